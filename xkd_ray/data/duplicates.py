"""Byte-identical images in an image folder: refused across splits (``data.duplicates: refuse``, the
default) or reduced to one copy each before the splits are made (``data.duplicates: drop``).

Files are compared by the sha256 of their bytes, and only files whose byte size occurs more than
once are read, so a clean tree costs one ``stat`` per file.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from pathlib import Path

from xkd_ray.errors import XKDDataError

logger = logging.getLogger(__name__)

Samples = list[tuple[str, int]]  # (path, label) in ImageFolder order


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def refuse_duplicates(root: Path, paths: dict[str, list[str]]) -> None:
    """An image in two splits inflates the held-out score without anyone noticing: a test image
    that is also a train image, or a file copied twice inside ``train/`` whose copies the val
    carve put on both sides (the search ranks students on val).

    Compared by sha256 of the file bytes, not of decoded pixels: it runs before any decoding (a
    bad folder fails in seconds) and, as only files whose byte size occurs in two splits can
    match, reads just those. It catches copies, hard links and re-downloads; a re-encoded copy
    (same pixels, other bytes) is not caught.
    """
    size = {path: os.path.getsize(path) for files in paths.values() for path in files}
    splits_of_size: dict[int, set[str]] = {}
    for name, files in paths.items():
        for path in files:
            splits_of_size.setdefault(size[path], set()).add(name)
    first_of: dict[str, tuple[str, str]] = {}  # digest -> (split, path) where it was first seen
    pairs: dict[str, list[tuple[str, str]]] = {}
    for name, files in paths.items():  # train, val, test: a pair is (later split's file, earlier one)
        for path in files:
            if len(splits_of_size[size[path]]) < 2:
                continue
            seen = first_of.setdefault(_sha256(path), (name, path))
            if seen[0] != name:
                pairs.setdefault(name, []).append((path, seen[1]))
    for name, found in sorted(pairs.items(), key=lambda item: item[0] != "test"):
        count = f"{len(found)} {name} image{'s are' if len(found) > 1 else ' is'}"
        example = f"(e.g. {found[0][0]} = {found[0][1]})"
        if name == "test":
            raise XKDDataError(
                f"{root}: {count} byte-identical to train/ images {example}; delete the copies from one "
                "folder so test scores stay honest"
            )
        raise XKDDataError(
            f"{root}: {count} (carved from train/) byte-identical to train images {example}; delete the "
            "duplicates inside train/ so val scores stay honest"
        )


def drop_duplicates(root: Path, train: Samples, test: Samples) -> tuple[Samples, Samples, str]:
    """``data.duplicates: drop``: keep one copy of each group of byte-identical files, before the
    val split is carved out of ``train/``, so no image can be in two splits.

    A group inside one folder keeps its first copy in sorted path order. A group with a copy in
    ``test/`` keeps its first ``test/`` copy and loses every ``train/`` copy: the test split stays as
    the user gave it (less its own repeats) and never scores an image the students trained on.
    Returns the kept samples of both folders (their order unchanged) and a one-line report, also
    logged as a warning; it is empty when nothing was dropped."""
    folders = {"train": train, "test": test}
    size = {path: os.path.getsize(path) for samples in folders.values() for path, _ in samples}
    repeated = Counter(size.values())
    groups: dict[str, list[tuple[str, str]]] = {}
    for name, samples in folders.items():
        for path, _ in samples:
            if repeated[size[path]] > 1:
                groups.setdefault(_sha256(path), []).append((name, path))
    dropped: dict[str, str] = {}  # path -> why
    count = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        count += 1
        in_test = sorted(path for name, path in members if name == "test")
        keep = in_test[0] if in_test else min(path for _, path in members)
        for name, path in members:
            if path != keep:
                dropped[path] = f"{name}/" if name == "train" and not in_test else f"{name}/ of test"
    if not dropped:
        return train, test, ""
    kept = {name: [item for item in samples if item[0] not in dropped] for name, samples in folders.items()}
    reasons = Counter(dropped.values())
    parts = [
        f"{reasons['train/']} inside train/" if reasons["train/"] else "",
        f"{reasons['test/ of test']} inside test/" if reasons["test/ of test"] else "",
        f"{reasons['train/ of test']} train/ copies of test/ images" if reasons["train/ of test"] else "",
    ]
    report = (
        f"{root}: data.duplicates=drop: dropped {len(dropped)} byte-identical file{'s' if len(dropped) > 1 else ''} "
        f"({', '.join(part for part in parts if part)}), keeping one copy of each of {count} group"
        f"{'s' if count > 1 else ''}"
    )
    logger.warning("%s", report)
    return kept["train"], kept["test"], report
