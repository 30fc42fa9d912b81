"""The front plot: every ok trial, the front, the reference configuration, per pair of objectives."""

from __future__ import annotations

import itertools
from pathlib import Path

from xkd_ray.core.checkpoints import atomic_write
from xkd_ray.pareto.tables import front_rows, read_objectives, read_trials


def write_front_plot(experiment: str | Path, path: str | Path) -> Path:
    """One panel per pair of objectives: every ok trial as a dot coloured by method, the front
    members ringed, the reference configuration as a star, students whose explanation skill is
    <= 0 crossed, and the constant map's fidelity as a line where fidelity is an axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = read_objectives(experiment)
    rows = [r for r in read_trials(experiment) if r["status"] == "ok"]
    front = front_rows(rows, objectives)
    pairs = list(itertools.combinations(objectives.names, 2))
    figure, panels = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4.5), squeeze=False)
    for axes, (x, y) in zip(panels[0], pairs, strict=True):
        for method in sorted({r["method"] or "?" for r in rows}):
            points = [r for r in rows if (r["method"] or "?") == method]
            axes.scatter([r[f"val_{x}"] for r in points], [r[f"val_{y}"] for r in points], label=method, alpha=0.7)
        if front:
            axes.scatter(
                [r[f"val_{x}"] for r in front], [r[f"val_{y}"] for r in front],
                facecolors="none", edgecolors="black", s=140, label="Pareto front",
            )  # fmt: skip
        unskilled = [r for r in rows if (r.get("val_fidelity_skill") or 0.0) <= 0]
        if unskilled:
            axes.scatter(
                [r[f"val_{x}"] for r in unskilled], [r[f"val_{y}"] for r in unskilled],
                marker="x", color="red", s=60, label="skill <= 0 (no better than the constant map)",
            )  # fmt: skip
        reference = [r for r in rows if r.get("reference")]
        if reference:
            axes.scatter(
                [r[f"val_{x}"] for r in reference], [r[f"val_{y}"] for r in reference],
                marker="*", color="gold", edgecolors="black", s=260, label="reference config", zorder=5,
            )  # fmt: skip
        template = rows[0].get("val_fidelity_template") if rows else None
        if template is not None and y == "fidelity":
            axes.axhline(template, color="grey", linewidth=0.8, label="template map (bar to beat)")
        axes.set_xlabel(f"validation {x} ({objectives.directions[objectives.names.index(x)]})")
        axes.set_ylabel(f"validation {y} ({objectives.directions[objectives.names.index(y)]})")
        axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)
    return Path(path)
