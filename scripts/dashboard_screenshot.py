"""Screenshot the Ray dashboard while a small xkd search runs on it (for docs/DASHBOARD.md).

Why a script and not a hand-made picture: the dashboard changes with every Ray release, so the
image in the docs should be one command away from being redone (``make``-free, offline):

    .venv/bin/python scripts/dashboard_screenshot.py --out docs/dashboard.png

What it does, and why each step is there:

1. starts its own Ray head with ``ray start --head --block`` on free ports, with a short
   private temp dir. Other people's Ray instances on the same machine are never touched: the
   head is stopped by SIGTERM to that one ``ray start`` process, which kills exactly the
   processes it started (``ray stop`` would kill every Ray on the machine);
2. runs ``xkd search --address`` on it in the background, on the shipped smoke space with the
   explanation cache moved into the temp dir (digits ships with scikit-learn, so no internet);
3. waits until Ray Train workers of the search's trials are alive (state API), so the picture
   shows a search at work, not an empty cluster;
4. screenshots a dashboard page (default: Actors, where each running trial shows as an ALIVE
   ``RayTrainWorker``) with headless Debian chromium's ``--screenshot`` and a virtual-time
   budget (the dashboard is a React app that renders after its first fetches), and refuses a
   blank image;
5. stops the search with SIGINT (Ray Tune saves its state, as on Ctrl-C), then the Ray head.

Exits 2 with one line if chromium is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "search_spaces" / "smoke.yaml"
BIN = Path(sys.executable).parent
CHROMIUM_NAMES = ("chromium", "chromium-browser")
# Flags measured to work for headless chromium in a container without a GPU or network.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
PAGES = ("job", "jobs", "overview", "actors", "cluster")
MAX_PNG_BYTES = 300_000


def log(message: str) -> None:
    """Progress on stderr, so a slow 2-core machine does not look hung."""
    print(f"dashboard_screenshot: {message}", file=sys.stderr, flush=True)


def find_chromium(explicit: str | None) -> str | None:
    """``--chromium`` if given, else the first chromium on PATH (Debian names it ``chromium``)."""
    if explicit:
        return explicit if Path(explicit).is_file() and os.access(explicit, os.X_OK) else None
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def free_port() -> int:
    """A port nobody listens on now. Every Ray port is chosen this way (not Ray's defaults, e.g.
    8265 or 52365) because other Ray instances may already hold the defaults on this machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str, timeout: float = 10.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode())


