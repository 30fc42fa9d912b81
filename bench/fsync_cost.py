"""What durability costs on the registry's update path: ``atomic_write`` (and the student folders)
fsync each file before its rename and the folder after it, so a power loss cannot leave a new name
on an empty file. Measured on the path a search takes after every finished trial: a student folder
written (``write_model_folder``), ``record_trial`` (trials.parquet) and ``update_registry`` (the
front student's folder, front.parquet, summary.json), N trials per arm, the arms interleaved trial
by trial in one run (fsync on / off, ``checkpoints.DURABLE``) in two fresh experiment folders.
Prints the median seconds per trial update in each arm and their ratio, then one RESULT line.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xkd_ray.core import checkpoints
from xkd_ray.core.models import StudentNet
from xkd_ray.pareto.front import record_trial, update_registry

ARCHITECTURE = {"in_channels": 1, "num_classes": 10, "width": 8, "ae_depth": 2, "ae_width": 8, "fusion": "concat"}


def one_trial(experiment: Path, index: int) -> float:
    started = time.perf_counter()
    folder = experiment / "students" / f"t{index:04d}"
    # Accuracy rises, fidelity falls: every trial joins the front (the most writes per update).
    metrics = {"val": {"accuracy": 0.5 + index / (2 * (index + 10)), "fidelity": 1.0 / (index + 2)}}
    student = StudentNet.from_architecture(ARCHITECTURE)
    checkpoints.write_model_folder(folder, student, {"architecture": ARCHITECTURE}, metrics)
    row = {"trial_id": f"t{index:04d}", "method": "xd", "status": "ok", "config": {}, "student_dir": str(folder),
           **{f"val_{k}": v for k, v in metrics["val"].items()}}  # fmt: skip
    record_trial(experiment, row)
    update_registry(experiment, lambda model, record: {"accuracy": 0.9, "fidelity": 0.5})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--dir", type=Path, default=None, help="where the experiment folders go (a disk to test)")
    parser.add_argument("--smoke", action="store_true", help="4 trial updates per arm (a check that it runs)")
    args = parser.parse_args()
    if args.smoke:
        args.trials = 4
    root = Path(tempfile.mkdtemp(prefix="fsync-cost-", dir=args.dir))
    times: dict[bool, list[float]] = {True: [], False: []}
    for index in range(args.trials):
        for durable in (True, False) if index % 2 == 0 else (False, True):
            checkpoints.DURABLE = durable
            times[durable].append(one_trial(root / ("durable" if durable else "plain"), index))
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"folder {root} ({args.trials} trial updates per arm, interleaved)")
    print(f"median s per trial update: fsync {on:.4f}, no fsync {off:.4f}; ratio {on / off:.2f}")
    shutil.rmtree(root, ignore_errors=True)
    print(f"RESULT fsync_s={on:.4f} no_fsync_s={off:.4f} ratio={on / off:.3f} extra_ms={(on - off) * 1000:.1f}")


if __name__ == "__main__":
    main()
