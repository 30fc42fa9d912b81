"""Our batched deletion curves (``xkd_ray.core.faithfulness``) against Quantus' PixelFlipping.

``xkd_ray/core/faithfulness.py`` is written by hand rather than taken from Quantus; this measures
what that buys. On the teacher and its cached test maps (first --images test images) it times
``perturbation_curves`` (ours: deletion *and* insertion curves, 2 (k + 1) + 1 batched forward
passes) and ``quantus.PixelFlipping`` (deletion only, k forward passes per batch of images),
each the median of --repeats timed calls after one warm-up, in the same process, on the CPU,
with --threads torch threads (default 1: on a busy machine two OpenMP threads made the same call
vary 100-fold between runs, from oversubscription, not from either implementation).

Quantus is configured as close to ours as its API allows:
  * features_in_step = C*H*W / k, so both take k equal steps to the fully removed image;
  * perturb_baseline = 0.0, our baseline (0 in the normalised input space). Quantus' own default,
    "black", is *not* 0: it is each image's minimum value (``arr.min()`` over the image's
    features), i.e. the darkest normalised intensity of that image; it is reported separately;
  * normalise=False, abs=False (Quantus' default normalise_by_max does not change the order);
  * y_batch = the teacher's own unperturbed predictions, softmax=True, batch_size as ours (512).
Differences by design that remain:
  * Quantus' curve has no step-0 point (its first value is after the first step) and
    ``return_auc_per_sample`` integrates with dx=1 over the k points; we prepend the unperturbed
    probability and integrate over [0, 1] like ``curve_auc``, so the AUCs are on one scale
    (``return_auc_per_sample=True`` itself calls ``np.trapz``, gone in NumPy 2.4: it raises
    AttributeError here, so the curves are taken and integrated by this script);
  * ties in a map: Quantus orders by ``np.argsort(-a)`` (unstable, implementation-defined), we
    break them by a seeded random permutation. The default run's Grad-CAM maps tie about 120 of
    1024 cells per test image (about 22 of them zeros), so the orders differ there. A second
    Quantus run on maps that encode our exact order (the rank of every cell) checks that with
    the same order the two give the same curves.
Quantus is optional: if the environment variable XKD_QUANTUS_PATH is set, that folder (holding
Quantus and what it needs beyond this project's environment) is put first on sys.path; without
Quantus the script times ours only and reports quantus=0.
Run: XKD_QUANTUS_PATH=/tmp/qlib python bench/faithfulness.py [--images 100]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.faithfulness import STEPS, curve_auc, perturbation_curves, pixel_order
from xkd_ray.core.prepared import prepare

# The distributions Quantus 0.6.0 needs that this project's environment does not (used for the
# dependency weight when Quantus is importable without XKD_QUANTUS_PATH).
QUANTUS_ONLY = ("quantus", "opencv-python", "opencv-python-headless", "scikit-image", "cachetools")
QUANTUS_ONLY += ("imageio", "tifffile", "lazy-loader")


def quantus_path() -> str | None:
    path = os.environ.get("XKD_QUANTUS_PATH")
    if path and path not in sys.path:
        sys.path.insert(0, path)
    return path or None


def import_quantus():
    try:
        import quantus
    except ImportError as error:
        print(f"quantus not importable ({error}); timing ours only")
        return None
    return quantus


def folder_mb(path: str) -> float:
    total = sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file() and not file.is_symlink())
    return total / 2**20


def installed_mb(names: tuple[str, ...]) -> float:
    """Size on disk of the installed distributions ``names`` (those that are installed)."""
    total = 0
    for name in names:
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in distribution.files or []:
            located = Path(distribution.locate_file(file))
            if located.is_file():
                total += located.stat().st_size
    return total / 2**20


def import_seconds(path: str | None, repeats: int = 3) -> float:
    """Median seconds for ``import quantus`` in a fresh interpreter that has already imported
    torch and numpy (this project imports both anyway)."""
    code = (
        "import sys, time\n"
        + (f"sys.path.insert(0, {path!r})\n" if path else "")
        + "import numpy, torch\nstarted = time.perf_counter()\nimport quantus\n"
        + "print(time.perf_counter() - started)\n"
    )
    times = []
    for _ in range(repeats):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        times.append(float(result.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def median_seconds(work, repeats: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """(Pearson r, mean absolute difference) of two per-image AUC vectors. r is 1 for identical
    vectors and 0 when one of them is constant but they differ (r undefined: kept finite)."""
    mad = float(np.abs(ours - theirs).mean())
    if ours.std() == 0 or theirs.std() == 0:
        return (1.0 if np.allclose(ours, theirs) else 0.0), mad
    return float(np.corrcoef(ours, theirs)[0, 1]), mad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="test images (default 100)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each, median reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (default 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny run to check the script works (seconds)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides: dict = {}
    if args.smoke:
        overrides = {"data.image_size": 16, "teacher.width": 8, "teacher.epochs": 2}
        overrides |= {"explain.cache_dir": ".xkd_cache/smoke"}
        args.images, args.repeats = min(args.images, 16), 1
    config = ExperimentConfig().with_overrides(overrides)
    data = prepare(config, progress=False)
    model = data.teacher()
    images = data.splits.test.images[: args.images]
    maps = data.teacher_outputs["test"].maps[: args.images]
    count, channels, height, width = images.shape
    print(
        f"{config.data.dataset} / {config.explain.explainer}: {count} test images {channels}x{height}x{width}, "
        f"{STEPS} steps, torch threads {torch.get_num_threads()}"
    )

    deletion, _ = perturbation_curves(model, images, maps, steps=STEPS)
    ours_auc = curve_auc(deletion).numpy()
    ours_s = median_seconds(lambda: perturbation_curves(model, images, maps, steps=STEPS), args.repeats)
    ours_ms = ours_s / count * 1000
    print(f"ours    : {ours_ms:.3f} ms/image (deletion + insertion, {2 * (STEPS + 1) + 1} batched forward passes)")

    path = quantus_path()
    quantus = import_quantus()
    if quantus is None:
        print(f"RESULT ours_ms_per_image={ours_ms:.4f} quantus=0")
        return

    features = channels * height * width
    if features % STEPS:
        raise SystemExit(f"Quantus needs features_in_step to divide {features} features; {STEPS} steps do not")
    x = images.numpy().astype(np.float32)
    targets = deletion[:, 0]  # probability of the own prediction on the unperturbed image
    with torch.no_grad():
        y = model(images).argmax(dim=1).numpy()

    def quantus_curves(attributions: np.ndarray, baseline) -> np.ndarray:
        metric = quantus.PixelFlipping(
            features_in_step=features // STEPS,
            perturb_baseline=baseline,
            normalise=False,
            abs=False,
            return_auc_per_sample=False,
            disable_warnings=True,
            display_progressbar=False,
        )
        curves = metric(
            model=model, x_batch=x, y_batch=y, a_batch=attributions, channel_first=True, softmax=True, batch_size=512
        )
        return np.asarray(curves, dtype=np.float64)

    def with_start(curves: np.ndarray) -> np.ndarray:
        """Quantus' curve with the unperturbed point in front, as AUC over [0, 1] like ours."""
        full = np.concatenate([targets.numpy()[:, None].astype(np.float64), curves], axis=1)
        return curve_auc(torch.from_numpy(full)).numpy()

    raw_maps = maps.numpy().astype(np.float32)[:, None]  # [N, 1, H, W], broadcast over channels
    quantus_s = median_seconds(lambda: quantus_curves(raw_maps, 0.0), args.repeats)
    quantus_ms = quantus_s / count * 1000
    print(f"quantus : {quantus_ms:.3f} ms/image (deletion only, {STEPS} forward passes per batch)")
    speedup = quantus_ms / ours_ms
    print(f"speed-up: {speedup:.2f}x as measured (ours computes two curves, Quantus one)")
    # Both are bound by the model's forward passes; per pass they are compared like for like.
    per_pass = (quantus_ms / STEPS) / (ours_ms / (2 * (STEPS + 1) + 1))
    print(f"speed-up per forward pass: {per_pass:.2f}x")

    matched = quantus_curves(raw_maps, 0.0)
    r_matched, mad_matched = agreement(ours_auc, with_start(matched))
    print(f"deletion AUC, baseline 0, own tie order : Pearson r {r_matched:.4f}, mean |diff| {mad_matched:.2e}")

    # The same order as ours: every cell's attribution is its (reversed) rank in our order, each
    # pixel's channels kept together, so no ties are left for argsort to break its own way.
    order = pixel_order(maps, seed=0)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(height * width).expand(count, -1))
    score = (height * width - rank).view(count, 1, height, width).double() * channels
    ranked = (score + torch.arange(channels - 1, -1, -1, dtype=torch.float64).view(1, channels, 1, 1)).numpy()
    same_order = quantus_curves(ranked, 0.0)
    max_curve_diff = float(np.abs(same_order - deletion[:, 1:].numpy()).max())
    r_order, mad_order = agreement(ours_auc, with_start(same_order))
    print(
        f"deletion AUC, baseline 0, our order     : Pearson r {r_order:.4f}, mean |diff| {mad_order:.2e}, "
        f"max |curve diff| {max_curve_diff:.2e}"
    )

    black = quantus_curves(raw_maps, "black")
    r_black, mad_black = agreement(ours_auc, with_start(black))
    print(
        f"deletion AUC, Quantus 'black' (per-image min {x.reshape(count, -1).min(1).mean():.2f} on average, not 0): "
        f"Pearson r {r_black:.4f}, mean |diff| {mad_black:.4f}"
    )
    native = np.trapezoid(black, dx=1, axis=1)  # what return_auc_per_sample gives with its defaults
    r_native, _ = agreement(ours_auc, native)
    print(f"Quantus' own AUC (k points, dx=1, range 0..{STEPS - 1}), 'black': Pearson r with ours {r_native:.4f}")

    if path:
        deps_mb = folder_mb(path)
        print(f"Quantus and what it needs beyond this environment ({path}): {deps_mb:.1f} MB")
    else:
        deps_mb = installed_mb(QUANTUS_ONLY)
        print(f"Quantus-only distributions ({', '.join(QUANTUS_ONLY)}, where installed): {deps_mb:.1f} MB")
    import_s = import_seconds(path)
    print(f"import quantus (after numpy and torch, fresh interpreter): {import_s:.2f} s")
    print(
        f"RESULT ours_ms_per_image={ours_ms:.4f} quantus_ms_per_image={quantus_ms:.4f} speedup={speedup:.3f} "
        f"speedup_per_pass={per_pass:.3f} "
        f"auc_pearson={r_matched:.4f} auc_mad={mad_matched:.3e} auc_pearson_same_order={r_order:.4f} "
        f"auc_pearson_black={r_black:.4f} quantus_deps_mb={deps_mb:.1f} quantus_import_s={import_s:.3f}"
    )


if __name__ == "__main__":
    main()
