"""An experiment folder knows what it is: which search it holds, who made it, who is using it.

``experiment.json`` (the manifest, written when a search first starts in the folder) records the
resolved search space (and a hash of it), the code version, the creating user and host, and an
HMAC signed with a per-user key (``$XDG_CONFIG_HOME/xkd-ray/folder.key``, created 0600 on first
use). It guards three things:

- ``--resume`` with a different space or base config is refused, naming the differing keys,
  unless ``--allow-space-change`` is given (the change is then appended to the manifest);
- a second live search on the same folder is refused: ``.lock`` is held with ``fcntl.flock`` for
  the search's lifetime, so the OS releases it when the holder dies, SIGKILL included (on a
  network filesystem flock is only as good as the server's lock support: NFSv4 and Lustre
  provide it, some FUSE mounts do not);
- Ray Tune's resume state (``tune/tuner.pkl``, the experiment state) is a pickle, so resuming
  runs code from the folder. ``--resume`` is refused unless the manifest verifies with this user's
  key (the folder was created by this user on this installation) and no file under ``tune/`` is
  writable by other users; ``--trust-folder`` overrides both, for a folder copied in on purpose.
  On object storage (``s3://``) file owners mean nothing, so the search *seals* Tune's state when
  it stops (``tune.seal.json``: the SHA-256 of every file under ``tune/`` that Tune reads on
  restore, signed with the same key) and ``--resume`` refuses a state that differs from its seal.

Pure stdlib and no Ray: the checks run before Ray starts, so a refused command writes nothing.
"""

from __future__ import annotations

import dataclasses
import fcntl
import getpass
import hashlib
import hmac
import json
import os
import secrets
import socket
import stat
import time
from pathlib import Path
from typing import IO, Any

from xkd_ray.config.space import SearchSpec
from xkd_ray.core.checkpoints import atomic_write_json, read_json_mapping
from xkd_ray.errors import XKDCheckpointError, XKDConfigError
from xkd_ray.pareto.storage import Storage

MANIFEST = "experiment.json"
LOCK = ".lock"


def spec_record(spec: SearchSpec) -> dict[str, Any]:
    """The resolved search as plain JSON: what two runs must agree on to share a folder."""
    record = {
        "base": spec.base.to_dict(),
        "space": {name: dataclasses.asdict(p) for name, p in sorted(spec.parameters.items())},
        "search": json.loads(spec.search.model_dump_json()),
    }
    return json.loads(json.dumps(record, default=str))  # tuples -> lists, as read back from the file


def _flatten(payload: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(payload, dict):
        items: dict[str, Any] = {}
        for key, value in payload.items():
            items.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return items
    return {prefix: payload}


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    flat_old, flat_new = _flatten(old), _flatten(new)
    return sorted(key for key in flat_old.keys() | flat_new.keys() if flat_old.get(key) != flat_new.get(key))


def _key_file() -> Path:
    home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(home) / "xkd-ray" / "folder.key"


def _user_key() -> bytes:
    """This user's signing key, created on first use (readable by this user alone)."""
    path = _key_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    return path.read_bytes()


def _signature(manifest: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in manifest.items() if k != "signature"}, sort_keys=True)
    return hmac.new(_user_key(), body.encode(), hashlib.sha256).hexdigest()


def _version() -> str:
    from xkd_ray import __version__

    return __version__


def new_manifest(spec: SearchSpec) -> dict[str, Any]:
    record = spec_record(spec)
    manifest = {
        "format": 1,
        "spec": record,
        "spec_hash": hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16],
        "xkd_ray_version": _version(),
        "created_by": {"user": getpass.getuser(), "uid": os.getuid(), "host": socket.gethostname()},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "space_changes": [],
    }
    return {**manifest, "signature": _signature(manifest)}


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    manifest = read_json_mapping(path)
    if not isinstance(manifest.get("spec"), dict) or not isinstance(manifest.get("signature"), str):
        raise XKDCheckpointError(f"{path}: not an experiment manifest (no 'spec' or 'signature')")
    return manifest


def _foreign_writable(folder: Path) -> Path | None:
    """A file or folder under ``folder`` that another user may write (or owns), if any."""
    if not folder.exists():
        return None
    for path in [folder, *folder.rglob("*")]:
        info = path.lstat()
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return path
    return None


def check_trusted(out: Path, manifest: dict[str, Any], label: str | None = None) -> None:
    """Refuse to unpickle Ray's resume state from a folder this user did not create."""
    where = label or out
    flag = "pass --trust-folder if you trust its origin"
    if not hmac.compare_digest(manifest["signature"], _signature(manifest)):
        raise XKDConfigError(
            f"--resume {where}: {MANIFEST} was not written by this user on this installation (or was edited); "
            f"resuming unpickles {where}/tune/, so {flag}"
        )
    exposed = _foreign_writable(out / "tune")
    if exposed is not None:
        raise XKDConfigError(f"--resume {where}: {exposed} is owned or writable by another user; {flag}")


