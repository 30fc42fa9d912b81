"""The teacher's steps on a GPU: what a Ray Train teacher worker runs per epoch
(``teacher.train_teacher_epoch`` with bf16 autocast) and what an explanation actor runs per batch
(``explain.explain_batch``, Integrated Gradients), in one process, against the same steps on the CPU.

Reports seconds per teacher epoch and per explained image on each device, and the test accuracy
of both teachers and the agreement of their maps (bf16 and GPU kernels make them differ slightly;
the check is that the GPU path trains as good a teacher). Without a GPU it says so and measures the
CPU alone.

Run: python bench/gpu_teacher.py [--epochs 15] [--images 512] [--smoke]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from xkd_ray.config.schema import ExperimentConfig
from xkd_ray.core.explain import explain_batch, explain_settings
from xkd_ray.core.models import build_teacher
from xkd_ray.core.teacher import make_teacher_optimizer, split_accuracies, teacher_architecture, train_teacher_epoch
from xkd_ray.data.datasets import load_splits


def train(config: ExperimentConfig, splits, device: str) -> tuple[float, torch.nn.Module]:
    """The teacher worker's epoch on one device; returns (median s/epoch, the trained teacher)."""
    torch.manual_seed(config.teacher.seed)
    model = build_teacher(**teacher_architecture(config, splits)).to(device)
    optimizer, scheduler = make_teacher_optimizer(config, model)
    dataset = TensorDataset(splits.train.images, splits.train.labels)
    loader = DataLoader(dataset, batch_size=config.teacher.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(config.teacher.seed))  # fmt: skip
    amp = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else None
    seconds = []
    for _ in range(config.teacher.epochs):
        started = time.perf_counter()
        train_teacher_epoch(model, loader, optimizer, device=device, amp_dtype=amp)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        scheduler.step()
    return sorted(seconds)[len(seconds) // 2], model.eval()


def explain(config: ExperimentConfig, model: torch.nn.Module, images: torch.Tensor, device: str):
    """Integrated Gradients maps batch by batch on one device; returns (s per image, maps on CPU)."""
    settings = explain_settings("integrated_gradients", None, config.explain.ig_steps, config.explain.blur_sigma)
    model, batch = model.to(device), config.explain.batch_size
    started, maps = time.perf_counter(), []
    for start in range(0, len(images), batch):
        _, chunk, _ = explain_batch(model, images[start : start + batch].to(device), settings)
        maps.append(chunk.cpu())
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / len(images), torch.cat(maps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="teacher epochs (the default space's)")
    parser.add_argument("--images", type=int, default=512, help="training images to explain")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    overrides = {"teacher.epochs": args.epochs}
    if args.smoke:
        overrides = {"data.image_size": 16, "teacher.width": 8, "teacher.epochs": 2}
        args.images = 64
    config = ExperimentConfig().with_overrides(overrides)
    splits = load_splits(config.data)
    images = splits.train.images[: args.images]
    cpu_epoch, cpu_teacher = train(config, splits, "cpu")
    cpu_accuracy = split_accuracies(cpu_teacher, splits, ("test",))["test_accuracy"]
    cpu_image, cpu_maps = explain(config, cpu_teacher, images, "cpu")
    print(f"cpu ({torch.get_num_threads()} threads): {cpu_epoch:.3f} s/teacher epoch, test accuracy "
          f"{cpu_accuracy:.3f}; IG {1000 * cpu_image:.2f} ms/image")  # fmt: skip
    if not torch.cuda.is_available():
        print("no GPU on this machine: the GPU path was not run")
        print(f"RESULT gpu=0 cpu_s_per_teacher_epoch={cpu_epoch:.4f} cpu_ms_per_ig_image={1000 * cpu_image:.3f}")
        return
    gpu_epoch, gpu_teacher = train(config, splits, "cuda")
    gpu_accuracy = split_accuracies(gpu_teacher.cpu(), splits, ("test",))["test_accuracy"]
    gpu_image, _ = explain(config, gpu_teacher, images, "cuda")
    # The same (CPU-trained) teacher explained on the GPU: do the maps agree with the CPU's?
    _, same_maps = explain(config, cpu_teacher, images, "cuda")
    cpu_teacher.cpu()
    agreement = torch.nn.functional.cosine_similarity(same_maps.flatten(1), cpu_maps.flatten(1)).mean().item()
    print(f"gpu ({torch.cuda.get_device_name()}, bf16 autocast): {gpu_epoch:.3f} s/teacher epoch, test accuracy "
          f"{gpu_accuracy:.3f}; IG {1000 * gpu_image:.2f} ms/image; map cosine vs CPU {agreement:.4f}")  # fmt: skip
    print(
        f"RESULT gpu=1 cpu_s_per_teacher_epoch={cpu_epoch:.4f} gpu_s_per_teacher_epoch={gpu_epoch:.4f} "
        f"teacher_speedup={cpu_epoch / gpu_epoch:.2f} accuracy_gpu_minus_cpu={gpu_accuracy - cpu_accuracy:.4f} "
        f"ig_speedup={cpu_image / gpu_image:.2f} map_cosine_gpu_vs_cpu={agreement:.4f}"
    )


if __name__ == "__main__":
    main()
