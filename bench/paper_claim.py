"""Does XDistillation give students more faithful explanations than KD at the same accuracy?

Trains the teacher once, then every registered method (``METHODS``, or --methods) with the
same fixed settings over several seeds, plus the controls that keep the claim honest:
  * template  - one constant map (mean training teacher map) for every image;
  * input     - the input image itself used as the explanation;
  * kd+head   - a KD student plus the same autoencoder head trained *separately* on the
                teacher maps (no fusion, no joint loss).
Prints a Markdown table (test split, mean ± std over seeds, one column per registered metric
that describes a student), writes it and a grid of maps for 8 test images (input, teacher, KD
student's post-hoc map, XD student's head and post-hoc maps; the seed-0 students) to
bench/results/, and ends with one RESULT line.
Run: python bench/paper_claim.py [--explainer integrated_gradients]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from xkd_ray.config.methods import GRADIENT_MAP_EXPLAINERS, METHODS
from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.config.yaml_loader import parse_overrides
from xkd_ray.core.checkpoints import atomic_write
from xkd_ray.core.distill import StudentPredictions, distill, split_metrics, student_predictions
from xkd_ray.core.explain import EXPLAINERS, explain_maps
from xkd_ray.core.faithfulness_metrics import (
    CURVES,
    MARGIN,
    NOT_INFORMATIVE,
    auc_name,
    curve_of,
    informative_in,
    se_name,
)
from xkd_ray.core.losses import explanation_loss
from xkd_ray.core.metrics import METRICS, fidelity, topk_iou
from xkd_ray.core.models import ConvAutoencoder, StudentNet
from xkd_ray.core.prepared import DistillData, prepare
from xkd_ray.data.datasets import DATASETS

RESULTS = Path(__file__).resolve().parent / "results"
CONTROLS = (("teacher", "teacher"), ("teacher_shift", "its maps shifted"), ("teacher_rand", "random maps"))
# Every registered metric is a column, except those that describe the teacher and its maps, the
# same for every student: they are printed once, under the table.
# Standard errors are printed with the teacher's AUCs (a student's spread over seeds is its ± std).
TEACHER_SIDE = (
    "fidelity_template",
    "degenerate_maps",
    *(auc_name(curve, whose) for curve in CURVES for whose in ("teacher", "teacher_rand", "teacher_shift")),
)
COLUMNS = tuple(name for name in METRICS if name not in TEACHER_SIDE and METRICS[name].error_of is None)
# Two tables: how like the teacher's the explanations are, and whether they are the student's reason.
REASON = tuple(
    c for c in COLUMNS if c.startswith(("head_honesty", "deletion_", "insertion_", "road_", "randomisation_", "mprt_"))
)
LIKENESS = (*(c for c in COLUMNS if c not in REASON), "s/epoch")


def train_head_alone(
    config: ExperimentConfig, data: DistillData, kd_student: StudentNet, kd_metrics: dict[str, float | None]
) -> dict[str, float | None]:
    """The kd+head control: the XD head architecture trained only to copy the teacher's maps,
    evaluated next to the KD student (its logits and post-hoc maps, the head's maps as its
    explanation) with every registered metric on the test split. The faithfulness measurements
    of the KD student's own maps are the KD student's (``kd_metrics``)."""
    torch.manual_seed(config.distill.seed)
    head = ConvAutoencoder(data.splits.in_channels, config.student.ae_depth, config.student.ae_width)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.distill.lr, weight_decay=config.distill.weight_decay)
    images, maps = data.splits.train.images, data.teacher_outputs["train"].maps
    generator = torch.Generator().manual_seed(config.distill.seed)
    for _ in range(config.distill.epochs):
        head.train()
        for batch in torch.randperm(len(images), generator=generator).split(config.distill.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = explanation_loss(head(images[batch])[:, 0], maps[batch], config.distill.explanation_loss)
            loss.backward()
            optimizer.step()
    head.eval()
    test_images = data.splits.test.images
    with torch.no_grad():
        head_maps = head(test_images)[:, 0]
    kd = student_predictions(kd_student, test_images, data.teacher_outputs["test"].predictions, config)
    control = split_metrics(data, "test", config, StudentPredictions(kd.logits, head_maps, kd.posthoc_maps))
    return {**kd_metrics, **{name: value for name, value in control.items() if value is not None}}


def write_map_grid(path: Path, data: DistillData, students: dict, config: ExperimentConfig, count: int = 8) -> None:
    """One row per test image: what the teacher explains, and how each student explains it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = data.splits.test.images[:count]
    teacher = data.teacher_outputs["test"]
    columns: dict[str, torch.Tensor] = {"input": images.mean(dim=1), "teacher map": teacher.maps[:count]}
    for method, student in students.items():
        predictions = student_predictions(student, images, teacher.predictions[:count], config)
        if predictions.head_maps is not None:
            columns[f"{method} head map"] = predictions.head_maps
        columns[f"{method} post-hoc map"] = predictions.posthoc_maps
    figure, axes = plt.subplots(count, len(columns), figsize=(1.6 * len(columns), 1.6 * count), squeeze=False)
    for column, (title, maps) in enumerate(columns.items()):
        for row in range(count):
            axis = axes[row][column]
            axis.imshow(maps[row].detach().numpy(), cmap="gray" if column == 0 else "inferno")
            axis.set_xticks([])
            axis.set_yticks([])
        axes[0][column].set_title(title, fontsize=8)
    figure.suptitle(f"{config.data.dataset} / {config.explain.explainer}, test images, seed-0 students", fontsize=9)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    plt.close(figure)


