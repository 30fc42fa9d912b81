"""Files on disk: atomic writes, model folders (weights + config + metrics), safe loading.

Every file the system writes goes through ``atomic_write``: written under a temporary name in
the same folder, then renamed, so a reader or a crash never sees half a file. Weights are
loaded with ``weights_only=True``, so a hostile checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xkd_ray.core.models import StudentNet
from xkd_ray.errors import XKDCheckpointError


def stable_hash(payload: Any, length: int = 16) -> str:
    """Content hash of a JSON-able payload: the key of teacher checkpoints and caches."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_hash(path: Path, length: int = 16) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:length]


DURABLE = True  # fsync in atomic_write; bench/fsync_cost.py switches it off to measure its cost


def _fsync_file(path: str | Path) -> None:
    """Flush a file's content to the disk before it is renamed into place: without it, a power
    loss after the rename can leave the new name pointing at an empty or partial file."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_folder(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (the folder's entry is what a rename changes)."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# Upper bounds on what a reader loads into memory: a crafted file (or a symlink to /dev/zero)
# must fail at once with one line, not after exhausting memory.
MAX_JSON_BYTES = 16 << 20
MAX_TABLE_BYTES = 256 << 20
MAX_WEIGHTS_BYTES = 2 << 30


def read_regular_file(path: str | Path, limit: int) -> bytes:
    """The bytes of ``path``, refused with one line (``XKDCheckpointError``) unless it is a regular
    file, not a symbolic link (a registry file linked elsewhere would be read from outside the
    experiment), and at most ``limit`` bytes."""
    path = Path(path)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise XKDCheckpointError(f"{path}: file not found") from None
    except OSError as exc:  # ELOOP: the last component is a symbolic link
        if path.is_symlink():
            raise XKDCheckpointError(f"{path}: is a symbolic link; refusing to follow it") from None
        raise XKDCheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise XKDCheckpointError(f"{path}: is not a regular file")
    with os.fdopen(descriptor, "rb") as handle:
        if info.st_size > limit:
            raise XKDCheckpointError(f"{path}: {info.st_size} bytes, more than the {limit} a reader accepts")
        payload = handle.read(limit + 1)
    if len(payload) > limit:
        raise XKDCheckpointError(f"{path}: more than the {limit} bytes a reader accepts")
    return payload


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)``, then rename the result onto ``path`` (same folder, so the
    rename is atomic); on any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        if DURABLE:
            _fsync_file(temporary)
        os.replace(temporary, path)
        if DURABLE:
            _fsync_folder(path.parent)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def atomic_write_bytes(path: str | Path, payload: bytes) -> Path:
    return atomic_write(path, lambda temporary: temporary.write_bytes(payload))


def finite_or_none(payload: Any) -> Any:
    """``payload`` with every non-finite float replaced by None: JSON has no NaN, and a reader
    must be able to refuse NaN in a file as corruption (``read_json``) while "undefined" stays
    representable as null."""
    if isinstance(payload, float) and not math.isfinite(payload):
        return None
    if isinstance(payload, dict):
        return {key: finite_or_none(value) for key, value in payload.items()}
    if isinstance(payload, list | tuple):
        return [finite_or_none(value) for value in payload]
    return payload


def json_text(payload: Any) -> str:
    return json.dumps(finite_or_none(payload), indent=2, sort_keys=True, default=str, allow_nan=False)


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    text = json_text(payload)
    return atomic_write(path, lambda temporary: temporary.write_text(text))


def write_model_folder(
    directory: str | Path,
    model: nn.Module,
    config: dict[str, Any],
    metrics: dict[str, Any],
    files: dict[str, str] | None = None,
) -> Path:
    """Write model.pt + config.json + metrics.json (+ ``files``: name -> text, e.g. a student's
    preprocessing.json and card.md) into a staging folder, then rename it into place: readers only
    ever see a complete folder (a folder cannot be written atomically file by file, so the folder
    itself is the unit that is renamed)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, staging / "model.pt")
        (staging / "config.json").write_text(json_text(config))
        (staging / "metrics.json").write_text(json_text(metrics))
        for name, text in (files or {}).items():
            (staging / name).write_text(text)
        if DURABLE:
            for name in ("model.pt", "config.json", "metrics.json", *(files or {})):
                _fsync_file(staging / name)
            _fsync_folder(staging)
        if directory.exists():
            retired = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, retired)
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, directory)
        if DURABLE:
            _fsync_folder(directory.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights only: ``weights_only=True`` refuses pickled code, so a malicious file cannot run."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise XKDCheckpointError(f"{path}: checkpoint file not found")
    payload = read_regular_file(path, MAX_WEIGHTS_BYTES)
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or hostile files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise XKDCheckpointError(f"{path}: not a loadable weights file ({reason[:200]})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise XKDCheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return state


def load_weights_into(model: nn.Module, path: str | Path) -> nn.Module:
    state = load_state_dict_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise XKDCheckpointError(f"{path}: weights do not match the configured architecture ({first})") from exc
    return model


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def read_json(path: Path) -> Any:
    """A JSON file written by ``json_text``: NaN/Infinity are refused (we never write them, so
    they mean a foreign or corrupted file), as is anything that is not JSON."""
    try:
        return json.loads(read_regular_file(path, MAX_JSON_BYTES).decode(), parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise XKDCheckpointError(" ".join(f"{path}: not valid JSON ({exc})".split())) from exc


def read_json_mapping(path: Path) -> dict[str, Any]:
    payload = read_json(path)
    if not isinstance(payload, dict):
        raise XKDCheckpointError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    return payload


def load_student(directory: str | Path) -> tuple[StudentNet, dict[str, Any], dict[str, Any]]:
    """Rebuild a saved student from its folder (no Ray, no experiment code needed)."""
    directory = Path(directory)
    if directory.is_symlink():
        raise XKDCheckpointError(f"{directory}: is a symbolic link; refusing to follow it")
    if not directory.is_dir():
        raise XKDCheckpointError(f"{directory}: student folder not found")
    record = read_json_mapping(directory / "config.json")
    if not isinstance(record.get("architecture"), dict):
        raise XKDCheckpointError(f"{directory / 'config.json'}: no 'architecture' entry")
    try:
        model = StudentNet.from_architecture(record["architecture"])
    except XKDCheckpointError as exc:
        raise XKDCheckpointError(f"{directory / 'config.json'}: {exc}") from None
    student = load_weights_into(model, directory / "model.pt")
    metrics = (
        read_json_mapping(directory / "metrics.json")
        if (directory / "metrics.json").exists() or (directory / "metrics.json").is_symlink()
        else {}
    )
    return student.eval(), record, metrics
