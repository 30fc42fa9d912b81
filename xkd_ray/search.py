"""The search job: ``python xkd_ray/search.py --space SPACE --out DIR`` (also ``xkd search``).

This is the script ``ray submit cluster/cluster.yaml xkd_ray/search.py -- ARGS`` and
``ray job submit -- python xkd_ray/search.py ARGS`` run on a cluster. Everything that can be
checked without Ray (the space file, the output folder) is checked before Ray starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a file: put the repo root (not xkd_ray/) on the path so module names such as
    # `tune` or `data` cannot shadow installed packages.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import contextlib
import os
import signal
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from xkd_ray.config.space import SAMPLERS, SearchSpec, load_search_space
from xkd_ray.data.streaming import check_stream_search
from xkd_ray.errors import XKDConfigError, XKDError
from xkd_ray.pareto.storage import experiment_location, is_remote

console = Console()


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", type=Path, required=True, help="search space YAML (see search_spaces/)")
    parser.add_argument(
        "--out",
        type=experiment_location,
        required=True,
        help="experiment folder (shared storage on a cluster) or s3://bucket/prefix (AWS_* variables)",
    )
    parser.add_argument("--trials", type=int, help="override search.trials")
    parser.add_argument("--workers-per-trial", type=int, help="override search.workers_per_trial")
    parser.add_argument("--sampler", choices=SAMPLERS, help="override search.sampler")
    parser.add_argument("--seed", type=int, help="override search.seed")
    parser.add_argument("--gpu", action="store_true", help="train each trial's workers on GPUs")
    parser.add_argument("--address", help="Ray cluster address ('auto' inside a cluster); default: start locally")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    parser.add_argument(
        "--allow-space-change",
        action="store_true",
        help="with --resume: continue although the space differs (recorded in experiment.json)",
    )
    parser.add_argument(
        "--trust-folder",
        action="store_true",
        help="with --resume: resume a folder made by another user or installation (Ray's resume state is a pickle)",
    )
    parser.add_argument("--no-live", action="store_true", help="no live table (logs only)")


def check_experiment_folder(out: Path) -> None:
    """Fail before any trial runs when the experiment folder cannot be written (permissions,
    full disk), instead of losing the first finished trial; a refused folder is left as found."""
    created = [folder for folder in (out, *out.parents) if not folder.exists()]
    probe = out / f".write-probe-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 65536)
    except OSError as exc:
        with contextlib.suppress(OSError):  # a read-only filesystem refuses even this
            probe.unlink(missing_ok=True)
        for folder in created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise XKDConfigError(f"--out {out}: cannot write the experiment folder ({exc.strerror or exc})") from None
    probe.unlink()


def spec_from_args(args: argparse.Namespace) -> SearchSpec:
    overrides: dict[str, Any] = {}
    for name in ("trials", "workers_per_trial", "sampler", "seed"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    return load_search_space(args.space, overrides, base_overrides={"ray.use_gpu": True} if args.gpu else None)


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: the search stopped early (Ray Tune saved its state)."""


def _on_sigterm(number: int, frame: Any) -> None:
    """SIGTERM (``kill``, ``ray job stop``) ends the search like Ctrl-C: Ray Tune handles SIGINT
    by stopping trials and saving its state, so pass it on as SIGINT."""
    _signals_received.append(number)
    os.kill(os.getpid(), signal.SIGINT)


_signals_received: list[int] = []


def exit_code_for_interrupt() -> int:
    """128 + the signal number, as a shell reports a process ended by that signal."""
    return 128 + (_signals_received[-1] if _signals_received else signal.SIGINT)


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    check_stream_search(spec, remote=is_remote(args.out))  # before any folder is made or Ray started
    if is_remote(args.out):
        return _run_on_object_storage(args, spec)
    check_experiment_folder(args.out)
    from xkd_ray.pareto.experiment_folder import FolderLock, open_experiment

    with FolderLock(args.out) as lock:
        open_experiment(
            args.out, spec, resume=args.resume, allow_space_change=args.allow_space_change, trust=args.trust_folder
        )
        lock.claim()
        return _search(args, spec, args.out)