def write_space(folder: Path, cache_dir: Path, trials: int, epochs: int) -> Path:
    """The smoke space with its cache in ``cache_dir`` (as tests/conftest.py ``smoke_space`` does)
    and more epochs per student, so trials run long enough to be caught running."""
    raw = yaml.safe_load(SMOKE.read_text())
    raw["base"]["explain"]["cache_dir"] = str(cache_dir)
    raw["base"]["distill"]["epochs"] = epochs
    raw["search"]["trials"] = trials
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@contextmanager
def local_ray(temp_dir: Path, num_cpus: int, env: dict[str, str]) -> Iterator[dict[str, str | int]]:
    """A Ray head of our own, on free ports, stopped (with all it started) when the block ends."""
    ports = {name: free_port() for name in ("gcs", "dashboard", "agent", "client", "metrics")}
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        f"--port={ports['gcs']}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dashboard']}",
        f"--dashboard-agent-listen-port={ports['agent']}",
        f"--ray-client-server-port={ports['client']}",
        f"--metrics-export-port={ports['metrics']}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
    ]
    log_file = (temp_dir.parent / "ray_start.log").open("wb")
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    info: dict[str, str | int] = {
        "address": f"127.0.0.1:{ports['gcs']}",
        "dashboard": f"http://127.0.0.1:{ports['dashboard']}",
        "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics",
        "pid": process.pid,
    }
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ray start exited with {process.returncode}; see {log_file.name}")
            try:
                get_json(f"{info['dashboard']}/api/version", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray dashboard did not come up in 120 s; see {log_file.name}") from None
                time.sleep(1)
        log(f"Ray head up: {info['address']}, dashboard {info['dashboard']}")
        yield info
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # ray start --block then kills what it started
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log_file.close()
        log("Ray head stopped")


def start_search(space: Path, experiment: Path, address: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """``xkd search`` as a user would run it against a cluster: a driver job of that Ray."""
    command = [str(BIN / "xkd"), "search", "--space", str(space), "--out", str(experiment)]
    command += ["--address", address, "--no-live"]
    log(" ".join(command))
    with log_path.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def stop_search(process: subprocess.Popen) -> None:
    """SIGINT, like Ctrl-C: Ray Tune stops the trials and saves its state (the search could be
    resumed with ``--resume``); SIGKILL only if it has not finished within a minute."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def alive_train_workers(dashboard: str) -> int:
    """How many Ray Train worker actors are alive: each running trial has one per DDP worker."""
    from ray.util.state import list_actors

    alive = [("state", "=", "ALIVE")]
    actors = list_actors(address=dashboard, filters=alive, limit=1000, raise_on_missing_output=False)
    return sum(1 for actor in actors if "RayTrainWorker" in (actor.class_name or ""))


def wait_for_trials(dashboard: str, search: subprocess.Popen, wanted: int, timeout: float) -> int:
    """Wait until ``wanted`` Ray Train workers are alive (the smoke space runs 2 trials of 1 worker
    at once), or settle for fewer 30 s after the first: trials of unequal length may never overlap.
    Returns how many were alive."""
    deadline = time.monotonic() + timeout
    first_seen: float | None = None
    while True:
        workers = alive_train_workers(dashboard)
        if workers and first_seen is None:
            first_seen = time.monotonic()
        if workers >= wanted or (first_seen is not None and time.monotonic() - first_seen > 30):
            return workers
        if search.poll() is not None:
            raise RuntimeError(f"the search exited ({search.returncode}) before {wanted} Ray Train workers ran")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no trial was running after {timeout:.0f} s")
        time.sleep(2)


def search_job_id(dashboard: str) -> str | None:
    """The running driver job of the search (the one whose entrypoint runs ``xkd search``)."""
    jobs = get_json(f"{dashboard}/api/jobs/")
    for job in jobs if isinstance(jobs, list) else []:
        if job.get("status") == "RUNNING" and "search" in (job.get("entrypoint") or ""):
            return job.get("job_id") or job.get("submission_id")
    return None


def xkd_metrics(metrics_url: str) -> list[str]:
    """The ``xkd_*`` lines Ray's Prometheus endpoint serves now (the search's gauges)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.startswith(("ray_xkd_", "xkd_"))]


def screenshot(chromium: str, url: str, out: Path, size: tuple[int, int], budget_ms: int, work: Path) -> None:
    """One ``chromium --headless --screenshot``; a fresh profile each time so no state leaks in."""
    profile = Path(tempfile.mkdtemp(prefix="profile-", dir=work))
    command = [
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        f"--window-size={size[0]},{size[1]}",
        f"--virtual-time-budget={budget_ms}",
        f"--screenshot={out}",
        url,
    ]
    result = subprocess.run(command, capture_output=True, timeout=180)
    if result.returncode != 0 or not out.is_file():
        tail = result.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"chromium failed ({result.returncode}) on {url}:\n{tail}")


def check_and_shrink(png: Path) -> None:
    """Refuse a blank page (a React app that had not rendered) and keep the file small enough to
    commit: quantise to a palette, which is lossless-looking for a flat UI."""
    from PIL import Image, ImageStat

    with Image.open(png) as image:
        rgb = image.convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 16)
    spread = max(ImageStat.Stat(rgb).stddev)
    if (colours is not None and len(colours) < 8) or spread < 5:
        raise RuntimeError(f"{png}: the screenshot is blank (the dashboard did not render)")
    if png.stat().st_size > MAX_PNG_BYTES:
        rgb.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
    if png.stat().st_size > MAX_PNG_BYTES:
        log(f"warning: {png} is {png.stat().st_size} bytes (over {MAX_PNG_BYTES})")


