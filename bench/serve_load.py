"""The served student under a bounded load from a real HTTP client on localhost.

Trains (or reuses, ``--student``) a digits XD student, deploys it with ``xkd_ray.cluster.serve``
on a local Ray (``--replicas``, one CPU each), and sends PNG digits (24x24 grey, sklearn's digits
scaled to 8 bits) with an aiohttp client at each concurrency: p50 / p99 latency, requests/s, errors
(anything but 200). Then the same valid requests mixed with 10% malformed ones (empty body, bytes
that are no image, a JSON content type, a body over the size limit), at concurrency 8: every
malformed one must get 400, every valid one 200, and none a 5xx. The ceiling is the same work in
this process without HTTP or Serve: decode the PNG, ``serve.answer`` (preprocess, forward, map as
base64 PNG) one request at a time, and in batches of ``serve.MAX_BATCH``. The client runs on the
same cores as the server, so the served figures include the client's own CPU time.

Ends with ``RESULT rps_c8=... p99_ms_c8=... errors=0 bad_input_5xx=0 ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TINY = {
    "data.image_size": 16,
    "teacher.width": 8,
    "teacher.epochs": 3,
    "student.width": 8,
    "student.ae_width": 8,
    "student.ae_depth": 2,
    "distill.epochs": 3,
    "distill.method": "xd",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_student(cache_dir: str, out: Path) -> Path:
    from xkd_ray.config.schema import ExperimentConfig
    from xkd_ray.core.distill import distill, save_student
    from xkd_ray.core.prepared import prepare

    config = ExperimentConfig().with_overrides({**TINY, "explain.cache_dir": cache_dir})
    data = prepare(config, progress=False)
    student, metrics = distill(config, data, progress=False)
    return save_student(out, config, student, data, metrics)


def digit_pngs(count: int) -> list[bytes]:
    from PIL import Image
    from sklearn.datasets import load_digits

    images = load_digits().images
    out = []
    for index in range(count):
        buffer = io.BytesIO()
        Image.fromarray((images[index % len(images)] * 255 / 16).astype(np.uint8)).resize((24, 24)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def malformed(index: int, max_bytes: int) -> tuple[bytes, str]:
    kinds = [
        (b"", "image/png"),
        (b"this is not an image " * 8, "image/png"),
        (b'{"image": "digit"}', "application/json"),
        (b"\x89PNG" + bytes(max_bytes), "image/png"),
    ]
    return kinds[index % len(kinds)]


async def load(url: str, requests: list[tuple[bytes, str, bool]], concurrency: int) -> dict[str, object]:
    """Send every request, ``concurrency`` at a time; latency per request, status per kind."""
    import aiohttp

    latencies: list[float] = []
    statuses: list[tuple[bool, int]] = []
    queue = iter(requests)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def worker() -> None:
            for body, content_type, valid in queue:
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers={"Content-Type": content_type}) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError):
                    status = -1  # no answer at all: counted as an error
                latencies.append(time.perf_counter() - started)
                statuses.append((valid, status))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "rps": len(requests) / wall,
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "valid_ok": sum(valid and status == 200 for valid, status in statuses),
        "valid_errors": sum(valid and status != 200 for valid, status in statuses),
        "bad_400": sum(not valid and status == 400 for valid, status in statuses),
        "bad_other": sum(not valid and status != 400 for valid, status in statuses),
        "5xx": sum(status >= 500 for _, status in statuses),
    }


def in_process(student, bodies: list[bytes], batch: int) -> float:
    """Requests/s of the served work done here: decode, preprocess, forward, encode the map."""
    from xkd_ray.cluster.serve import answer, image_from_body

    started = time.perf_counter()
    for start in range(0, len(bodies), batch):
        images = [image_from_body(body, "image/png") for body in bodies[start : start + batch]]
        answer(student, images)
    return len(bodies) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, help="a student folder (default: train a small digits XD student)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny: 60 requests per level")
    args = parser.parse_args(argv)
    count = 60 if args.smoke else args.requests
    levels = [int(c) for c in args.concurrency.split(",")]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    import torch

    from xkd_ray.cluster.serve import MAX_BATCH, MAX_BYTES, deploy
    from xkd_ray.student.predict import load_student_folder

    folder = args.student or train_student(".xkd_cache/smoke", Path(tempfile.mkdtemp(prefix="xkd-serve-")) / "xd")
    student = load_student_folder(folder)
    bodies = digit_pngs(count)
    torch.set_num_threads(1)  # as in a replica
    ceiling_1 = in_process(student, bodies, 1)
    ceiling_batch = in_process(student, bodies, MAX_BATCH)

    ray.init(num_cpus=max(2, args.replicas), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        base = deploy(student, port=free_port(), replicas=args.replicas)
        url = f"{base}/predict"
        results = {}
        print(f"student {folder}; {count} requests per level; {os.cpu_count()} CPUs; {args.replicas} replica(s)")
        print(f"{'run':>14} {'rps':>8} {'p50 ms':>8} {'p99 ms':>8} {'ok':>6} {'errors':>6} {'bad->400':>8} {'5xx':>4}")
        for concurrency in levels:
            result = asyncio.run(load(url, [(b, "image/png", True) for b in bodies], concurrency))
            results[concurrency] = result
            print(
                f"{'c=' + str(concurrency):>14} {result['rps']:8.1f} {result['p50_ms']:8.1f} {result['p99_ms']:8.1f} "
                f"{result['valid_ok']:6d} {result['valid_errors']:6d} {'-':>8} {result['5xx']:4d}"
            )
        mixed = [
            (*malformed(index, MAX_BYTES), False) if index % 10 == 9 else (body, "image/png", True)
            for index, body in enumerate(bodies)
        ]
        bad = asyncio.run(load(url, mixed, 8))
        print(
            f"{'c=8, 10% bad':>14} {bad['rps']:8.1f} {bad['p50_ms']:8.1f} {bad['p99_ms']:8.1f} {bad['valid_ok']:6d} "
            f"{bad['valid_errors']:6d} {bad['bad_400']:8d} {bad['5xx']:4d}  (malformed not 400: {bad['bad_other']})"
        )
    finally:
        ray.shutdown()
    c8 = results.get(8, results[levels[-1]])
    errors = sum(r["valid_errors"] for r in results.values()) + bad["valid_errors"] + bad["bad_other"]
    print(
        f"in-process ceiling (no HTTP, no Serve, this process): {ceiling_1:.1f} rps one at a time, "
        f"{ceiling_batch:.1f} rps in batches of {MAX_BATCH}; served c=8 / in-process one at a time = "
        f"{c8['rps'] / ceiling_1:.3f}, / batched = {c8['rps'] / ceiling_batch:.3f}"
    )
    print(
        f"RESULT rps_c8={c8['rps']:.1f} p99_ms_c8={c8['p99_ms']:.1f} errors={errors} bad_input_5xx={bad['5xx']} "
        f"bad_input_400={bad['bad_400']} inprocess_rps={ceiling_1:.1f} inprocess_batched_rps={ceiling_batch:.1f} "
        f"served_vs_inprocess={c8['rps'] / ceiling_1:.3f}"
    )
    return 0 if errors == 0 and bad["5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