def seconds_per_epoch(history: list[dict]) -> float:
    """Training time per epoch from the run's own clock, leaving out the last epoch (it also
    holds the end-of-run evaluation); nan for runs too short to tell."""
    if len(history) < 3:
        return float("nan")
    return (history[-2]["wall_time"] - history[0]["wall_time"]) / (len(history) - 2)


def explanation_latency(students: dict, data: DistillData, config: ExperimentConfig, count: int = 128) -> dict:
    """Milliseconds per image to explain one test image: a head needs one forward pass; a post-hoc
    map needs captum's forward and backward passes on the student, or on the teacher."""
    images = data.splits.test.images[:count]
    targets = data.teacher_outputs["test"].predictions[:count]
    settings = {"explainer": config.explain.explainer, "ig_steps": config.explain.ig_steps}
    settings["blur_sigma"] = config.explain.blur_sigma
    timings: dict[str, float] = {}

    def clock(name: str, work) -> None:
        work()  # warm-up
        started = time.perf_counter()
        for _ in range(3):
            work()
        timings[name] = (time.perf_counter() - started) / 3 / count * 1000

    teacher = data.teacher()
    clock("teacher post-hoc", lambda: explain_maps(teacher, images, targets, layer=config.explain.layer, **settings))
    for method, student in students.items():
        if student.head is not None:
            clock(f"{method} head", lambda s=student: s.eval()(images, return_all=True))
        clock(f"{method} post-hoc", lambda s=student: explain_maps(s, images, targets, **settings))
    return timings


