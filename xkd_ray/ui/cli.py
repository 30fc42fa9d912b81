"""The ``xkd`` command: train a teacher, distill one student, search, inspect Pareto fronts, use a student.

Every user error is an ``XKDError``: it is printed as one line naming the field or file and
the command exits with status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from xkd_ray.config.methods import METHODS
from xkd_ray.config.registries import DATASETS
from xkd_ray.config.schema import ExperimentConfig, load_config
from xkd_ray.config.yaml_loader import parse_overrides
from xkd_ray.errors import XKDConfigError, XKDError
from xkd_ray.pareto.display import items_table, metrics_table

console = Console()


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="experiment YAML (sections: data, teacher, explain, ...)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set distill.temperature=4 (repeatable)",
    )
    parser.add_argument("--dataset", choices=list(DATASETS), help="which dataset (default: the config's, digits)")
    parser.add_argument("--data-root", help="folder holding torchvision datasets or an ImageFolder tree")
    parser.add_argument("--download", action="store_true", help="download a torchvision dataset into --data-root")


def config_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> ExperimentConfig:
    overrides = parse_overrides(args.overrides)
    if args.dataset:
        overrides["data.dataset"] = args.dataset
    if args.data_root:
        overrides["data.root"] = args.data_root
    if args.download:
        overrides["data.download"] = True
    overrides.update(extra or {})
    return load_config(args.config, overrides)


def check_output_folder(flag: str, out: Path) -> None:
    """Refuse an output folder that cannot be created before any work is done (a trained
    student must never be lost to a path that was unusable from the start)."""
    existing = next(path for path in (out, *out.parents) if path.exists())
    if not existing.is_dir():
        raise XKDConfigError(f"{flag} {out}: {existing} exists and is not a folder")
    if not os.access(existing, os.W_OK):
        raise XKDConfigError(f"{flag} {out}: {existing} is not writable")


def check_cache_folder(config: ExperimentConfig) -> None:
    """The teacher and its explanations are cached under ``explain.cache_dir``: checked first,
    like every output folder, so hours of teacher training cannot end in an unwritable path."""
    check_output_folder("explain.cache_dir", Path(config.explain.cache_dir))


def command_teacher(args: argparse.Namespace) -> int:
    """Train (or reuse) the teacher and cache its explanations: in this process (``--workers 0``,
    the default), or with Ray Train and Ray actors over ``--workers N`` workers, writing the same
    cache files either way."""
    config = config_from_args(args)
    if args.workers is not None and args.workers < 0:
        raise XKDConfigError(f"--workers: got {args.workers}; must be >= 0 (0: this process, no Ray)")
    if (args.gpu or args.address) and not args.workers:
        raise XKDConfigError("--gpu and --address need --workers N >= 1 (they configure the Ray workers)")
    check_cache_folder(config)
    started = time.perf_counter()
    from xkd_ray.data.streaming import storage_for

    if storage_for(config.data) == "stream":  # docs/DATA.md: shards, teacher and maps written once, here
        from xkd_ray.core.stream_run import prepare_stream

        if args.workers:
            raise XKDConfigError("--workers: streamed data (data.storage resolved to stream) is prepared here; use 0")
        data: Any = prepare_stream(config, progress=True)
        files = {split: outputs.folder for split, outputs in data.teacher_outputs.items()}
    elif args.workers:
        from xkd_ray.cluster.ray_explain import prepare_on_workers
        from xkd_ray.cluster.ray_run import ensure_ray

        ensure_ray(args.address)
        data = prepare_on_workers(config, workers=args.workers, use_gpu=args.gpu, progress=True)
        files = data.cache_files
    else:
        from xkd_ray.core.prepared import prepare

        data = prepare(config, progress=True)
        files = data.cache_files
    items: dict[str, Any] = dict(data.teacher_metrics)
    for split, path in files.items():
        items[f"explanations[{split}]"] = f"{path} ({'cached' if data.cache_hits[split] else 'computed'})"
    console.print(items_table(f"teacher {data.teacher_id} ({time.perf_counter() - started:.1f} s)", items))
    return 0


def run_distill(config: ExperimentConfig, out: Path | None, address: str | None = None) -> dict[str, Any]:
    """Prepare, train one student (plain loop or Ray Train), and save it to ``out``."""
    from xkd_ray.core.distill import save_student
    from xkd_ray.core.prepared import prepare
    from xkd_ray.data.streaming import storage_for

    data: Any
    if storage_for(config.data) == "stream":  # docs/DATA.md: data larger than memory
        from xkd_ray.core.stream_run import distill_stream, prepare_stream, refuse_live_teacher

        refuse_live_teacher(config.distill.method)  # before any shard is written
        data = prepare_stream(config, progress=True)
        if config.ray.num_workers == 0:
            student, metrics = distill_stream(config, data, progress=True)
            if out is not None:
                save_student(out, config, student, data, metrics)
            return metrics
    else:
        data = prepare(config, progress=True)
    if config.ray.num_workers > 0:
        from xkd_ray.cluster.ray_run import distill_with_ray

        student, metrics = distill_with_ray(config, data, address=address)
    else:
        from xkd_ray.core.distill import distill

        student, metrics = distill(config, data, progress=True)
    if out is not None:
        save_student(out, config, student, data, metrics)
    return metrics


def command_distill(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {"distill.method": args.method}
    if args.workers is not None:
        extra["ray.num_workers"] = args.workers
    if args.gpu:
        extra["ray.use_gpu"] = True
    config = config_from_args(args, extra)
    check_output_folder("--out", args.out)
    check_cache_folder(config)
    from xkd_ray.pareto.experiment_folder import FolderLock

    created = not args.out.exists()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with FolderLock(args.out) as lock:  # the searches' lock: two runs into one --out would overwrite each other
            lock.claim()
            started = time.perf_counter()
            metrics = run_distill(config, args.out, address=args.address)
    except BaseException:
        if created:  # refused or interrupted: leave nothing half-written behind
            shutil.rmtree(args.out, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - started
    console.print(metrics_table(f"{args.method} student, test split ({elapsed:.0f} s)", {args.method: metrics}))
    console.print(f"saved to {args.out}/ (model.pt, config.json, metrics.json)")
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from xkd_ray.ui.demo import run_demo

    return run_demo(args)


def command_evaluate(args: argparse.Namespace) -> int:
    """Re-measure a saved student (a ``--out`` folder or a Pareto student) on a split, with the
    teacher and explanations its config names (reused from the cache, trained if absent)."""
    from xkd_ray.core.checkpoints import load_student
    from xkd_ray.core.distill import evaluate
    from xkd_ray.core.prepared import prepare

    student, record, _ = load_student(args.student)
    if not isinstance(record.get("experiment"), dict):
        raise XKDError(f"{args.student / 'config.json'}: no 'experiment' entry")
    config = ExperimentConfig.from_dict(record["experiment"])
    data = prepare(config, progress=True)
    metrics = evaluate(student, data, args.split, config)
    console.print(
        metrics_table(f"{args.student} on the {args.split} split", {"student": {args.split: metrics}}, args.split)
    )
    return 0


def command_search(args: argparse.Namespace) -> int:
    from xkd_ray.search import run_reporting_errors

    return run_reporting_errors(args)


def command_pareto(args: argparse.Namespace) -> int:
    """Print the front of a finished or running experiment (reads only its files)."""
    from xkd_ray.pareto.display import front_table
    from xkd_ray.pareto.front import list_pareto_students, read_objectives, readable, summary, write_front_plot

    if args.plot is not None:  # before reading anything, like every command's output
        check_output_folder("--plot", args.plot.parent)
        if args.plot.is_dir():
            raise XKDConfigError(f"--plot {args.plot}: is a folder; name the PNG file to write")
    experiment = readable(args.experiment)  # one local copy of an s3:// front for every read below
    rows = list_pareto_students(experiment).to_pylist()
    title = f"Pareto front of {args.experiment} ({len(rows)} students)"
    recorded = summary(experiment)
    if recorded is not None:
        title += f", hypervolume {recorded['hypervolume']:.4f} after {recorded['trials']} trials"
    console.print(front_table(rows, title, read_objectives(experiment).names))
    if args.plot:
        console.print(f"plot: {write_front_plot(experiment, args.plot)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xkd", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-level", default=os.environ.get("XKD_LOG_LEVEL", "WARNING"), type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="diagnostics of the xkd_ray loggers (XKD_LOG_LEVEL)",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)

    teacher = commands.add_parser("teacher", help="train (or reuse) the teacher and cache its explanations")
    teacher.add_argument(
        "--workers", type=int, help="Ray workers for training and explaining (default 0: this process, no Ray)"
    )
    teacher.add_argument("--gpu", action="store_true", help="one GPU per Ray worker (bf16 autocast in training)")
    teacher.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    _add_config_arguments(teacher)
    teacher.set_defaults(handler=command_teacher)

    distill = commands.add_parser("distill", help="train one student and save it")
    distill.add_argument("--method", required=True, choices=METHODS)
    distill.add_argument("--out", type=Path, required=True, help="folder for model.pt, config.json, metrics.json")
    distill.add_argument("--workers", type=int, help="Ray Train workers (0: plain single-process loop)")
    distill.add_argument("--gpu", action="store_true", help="train on GPUs (one per worker)")
    distill.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    _add_config_arguments(distill)
    distill.set_defaults(handler=command_distill)

    demo = commands.add_parser("demo", help="teacher + KD and XD students on digits, compared")
    demo.add_argument("--out", default="runs/demo", help="where the demo's students and search are saved")
    demo.add_argument("--space", type=Path, default=Path("search_spaces/default.yaml"), help="search space")
    demo.add_argument("--no-search", action="store_true", help="stop after the KD vs XD comparison")
    demo.add_argument(
        "--trials",
        type=int,
        default=6,
        help="search budget: the 4 methods' `xkd distill` defaults, then 2 sampled trials",
    )
    demo.add_argument("--resume", action="store_true", help="continue an interrupted demo search")
    _add_config_arguments(demo)
    demo.set_defaults(handler=command_demo)
    search = commands.add_parser("search", help="Ray Tune + Optuna search; keeps the Pareto front on disk")
    from xkd_ray.search import add_search_arguments

    add_search_arguments(search)
    search.set_defaults(handler=command_search)

    evaluate = commands.add_parser("evaluate", help="re-measure a saved student on a split")
    evaluate.add_argument("student", type=Path, help="a student folder (model.pt, config.json)")
    evaluate.add_argument("--split", choices=("val", "test"), default="test")
    evaluate.set_defaults(handler=command_evaluate)

    from xkd_ray.pareto.storage import experiment_location

    pareto = commands.add_parser("pareto", help="print the Pareto front of an experiment")
    pareto.add_argument("experiment", type=experiment_location, help="experiment folder or s3://bucket/prefix")
    pareto.add_argument("--plot", type=Path, help="also write the accuracy vs fidelity plot (PNG)")
    pareto.set_defaults(handler=command_pareto)
    from xkd_ray.ui.student_commands import add_student_commands

    add_student_commands(commands)  # predict, export, serve, upgrade
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # One named logger per module under "xkd_ray"; the CLI only picks the level and the format.
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("xkd_ray").setLevel(args.log_level)
    try:
        return args.handler(args)
    except XKDError as exc:
        print(f"xkd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
