"""Where an experiment lives: a (shared) local folder, or object storage at ``s3://bucket/prefix``.

Object storage goes through ``pyarrow.fs.S3FileSystem``, the filesystem Ray Tune and Ray Train
already use for their own ``storage_path``, so one object (pickled to every node) serves Tune's
state, Train's checkpoints and our registry. Endpoint and credentials come from the standard AWS
environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``): the same command runs against AWS S3, MinIO or a local test server.
pyarrow itself does not read ``AWS_ENDPOINT_URL`` (checked with pyarrow 26), hence ``s3_filesystem``.

A search on object storage works in a local *staging* folder (the registry's files are small and
rewritten per trial: Parquet needs a seekable file and ``flock`` needs a local one) and uploads each
file after it changes; Tune and Train write to the bucket directly. Pure pyarrow, no Ray.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from xkd_ray.errors import XKDCheckpointError, XKDConfigError

SCHEME = "s3://"
# Files Tune and Train keep in the bucket themselves: never mirrored to the staging folder.
RAY_OWNED = ("tune", "train")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")  # S3's bucket naming rule


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether ``--out`` names object storage rather than a folder."""
    return str(location).startswith(SCHEME)


_FINALIZE_REGISTERED: list[bool] = []


def _finalize_at_exit() -> None:
    """Shut pyarrow's S3 subsystem down before the interpreter does: left to the C++ static
    destructors it can abort the process (SIGABRT, "terminate called without an active exception")
    after a command has already printed its result."""
    if not _FINALIZE_REGISTERED:
        atexit.register(pafs.finalize_s3)
        _FINALIZE_REGISTERED.append(True)


def s3_filesystem(environ: Mapping[str, str] | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem for the endpoint and region in the standard AWS variables; credentials come
    from the AWS SDK's own chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ~/.aws, an instance
    role), never passed in, so no key is pickled with the filesystem into Ray's state on storage.
    Short timeouts and 2 attempts: a wrong endpoint fails in seconds, not after minutes of retries."""
    environ = os.environ if environ is None else environ
    _finalize_at_exit()
    options: dict[str, object] = {
        "connect_timeout": 5,
        "request_timeout": 30,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2),
    }
    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        options["endpoint_override"] = host.rstrip("/")
        options["scheme"] = scheme or "https"
    if environ.get("AWS_DEFAULT_REGION") or environ.get("AWS_REGION"):
        options["region"] = environ.get("AWS_DEFAULT_REGION") or environ.get("AWS_REGION")
    return pafs.S3FileSystem(**options)


def experiment_location(text: str) -> Path | str:
    """A command-line experiment location: a folder, or an ``s3://`` URL kept as text (``Path``
    would fold its ``//``)."""
    return text if is_remote(text) else Path(text)


@dataclass(frozen=True)
class Storage:
    """An experiment's storage: ``url`` as the user gave it (normalised), ``filesystem`` and
    ``root`` (the path inside it: ``bucket/prefix``). Picklable, so trial drivers on any node
    write through the same object."""

    url: str
    filesystem: pafs.FileSystem
    root: str

    def path(self, *parts: str) -> str:
        """A path inside the filesystem (``bucket/prefix/parts...``)."""
        return "/".join([self.root, *(p.strip("/") for p in parts if p)])

    def url_of(self, *parts: str) -> str:
        return "/".join([self.url, *(p.strip("/") for p in parts if p)])

    def exists(self, *parts: str) -> bool:
        return self.filesystem.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def files(self, *parts: str) -> list[str]:
        """Every file under ``parts``, relative to the experiment root, sorted."""
        base = self.path(*parts)
        if self.filesystem.get_file_info(base).type == pafs.FileType.NotFound:
            return []
        found = self.filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
        prefix = self.root + "/"
        return sorted(info.path.removeprefix(prefix) for info in found if info.type == pafs.FileType.File)

    def read_bytes(self, *parts: str) -> bytes:
        with self.filesystem.open_input_stream(self.path(*parts)) as stream:
            return stream.read()

    def upload(self, local: Path, *parts: str) -> None:
        """Copy a local file or folder to ``parts`` (each object written whole: S3 has no partial objects)."""
        pafs.copy_files(str(local), self.path(*parts), pafs.LocalFileSystem(), self.filesystem)

    def download(self, local: Path, *parts: str, skip: Iterable[str] = ()) -> list[str]:
        """Copy every file under the folder ``parts`` into the local folder ``local``; returns the
        paths copied (relative to ``parts``). ``skip``: top-level names left out. Every key is
        checked before anything is written: one that would land outside ``local`` is refused."""
        base, skipped = "/".join(p.strip("/") for p in parts if p), set(skip)
        planned = []
        for relative in self.files(*parts):
            inside = relative.removeprefix(base).lstrip("/")
            if inside.split("/", 1)[0] not in skipped:
                planned.append((relative, confined(local, inside, self.url_of(relative))))
        for relative, destination in planned:
            self.download_file(relative, destination)
        return [destination.relative_to(local).as_posix() for _, destination in planned]

    def download_file(self, relative: str, destination: Path) -> None:
        """One object to a local file: written under a temporary name, then renamed into place."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
        with self.filesystem.open_input_stream(self.path(relative)) as source, partial.open("wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
        os.replace(partial, destination)

    def delete(self, *parts: str) -> None:
        info = self.filesystem.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.filesystem.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.filesystem.delete_file(info.path)


def confined(local: Path, relative: str, name: str) -> Path:
    """``local / relative`` for a key read from storage, refused (naming it) when the key is empty,
    absolute or has a ``.``/``..`` part: a crafted object name must never write outside ``local``."""
    parts = relative.split("/")
    if not relative or relative.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\0" in relative:
        raise XKDCheckpointError(f"{name}: object key {relative!r} leaves its folder; refusing to copy it")
    return local.joinpath(*parts)


def _reason(exc: BaseException) -> str:
    """pyarrow's S3 errors, shortened to the part a person acts on."""
    text = str(exc).replace("\n", " ")
    for marker in ("Details:", "operation:"):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text.strip()[:200]


