"""A mirror's target misbehaving, through real processes: frozen (SIGSTOP,
its connection kept, as a hung or partitioned remote), accepting and never
answering, or racing the toolstack's calls. The promise under test: no
fault of the target holds a guest write much longer than
``TASK_MIRROR_STALL_TIMEOUT``, every call that ends a mirror returns within
its own bound, and no job outlives the call meant to end it."""

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import BIN
from mirroring import (GUEST, SIZE, Guest, attach_guest, data_stat, dp, needs_qemu, qmp_jobs, run_bin, servers,
                       slow_target, source, start_mirror, task_state, uri, volumes, wait_for)
from xapi_storage_tasks.nbd.protocol import Client, Timeouts

pytestmark = needs_qemu
__all__ = ["servers", "source", "uri", "volumes"]  # fixtures, shared

STALL = 2.0
# What a loaded 2-core machine may add to a bound: scheduling, the worker's
# poll, the guest's own round trip. A bound, not a benchmark.
MARGIN = 2.5


@pytest.fixture
def stall(monkeypatch):
    monkeypatch.setenv("TASK_MIRROR_STALL_TIMEOUT", str(STALL))
    return STALL


def fast_target(servers, tmp_path):
    """nbdkit's memory disk, unthrottled."""
    sock = tmp_path / "fast.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "memory", str(SIZE)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers.append(proc)
    wait_for(sock.exists, what="nbdkit's socket")
    return proc, "nbd+unix:///?socket=%s" % sock


