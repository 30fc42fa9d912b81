"""The teacher's explanations on Ray workers: actors that each explain a chunk of a split, and
the preparation of a search's data bundle (teacher trained or reused, maps cached) on the workers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.util import ActorPool

from xkd_ray.cluster.ray_run import ensure_ray
from xkd_ray.cluster.ray_teacher import train_teacher_with_ray
from xkd_ray.cluster.ray_train import assigned_device
from xkd_ray.config.faithfulness_schema import road_on
from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.explain import (
    TeacherOutputs,
    explain_batch,
    explain_settings,
    teacher_cache_file,
    teacher_faithfulness,
    write_teacher_outputs,
)
from xkd_ray.core.models import build_teacher
from xkd_ray.core.prepared import DistillData, prepare_splits
from xkd_ray.core.progress import track
from xkd_ray.core.teacher import (
    Teacher,
    cached_teacher,
    teacher_architecture,
    teacher_input,
)
from xkd_ray.core.teacher_input import TeacherInput
from xkd_ray.data.datasets import load_splits
from xkd_ray.data.splits import SPLIT_NAMES, Splits
from xkd_ray.errors import XKDConfigError
from xkd_ray.pareto.storage import Storage


@ray.remote
class TeacherExplainer:
    """One explanation worker: loads the teacher once, then explains batch after batch."""

    def __init__(
        self, architecture: dict[str, Any], state: dict[str, torch.Tensor], threads: int, inputs: TeacherInput
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        device = assigned_device()
        model = build_teacher(**architecture)
        model.load_state_dict(state)
        self.teacher = model.to(device).eval()
        self.inputs = inputs  # the teacher's input contract
        self.node_id = ray.get_runtime_context().get_node_id()

    def explain(self, images: np.ndarray, settings: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int, str]:
        logits, maps, degenerate = explain_batch(self.teacher, torch.tensor(images), settings, self.inputs)
        return logits.numpy(), maps.numpy(), degenerate, self.node_id

    def faithfulness(
        self, images: np.ndarray, labels: np.ndarray, maps: np.ndarray, settings: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        return teacher_faithfulness(
            self.teacher, torch.tensor(images), torch.tensor(labels), torch.tensor(maps), settings, self.inputs
        )


def _chunks(count: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """Batches of at most ``batch_size`` images, at least two per worker when the split allows,
    so a small split still keeps every worker busy (maps do not depend on the batching)."""
    size = max(1, min(batch_size, math.ceil(count / (2 * workers))))
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def explain_on_workers(
    teacher: Teacher,
    splits: Splits,
    names: list[str],
    config: ExperimentConfig,
    *,
    workers: int,
    use_gpu: bool = False,
    progress: bool = True,
) -> dict[str, tuple[TeacherOutputs, list[str]]]:
    """The teacher's outputs for the splits ``names``, computed by ``workers`` Ray actors (one
    GPU each when ``use_gpu``), with the Ray node ids that computed each split. The batches of
    all splits form one queue, so one split's tail overlaps the next split's head."""
    if workers < 1:
        raise XKDConfigError(f"--workers: got {workers}; the explanation job needs >= 1 worker")
    explain = config.explain
    settings = explain_settings(
        explain.explainer, explain.layer, explain.ig_steps, explain.blur_sigma, config.faithfulness.cache_settings()
    )
    state_ref = ray.put({k: v.detach().cpu() for k, v in teacher.model.state_dict().items()})
    options = {"num_cpus": config.ray.cpus_per_worker, "num_gpus": 1 if use_gpu else 0}
    architecture, inputs = teacher_architecture(config, splits), teacher_input(config, splits)
    actors = [
        TeacherExplainer.options(**options).remote(architecture, state_ref, config.ray.threads_per_worker, inputs)
        for _ in range(workers)
    ]
    try:
        work = [
            (name, start, stop)
            for name in names
            for start, stop in _chunks(len(splits.split(name)), explain.batch_size, workers)
        ]
        images = {name: splits.split(name).images.numpy() for name in names}
        parts: dict[str, list[tuple[np.ndarray, np.ndarray, int, str]]] = {name: [] for name in names}
        total = sum(len(splits.split(name)) for name in names)
        description = f"teacher {explain.explainer} on {workers} Ray workers ({', '.join(names)})"
        pool = ActorPool(actors)
        with track(description, total, progress) as bar:
            batches = pool.map(
                lambda actor, item: actor.explain.remote(images[item[0]][item[1] : item[2]], settings), work
            )
            for (name, start, stop), result in zip(work, batches, strict=True):
                parts[name].append(result)
                bar.advance(stop - start)
        results: dict[str, tuple[TeacherOutputs, list[str]]] = {}
        auc_refs = {}
        for index, name in enumerate(names):
            logits = torch.from_numpy(np.concatenate([part[0] for part in parts[name]]))
            maps = torch.from_numpy(np.concatenate([part[1] for part in parts[name]]))
            outputs = TeacherOutputs(logits, maps, sum(part[2] for part in parts[name]))
            labels = splits.split(name).labels.numpy()
            results[name] = (outputs, sorted({part[3] for part in parts[name]}))
            if name != "train":  # as in explain.cached_teacher_outputs: val and test only
                actor = actors[index % len(actors)]
                faithful = {**settings["faithfulness"], "road": road_on(settings["faithfulness"]["road"], name)}
                auc_refs[name] = actor.faithfulness.remote(images[name], labels, maps.numpy(), faithful)
        for name, ref in auc_refs.items():
            outputs, nodes = results[name]
            results[name] = (dataclasses.replace(outputs, faithfulness=ray.get(ref)), nodes)
        return results
    finally:
        for actor in actors:
            ray.kill(actor)


# ----------------------------------------------------------------------------- the whole preparation


def prepare_on_workers(
    config: ExperimentConfig, *, workers: int, use_gpu: bool, progress: bool = True, storage: Storage | None = None
) -> DistillData:
    """``prepared.prepare(config)``, with the heavy parts on Ray workers: the teacher is trained by
    Ray Train (only if it is not cached) and the explanation caches of the splits that are missing
    are computed by Ray actors and written where ``prepare`` reads them. The bundle is then
    assembled from the caches by ``prepare_splits``, so both paths return the same ``DistillData``
    (``cache_hits`` saying which caches existed before this call). Joins the running Ray or
    starts a local one (``ensure_ray``). With ``storage`` (a search on object storage), the
    teacher's Ray Train run keeps its checkpoints there (``<out>/train/teacher-<id>``), where
    workers on any node reach them."""
    ensure_ray()
    splits = load_splits(config.data)
    teacher = cached_teacher(config, splits)
    if teacher is None:
        teacher = train_teacher_with_ray(
            config, splits, workers=workers, use_gpu=use_gpu, progress=progress,
            storage_path=None if storage is None else storage.path("train"),
            storage_filesystem=None if storage is None else storage.filesystem,
        )  # fmt: skip
    explain = config.explain
    settings = explain_settings(
        explain.explainer, explain.layer, explain.ig_steps, explain.blur_sigma, config.faithfulness.cache_settings()
    )
    fingerprint = splits.fingerprint()
    files = {
        name: teacher_cache_file(explain.cache_dir, teacher.teacher_id, settings, fingerprint, name)
        for name in SPLIT_NAMES
    }
    hits = {name: path.exists() for name, path in files.items()}
    missing = [name for name in SPLIT_NAMES if not hits[name]]
    if missing:
        computed = explain_on_workers(
            teacher, splits, missing, config, workers=workers, use_gpu=use_gpu, progress=progress
        )
        for name, (outputs, nodes) in computed.items():
            metadata = {"split": name, "teacher": teacher.teacher_id, **settings}
            metadata["computed_on"] = {"backend": "ray_actors", "workers": workers, "node_ids": nodes}
            write_teacher_outputs(files[name], outputs, metadata)
    data = prepare_splits(config, splits, progress=False)
    return dataclasses.replace(data, cache_hits=hits)