_REFUSED_CREDENTIALS = (
    "ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "INVALID_ACCESS_KEY_ID", "SignatureDoesNotMatch",
    "SIGNATURE_DOES_NOT_MATCH", "Forbidden", "403",
)  # fmt: skip


def _classify(url: str, exc: OSError, environ: Mapping[str, str], what: str = "--out ") -> XKDConfigError:
    text = str(exc)
    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    if "NETWORK_CONNECTION" in text or "curlCode" in text or "Could not resolve" in text:
        return XKDConfigError(f"{what}{url}: cannot reach the S3 endpoint {endpoint} ({_reason(exc)})")
    if any(word in text for word in _REFUSED_CREDENTIALS):
        return XKDConfigError(
            f"{what}{url}: the S3 endpoint {endpoint} refused the credentials "
            f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): {_reason(exc)}"
        )
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return XKDConfigError(f"{what}{url}: the bucket does not exist on {endpoint}")
    return XKDConfigError(f"{what}{url}: S3 error: {_reason(exc)}")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix); refuses what S3 would refuse later, naming it."""
    rest = url[len(SCHEME) :].strip("/")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise XKDConfigError(f"--out {url}: {bucket!r} is not a valid S3 bucket name")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise XKDConfigError(f"--out {url}: the prefix {prefix!r} has an empty, '.' or '..' part")
    if not prefix:
        raise XKDConfigError(f"--out {url}: give a prefix inside the bucket (s3://{bucket}/NAME)")
    return bucket, prefix


def open_storage(url: str, environ: Mapping[str, str] | None = None, *, check: bool = True) -> Storage:
    """The storage for ``--out``. With ``check``: the endpoint answers, accepts the credentials,
    the bucket exists and a probe object can be written and deleted (so a wrong URL fails before
    any trial, with one line)."""
    environ = os.environ if environ is None else environ
    bucket, prefix = parse_s3_url(url)
    storage = Storage(url=f"{SCHEME}{bucket}/{prefix}", filesystem=s3_filesystem(environ), root=f"{bucket}/{prefix}")
    if not check:
        return storage
    try:
        if storage.filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise XKDConfigError(f"--out {url}: the bucket {bucket!r} does not exist")
        probe = f".write-probe-{uuid.uuid4().hex}"
        with storage.filesystem.open_output_stream(storage.path(probe)) as stream:
            stream.write(b"xkd")
        storage.filesystem.delete_file(storage.path(probe))
    except OSError as exc:
        raise _classify(url, exc, environ) from None
    return storage


def _local_root(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "xkd-ray"


def _url_hash(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def staging_folder(url: str, environ: Mapping[str, str] | None = None) -> Path:
    """The local working copy of a remote experiment's registry, one per URL and user
    (``$XDG_CACHE_HOME/xkd-ray/staging/<hash>``, or ``$XKD_STAGING_DIR/<hash>``)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XKD_STAGING_DIR") or _local_root(environ) / "staging"
    return Path(base) / _url_hash(url)


# The registry's files (xkd_ray.pareto.front), uploaded in this order after every finished trial: a
# front student's folder before the table that names it, the table before the summary.
REGISTRY_FILES = ("trials.parquet", "optuna.journal", "experiment.json")


def upload_registry(storage: Storage, experiment: Path) -> None:
    """Mirror the staging folder's registry to storage; front students that left the front are
    deleted there after the new ``front.parquet`` is up (a reader of the old table may still load them)."""
    pareto = experiment / "pareto"
    children = list(pareto.iterdir()) if pareto.is_dir() else []
    local = {child.name for child in children if child.is_dir() and not child.name.startswith(".")}
    remote = {path.split("/")[1] for path in storage.files("pareto") if path.count("/") >= 2}
    for name in sorted(local - remote):
        storage.upload(pareto / name, "pareto", name)
    for name in ("front.parquet", "front.png"):
        if (pareto / name).exists():
            storage.upload(pareto / name, "pareto", name)
    for name in ("summary.json", *REGISTRY_FILES):
        if (experiment / name).exists():
            storage.upload(experiment / name, name)
    for name in sorted(remote - local):
        storage.delete("pareto", name)


def download_experiment(storage: Storage, staging: Path) -> None:
    """Replace the staging folder's content (its lock file kept) with the experiment's files on
    storage, except Tune's and Train's own folders."""
    for child in staging.iterdir():
        if child.name == ".lock":
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    storage.download(staging, skip=RAY_OWNED)


def pull_cache(storage: Storage, cache_dir: Path) -> list[str]:
    """Fetch the experiment's teacher and explanation cache (``<out>/cache``) files the local
    cache lacks, so a resumed search or another machine reuses them instead of recomputing."""
    targets = [(p, confined(cache_dir, p.removeprefix("cache/"), storage.url_of(p))) for p in storage.files("cache")]
    missing = [(p, target) for p, target in targets if not target.exists()]
    for path, target in missing:
        storage.download_file(path, target)
    return [path for path, _ in missing]


def push_cache(storage: Storage, cache_dir: Path, paths: Iterable[Path]) -> list[str]:
    """Upload this experiment's cache files (files or folders inside ``cache_dir``) that storage lacks."""
    remote = set(storage.files("cache"))
    pushed = []
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            relative = file.resolve().relative_to(cache_dir.resolve()).as_posix()
            if f"cache/{relative}" not in remote:
                storage.upload(file, "cache", relative)
                pushed.append(relative)
    return pushed
