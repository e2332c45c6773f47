"""What the mirror tests share: a source volume, NBD targets (qemu-nbd
accepting one connection, nbdkit behind a rate limit), the executables'
calls as the toolstack makes them, and a guest writing through the export."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, kill_leftover_daemons, run_bin

needs_qemu = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("qemu-storage-daemon", "qemu-nbd", "nbdkit")),
    reason="needs qemu-storage-daemon, qemu-nbd and nbdkit (make deps)")

SIZE = 32 << 20
GUEST = "7"
DOM0 = "u0_mirror_vbd_7_xvda"  # the dom0 mirror dp, as xapi names it
WRITER = os.path.join(ROOT, "tools", "guest-writer.py")


def wait_for(predicate, timeout=30.0, what="condition"):
    """Poll ``predicate`` until true; fail after ``timeout`` (a bound on a
    hang, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail("timed out waiting for " + what)
        time.sleep(0.01)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.raw"
    with open(path, "wb") as f:
        f.write(os.urandom(SIZE // 2))
        f.truncate(SIZE)
    return str(path)


@pytest.fixture
def uri(source):
    return "raw+file://" + source


@pytest.fixture
def servers():
    """Processes the test starts; killed at the end whatever happened."""
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def volumes(state_dir):
    yield state_dir / "volumes"
    kill_leftover_daemons(str(state_dir / "volumes"))


def qemu_nbd_target(servers, tmp_path):
    """A qemu-nbd serving an empty image that accepts ONE connection (it
    exits when that client goes, as the toolstack's proxy does)."""
    image, sock = tmp_path / "target.raw", tmp_path / "target.sock"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    servers.append(subprocess.Popen(["qemu-nbd", "-f", "raw", "--socket", str(sock), "-x", "dst", str(image)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_for(sock.exists, what="qemu-nbd's socket")
    return str(image), "nbd+unix:///dst?socket=%s" % sock


def slow_target(servers, tmp_path, rate="8M", name="slow"):
    """nbdkit's memory disk behind a rate limit: a sync that takes seconds."""
    sock = tmp_path / (name + ".sock")
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "--filter=rate", "memory", str(SIZE), "rate=" + rate],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers.append(proc)
    wait_for(sock.exists, what="nbdkit's socket")
    return proc, "nbd+unix:///?socket=%s" % sock


def dp(method, uri, domain, **env):
    return run_bin("Datapath." + method, {"dbg": "t", "uri": uri, "domain": domain},
                   env=dict(os.environ, **env) if env else None)


def attach_guest(uri):
    """The guest's attach and activate; returns its NBD URI."""
    answer = dp("attach", uri, GUEST)
    assert answer.returncode == 0, answer.stdout
    assert dp("activate", uri, GUEST).stdout == b"null\n"
    return answer.json["implementations"][-1][1]["uri"]


def start_mirror(uri, remote):
    res = run_bin("Data.mirror", {"dbg": "t", "uri": uri, "domain": GUEST, "remote": remote})
    assert res.returncode == 0, res.stdout
    op = res.json
    assert op[0] == "MirrorV1"
    return op


def data_stat(op):
    res = run_bin("Data.stat", {"dbg": "t", "operation": op})
    assert res.returncode == 0, res.stdout
    return res.json


def task_state(op):
    return run_bin("Task.stat", {"dbg": "t", "id": op[1]}).json["state"]


class Guest:
    """A guest process writing random blocks through the export; with
    ``report``, it also measures its longest write and checks at the end
    that every acknowledged write reads back (:meth:`report`)."""

    def __init__(self, nbd_uri, tmp_path, report=False):
        self.count_file = str(tmp_path / "writes")
        self.report_file = str(tmp_path / "guest-report.json") if report else None
        extra = [self.report_file] if report else []
        self.proc = subprocess.Popen([sys.executable, WRITER, nbd_uri, str(SIZE), self.count_file, *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def writes(self):
        try:
            with open(self.count_file) as f:
                return int(f.read() or 0)
        except FileNotFoundError:
            return 0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return int(out)

    def measure_from_now(self):
        """Forget the longest write so far (the next one counts afresh)."""
        self.proc.send_signal(signal.SIGUSR1)

    def report(self):
        """``{"writes", "max_latency", "mismatches"}`` of a stopped guest."""
        with open(self.report_file) as f:
            return json.load(f)


def qmp_jobs(volumes):
    """The jobs in the volume's storage daemon, through its control socket."""
    from xapi_storage_tasks.datapath import qmp

    (ctl,) = volumes.glob("*.ctl")
    return qmp.run(str(ctl), [("query-jobs", None)])[0]


def gone(res):
    return res.returncode == 1 and res.error_name == "Task_does_not_exist"


def volume_record(volumes):
    (path,) = [p for p in volumes.glob("*.json")]
    return json.loads(path.read_text())