def mean_std(values: list[float | None]) -> str:
    """Mean ± std over seeds; "-" where the metric does not apply (None, e.g. head metrics without a head)."""
    measured = [value for value in values if value is not None]
    if not measured:
        return "-"
    if len(measured) == 1:
        return f"{measured[0]:.3f}"
    return f"{statistics.mean(measured):.3f} ± {statistics.stdev(measured):.3f}"


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--explainer", default="gradcam", choices=list(EXPLAINERS))
    parser.add_argument("--dataset", default="digits", choices=list(DATASETS))
    parser.add_argument("--data-root")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--augment",
        choices=("default", "on", "off"),
        default="default",
        help="data.augment: random resized crop + flip on image and teacher map (default: the dataset's rule)",
    )
    parser.add_argument("--methods", help=f"comma-separated, from: {', '.join(METHODS)} (default: all that apply)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every method, as in `xkd distill --set` (named in the results file)",
    )
    parser.add_argument(
        "--no-head-control",
        action="store_true",
        help="skip the kd+head control (a head trained and evaluated beside each KD student: with IG, "
        "most of a KD seed's time)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run to check the script works (seconds)")
    parser.add_argument("--grid-only", action="store_true", help="only train seed-0 kd and xd and draw the map grid")
    args = parser.parse_args()
    if args.grid_only:
        args.seeds, args.methods = 1, "kd,xd"
    subset = args.methods is not None  # a subset is written to its own results file
    applies = [m for m in METHODS if METHODS[m].student_map != "gradient" or args.explainer in GRADIENT_MAP_EXPLAINERS]
    methods = [name.strip() for name in (args.methods or ",".join(applies)).split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; registered: {', '.join(METHODS)}")

    overrides = {"explain.explainer": args.explainer, "data.dataset": args.dataset, "data.root": args.data_root}
    if args.augment != "default":
        overrides["data.augment"] = args.augment == "on"
    if args.smoke:
        overrides |= {"data.image_size": 16, "teacher.width": 8, "teacher.epochs": 2, "distill.epochs": 1}
        overrides |= {"student.width": 8, "student.ae_width": 8, "explain.cache_dir": ".xkd_cache/smoke"}
        args.seeds, methods = 1, ["kd", "xd", "xd_e2kd"]
    overrides |= parse_overrides(args.set)
    base = ExperimentConfig().with_overrides(overrides)
    started = time.perf_counter()
    data = prepare(base, progress=False)
    teacher_test = data.teacher_outputs["test"]
    test_images = data.splits.test.images
    rows: dict[str, dict[str, list[float | None]]] = {}
    grid_students: dict = {}
    teacher_side: dict[str, float | None] = {}
    teacher_test_metrics: dict[str, float | None] = {}
    for method in methods:
        for seed in range(args.seeds):
            config = base.with_overrides({"distill.method": method, "distill.seed": seed})
            student, metrics = distill(config, data, progress=False)
            if seed == 0:
                grid_students[method] = student
            for key in COLUMNS:
                rows.setdefault(method, {}).setdefault(key, []).append(metrics["test"][key])
            rows[method].setdefault("s/epoch", []).append(seconds_per_epoch(metrics["history"]))
            if method == "kd" and not args.no_head_control:
                control = train_head_alone(config, data, student, metrics["test"])
                row = rows.setdefault("kd+head (control)", {})
                for key in COLUMNS:
                    row.setdefault(key, []).append(control[key])
            teacher_side = {key: metrics["test"][key] for key in TEACHER_SIDE if key in metrics["test"]}
            teacher_test_metrics = metrics["test"]
            print(
                f"{method} seed {seed}: " + " ".join(f"{k}={number(metrics['test'][k])}" for k in COLUMNS), flush=True
            )
    template = data.template_map.expand_as(teacher_test.maps)
    image_maps = test_images.abs().sum(dim=1)
    controls = {
        "template (control)": {"fidelity": [fidelity(template, teacher_test.maps)]},
        "input image (control)": {"fidelity": [fidelity(image_maps, teacher_test.maps)]},
    }
    for name, values in controls.items():
        values["topk_iou"] = [topk_iou(template if name.startswith("template") else image_maps, teacher_test.maps)]
        rows[name] = values

    # A curve that cannot tell the teacher's own maps from random maps (on the teacher) ranks nothing here.
    verdicts = {curve: informative_in(teacher_test_metrics, curve) for curve in CURVES}

    def cell(column: str, values: list[float | None]) -> str:
        curve = curve_of(column)
        if curve is not None and verdicts.get(curve) is False and any(v is not None for v in values):
            return NOT_INFORMATIVE
        return mean_std(values)

    lines = []
    for title, columns in (("like the teacher's", LIKENESS), ("the student's own reason?", REASON)):
        heading = f"{args.dataset} / {args.explainer}, augment {'on' if base.data.augment_on else 'off'}"
        heading += "".join(f", {text}" for text in args.set)
        lines += [f"| {heading}, {title} (test, {args.seeds} seeds) | " + " | ".join(columns) + " |"]
        lines += ["|" + "---|" * (len(columns) + 1)]
        for name, values in rows.items():
            if any(c in values for c in columns):
                lines.append(
                    f"| {name} | " + " | ".join(cell(c, values[c]) if c in values else "-" for c in columns) + " |"
                )
        lines.append("")
    teacher_line = (
        f"Teacher test accuracy {data.teacher_metrics['test_accuracy']:.3f}; "
        f"degenerate teacher maps on test: {teacher_test.degenerate_maps}; "
        + "".join(f"{key} {number(value)}; " for key, value in teacher_side.items() if key != "degenerate_maps")
        + f"wall {time.perf_counter() - started:.0f} s."
    )
    latency = explanation_latency(grid_students, data, base)
    latency_line = "Explanation latency, ms per test image (same run, seed-0 students): " + "; ".join(
        f"{name} {value:.2f}" for name, value in latency.items()
    )
    checks = []
    for curve, verdict in verdicts.items():
        shown = []
        for whose, what in CONTROLS:
            value, error = (teacher_test_metrics.get(name(curve, whose)) for name in (auc_name, se_name))
            shown.append(f"{what} {number(value)} ± {number(error)}")
        word = {True: "informative", False: NOT_INFORMATIVE, None: "not measured"}[verdict]
        checks.append(f"{curve} ({CURVES[curve][0]}): {', '.join(shown)}: {word}")
    check_line = (
        "Can each curve tell where the teacher's maps point on test (teacher better than its maps shifted "
        f"elsewhere by > {MARGIN} and > 2 SE; random maps for comparison)? " + "; ".join(checks) + "."
    )
    table = "\n".join(lines) + "\n" + teacher_line + "\n\n" + check_line + "\n\n" + latency_line + "\n"
    print(table)
    name = f"paper_claim_{args.dataset}_{args.explainer}" + ("_" + "_".join(methods) if subset else "")
    name += "" if args.augment == "default" else f"_augment_{args.augment}"
    name += "".join(f"_{text.replace('=', '-')}" for text in args.set)
    if not args.smoke and not args.grid_only:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.md").write_text(table)
    if grid_students:
        grid = (Path(base.explain.cache_dir) if args.smoke else RESULTS) / f"{name}.png"
        write_map_grid(grid, data, grid_students, base)
        print(f"map grid: {grid}")

    def avg(method: str, key: str) -> float:
        values = [value for value in rows.get(method, {}).get(key, []) if value is not None]
        return statistics.mean(values) if values else float("nan")

    keys = ("accuracy", "fidelity", "fidelity_posthoc", "fidelity_posthoc_skill", "head_honesty")
    pairs = [f"{method}_{key}={avg(method, key):.4f}" for method in methods for key in keys]
    pairs = [pair for pair in pairs if not pair.endswith("=nan")]
    print("RESULT " + " ".join(pairs))


if __name__ == "__main__":
    main()