class Frozen:
    """SIGSTOP a server; SIGCONT it on leaving, whatever happened."""

    def __init__(self, proc):
        self.proc = proc

    def __enter__(self):
        os.kill(self.proc.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        os.kill(self.proc.pid, signal.SIGCONT)


def nothing_left_of_the_mirror(volumes):
    """No job in the daemon, no target node, no relay socket."""
    from xapi_storage_tasks.datapath import qmp

    (ctl,) = volumes.glob("*.ctl")
    jobs, nodes = qmp.run(str(ctl), [("query-jobs", None), ("query-named-block-nodes", {"flat": True})])
    assert jobs == []
    assert not [n["node-name"] for n in nodes if n["node-name"].startswith("target-")]
    assert not [p.name for p in volumes.iterdir() if p.suffix.startswith(".r")]


def guest_carries_on(guest, more=30):
    writes = guest.writes()
    wait_for(lambda: guest.writes() >= writes + more, what="the guest to go on writing")


def check_guest(guest):
    """The guest's longest write stayed within the bound, and every write it
    had acknowledged reads back from the source."""
    guest.stop()
    report = guest.report()
    assert report["mismatches"] == 0, report
    assert report["max_latency"] <= STALL + MARGIN, report
    return report


@pytest.mark.parametrize("when", ["after ready", "mid-sync"])
def test_a_frozen_target_holds_no_guest_write_beyond_the_bound(state_dir, volumes, tmp_path, uri, servers, stall, when):
    guest = Guest(attach_guest(uri), tmp_path, report=True)
    wait_for(lambda: guest.writes() >= 20, what="the guest to write")
    server, remote = fast_target(servers, tmp_path) if when == "after ready" else slow_target(servers, tmp_path)
    op = start_mirror(uri, remote)
    if when == "after ready":
        wait_for(lambda: data_stat(op)["complete"], what="the mirror to synchronise")
    else:
        wait_for(lambda: data_stat(op).get("progress", 0) > 0, what="progress")
    guest_carries_on(guest)
    # Before the freeze, writes wait behind the mirror's own to a slow
    # target (write-blocking): what is measured is the freeze's effect.
    guest.measure_from_now()
    with Frozen(server):
        frozen = time.monotonic()
        wait_for(lambda: data_stat(op)["failed"], timeout=STALL + 30, what="Data.stat to say failed")
        noticed = time.monotonic() - frozen
        assert data_stat(op) == {"failed": True, "complete": False}
        state = task_state(op)
        assert state[0] == "Failed" and "completed nothing for %gs" % STALL in state[1], state
        guest_carries_on(guest)  # against the source alone
        nothing_left_of_the_mirror(volumes)
    report = check_guest(guest)
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"
    assert dp("detach", uri, GUEST).stdout == b"null\n"
    assert os.listdir(volumes) == []
    print("\nfrozen %s: failed %.2fs after the freeze; the guest's longest write %.2fs over %d writes (bound %g s)"
          % (when, noticed, report["max_latency"], report["writes"], STALL))


def test_deactivate_with_a_frozen_target_returns_within_the_drain_timeout(state_dir, volumes, tmp_path, uri, servers,
                                                                           monkeypatch):
    monkeypatch.setenv("TASK_MIRROR_STALL_TIMEOUT", "60")  # the drain's deadline is what must act
    guest = Guest(attach_guest(uri), tmp_path, report=True)
    server, remote = fast_target(servers, tmp_path)
    op = start_mirror(uri, remote)
    wait_for(lambda: data_stat(op)["complete"], what="the mirror to synchronise")
    guest_carries_on(guest)
    guest.stop()  # the toolstack suspends the guest before it deactivates
    with Frozen(server):
        began = time.monotonic()
        res = dp("deactivate", uri, GUEST, TASK_MIRROR_DRAIN_TIMEOUT="1")
        took = time.monotonic() - began
        assert res.error_name == "Mirror_failed" and "did not drain within 1s" in res.json["params"][1], res.stdout
        assert took <= 1 + 1.5, took
        assert task_state(op)[0] == "Failed"
        nothing_left_of_the_mirror(volumes)  # no job outlives the call meant to end it
    assert guest.report()["mismatches"] == 0
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"  # the second deactivate of an unplug
    assert dp("detach", uri, GUEST).stdout == b"null\n"
    assert os.listdir(volumes) == []
    print("\ndeactivate with a frozen target: %.2fs (drain timeout 1 s)" % took)


def test_a_cancel_on_a_frozen_target_ends_within_the_bound(state_dir, volumes, tmp_path, uri, servers, stall):
    guest = Guest(attach_guest(uri), tmp_path, report=True)
    server, remote = fast_target(servers, tmp_path)
    op = start_mirror(uri, remote)
    wait_for(lambda: data_stat(op)["complete"], what="the mirror to synchronise")
    with Frozen(server):
        time.sleep(0.3)  # a guest write now waits for the frozen target
        began = time.monotonic()
        assert run_bin("Data.cancel", {"dbg": "t", "operation": op}).stdout == b"null\n"
        wait_for(lambda: task_state(op)[0] != "Pending", timeout=STALL + 30, what="the cancel to end the mirror")
        took = time.monotonic() - began
        assert task_state(op) == ["Failed", "Cancelled"]
        assert took <= STALL + MARGIN, took
        guest_carries_on(guest)
        nothing_left_of_the_mirror(volumes)
    check_guest(guest)
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"
    assert dp("detach", uri, GUEST).stdout == b"null\n"


def test_a_killed_worker_cuts_its_frozen_target_off_and_the_next_call_ends_its_job(
        state_dir, volumes, tmp_path, uri, servers, store):
    guest = Guest(attach_guest(uri), tmp_path, report=True)
    server, remote = fast_target(servers, tmp_path)
    op = start_mirror(uri, remote)
    wait_for(lambda: data_stat(op)["complete"], what="the mirror to synchronise")
    with Frozen(server):
        time.sleep(0.5)  # guest writes now wait for the frozen target (the stall bound is 5 s)
        os.kill(store.get(op[1]).worker["pid"], signal.SIGKILL)
        guest_carries_on(guest)  # the kernel closed the worker's sockets: the daemon's client saw the end
        assert data_stat(op)["failed"] is True
        assert dp("activate", uri, GUEST).stdout == b"null\n"  # the next call on the volume ...
        nothing_left_of_the_mirror(volumes)  # ... ended the job its worker could not
    report = check_guest(guest)
    assert report["max_latency"] <= 0.5 + MARGIN
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"
    assert dp("detach", uri, GUEST).stdout == b"null\n"


class Mute:
    """A server that accepts connections and never says a word."""

    def __init__(self, path):
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(8)
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self):
        self.listener.close()
        for conn in self.held:
            conn.close()


