"""Does XDistillation give students more faithful explanations than KD at the same accuracy?

Trains the teacher once, then every method with the same fixed settings over several seeds,
plus the controls that keep the claim honest:
  * template  - one constant map (mean training teacher map) for every image;
  * input     - the input image itself used as the explanation;
  * kd+head   - a KD student plus the same autoencoder head trained *separately* on the
                teacher maps (no fusion, no joint loss).
Prints a Markdown table (test split, mean ± std over seeds), writes it and a grid of maps for 8
test images (input, teacher, KD student's post-hoc map, XD student's head and post-hoc maps; the
seed-0 students) to bench/results/, and ends with one RESULT line.
Run: python bench/paper_claim.py [--explainer integrated_gradients]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from xkd_ray.config import ExperimentConfig
from xkd_ray.distill import DistillData, distill, prepare, student_predictions
from xkd_ray.losses import explanation_loss
from xkd_ray.metrics import fidelity, topk_iou
from xkd_ray.models import ConvAutoencoder

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("accuracy", "agreement", "fidelity", "fidelity_posthoc", "topk_iou")


def train_head_alone(config: ExperimentConfig, data: DistillData) -> dict[str, float]:
    """The kd+head control: the XD head architecture trained only to copy the teacher's maps."""
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
    with torch.no_grad():
        predicted = head(data.splits.test.images)[:, 0]
    teacher_maps = data.teacher_outputs["test"].maps
    return {"head_fidelity": fidelity(predicted, teacher_maps), "head_topk_iou": topk_iou(predicted, teacher_maps)}


def write_map_grid(path: Path, data: DistillData, students: dict, config: ExperimentConfig, count: int = 8) -> None:
    """One row per test image: what the teacher explains, and how each student explains it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = data.splits.test.images[:count]
    teacher = data.teacher_outputs["test"]
    columns: dict[str, torch.Tensor] = {"input": images.mean(dim=1), "teacher map": teacher.maps[:count]}
    for method, student in students.items():
        _, head_maps, posthoc = student_predictions(student, images, teacher.predictions[:count], config)
        if head_maps is not None:
            columns[f"{method} head map"] = head_maps
        columns[f"{method} post-hoc map"] = posthoc
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
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    temporary.replace(path)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--explainer", default="gradcam", choices=["gradcam", "integrated_gradients", "saliency"])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", default="student,kd,at,xd")
    parser.add_argument("--smoke", action="store_true", help="tiny run to check the script works (seconds)")
    parser.add_argument("--grid-only", action="store_true", help="only train seed-0 kd and xd and draw the map grid")
    args = parser.parse_args()
    if args.grid_only:
        args.seeds, args.methods = 1, "kd,xd"

    overrides = {"explain.explainer": args.explainer, "data.dataset": args.dataset, "data.root": args.data_root}
    if args.smoke:
        overrides |= {"data.image_size": 16, "teacher.width": 8, "teacher.epochs": 2, "distill.epochs": 1}
        overrides |= {"student.width": 8, "student.ae_width": 8, "explain.cache_dir": ".xkd_cache/smoke"}
        args.seeds, args.methods = 1, "kd,xd"
    base = ExperimentConfig().with_overrides(overrides)
    started = time.perf_counter()
    data = prepare(base, progress=False)
    teacher_test = data.teacher_outputs["test"]
    test_images = data.splits.test.images
    rows: dict[str, dict[str, list[float]]] = {}
    grid_students: dict = {}
    for method in args.methods.split(","):
        for seed in range(args.seeds):
            config = base.with_overrides({"distill.method": method, "distill.seed": seed})
            student, metrics = distill(config, data, progress=False)
            if seed == 0 and method in ("kd", "xd"):
                grid_students[method] = student
            for key in COLUMNS:
                rows.setdefault(method, {}).setdefault(key, []).append(metrics["test"][key])
            if method == "kd":
                control = train_head_alone(config, data)
                row = rows.setdefault("kd+head (control)", {})
                for key in COLUMNS:
                    value = control["head_fidelity"] if key == "fidelity" else metrics["test"][key]
                    value = control["head_topk_iou"] if key == "topk_iou" else value
                    row.setdefault(key, []).append(value)
            print(f"{method} seed {seed}: " + " ".join(f"{k}={metrics['test'][k]:.3f}" for k in COLUMNS), flush=True)
    template = data.template_map.expand_as(teacher_test.maps)
    image_maps = test_images.abs().sum(dim=1)
    controls = {
        "template (control)": {"fidelity": [fidelity(template, teacher_test.maps)]},
        "input image (control)": {"fidelity": [fidelity(image_maps, teacher_test.maps)]},
    }
    for name, values in controls.items():
        values["topk_iou"] = [topk_iou(template if name.startswith("template") else image_maps, teacher_test.maps)]
        rows[name] = values

    header = f"| {args.dataset} / {args.explainer} (test, {args.seeds} seeds) | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, values in rows.items():
        cells = [mean_std(values[c]) if c in values else "-" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    teacher_line = (
        f"Teacher test accuracy {data.teacher_metrics['test_accuracy']:.3f}; "
        f"degenerate teacher maps on test: {teacher_test.degenerate_maps}; wall {time.perf_counter() - started:.0f} s."
    )
    table = "\n".join(lines) + "\n\n" + teacher_line + "\n"
    print(table)
    name = f"paper_claim_{args.dataset}_{args.explainer}"
    if not args.smoke and not args.grid_only:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.md").write_text(table)
    if grid_students:
        grid = (Path(base.explain.cache_dir) if args.smoke else RESULTS) / f"{name}.png"
        write_map_grid(grid, data, grid_students, base)
        print(f"map grid: {grid}")

    def avg(method: str, key: str) -> float:
        values = rows.get(method, {}).get(key)
        return statistics.mean(values) if values else float("nan")

    print(
        f"RESULT xd_acc={avg('xd', 'accuracy'):.4f} kd_acc={avg('kd', 'accuracy'):.4f} "
        f"xd_fidelity={avg('xd', 'fidelity'):.4f} kd_fidelity={avg('kd', 'fidelity'):.4f} "
        f"xd_fidelity_posthoc={avg('xd', 'fidelity_posthoc'):.4f} "
        f"kd_fidelity_posthoc={avg('kd', 'fidelity_posthoc'):.4f}"
    )


if __name__ == "__main__":
    main()
