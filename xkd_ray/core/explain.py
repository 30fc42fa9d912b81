"""Captum explanations as normalised maps, and the on-disk cache of the teacher's outputs.

Teacher explanations are the distillation target: computed once per (teacher, explainer,
dataset split), stored as Parquet under a content-hashed name, and read by every later run
and every search trial. Integrated Gradients costs ~50 forward/backward passes per image,
so recomputing it per trial would dominate a search.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Saliency
from torch import nn

from xkd_ray.config.faithfulness_schema import road_on
from xkd_ray.config.registries import EXPLAINERS
from xkd_ray.core.checkpoints import atomic_write, stable_hash
from xkd_ray.core.diagnostics import teacher_diagnostics
from xkd_ray.core.faithfulness import faithfulness_subset
from xkd_ray.core.losses import blur_maps
from xkd_ray.core.models import find_layer, predict_logits
from xkd_ray.core.progress import track
from xkd_ray.core.teacher_input import TeacherInput, student_view
from xkd_ray.data.splits import ZeroCopyPickle
from xkd_ray.errors import XKDConfigError, XKDDataError

CACHE_FORMAT_VERSION = 4  # 3: teacher deletion/insertion AUCs in the metadata; 4: on the faithfulness subset, + ROAD
# Val/test caches only (they carry the teacher's faithfulness measurements): 2 adds the shifted-map
# control, so train maps, the expensive part, stay valid.
FAITHFULNESS_FORMAT = 2


@dataclass(frozen=True)
class Explanations:
    maps: torch.Tensor  # float32 [N, H, W] in [0, 1]
    degenerate_maps: int  # all-zero Grad-CAM maps that fell back to |raw CAM|


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(maps)


def gradcam(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, layer: nn.Module | None, **_: Any):
    size = images.shape[-2:]
    raw = LayerGradCam(model, layer).attribute(images, target=targets, relu_attributions=False)
    raw = LayerAttribution.interpolate(raw, size, interpolate_mode="bilinear")[:, 0]
    maps = raw.clamp_min(0.0)
    # Grad-CAM on tiny images is sometimes all-negative; keep *some* localisation
    # (|raw CAM|) instead of a flat map, and count it so reports can say how often.
    degenerate = maps.flatten(1).amax(dim=1) <= 0
    maps = torch.where(degenerate[:, None, None], raw.abs(), maps)
    return _min_max(maps.detach()), int(degenerate.sum())


def _input_attribution_map(attribution: torch.Tensor, blur_sigma: float) -> tuple[torch.Tensor, int]:
    """Pixel attributions -> one map: |attribution| summed over channels, lightly blurred."""
    return _min_max(blur_maps(attribution.detach().abs().sum(dim=1), blur_sigma)), 0


def integrated_gradients(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, ig_steps: int, blur_sigma: float, **_: Any
):
    attribution = IntegratedGradients(model).attribute(
        images, baselines=torch.zeros_like(images), target=targets, n_steps=ig_steps, internal_batch_size=len(images)
    )
    return _input_attribution_map(attribution, blur_sigma)


def saliency(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, blur_sigma: float, **_: Any):
    return _input_attribution_map(Saliency(model).attribute(images, target=targets, abs=True), blur_sigma)


def explain_maps(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    explainer: str = "gradcam",
    layer: str | None = None,
    ig_steps: int = 32,
    blur_sigma: float = 1.0,
    batch_size: int = 128,
    progress: bool = False,
    description: str = "explaining",
    inputs: TeacherInput | None = None,
) -> Explanations:
    """Maps in [0, 1] at input resolution, explaining ``targets`` (default: the model's own
    predictions). The model is put in eval mode and left there.

    ``inputs``: a teacher's input contract. Each batch is converted to the teacher's input, explained
    there, and its maps are resized back to the resolution of ``images``."""
    model.eval()
    device = next(model.parameters()).device
    if explainer not in EXPLAINERS:
        raise XKDConfigError(f"explain.explainer: got {explainer!r}; allowed values are {', '.join(EXPLAINERS)}")
    method = EXPLAINERS[explainer]
    layer_module = find_layer(model, layer) if method.uses_layer else None
    all_maps: list[torch.Tensor] = []
    degenerate = 0
    with track(description, len(images), progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device)
            if inputs is not None:
                batch = inputs(batch)
            if targets is None:
                with torch.no_grad():
                    batch_targets = model(batch).argmax(dim=1)
            else:
                batch_targets = targets[start : start + batch_size].to(device)
            maps, count = method.attribute(
                model, batch, batch_targets, layer=layer_module, ig_steps=ig_steps, blur_sigma=blur_sigma
            )
            all_maps.append((maps if inputs is None else inputs.maps_back(maps)).float().cpu())
            degenerate += count
            bar.advance(len(batch))
    return Explanations(torch.cat(all_maps), degenerate)


@dataclass(frozen=True)
class TeacherOutputs(ZeroCopyPickle):
    """What distillation needs from the teacher for one split, aligned with the split's order."""

    logits: torch.Tensor  # float32 [N, classes]
    maps: torch.Tensor  # float32 [N, H, W]
    degenerate_maps: int
    # Faithfulness of the teacher's maps to the teacher (per image, on the faithfulness subset;
    # val and test only), keyed as Evidence.diagnostics: "deletion_teacher", "road_morf_teacher",
    # "road_lerf_teacher_rand", ... (``diagnostics.teacher_diagnostics``).
    faithfulness: dict[str, torch.Tensor] | None = None

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)

    def whole(self) -> TeacherOutputs:
        """Already in memory (streamed outputs read theirs: ``streamed.StreamTeacherOutputs.whole``)."""
        return self

    @property
    def deletion_auc(self) -> torch.Tensor | None:
        return (self.faithfulness or {}).get("deletion_teacher")

    @property
    def insertion_auc(self) -> torch.Tensor | None:
        return (self.faithfulness or {}).get("insertion_teacher")


