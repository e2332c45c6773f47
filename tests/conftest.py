"""Shared fixtures: a private state directory and a runner for the real
executables in bin/ as subprocesses."""

import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "bin")
# The source root holding the package (plugin/xapi_storage_tasks).
SRC = os.path.join(ROOT, "plugin")
sys.path.insert(0, SRC)


class Result:
    """What one executable call produced."""

    def __init__(self, proc):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    @property
    def json(self):
        return json.loads(self.stdout)

    @property
    def error_name(self):
        assert self.returncode == 1, (self.stdout, self.stderr)
        return self.json["params"][0]


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """A fresh state directory, exported as TASK_STATE_DIR for this test and
    for the executables it runs."""
    path = tmp_path / "state"
    monkeypatch.setenv("TASK_STATE_DIR", str(path))
    monkeypatch.setenv("TASK_SYSLOG", "0")
    return path


@pytest.fixture
def store(state_dir):
    from xapi_storage_tasks.tasks.store import Store

    with Store(str(state_dir)) as s:
        yield s


def run_bin(method, stdin=b"", args=("--json",), env=None, timeout=30):
    """Run ``bin/<method>`` with ``stdin`` (bytes, str or a JSON-able
    object) and return a :class:`Result`."""
    if not isinstance(stdin, (bytes, str)):
        stdin = json.dumps(stdin)
    if isinstance(stdin, str):
        stdin = stdin.encode()
    proc = subprocess.run(
        [os.path.join(BIN, method), *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=timeout,
    )
    return Result(proc)


@pytest.fixture
def call():
    """``call(method, params)``: the toolstack's way, ``--json`` and stdin."""
    return run_bin


def kill_leftover_daemons(volumes):
    """SIGKILL every qemu-storage-daemon a test left running in ``volumes``
    (only those the kernel vouches for: alive and holding their pidfile),
    then release the block devices it left."""
    from xapi_storage_tasks.datapath.qsd import mark_fd
    from xapi_storage_tasks.process import identity

    if not os.path.isdir(volumes):
        return
    for name in os.listdir(volumes):
        if name.endswith(".qsd"):
            path = os.path.join(volumes, name)
            with open(path) as f:
                ident = json.load(f)["identity"]
            try:
                st = os.stat(path[: -len(".qsd")] + ".pid")  # its mark: QEMU holds its pidfile open
            except OSError:
                continue
            ident["fd"] = mark_fd(ident["pid"], (st.st_dev, st.st_ino))
            identity.signal_worker(ident, signal.SIGKILL, (st.st_dev, st.st_ino))
    release_leftover_devices(volumes)


def leftovers(state_dir):
    """What a state directory's volumes left in the kernel and the process
    table: loop devices backed by a file under it, mounts under it, and
    processes (storage daemons, nbdfuse, nbd-client) naming it."""
    import psutil

    root = str(state_dir) + "/"
    loops = [name for name in os.listdir("/sys/block") if name.startswith("loop")
             and _read("/sys/block/%s/loop/backing_file" % name).startswith(root)]
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split(" ")[4] for line in f if line.split(" ")[4].startswith(root)]
    procs = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(root in arg for arg in proc.info["cmdline"] or ()):
            procs.append(proc.info["pid"])
    return {"loops": loops, "mounts": mounts, "processes": procs}


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def release_leftover_devices(volumes):
    """Detach the loop devices and unmount the nbdfuse mounts a failed test
    left under ``volumes`` (never anyone else's)."""
    root = str(volumes) + "/"
    for name in os.listdir("/sys/block"):
        if name.startswith("loop") and _read("/sys/block/%s/loop/backing_file" % name).startswith(root):
            subprocess.run(["blockdev", "--setrw", "/dev/" + name], capture_output=True, timeout=10)
            subprocess.run(["losetup", "--detach", "/dev/" + name], capture_output=True, timeout=10)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split(" ")[4] for line in f if line.split(" ")[4].startswith(root)]
    for mount in mounts:
        subprocess.run(["umount", "--lazy", mount], capture_output=True, timeout=10)