def _run_on_object_storage(args: argparse.Namespace, spec: SearchSpec) -> int:
    """``--out s3://...``: the same checks and search, in a local staging copy of the registry
    (xkd_ray.pareto.storage) that is mirrored to storage; Tune and Train write to storage directly. The
    lock is the staging folder's, so it guards one machine: run one search per prefix."""
    from xkd_ray.pareto.experiment_folder import MANIFEST, FolderLock, check_tune_seal, open_experiment
    from xkd_ray.pareto.storage import RAY_OWNED, download_experiment, open_storage, staging_folder

    storage = open_storage(args.out)
    found = storage.files()
    if found and MANIFEST not in found:
        raise XKDConfigError(
            f"--out {storage.url}: holds {len(found)} files that are not an xkd search (no {MANIFEST}), "
            f"e.g. {found[0]}; choose another prefix"
        )
    staging = staging_folder(storage.url)
    check_experiment_folder(staging)
    with FolderLock(staging) as lock:
        download_experiment(storage, staging)
        if not (staging / MANIFEST).exists() and any(p.split("/", 1)[0] in RAY_OWNED for p in found):
            raise XKDConfigError(f"--out {storage.url}: has Ray state but no {MANIFEST}; choose another prefix")
        open_experiment(
            staging,
            spec,
            resume=args.resume,
            allow_space_change=args.allow_space_change,
            trust=args.trust_folder,
            label=storage.url,
        )
        if args.resume and not args.trust_folder:
            check_tune_seal(storage, staging)
        lock.claim()
        storage.upload(staging / MANIFEST, MANIFEST)
        return _search(args, spec, staging, storage)


def _search(args: argparse.Namespace, spec: SearchSpec, out: Path, storage: Any = None) -> int:
    from xkd_ray.cluster.ray_run import ensure_ray
    from xkd_ray.cluster.ray_search import run_search
    from xkd_ray.pareto.display import front_table
    from xkd_ray.pareto.front import (
        list_pareto_students,
        load_pareto_student,
        read_objectives,
        read_trials,
        write_front_plot,
    )

    ensure_ray(args.address)
    # After ray.init, which installs its own SIGTERM handler (exit 1, no Tune state saved).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    log_progress()
    live = not args.no_live and sys.stdout.isatty()  # a log file gets plain progress lines instead
    summary = run_search(spec, out, resume=args.resume, live=live, storage=storage)
    finished = len(read_trials(out))
    if finished < spec.search.trials:
        # Tune returns normally after SIGINT; only the count of recorded trials tells.
        raise Interrupted(f"interrupted after {finished} of {spec.search.trials} trials; resume with --resume")
    front = list_pareto_students(out)
    write_front_plot(out, out / "pareto" / "front.png")
    if storage is not None:
        from xkd_ray.pareto.storage import upload_registry

        upload_registry(storage, out)
    title = f"Pareto front ({summary.get('front_size', 0)} students)"
    console.print(front_table(front.to_pylist(), title, read_objectives(out).names))
    statuses = Counter(row["status"] for row in read_trials(out))
    console.print(
        f"hypervolume {summary.get('hypervolume', 0):.4f} over {summary.get('trials', 0)} trials "
        f"({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}) in {summary['wall_seconds']:.0f} s"
    )
    reference = summary.get("reference_config")
    if reference:
        ratio = reference["hv_vs_reference"]
        console.print(
            f"reference config (trial {reference['trial_id']}, trained as `xkd distill` would): "
            f"{'dominated by' if reference['dominated_by_front'] else 'not dominated by'} the front; "
            f"front hypervolume / reference's = {'-' if ratio is None else f'{ratio:.3f}'}"
        )
        for difference in reference.get("trains_differently", []):
            console.print(f"  the reference differs from the space's base in {difference}")
    if front.num_rows == 0:
        raise XKDError(f"{out}: no trial finished ok, so the Pareto front is empty; see trials.parquet")
    knee = load_pareto_student(out, prefer="knee").path
    console.print(f"knee student: {knee if storage is None else storage.url_of(knee.relative_to(out).as_posix())}")
    return 0


def log_progress() -> None:
    """The search's own log lines (xkd_ray.cluster.progress_callbacks.ProgressLogCallback) on stderr,
    one plain line each, so a redirected log or ``ray job logs`` shows progress."""
    import logging

    package = logging.getLogger("xkd_ray")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s xkd: %(message)s", "%H:%M:%S"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xkd search", description=__doc__.splitlines()[0])
    add_search_arguments(parser)
    args = parser.parse_args(argv)
    return run_reporting_errors(args)


def run_reporting_errors(args: argparse.Namespace) -> int:
    """``run`` with its outcome as an exit code: 2 for a user error, 128 + signal when stopped."""
    try:
        return run(args)
    except XKDError as exc:
        print(f"xkd: error: {exc}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as exc:
        print(f"xkd: {exc or 'interrupted before any trial finished; resume with --resume'}", file=sys.stderr)
        return exit_code_for_interrupt()


if __name__ == "__main__":
    sys.exit(main())