def cache_key(teacher_id: str, explain_settings: dict[str, Any], data_fingerprint: str, split: str) -> str:
    """Content hash of everything the cached maps depend on (batch size and cache folder excluded).
    The faithfulness settings (``explain_settings["faithfulness"]``) key val and test only: the
    train split's maps carry no faithfulness measurements."""
    keyed: dict[str, Any] = {"version": CACHE_FORMAT_VERSION}
    if split == "train":
        explain_settings = {k: v for k, v in explain_settings.items() if k != "faithfulness"}
    else:
        keyed["faithfulness_format"] = FAITHFULNESS_FORMAT
    keyed |= {"teacher": teacher_id, "explain": explain_settings, "data": data_fingerprint, "split": split}
    return stable_hash(keyed)


def cache_path(cache_dir: str | Path, split: str, key: str) -> Path:
    return Path(cache_dir) / "explanations" / f"teacher-{split}-{key}.parquet"


def write_teacher_outputs(path: Path, outputs: TeacherOutputs, metadata: dict[str, Any]) -> None:
    """Write atomically (temp file + rename) so a crash never leaves a half-written cache."""
    count, classes = outputs.logits.shape
    height, width = outputs.maps.shape[-2:]
    table = pa.table(
        {
            "index": pa.array(np.arange(count, dtype=np.int64)),
            "logits": pa.FixedSizeListArray.from_arrays(pa.array(outputs.logits.numpy().ravel()), classes),
            "map": pa.FixedSizeListArray.from_arrays(pa.array(outputs.maps.numpy().ravel()), height * width),
        }
    )
    info = {**metadata, "height": height, "width": width, "degenerate_maps": outputs.degenerate_maps}
    # The AUCs cover only the faithfulness subset, so they travel in the metadata, not as columns.
    if outputs.faithfulness:
        info["faithfulness_aucs"] = {name: values.tolist() for name, values in outputs.faithfulness.items()}
    table = table.replace_schema_metadata({"xkd_ray": json.dumps(info, sort_keys=True, default=str)})
    atomic_write(path, lambda temporary: pq.write_table(table, temporary))


def read_teacher_outputs(path: Path) -> TeacherOutputs:
    try:
        table = pq.read_table(path)
        info = json.loads(table.schema.metadata[b"xkd_ray"])
        count = table.num_rows
        logits = np.asarray(table.column("logits").combine_chunks().flatten(), dtype=np.float32).reshape(count, -1)
        maps = np.asarray(table.column("map").combine_chunks().flatten(), dtype=np.float32)
        maps = maps.reshape(count, int(info["height"]), int(info["width"]))
        found = info.get("faithfulness_aucs")
        aucs = {k: torch.tensor(v, dtype=torch.float32) for k, v in found.items()} if found else None
    except (OSError, KeyError, ValueError, pa.ArrowException, TypeError) as exc:
        raise XKDDataError(f"{path}: explanation cache is unreadable ({exc}); delete it to recompute") from exc
    maps_tensor = torch.from_numpy(maps.copy())
    return TeacherOutputs(torch.from_numpy(logits.copy()), maps_tensor, int(info["degenerate_maps"]), aucs)


