"""The student loop on a GPU: the code Ray Train workers run (``train_one_epoch`` with bf16
autocast, evaluation with captum on the device, the latency metric's CUDA timing), run here in
one process, against the same loop on the CPU.

Reports seconds per epoch on each device and the test metrics of both students (bf16 autocast
and GPU kernels make the runs differ slightly; the check is that the GPU path trains a student
as good as the CPU one). Without a GPU it says so and measures the CPU alone.

Run: python bench/gpu_path.py [--method xd_e2kd] [--epochs 12]
"""

from __future__ import annotations

import argparse
import time

import torch

from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.distill import build_student, epoch_loader, evaluate, make_optimizer, train_one_epoch
from xkd_ray.core.prepared import prepare


def train(config: ExperimentConfig, data, device: str) -> tuple[float, dict[str, float]]:
    """The worker loop's steps on one device; returns (median s/epoch, test metrics)."""
    torch.manual_seed(config.distill.seed)
    student = build_student(config, data.splits).to(device)
    optimizer, scheduler = make_optimizer(config, student)
    teacher = data.live_teacher(config)
    teacher = teacher.to(device) if teacher is not None else None
    amp = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else None
    seconds = []
    for epoch in range(config.distill.epochs):
        loader = epoch_loader(config, data, epoch)
        started = time.perf_counter()
        train_one_epoch(student, loader, optimizer, config, epoch, teacher=teacher, device=device, amp_dtype=amp)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        scheduler.step()
    metrics = evaluate(student, data, "test", config, device=device)
    return sorted(seconds)[len(seconds) // 2], metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="xd_e2kd", help="xd_e2kd uses the teacher live and differentiable Grad-CAM")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    overrides = {"distill.method": args.method, "distill.epochs": args.epochs}
    if args.smoke:
        overrides.update({"data.image_size": 16, "teacher.width": 8, "teacher.epochs": 2, "student.width": 8,
                          "student.ae_width": 8, "distill.epochs": 2})  # fmt: skip
    config = ExperimentConfig().with_overrides(overrides)
    data = prepare(config, progress=False)
    cpu_epoch, cpu = train(config, data, "cpu")
    print(f"cpu ({torch.get_num_threads()} threads): {cpu_epoch:.3f} s/epoch, test {_shown(cpu)}")
    if not torch.cuda.is_available():
        print("no GPU on this machine: the GPU path was not run")
        print(f"RESULT gpu=0 cpu_s_per_epoch={cpu_epoch:.4f}")
        return
    gpu_epoch, gpu = train(config, data, "cuda")
    print(f"gpu ({torch.cuda.get_device_name()}, bf16 autocast): {gpu_epoch:.3f} s/epoch, test {_shown(gpu)}")
    print(
        f"RESULT gpu=1 cpu_s_per_epoch={cpu_epoch:.4f} gpu_s_per_epoch={gpu_epoch:.4f} "
        f"speedup={cpu_epoch / gpu_epoch:.2f} accuracy_gpu_minus_cpu={gpu['accuracy'] - cpu['accuracy']:.4f} "
        f"posthoc_skill_gpu_minus_cpu={gpu['fidelity_posthoc_skill'] - cpu['fidelity_posthoc_skill']:.4f} "
        f"latency_ms_gpu={gpu['latency_ms']:.3f} latency_ms_cpu={cpu['latency_ms']:.3f}"
    )


def _shown(metrics: dict[str, float]) -> str:
    names = ("accuracy", "fidelity", "fidelity_posthoc_skill", "head_honesty", "latency_ms")
    return ", ".join(f"{n} {metrics[n]:.3f}" for n in names if metrics.get(n) is not None)


if __name__ == "__main__":
    main()