def page_url(dashboard: str, page: str, job_id: str | None) -> str:
    """The dashboard's hash routes (a single-page app: the path after ``#`` picks the view)."""
    if page == "job":
        return f"{dashboard}/#/jobs/{job_id}" if job_id else f"{dashboard}/#/jobs"
    return f"{dashboard}/#/{page}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="PNG to write (e.g. docs/dashboard.png)")
    parser.add_argument("--page", choices=PAGES, default="actors", help="dashboard page (job: the search's job page)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers to wait for (trials x DDP workers)")
    parser.add_argument("--chromium", help="chromium executable (default: chromium on PATH)")
    parser.add_argument("--window", default="1400,1500", help="browser window WIDTH,HEIGHT")
    parser.add_argument("--budget-ms", type=int, default=15000, help="chromium --virtual-time-budget")
    parser.add_argument("--trials", type=int, default=4, help="trials of the smoke search")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per student (long enough to be seen)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the Ray head")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for running trials")
    parser.add_argument(
        "--finish", action="store_true", help="after the screenshot, let the search finish (prints its xkd_* gauges)"
    )
    parser.add_argument("--keep", type=Path, help="copy the experiment folder here before cleaning up")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print(
            "dashboard_screenshot: error: chromium not found; install it (Debian: apt-get install -y chromium)",
            file=sys.stderr,
        )
        return 2
    width, height = (int(part) for part in args.window.split(","))
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Ray puts unix sockets under its temp dir, whose paths must stay short: /tmp/xkdd-XXXX/r.
    work = Path(tempfile.mkdtemp(prefix="xkdd-", dir="/tmp"))
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray 2.60 turns token authentication on when ~/.ray/auth_token exists, and the dashboard
        # then asks the browser for the token, which ``chromium --screenshot`` cannot type in.
        # This head listens on 127.0.0.1 only and lives for minutes, so run it without a token.
        "RAY_AUTH_MODE": "disabled",
        # the folder-signing key (xkd_ray.pareto.experiment_folder) of a throwaway experiment stays here
        "XDG_CONFIG_HOME": str(work / "config"),
    }
    os.environ["RAY_AUTH_MODE"] = "disabled"  # for this process's state-API calls
    experiment = work / "experiment"
    gauges: list[str] = []
    try:
        space = write_space(work, work / "cache", args.trials, args.epochs)
        with local_ray(work / "r", args.num_cpus, env) as ray_info:
            dashboard = str(ray_info["dashboard"])
            search = start_search(space, experiment, str(ray_info["address"]), env, work / "search.log")
            try:
                workers = wait_for_trials(dashboard, search, args.workers, args.timeout)
                job_id = search_job_id(dashboard)
                log(f"{workers} Ray Train worker(s) alive; job {job_id}")
                time.sleep(3)  # let the dashboard's own polling see the new actors
                url = page_url(dashboard, args.page, job_id)
                log(f"screenshot of {url}")
                screenshot(chromium, url, out, (width, height), args.budget_ms, work)
                check_and_shrink(out)
                log(f"wrote {out} ({out.stat().st_size} bytes)")
                if args.finish:
                    while search.poll() is None:
                        gauges = xkd_metrics(str(ray_info["metrics"])) or gauges
                        time.sleep(3)
                    log(f"search finished with exit code {search.returncode}")
            finally:
                stop_search(search)
        if gauges:
            log("last xkd_* gauges served by Ray's Prometheus endpoint:\n" + "\n".join(gauges))
        if args.keep:
            shutil.copytree(experiment, args.keep, dirs_exist_ok=True)
            log(f"experiment kept in {args.keep}")
    except Exception as exc:
        print(f"dashboard_screenshot: error: {exc}", file=sys.stderr)
        for name in ("ray_start.log", "search.log"):  # both go with the temp dir: show their ends
            if (work / name).is_file():
                print(f"--- {name} (end)", (work / name).read_text(errors="replace")[-2500:], sep="\n", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
