"""An experiment folder that cannot be written stops `xkd search` before Ray starts: exit 2, one
error line naming the folder, nothing written.

Root ignores permission bits, and tests (here and in CI containers) often run as root, so the
read-only folders are tried by an unprivileged user: this user when it is not root, else user
65534 (``nobody``) through ``setpriv`` or ``runuser``. Read-only and full file systems need a
mount (root with CAP_SYS_ADMIN); where none can be made those tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, smoke_space

SEARCH = [sys.executable, str(REPO / "xkd_ray" / "search.py")]
NOBODY = 65534


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its mode and size: what "nothing written" compares."""
    return {str(p.relative_to(root)): (p.lstat().st_mode, p.lstat().st_size) for p in sorted(root.rglob("*"))}


class Sandbox:
    """A folder outside pytest's tmp_path (which may sit under a 0700 folder), with a space file
    and a home the unprivileged user can use."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="xkd-readonly-"))
        self.root.chmod(0o755)
        self.home = self.root / "home"
        self.home.mkdir()
        self.space = smoke_space(self.root, str(self.root / "cache"))  # the cache is never created
        self.space.chmod(0o644)

    def env(self) -> dict[str, str]:
        env = {**os.environ, "HOME": str(self.home), "XDG_CONFIG_HOME": str(self.home / "config")}
        env["MPLCONFIGDIR"] = str(self.home / "matplotlib")
        env.pop("XKD_FAULTS", None)  # names a file in a 0700 folder of the test session
        return env

    def files(self) -> dict[str, tuple[int, int]]:
        return {path: entry for path, entry in _listing(self.root).items() if not path.startswith("home")}

    def search(self, prefix: list[str], out: Path) -> subprocess.CompletedProcess[str]:
        command = [*prefix, *SEARCH, "--space", str(self.space), "--out", str(out), "--no-live"]
        return subprocess.run(command, cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=300)


@pytest.fixture()
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    try:
        yield box
    finally:
        for path in [box.root, *box.root.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(box.root, ignore_errors=True)


def _unprivileged(box: Sandbox, folder: Path) -> list[str]:
    """The command prefix that runs as a user for whom ``folder``'s permission bits hold."""
    if os.geteuid() != 0:
        prefix: list[str] = []
    else:
        if shutil.which("setpriv"):
            prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        elif shutil.which("runuser"):
            prefix = ["runuser", "-u", "nobody", "--"]
        else:
            pytest.skip("running as root (which ignores permission bits) and neither setpriv nor runuser is installed")
        os.chown(box.home, NOBODY, NOBODY)
        for parent in box.root.parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                pytest.skip(f"{parent} cannot be traversed by other users, so user {NOBODY} cannot reach {box.root}")
    # The user must run this interpreter and import xkd-ray, and must really be refused the folder.
    check = "import os, sys, xkd_ray.search; sys.exit(3 if os.access(sys.argv[1], os.W_OK) else 0)"
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", check, str(folder)], cwd=REPO, env=box.env(), capture_output=True, text=True
    )
    if probe.returncode == 3:
        pytest.fail(f"{' '.join(prefix) or 'this user'} can write {folder}: the test would prove nothing")
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"{' '.join(prefix)} cannot run {sys.executable} with xkd_ray: {last}")
    return prefix


@pytest.mark.slow  # CLI runs as another user: the full suite runs it, make test-fast does not
@pytest.mark.parametrize("inside", [False, True], ids=["the-folder-itself", "a-new-folder-inside-it"])
def test_a_read_only_experiment_folder_is_refused_for_a_non_root_user(sandbox, inside):
    """A 0555 folder (owned by another user when the test runs as root): exit 2 before Ray
    starts, one line naming the folder and the OS's reason, nothing written."""
    read_only = sandbox.root / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    out = read_only / "experiment" if inside else read_only
    prefix = _unprivileged(sandbox, read_only)
    before = sandbox.files()
    result = sandbox.search(prefix, out)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        f"xkd: error: --out {out}: cannot write the experiment folder (Permission denied)"
    ], result.stderr
    assert sandbox.files() == before  # nothing written
    assert list(read_only.iterdir()) == []


class Mount:
    """A mount made for one test and always undone."""

    def __init__(self, where: Path, *commands: list[str]) -> None:
        self.where = where
        if os.geteuid() != 0:
            pytest.skip("mounting a file system needs root")
        self.mounted = False
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                self.undo()
                pytest.skip(f"cannot mount here ({' '.join(command[:3])}...: {done.stderr.strip()})")
            self.mounted = True

    def undo(self) -> None:
        if self.mounted:
            if subprocess.run(["umount", str(self.where)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(self.where)], capture_output=True)
            self.mounted = False


@pytest.mark.parametrize("inside", [False, True], ids=["the-mount-itself", "a-new-folder-inside-it"])
def test_an_experiment_folder_on_a_read_only_mount_is_refused(sandbox, inside):
    """A read-only bind mount refuses root too (EROFS): exit 2, one line, nothing written."""
    source, mounted = sandbox.root / "source", sandbox.root / "mounted"
    source.mkdir()
    mounted.mkdir()
    mount = Mount(
        mounted, ["mount", "--bind", str(source), str(mounted)], ["mount", "-o", "remount,ro,bind", str(mounted)]
    )
    try:
        out = mounted / "experiment" if inside else mounted
        result = sandbox.search([], out)
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert result.stderr.splitlines() == [
            f"xkd: error: --out {out}: cannot write the experiment folder (Read-only file system)"
        ], result.stderr
        assert list(mounted.iterdir()) == []
    finally:
        mount.undo()
    assert list(source.iterdir()) == []  # nothing written


def test_an_experiment_folder_on_a_full_disk_is_refused(sandbox):
    """A 16 KiB tmpfs: the 64 KiB write probe fails with ENOSPC; exit 2, one line, and the probe
    must not be left filling the disk."""
    full = sandbox.root / "full"
    full.mkdir()
    mount = Mount(full, ["mount", "-t", "tmpfs", "-o", "size=16k,mode=0755", "tmpfs", str(full)])
    try:
        out = full / "experiment"
        result = sandbox.search([], out)
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert result.stderr.splitlines() == [
            f"xkd: error: --out {out}: cannot write the experiment folder (No space left on device)"
        ], result.stderr
        left = [str(p.relative_to(full)) for p in full.rglob("*")]
        assert left == [], f"left behind on the full disk: {left}"
    finally:
        mount.undo()
