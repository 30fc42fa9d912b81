"""Exported students run in a process that never imports xkd_ray, and give the same numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from xkd_ray.core.distill import distill, save_student
from xkd_ray.core.models import StudentNet
from xkd_ray.errors import XKDConfigError
from xkd_ray.student.export import export_student
from xkd_ray.student.predict import Student, load_student_folder
from xkd_ray.student.preprocessing import Explanation, Preprocessing

# Runs the artefact with torch / onnxruntime alone, then proves xkd_ray was never imported.
RUNNER = """
import json, sys
import numpy as np
path, fmt, pixels_file, out_file = sys.argv[1:]
pixels = np.load(pixels_file)
if fmt == "torchscript":
    import torch
    extra = {"preprocessing.json": "", "outputs.json": ""}
    model = torch.jit.load(path, _extra_files=extra)
    with torch.no_grad():
        outputs = [o.numpy() for o in model(torch.from_numpy(pixels))]
    names, prep = json.loads(extra["outputs.json"]), json.loads(extra["preprocessing.json"])
else:
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"pixels": pixels})
    names = [o.name for o in session.get_outputs()]
    prep = json.loads(session.get_modelmeta().custom_metadata_map["preprocessing"])
np.savez(out_file, **dict(zip(names, outputs)))
leaked = sorted(name for name in sys.modules if name.split(".")[0] == "xkd_ray")
print(json.dumps({"leaked": leaked, "class_names": prep["class_names"], "names": names}))
"""


@pytest.fixture(scope="module")
def xd_student(tiny_config, tiny_data, tmp_path_factory) -> Student:
    config = tiny_config.with_overrides({"distill.method": "xd"})
    student, metrics = distill(config, tiny_data, progress=False)
    return load_student_folder(
        save_student(tmp_path_factory.mktemp("export") / "xd", config, student, tiny_data, metrics)
    )


def run_outside(path, fmt: str, pixels: np.ndarray, tmp_path) -> tuple[dict, dict[str, np.ndarray]]:
    np.save(tmp_path / "pixels.npy", pixels)
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(path), fmt, str(tmp_path / "pixels.npy"), str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the repository: nothing of xkd_ray on the way
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report, dict(np.load(tmp_path / "out.npz"))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_student_matches_predict_without_xkd_ray(xd_student, fmt, tmp_path) -> None:
    artefact = export_student(xd_student, fmt, tmp_path / f"student.{fmt}")
    # scikit-learn's raw 8x8 digits (ink 0..16), as the artefact takes them: float32 [N, 1, H, W].
    raw = load_digits().images[:300].astype(np.float32)[:, None]
    report, outputs = run_outside(artefact, fmt, raw, tmp_path)
    assert report["leaked"] == [] and report["names"] == ["logits", "probabilities", "head_map"]
    assert report["class_names"] == [str(d) for d in range(10)]
    expected = xd_student.predict(raw[:, 0])
    np.testing.assert_allclose(outputs["logits"], expected.logits.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(outputs["probabilities"], expected.probabilities.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(outputs["head_map"], torch.stack(expected.maps).numpy(), atol=1e-5, rtol=0)
    # Another size than the one it was exported with: resized inside, map back at 40 x 28.
    big = np.random.default_rng(0).uniform(0, 16, (3, 1, 40, 28)).astype(np.float32)
    _, outputs = run_outside(artefact, fmt, big, tmp_path)
    expected = xd_student.predict(big)
    np.testing.assert_allclose(outputs["logits"], expected.logits.numpy(), atol=1e-5, rtol=0)
    assert outputs["head_map"].shape == (3, 40, 28)


def test_headless_student_exports_logits_only(tmp_path) -> None:
    torch.manual_seed(0)
    prep = Preprocessing(
        image_size=16, channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), pixel_max=255.0,
        resize="torch_bilinear_antialias", class_names=("cat", "dog"), explanation=Explanation(kind="gradcam"),
    )  # fmt: skip
    student = Student(StudentNet(3, 2, width=8).eval(), {}, {}, tmp_path, prep)
    pixels = np.random.default_rng(1).integers(0, 256, (4, 3, 20, 20)).astype(np.float32)
    report, outputs = run_outside(
        export_student(student, "torchscript", tmp_path / "s.pt"), "torchscript", pixels, tmp_path
    )
    assert report["names"] == ["logits", "probabilities"] and report["leaked"] == []
    np.testing.assert_allclose(outputs["logits"], student.predict(pixels, explain=False).logits.numpy(), atol=1e-5)
    with pytest.raises(XKDConfigError, match="--format"):
        export_student(student, "tflite", tmp_path / "s.tflite")
    assert not (tmp_path / "s.tflite").exists()
