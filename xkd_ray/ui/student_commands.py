"""``xkd predict``, ``xkd export``, ``xkd serve`` and ``xkd upgrade``: using a trained student.

Each takes a student folder (it holds model.pt) or an experiment (a folder or ``s3://``) whose
front member ``--prefer`` picks, and refuses a folder saved without ``preprocessing.json`` in one
line that says how to re-save it (``xkd upgrade``).
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from xkd_ray.errors import XKDConfigError, XKDError

console = Console()


def _prefer(text: str) -> str | dict[str, float]:
    """``knee``, an objective's name, or weights as ``accuracy=1,fidelity=2``."""
    if "=" not in text:
        return text
    try:
        return {key.strip(): float(value) for key, value in (part.split("=", 1) for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prefer {text!r}: weights are name=number pairs, comma-separated") from None


def _open(args: argparse.Namespace) -> Any:
    from xkd_ray.pareto.front import open_student

    try:
        return open_student(args.target, args.prefer)
    except XKDError:
        raise
    except ValueError as exc:  # a --prefer that names no objective of the front
        raise XKDConfigError(str(exc)) from None


def _check_output_file(flag: str, path: Path) -> None:
    from xkd_ray.ui.cli import check_output_folder

    if path.is_dir():
        raise XKDConfigError(f"{flag} {path}: is a folder; name the file to write")
    check_output_folder(flag, path.parent)


def write_maps_grid(path: Path, images: list[str], result: Any) -> Path:
    """One row per image: the image, and the student's map over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from xkd_ray.core.checkpoints import atomic_write

    figure, axes = plt.subplots(len(images), 2, figsize=(5, 2.5 * len(images)), squeeze=False)
    for row, (name, explanation) in enumerate(zip(images, result.maps, strict=True)):
        with Image.open(name) as image:
            axes[row][0].imshow(image.convert("RGB"))
        axes[row][0].set_title(f"{Path(name).name}: {result.class_names[row]}", fontsize=8)
        axes[row][1].imshow(explanation.numpy(), cmap="jet", vmin=0, vmax=1)
        axes[row][1].set_title(f"{result.map_kind} map", fontsize=8)
        for axis in axes[row]:
            axis.axis("off")
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    plt.close(figure)
    return path


def command_predict(args: argparse.Namespace) -> int:
    if args.maps is not None:
        _check_output_file("--maps", args.maps)
    student = _open(args)
    result = student.predict([str(image) for image in args.images], explain=args.maps is not None)
    rows = result.rows()
    if args.json:
        for image, row in zip(args.images, rows, strict=True):
            print(json.dumps({"file": str(image), **row}))
    else:
        table = Table(title=f"{student.path} ({len(rows)} images)")
        for column in ("file", "label", "class", "probability"):
            table.add_column(column)
        for image, row in zip(args.images, rows, strict=True):
            table.add_row(str(image), str(row["label"]), row["class_name"], f"{row['probability']:.4f}")
        console.print(table)
    if args.maps is not None:
        written = write_maps_grid(args.maps, [str(image) for image in args.images], result)
        if not args.json:
            console.print(f"maps: {written}")
    return 0


def command_export(args: argparse.Namespace) -> int:
    from xkd_ray.student.export import export_student, output_names

    _check_output_file("--out", args.out)
    student = _open(args)
    path = export_student(student, args.format, args.out)
    console.print(f"exported {student.path} as {args.format}: {path} (outputs: {', '.join(output_names(student))})")
    return 0


def command_serve(args: argparse.Namespace) -> int:
    """Deploy and keep serving until interrupted (Ctrl-C), then take the application down."""
    if args.replicas < 1:
        raise XKDConfigError(f"--replicas: got {args.replicas}; must be >= 1")
    student = _open(args)
    from xkd_ray.cluster.ray_run import ensure_ray
    from xkd_ray.cluster.serve import deploy, undeploy

    ensure_ray(args.address)
    url = deploy(student, port=args.port, host=args.host, replicas=args.replicas, cpus_per_replica=args.cpus)
    console.print(f"serving {student.path}: POST {url}/predict (an image), GET {url}/health; Ctrl-C stops")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        undeploy()
    return 0


def command_upgrade(args: argparse.Namespace) -> int:
    from xkd_ray.student.card import upgrade_folder

    for folder in args.folders:
        console.print(f"upgraded {upgrade_folder(folder)} (preprocessing.json, card.md)")
    return 0


def _add_target(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("target", help=f"{what}: a student folder, or an experiment folder / s3://bucket/prefix")
    parser.add_argument(
        "--prefer", type=_prefer, default="knee", help="which front member: knee (default), an objective, or a=1,b=2"
    )


def add_student_commands(commands: Any) -> None:
    """Register the four subcommands on ``xkd``'s subparsers."""
    predict = commands.add_parser("predict", help="classify image files with a student, with its explanation")
    _add_target(predict, "the student")
    predict.add_argument("images", nargs="+", type=Path, help="image files (any size; grey or RGB)")
    predict.add_argument("--maps", type=Path, help="also write a PNG grid: each image and the student's map")
    predict.add_argument("--json", action="store_true", help="one JSON line per image instead of a table")
    predict.set_defaults(handler=command_predict)

    export = commands.add_parser("export", help="write a student as one TorchScript or ONNX file")
    _add_target(export, "the student")
    export.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    export.add_argument("--out", required=True, type=Path, help="the file to write")
    export.set_defaults(handler=command_export)

    serve = commands.add_parser("serve", help="serve a student over HTTP with Ray Serve (POST /predict)")
    _add_target(serve, "the student")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept requests from other machines")
    serve.add_argument("--replicas", type=int, default=1)
    serve.add_argument("--cpus", type=float, default=1.0, help="CPUs reserved per replica")
    serve.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    serve.set_defaults(handler=command_serve)

    upgrade = commands.add_parser("upgrade", help="add preprocessing.json and card.md to older student folders")
    upgrade.add_argument("folders", nargs="+", type=Path, help="student folders (each with model.pt, config.json)")
    upgrade.set_defaults(handler=command_upgrade)
