"""The YAML every config and space file is read with, and ``--set key=value`` values.

PyYAML's safe loader with limits (size, nodes after aliases, depth, key types): a config file is
data from anywhere, so reading it must be bounded in time and memory and fail with one line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from xkd_ray.errors import XKDConfigError

MAX_YAML_BYTES = 1 << 20  # refused before parsing: a real config or space file is a few KB
MAX_YAML_NODES = 10_000  # after expanding aliases; a real config or space file has a few hundred
MAX_YAML_DEPTH = 100  # nesting; far below Python's recursion limit, far above any real file
_STR, _MERGE = "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"
# What a key that is not a string reads as, by the last part of its tag.
_KINDS = {"int": "an integer", "float": "a number", "bool": "true/false", "null": "null", "timestamp": "a date"}
_KINDS |= {"seq": "a list", "map": "a mapping"}
# YAML 1.2 floats with an exponent (1e-3, 5E-4, 2e5, .5e3). YAML 1.1 (PyYAML) wants a dot and a
# signed exponent, so ``lr: 1e-3`` was the string "1e-3", refused as "must be a number".
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")


class YAMLRefused(yaml.YAMLError):
    """Valid YAML that ``YAMLLoader`` refuses; the message starts with the path in the document."""


def _where(parts: list[str]) -> str:
    """``distill.lr``, ``space[0]``: the path of a node from its parents' keys and indexes (each
    cut to 40 characters and on one line, as a key may be any text)."""
    parts = [" ".join(part.split())[:40] for part in parts if part]  # the document itself has no name
    return "".join(p if p.startswith("[") or i == 0 else f".{p}" for i, p in enumerate(parts)) or "document"


class YAMLLoader(yaml.SafeLoader):
    """The safe loader with limits, used for every config and space file and every ``--set`` value.

    PyYAML expands nothing: an alias is the same node again, so ``a: &x [*x]`` is a list that
    contains itself (a RecursionError later, in whatever walks it) and nine lists of nine aliases
    are 9**9 strings to whoever walks them (minutes and gigabytes). Composing here refuses an
    alias inside its own anchor, more than ``MAX_YAML_NODES`` nodes once aliases are counted
    as copies, nesting deeper than ``MAX_YAML_DEPTH``, and mapping keys that are not strings or
    appear twice (PyYAML keeps the last one silently), each as one line naming the path.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._open: list[tuple[str | None, str]] = []  # (anchor, path part) of each node being composed
        self._sizes: dict[yaml.Node, int] = {}  # nodes with aliases expanded, per composed node

    def _refuse(self, part: str, problem: str) -> YAMLRefused:
        return YAMLRefused(f"{_where([*(p for _, p in self._open), part])}: {problem}")

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        """Compose as PyYAML does, counting each node's expanded size and checking its keys."""
        part = "" if parent is None else f"[{index}]" if isinstance(index, int) else "?"
        if isinstance(index, yaml.ScalarNode):  # a mapping's value: its key names it
            part = str(index.value)
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in (anchor for anchor, _ in self._open):
                raise self._refuse(part, f"alias *{event.anchor} is inside its own anchor (a recursive structure)")
            return super().compose_node(parent, index)  # a finished node: its size is known
        if len(self._open) >= MAX_YAML_DEPTH:
            raise self._refuse(part, f"nested deeper than {MAX_YAML_DEPTH} levels")
        self._open.append((event.anchor, part))
        node = super().compose_node(parent, index)
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            self._check_keys(node)
            children = [n for pair in node.value for n in pair]
        self._open.pop()
        size = 1 + sum(self._sizes[child] for child in children)  # children are finished: sizes known
        if size > MAX_YAML_NODES:
            raise self._refuse(part, f"more than {MAX_YAML_NODES} values once aliases are expanded")
        self._sizes[node] = size
        return node

    def _check_keys(self, node: yaml.MappingNode) -> None:
        """Every key a string (mixed key types break code that sorts keys: a TypeError), each once."""
        seen: dict[str, yaml.Node] = {}
        for key, _ in node.value:
            if key.tag == _MERGE:  # ``<<: *defaults``: merged keys may be overridden, as YAML says
                continue
            kind = _KINDS.get(key.tag.rpartition(":")[2], key.tag)
            if not isinstance(key, yaml.ScalarNode):
                raise self._refuse("?", f"keys must be strings; this one is {kind}")
            if key.tag != _STR:
                raise self._refuse(key.value, f"keys must be strings; this one reads as {kind} (quote it if a name)")
            if key.value in seen:
                lines = f"lines {seen[key.value].start_mark.line + 1} and {key.start_mark.line + 1}"
                raise self._refuse(key.value, f"key given twice ({lines}); give it once")
            seen[key.value] = key


YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` from the CLI, reading the value as YAML (the files' loader) so ``4`` is
    an int and ``1e-3`` a float, with the same limits as a file."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise XKDConfigError(f"--set {text!r}: expected key=value, e.g. distill.temperature=4")
    try:
        return key.strip(), yaml.load(value, Loader=YAMLLoader)  # a SafeLoader subclass
    except YAMLRefused as exc:
        raise XKDConfigError(f"--set {text!r}: value {exc}") from None
    except yaml.YAMLError as exc:
        raise XKDConfigError(" ".join(f"--set {text!r}: value is not valid YAML ({exc})".split())) from None


def parse_overrides(texts: list[str]) -> dict[str, Any]:
    """All ``--set key=value`` of one command; a key given twice is refused, not taken last,
    as a typo in a long command line would otherwise silently undo an earlier setting."""
    overrides: dict[str, Any] = {}
    first: dict[str, str] = {}
    for text in texts:
        key, value = parse_override(text)
        if key in overrides:
            raise XKDConfigError(f"--set {key}: given twice ({first[key]!r} and {text!r}); give it once")
        overrides[key], first[key] = value, text
    return overrides


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content, or a one-line error naming the file.

    The bytes are decoded as UTF-8 whatever the locale, so a file means the same on every machine."""
    if not path.is_file():
        raise XKDConfigError(f"{path}: {what} not found")
    try:
        with path.open("rb") as handle:
            payload = handle.read(MAX_YAML_BYTES + 1)
        if len(payload) > MAX_YAML_BYTES:
            raise XKDConfigError(f"{path}: larger than {MAX_YAML_BYTES} bytes; not a {what}")
        text = payload.decode("utf-8")
    except OSError as exc:
        raise XKDConfigError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        byte, line = f"0x{exc.object[exc.start]:02x}", exc.object.count(b"\n", 0, exc.start) + 1
        raise XKDConfigError(f"{path}: not UTF-8 text (byte {byte} at offset {exc.start}, line {line})") from None
    try:
        return yaml.load(text, Loader=YAMLLoader)  # a SafeLoader subclass
    except YAMLRefused as exc:
        raise XKDConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise XKDConfigError(" ".join(f"{path}: not valid YAML ({exc})".split())) from None