def open_experiment(
    out: Path, spec: SearchSpec, *, resume: bool, allow_space_change: bool, trust: bool, label: str | None = None
) -> None:
    """Check (and on first use, create) the folder's manifest before any trial runs. ``label``: how
    errors name the experiment (an ``s3://`` URL whose staging folder ``out`` is)."""
    where = label or out
    manifest = read_manifest(out)
    if manifest is None:
        if resume and (out / "tune").exists():
            raise XKDConfigError(f"--resume {where}: no {MANIFEST}, so nothing says which search this folder holds")
        atomic_write_json(out / MANIFEST, new_manifest(spec))
        return
    if not resume:
        problem = "already holds a search; pass --resume to continue it, or use another folder"
        raise XKDConfigError(f"--out {where}: {problem}")
    if not trust:
        check_trusted(out, manifest, label)
    record = spec_record(spec)
    changed = differing_keys(manifest["spec"], record)
    if changed and not allow_space_change:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise XKDConfigError(
            f"--resume {where}: the space differs from the one this search started with ({shown}); "
            "pass --allow-space-change to continue anyway (recorded in experiment.json)"
        )
    if changed:
        change = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "keys": changed, "spec": record}
        updated = {**manifest, "spec": record, "space_changes": [*manifest.get("space_changes", []), change]}
        updated.pop("signature")
        atomic_write_json(out / MANIFEST, {**updated, "signature": _signature(updated)})


TUNE_SEAL = "tune.seal.json"


def _tune_state(storage: Storage) -> dict[str, str]:
    """SHA-256 of every object under ``tune/`` Tune may read on restore (its pickles and JSON
    state); trial checkpoints (``checkpoint_*`` folders) are weights read with ``weights_only``."""
    digests = {}
    for path in storage.files("tune"):
        if not any(part.startswith("checkpoint_") for part in path.split("/")):
            digests[path] = hashlib.sha256(storage.read_bytes(path)).hexdigest()
    return digests


def seal_tune_state(storage: Storage, staging: Path) -> None:
    """Sign what Tune left on storage, once it has stopped writing (after ``Tuner.fit``)."""
    seal = {"format": 1, "files": _tune_state(storage)}
    atomic_write_json(staging / TUNE_SEAL, {**seal, "signature": _signature(seal)})
    storage.upload(staging / TUNE_SEAL, TUNE_SEAL)


def check_tune_seal(storage: Storage, staging: Path) -> None:
    """Before ``--resume`` on object storage: Tune's state must be exactly what this user's last
    search sealed (a search killed before it could seal needs ``--trust-folder``)."""
    flag = "resuming unpickles it, so pass --trust-folder if you trust its origin"
    state = _tune_state(storage)
    if not state:
        return
    path = staging / TUNE_SEAL
    if not path.exists():
        first = sorted(state)[0]
        raise XKDConfigError(f"--resume {storage.url}: {first} is not sealed by this user's search; {flag}")
    seal = read_json_mapping(path)
    signature = seal.pop("signature", "")
    if not isinstance(signature, str) or not hmac.compare_digest(signature, _signature(seal)):
        raise XKDConfigError(f"--resume {storage.url}: {TUNE_SEAL} was not signed by this user; {flag}")
    sealed = seal.get("files") if isinstance(seal.get("files"), dict) else {}
    changed = sorted(name for name in state.keys() | sealed.keys() if state.get(name) != sealed.get(name))
    if changed:
        raise XKDConfigError(
            f"--resume {storage.url}: {changed[0]} changed since this user's search sealed Tune's state "
            f"({len(changed)} file(s) differ; a search killed before it stopped cannot seal); {flag}"
        )


class FolderLock:
    """An exclusive ``flock`` on ``<out>/.lock`` for the lifetime of a search; the file names the
    holder (host, pid, start time) so the refusal can say who is using the folder."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK
        self._handle: IO[str] | None = None

    def acquire(self) -> FolderLock:
        handle = open(self.path, "a+")  # held open for the search's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise XKDConfigError(f"--out {self.path.parent}: in use by a running search ({holder})") from None
        self._handle = handle
        return self

    def claim(self) -> None:
        """Name this process as the holder; called once the folder's checks passed, so a refused
        command leaves the file as it found it."""
        assert self._handle is not None, "claim() needs the lock"
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(
            f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        self._handle.flush()

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
