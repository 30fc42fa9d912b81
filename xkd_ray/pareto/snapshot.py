"""Read-only local copies of a remote experiment's front, one per reader.

``xkd pareto s3://...`` and ``load_pareto_student("s3://...")`` read Parquet and model files,
which need local paths; each call copies the front into its own folder so that concurrent readers
of one URL never delete each other's copy. Pure pyarrow, no Ray.
"""

from __future__ import annotations

import atexit
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import pyarrow.fs as pafs

from xkd_ray.errors import XKDCheckpointError, XKDConfigError
from xkd_ray.pareto.storage import _classify, _local_root, _url_hash, open_storage

SNAPSHOT_ATTEMPTS = 5  # a writer replaces the front at most once per finished trial
_SNAPSHOTS_OF_THIS_PROCESS: list[Path] = []


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def _remove_snapshots_of_dead_processes(base: Path) -> None:
    """Snapshots are named ``<url hash>-<pid>-<random>``: each process deletes its own at exit
    (``atexit``); one left by a process that died without exiting is deleted here. A live
    process's snapshot is never touched, so concurrent readers of one URL cannot break each other."""
    for folder in base.glob("*-*-*"):
        pid = folder.name.split("-")[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _remove_own_snapshots() -> None:
    for folder in _SNAPSHOTS_OF_THIS_PROCESS:
        shutil.rmtree(folder, ignore_errors=True)


atexit.register(_remove_own_snapshots)


def registry_snapshot(url: str, environ: Mapping[str, str] | None = None) -> Path:
    """A local copy of a remote experiment's front (``summary.json``, ``experiment.json``,
    ``pareto/``), for ``load_pareto_student("s3://...")`` and ``xkd pareto``: read-only use,
    no write permission needed. Each call takes its own copy (kept until the process exits: the
    caller may still read files from it); a copy that raced a writer deleting a retired student
    is retaken. A missing bucket or an empty prefix is one line naming the URL."""
    environ = os.environ if environ is None else environ
    storage = open_storage(url, environ, check=False)
    base = _local_root(environ) / "snapshots"
    _remove_snapshots_of_dead_processes(base)
    target = base / f"{_url_hash(storage.url)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _SNAPSHOTS_OF_THIS_PROCESS.append(target)
    for attempt in range(SNAPSHOT_ATTEMPTS):
        shutil.rmtree(target, ignore_errors=True)
        try:
            bucket = storage.root.split("/", 1)[0]
            if storage.filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise XKDConfigError(f"{storage.url}: the bucket {bucket!r} does not exist")
            for name in ("summary.json", "experiment.json"):
                if storage.exists(name):
                    storage.download_file(name, target / name)
            storage.download(target / "pareto", "pareto")
        except FileNotFoundError:
            if attempt + 1 == SNAPSHOT_ATTEMPTS:
                raise XKDCheckpointError(f"{storage.url}: the front kept changing while it was copied") from None
            continue
        except OSError as exc:
            raise _classify(url, exc, environ, what="") from None
        break
    target.mkdir(parents=True, exist_ok=True)
    if not (target / "pareto" / "front.parquet").exists():
        raise XKDCheckpointError(f"{storage.url}: no Pareto front yet (has any trial finished?)")
    return target