def explain_settings(
    explainer: str, layer: str | None, ig_steps: int, blur_sigma: float, faithfulness: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``explain.*`` values that key the cache: the explainer, its layer, and only the settings
    that explainer reads (so a setting it ignores never splits the cache); with ``faithfulness``
    (``FaithfulnessConfig.cache_settings()``), the teacher's val/test measurements are made with it."""
    if explainer not in EXPLAINERS:
        raise XKDConfigError(f"explain.explainer: got {explainer!r}; allowed values are {', '.join(EXPLAINERS)}")
    every = {"ig_steps": ig_steps, "blur_sigma": blur_sigma}
    chosen = {"explainer": explainer, "layer": layer, **{k: every[k] for k in EXPLAINERS[explainer].settings}}
    return chosen if faithfulness is None else {**chosen, "faithfulness": dict(faithfulness)}


def teacher_cache_file(
    cache_dir: str | Path, teacher_id: str, settings: dict[str, Any], data_fingerprint: str, split: str
) -> Path:
    """The cache file of one split's teacher outputs (``cache_path`` of ``cache_key``)."""
    return cache_path(cache_dir, split, cache_key(teacher_id, settings, data_fingerprint, split))


def read_cached_teacher_outputs(path: Path, images: torch.Tensor, split: str) -> TeacherOutputs:
    """Read a cache file and check it still fits the split it claims to describe."""
    outputs = read_teacher_outputs(path)
    if len(outputs.logits) != len(images) or outputs.maps.shape[-2:] != images.shape[-2:]:
        raise XKDDataError(f"{path}: cached explanations do not match the {split} split; delete the file")
    return outputs


def explain_batch(
    teacher: nn.Module, images: torch.Tensor, settings: dict[str, Any], inputs: TeacherInput | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The teacher's logits and its maps for its own top-1 class on one batch (CPU float32), the
    maps at the size of ``images`` (``inputs``: the teacher's input contract).

    The unit of work of the distributed explanation job (``xkd_ray.cluster.ray_teacher``): each map
    depends only on its own image, so any split into batches gives the same maps."""
    logits = predict_logits(student_view(teacher, inputs), images, len(images))
    maps = explain_maps(
        teacher,
        images,
        logits.argmax(dim=1),
        explainer=settings["explainer"],
        layer=settings["layer"],
        ig_steps=settings.get("ig_steps", 32),
        blur_sigma=settings.get("blur_sigma", 1.0),
        batch_size=max(1, len(images)),
        inputs=inputs,
    )
    return logits, maps.maps, maps.degenerate_maps


def teacher_faithfulness(
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    maps: torch.Tensor,
    settings: dict[str, Any],
    inputs: TeacherInput | None = None,
) -> dict[str, torch.Tensor]:
    """The teacher's per-image faithfulness measurements (``diagnostics.teacher_diagnostics``) on
    the split's faithfulness subset (the students' images, so the numbers compare); ``settings``:
    ``FaithfulnessConfig.cache_settings()``. The student's images are perturbed and the teacher
    sees each perturbed image through its input contract ``inputs``."""
    ids = torch.as_tensor(faithfulness_subset(labels, settings["images"], settings["seed"]))
    return teacher_diagnostics(
        student_view(teacher, inputs),
        images[ids],
        maps[ids],
        ids,
        seed=settings["seed"],
        road=settings["road"],
        road_steps=settings["road_steps"],
    )


def cached_teacher_outputs(
    teacher: nn.Module,
    teacher_id: str,
    images: torch.Tensor,
    split: str,
    data_fingerprint: str,
    *,
    explainer: str,
    layer: str | None,
    ig_steps: int,
    blur_sigma: float,
    batch_size: int,
    cache_dir: str | Path,
    progress: bool = True,
    inputs: TeacherInput | None = None,
    labels: torch.Tensor | None = None,
    faithfulness: dict[str, Any] | None = None,
) -> tuple[TeacherOutputs, Path, bool]:
    """The teacher's logits and maps for one split: from the cache, or computed and cached.

    Returns the outputs, the cache file and whether it was a cache hit. ``inputs``: the teacher's
    input contract (its maps are cached at the split's size); ``teacher_id`` must key it. With
    ``labels`` and ``faithfulness`` (``FaithfulnessConfig.cache_settings()``), val and test also
    carry the teacher's faithfulness measurements on the faithfulness subset.
    """
    settings = explain_settings(explainer, layer, ig_steps, blur_sigma, faithfulness)
    path = teacher_cache_file(cache_dir, teacher_id, settings, data_fingerprint, split)
    if path.exists():
        return read_cached_teacher_outputs(path, images, split), path, True
    logits = predict_logits(student_view(teacher, inputs), images, batch_size)
    explained = explain_maps(
        teacher,
        images,
        logits.argmax(dim=1),
        explainer=explainer,
        layer=layer,
        ig_steps=ig_steps,
        blur_sigma=blur_sigma,
        batch_size=batch_size,
        progress=progress,
        description=f"teacher {explainer} ({split})",
        inputs=inputs,
    )
    # Metrics read val and test only; the faithfulness subset, as for students.
    measured = split != "train" and labels is not None and faithfulness is not None
    if measured:
        on_split = {**faithfulness, "road": road_on(faithfulness["road"], split)}  # type: ignore[index]
        aucs = teacher_faithfulness(teacher, images, labels, explained.maps, on_split, inputs)
    else:
        aucs = None
    outputs = TeacherOutputs(logits, explained.maps, explained.degenerate_maps, aucs)
    write_teacher_outputs(path, outputs, {"split": split, "teacher": teacher_id, **settings})
    return outputs, path, False