def test_a_target_that_never_answers_is_refused_without_wedging_the_daemon(state_dir, volumes, tmp_path, uri, stall):
    nbd = attach_guest(uri)
    mute = Mute(str(tmp_path / "mute.sock"))
    try:
        op = start_mirror(uri, "nbd+unix:///x?socket=%s" % (tmp_path / "mute.sock"))
        began = time.monotonic()
        # Meanwhile the export serves a new client and QMP answers at once.
        quick = Timeouts(connect=2, handshake=2, io=2, flush=2)
        with Client.connect(nbd, quick) as client:
            assert len(client.pread(4096, 0)) == 4096
        assert qmp_jobs(volumes) == []
        wait_for(lambda: data_stat(op)["failed"], timeout=STALL + 30, what="the mirror to fail")
        assert time.monotonic() - began <= STALL + MARGIN
        assert "sent no NBD greeting" in task_state(op)[1]
    finally:
        mute.close()
    nothing_left_of_the_mirror(volumes)
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"
    assert dp("detach", uri, GUEST).stdout == b"null\n"


@pytest.mark.parametrize("delay", [0.0, 0.03, 0.1])
def test_a_cancel_racing_deactivate_never_fails_the_deactivate(state_dir, volumes, tmp_path, uri, servers, delay):
    attach_guest(uri)
    _, remote = fast_target(servers, tmp_path)
    op = start_mirror(uri, remote)
    wait_for(lambda: data_stat(op)["complete"], what="the mirror to synchronise")
    deactivate = subprocess.Popen([os.path.join(BIN, "Datapath.deactivate"), "--json"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deactivate.stdin.write(b'{"dbg": "t", "uri": "%s", "domain": "%s"}' % (uri.encode(), GUEST.encode()))
    deactivate.stdin.close()
    time.sleep(delay)
    assert run_bin("Data.cancel", {"dbg": "t", "operation": op}).stdout == b"null\n"
    assert deactivate.wait(30) == 0, deactivate.stderr.read()
    assert deactivate.stdout.read() == b"null\n"
    assert task_state(op)[0] == "Completed" or task_state(op) == ["Failed", "Cancelled"]
    nothing_left_of_the_mirror(volumes)
    assert dp("detach", uri, GUEST).stdout == b"null\n"


def test_mirror_is_only_for_the_domain_the_volume_is_active_for(state_dir, volumes, tmp_path, uri, servers):
    _, remote = fast_target(servers, tmp_path)
    assert dp("attach", uri, GUEST).returncode == 0
    res = run_bin("Data.mirror", {"dbg": "t", "uri": uri, "domain": GUEST, "remote": remote})
    assert res.error_name == "Volume_not_attached" and "not active" in res.json["params"][1]  # attached only
    assert dp("activate", uri, GUEST).stdout == b"null\n"
    res = run_bin("Data.mirror", {"dbg": "t", "uri": uri, "domain": "9", "remote": remote})
    assert res.error_name == "Volume_not_attached"  # never attached for that domain
    op = start_mirror(uri, remote)
    res = run_bin("Data.mirror", {"dbg": "t", "uri": uri, "domain": "9", "remote": remote})
    assert res.error_name == "Volume_not_attached"  # not the running mirror's id for another domain
    assert start_mirror(uri, remote) == op  # the same call again: the same mirror
    wait_for(lambda: data_stat(op)["complete"], what="the mirror to synchronise")
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"
    assert task_state(op)[0] == "Completed"
    assert dp("detach", uri, GUEST).stdout == b"null\n"


def test_an_image_deleted_while_attached_is_still_deactivated_and_flushed(state_dir, volumes, source, uri):
    nbd = attach_guest(uri)
    with Client.connect(nbd) as client:
        client.pwrite(b"x" * 4096, 0)
        client.drain()
    os.unlink(source)
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"
    assert dp("detach", uri, GUEST).stdout == b"null\n"
    assert os.listdir(volumes) == []
