"""Self-contained student folders: ``preprocessing.json`` and a model card (``card.md``) beside
``model.pt``, ``config.json`` and ``metrics.json``.

A folder written here can be used with nothing else: the card says what the student was
distilled from (teacher id and a hash of its weights), on which data (the splits' fingerprint),
with which config, how well it does (val/test accuracy, fidelity and its skill over the constant
map, faithfulness), which front it came from, and how to load, predict, export and serve it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from xkd_ray.core.checkpoints import write_model_folder
from xkd_ray.student.preprocessing import FILE, Preprocessing

CARD = "card.md"
# The card's metrics table: what a reader of one student asks first (every metric stays in metrics.json).
CARD_METRICS = (
    ("accuracy", "top-1 accuracy"),
    ("agreement", "top-1 agreement with the teacher"),
    ("fidelity", "Pearson r of its map with the teacher's"),
    ("fidelity_template", "the constant mean map's fidelity (the bar to beat)"),
    ("fidelity_skill", "skill over the constant map (0: no better; 1: perfect)"),
    ("fidelity_posthoc_skill", "the same, for captum on the student"),
    ("head_honesty", "head map vs its own post-hoc map (Pearson r)"),
    ("deletion_auc_head", "deletion AUC with its head map (lower: more faithful)"),
    ("deletion_auc_posthoc", "deletion AUC with its post-hoc map"),
    ("deletion_auc_random", "deletion AUC with random maps (control)"),
    ("road_morf_auc_head", "ROAD MoRF AUC with its head map (lower: more faithful)"),
    ("road_morf_auc_posthoc", "ROAD MoRF AUC with its post-hoc map"),
    ("road_morf_auc_random", "ROAD MoRF AUC with random maps (control)"),
    ("road_morf_auc_shifted", "ROAD MoRF AUC with its post-hoc map shifted elsewhere (control as smooth as the map)"),
    ("randomisation_head", "head map before/after randomising the classifier (low: depends on it)"),
    ("mprt_spearman_posthoc", "post-hoc map vs after cascading randomisation (Spearman; low: depends on it)"),
    ("params", "parameters"),
    ("latency_ms", "ms per image at batch size 1 (median)"),
)


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, shapes, bytes): which teacher, whatever file it came from."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def _value(metrics: dict[str, Any], split: str, name: str) -> str:
    value = metrics.get(split, {}).get(name) if isinstance(metrics.get(split), dict) else None
    if value is None:
        return "-"
    return f"{value:,.0f}" if name == "params" else f"{value:.4f}"


def card_text(
    record: dict[str, Any], metrics: dict[str, Any], prep: Preprocessing, origin: dict[str, Any] | None = None
) -> str:
    """The model card (Markdown). ``origin``: the front this student belongs to, when it does."""
    experiment = record.get("experiment", {}) if isinstance(record.get("experiment"), dict) else {}
    method = experiment.get("distill", {}).get("method", "?")
    teacher = experiment.get("teacher", {})
    lines = [
        f"# Student: {method} on {prep.dataset or '?'}",
        "",
        f"- distilled from teacher `{record.get('teacher_id', '?')}` ({teacher.get('arch', '?')}, width "
        f"{teacher.get('width', '?')}); teacher weights sha256 `{record.get('teacher_weights_sha256', '?')}`",
        f"- data fingerprint `{record.get('data_fingerprint', '?')}`; split sizes "
        f"{record.get('data', {}).get('sizes')}",
        f"- input: {prep.channels} channel(s) ({'grey' if prep.channels == 1 else 'RGB'}), resized to "
        f"{prep.image_size}x{prep.image_size} ({prep.resize}), arrays / {prep.pixel_max:g} then standardised "
        f"with the training split's mean {list(prep.mean)} and std {list(prep.std)}",
        f"- classes: {', '.join(prep.class_names)}",
        f"- explanation: `{prep.explanation.kind}`"
        + (" (its own head's map)" if prep.explanation.kind == "head" else " (captum on the student, post hoc)"),
        f"- architecture: `{record.get('architecture')}`",
    ]
    if origin:
        lines.append(
            f"- Pareto front of `{origin.get('experiment')}`, trial `{origin.get('trial_id')}`, objectives "
            f"{origin.get('objectives')}"
        )
    lines += ["", "| metric | val | test | meaning |", "|---|---|---|---|"]
    lines += [
        f"| {name} | {_value(metrics, 'val', name)} | {_value(metrics, 'test', name)} | {meaning} |"
        for name, meaning in CARD_METRICS
    ]
    changed = {section: values for section, values in experiment.items() if section in ("student", "distill")}
    lines += [
        "",
        f"Config (student, distill): `{changed}`; the whole experiment is in `config.json`.",
        "",
        "## Use it",
        "",
        "```python",
        "from xkd_ray.student.predict import load_student_folder",
        "student = load_student_folder('THIS_FOLDER')",
        "result = student.predict('image.png')   # labels, class_names, probabilities, maps",
        "```",
        "",
        "```bash",
        "xkd predict THIS_FOLDER image.png --maps maps.png",
        "xkd export THIS_FOLDER --format onnx --out student.onnx   # or torchscript: no xkd_ray needed to run it",
        "xkd serve THIS_FOLDER --port 8000   # POST /predict with an image; GET /health",
        "```",
        "",
    ]
    return "\n".join(lines)


def folder_files(
    record: dict[str, Any], metrics: dict[str, Any], prep: Preprocessing | None, origin: dict[str, Any] | None = None
) -> dict[str, str]:
    """The files that make a student folder self-contained (none for a folder without preprocessing)."""
    if prep is None:
        return {}
    return {FILE: prep.to_json(), CARD: card_text(record, metrics, prep, origin)}


def write_student_folder(directory: str | Path, config: Any, student: Any, data: Any, metrics: dict[str, Any]) -> Path:
    """A trained student's folder: weights, config.json (architecture, experiment, teacher and data
    identity), metrics.json, preprocessing.json and card.md, renamed into place as one unit."""
    from xkd_ray.student.preprocessing import preprocessing_of

    record = {
        "architecture": student.architecture(),
        "experiment": config.to_dict(),
        "teacher_id": data.teacher_id,
        "teacher_weights_sha256": weights_hash(data.teacher_state),
        "data": data.splits.describe(),
        "data_fingerprint": data.splits.fingerprint(),
    }
    prep = preprocessing_of(data.splits, config.explain, student.head is not None)
    return write_model_folder(directory, student, record, metrics, files=folder_files(record, metrics, prep))


def upgrade_folder(folder: str | Path) -> Path:
    """Give a student folder saved before students carried ``preprocessing.json`` its record and
    card: the data its config.json names is reloaded (same config, same tensors), its description
    checked against the one saved at training time, and the two files are added (the weights,
    config.json and metrics.json are not touched)."""
    from xkd_ray.config.schema import ExperimentConfig
    from xkd_ray.core.checkpoints import atomic_write_bytes, read_json_mapping
    from xkd_ray.data.datasets import load_splits
    from xkd_ray.errors import XKDCheckpointError
    from xkd_ray.student.preprocessing import preprocessing_of

    folder = Path(folder)
    record = read_json_mapping(folder / "config.json")
    if not isinstance(record.get("experiment"), dict) or not isinstance(record.get("architecture"), dict):
        raise XKDCheckpointError(f"{folder / 'config.json'}: no 'experiment'/'architecture' entry to rebuild from")
    config = ExperimentConfig.from_dict(record["experiment"])
    splits = load_splits(config.data)
    if record.get("data") is not None and record["data"] != splits.describe():
        raise XKDCheckpointError(
            f"{folder}: the data its config names now loads as {splits.describe()}, not {record['data']} "
            "as at training; cannot recover its preprocessing"
        )
    prep = preprocessing_of(splits, config.explain, bool(record["architecture"].get("ae_depth")))
    metrics = read_json_mapping(folder / "metrics.json") if (folder / "metrics.json").exists() else {}
    shown = {**record, "data_fingerprint": record.get("data_fingerprint", splits.fingerprint())}
    for name, text in folder_files(shown, metrics, prep).items():
        atomic_write_bytes(folder / name, text.encode())
    return folder
