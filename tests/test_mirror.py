"""Data.mirror: live migration of a running disk as the toolstack drives
it, through the real executables, a real qemu-storage-daemon, a guest
process writing through the NBD export, and real NBD targets (qemu-nbd
accepting one connection; nbdkit with a rate limit for a slow target)."""

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT, run_bin
from mirroring import (DOM0, GUEST, Guest, attach_guest, data_stat, dp, gone, needs_qemu, qemu_nbd_target, qmp_jobs,
                       servers, slow_target, source, start_mirror, task_state, uri, volume_record, volumes, wait_for)
from xapi_storage_tasks.nbd.protocol import Client
from xapi_storage_tasks.process import identity

pytestmark = needs_qemu
__all__ = ["servers", "source", "uri", "volumes"]  # fixtures, shared

def test_live_migration_as_the_toolstack_does_it(state_dir, volumes, tmp_path, source, uri, servers):
    target, remote = qemu_nbd_target(servers, tmp_path)
    guest = Guest(attach_guest(uri), tmp_path)
    wait_for(lambda: guest.writes() >= 20, what="the guest to write")
    assert dp("attach", uri, DOM0).returncode == 0  # the dom0 mirror dp: attached, not activated
    began = time.monotonic()
    op = start_mirror(uri, remote)
    assert task_state(op)[0] == "Pending"
    assert op[1] in run_bin("Task.ls", {"dbg": "t"}).json
    assert op in run_bin("Data.ls", {"dbg": "t"}).json
    # mirror_wait: Data.stat back to back, no sleep, until complete.
    polls, progress = 0, []
    while True:
        assert time.monotonic() - began < 120, "the mirror neither completed nor failed"
        status = data_stat(op)
        polls += 1
        assert set(status) <= {"failed", "complete", "progress"} and type(status["failed"]) is bool
        assert not (status["failed"] and status["complete"])
        if "progress" in status:
            assert type(status["progress"]) is float and 0.0 <= status["progress"] <= 1.0
            progress.append(status["progress"])
        if status["complete"]:
            break
        assert not status["failed"], status
    synced = time.monotonic() - began
    assert progress == sorted(progress)  # never goes back
    assert task_state(op)[0] == "Pending"  # mirroring goes on
    # The guest keeps writing; the dom0 dp goes; the mirror survives it.
    writes = guest.writes()
    wait_for(lambda: guest.writes() >= writes + 50, what="more guest writes")
    assert dp("detach", uri, DOM0).stdout == b"null\n"
    wait_for(lambda: guest.writes() >= writes + 100, what="more guest writes")
    assert data_stat(op) == {"failed": False, "complete": True, "progress": 1.0}
    total = guest.stop()
    drain_began = time.monotonic()
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"
    drained = time.monotonic() - drain_began
    state = task_state(op)
    assert state[0] == "Completed", state
    assert data_stat(op) == {"failed": False, "complete": True, "progress": 1.0}
    servers[0].wait(timeout=30)  # qemu-nbd exits once the mirror's one connection is gone
    with open(source, "rb") as a, open(target, "rb") as b:
        assert a.read() == b.read()
    assert dp("detach", uri, GUEST).stdout == b"null\n"
    assert os.listdir(volumes) == []
    print("\nmigration: %d guest writes, %d Data.stat polls, progress %s, complete after %.3fs, deactivate drained in %.3fs"
          % (total, polls, [round(p, 3) for p in progress[:: max(1, len(progress) // 8)]], synced, drained))


def test_target_killed_mid_sync_fails_the_mirror_and_the_volume_detaches(state_dir, volumes, tmp_path, uri, servers):
    attach_guest(uri)
    server, remote = slow_target(servers, tmp_path)
    op = start_mirror(uri, remote)
    wait_for(lambda: data_stat(op).get("progress", 0) > 0, what="progress")
    server.kill()
    wait_for(lambda: data_stat(op)["failed"], what="Data.stat to say failed")
    assert data_stat(op) == {"failed": True, "complete": False}
    state = task_state(op)
    assert state[0] == "Failed" and "mirror" in state[1]
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"
    assert dp("detach", uri, GUEST).stdout == b"null\n"
    assert os.listdir(volumes) == []


def test_cancel_mid_sync_stops_the_mirror_and_the_volume_keeps_serving(state_dir, volumes, tmp_path, uri, servers):
    nbd_uri = attach_guest(uri)
    _, remote = slow_target(servers, tmp_path)
    op = start_mirror(uri, remote)
    wait_for(lambda: data_stat(op).get("progress", 0) > 0, what="progress")
    assert run_bin("Data.cancel", {"dbg": "t", "operation": op}).stdout == b"null\n"
    wait_for(lambda: task_state(op)[0] != "Pending", what="the cancel")
    assert task_state(op) == ["Failed", "Cancelled"]
    assert data_stat(op)["failed"] is True
    with Client.connect(nbd_uri) as client:  # the guest's volume still serves
        client.pwrite(b"after" * 100, 0)
        assert client.pread(500, 0) == b"after" * 100
    # A new mirror may start once the old one is gone.
    _, again = slow_target(servers, tmp_path, name="again")
    assert start_mirror(uri, again) != op
    assert dp("detach", uri, GUEST).stdout == b"null\n"  # detach without deactivate: the mirror ends too
    assert os.listdir(volumes) == []


def test_a_killed_daemon_fails_the_mirror_and_is_reported(state_dir, volumes, tmp_path, uri, servers):
    attach_guest(uri)
    _, remote = slow_target(servers, tmp_path)
    op = start_mirror(uri, remote)
    (daemon,) = [json.loads(p.read_text())["identity"] for p in volumes.glob("*.qsd")]
    os.kill(daemon["pid"], signal.SIGKILL)
    wait_for(lambda: task_state(op)[0] == "Failed", what="the mirror to fail")
    assert data_stat(op)["failed"] is True
    assert "the storage daemon serving the volume died" in task_state(op)[1]  # not the QMP library's words
    assert dp("deactivate", uri, GUEST).error_name == "Storage_daemon_lost"
    assert dp("detach", uri, GUEST).stdout == b"null\n"
    assert os.listdir(volumes) == []


def test_a_drain_that_cannot_finish_fails_the_mirror_in_bounded_time(state_dir, volumes, tmp_path, uri, servers):
    attach_guest(uri)
    _, remote = slow_target(servers, tmp_path)
    op = start_mirror(uri, remote)
    began = time.monotonic()
    res = dp("deactivate", uri, GUEST, TASK_MIRROR_DRAIN_TIMEOUT="0.5")
    # Bounded: the drain's 0.5 s plus ending the job, far below the 30 s a
    # hang would take to hit run_bin's timeout (a bound, not a benchmark).
    assert time.monotonic() - began < 20
    assert res.error_name == "Mirror_failed" and "did not drain within" in res.json["params"][1]
    state = task_state(op)
    assert state[0] == "Failed" and "drain" in state[1]
    assert data_stat(op)["failed"] is True
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"  # done already: idempotent
    assert dp("detach", uri, GUEST).stdout == b"null\n"
    assert os.listdir(volumes) == []


def test_copy_of_a_volume_being_mirrored_is_refused(state_dir, volumes, tmp_path, source, uri, servers):
    attach_guest(uri)
    _, remote = slow_target(servers, tmp_path)
    op = start_mirror(uri, remote)
    for copy_uri in (uri, "file://" + source):
        res = run_bin("Data.copy", {"dbg": "t", "uri": copy_uri, "domain": "0", "remote": str(tmp_path / "copy.raw"),
                                    "blocklist": None})
        assert res.error_name == "Volume_in_use" and op[1] in res.json["params"][1]
    # Asked again for the same remote, Data.mirror answers the same task.
    assert start_mirror(uri, remote) == op
    dp("detach", uri, GUEST)


def test_mirror_needs_an_attached_volume_and_a_valid_remote(state_dir, volumes, uri):
    res = run_bin("Data.mirror", {"dbg": "t", "uri": uri, "domain": GUEST, "remote": "nbd+unix:///x?socket=/nonexistent"})
    assert res.error_name == "Volume_not_attached"
    attach_guest(uri)
    res = run_bin("Data.mirror", {"dbg": "t", "uri": uri, "domain": GUEST, "remote": "http://x"})
    assert res.error_name == "Invalid_arguments"
    assert run_bin("Task.ls", {"dbg": "t"}).json == []
    # An unreachable target: the task fails with QEMU's reason.
    op = start_mirror(uri, "nbd+unix:///x?socket=/nonexistent/sock")
    wait_for(lambda: task_state(op)[0] == "Failed", what="the mirror to fail")
    assert "/nonexistent/sock" in task_state(op)[1]
    dp("detach", uri, GUEST)


def test_a_killed_mirror_worker_fails_the_task_and_its_job_is_ended(state_dir, volumes, tmp_path, uri, servers, store):
    attach_guest(uri)
    # Fast enough that ending the job (which waits for its writes in
    # flight) is quick, slow enough that the worker dies mid-sync.
    _, remote = slow_target(servers, tmp_path, rate="64M")
    op = start_mirror(uri, remote)
    wait_for(lambda: qmp_jobs(volumes), what="the mirror job")
    worker = store.get(op[1]).worker
    os.kill(worker["pid"], signal.SIGKILL)
    assert identity.wait_gone(worker, 10)
    assert data_stat(op)["failed"] is True
    assert task_state(op)[1].startswith("Worker lost")
    assert qmp_jobs(volumes)  # nobody ended it yet
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"
    assert qmp_jobs(volumes) == []  # the deactivate did
    assert "which its worker did not end" in (state_dir / "logs" / "store.log").read_text()
    assert dp("detach", uri, GUEST).stdout == b"null\n"


def test_active_mirroring_converges_while_the_guest_outpaces_the_target(state_dir, volumes, tmp_path, source, uri, servers):
    guest = Guest(attach_guest(uri), tmp_path)
    wait_for(lambda: guest.writes() >= 20, what="the guest to write")
    _, remote = slow_target(servers, tmp_path, rate="16M")  # slower than the guest alone writes
    op = start_mirror(uri, remote)
    wait_for(lambda: data_stat(op)["complete"], timeout=120, what="the mirror to converge")
    writes = guest.writes()
    wait_for(lambda: guest.writes() > writes, what="the guest to go on writing")
    assert data_stat(op) == {"failed": False, "complete": True, "progress": 1.0}
    dump = json.loads(run_bin("Plugin.diagnostics", {"dbg": "t"}).json)
    assert [(m["task"], m["ready"]) for m in dump["mirrors"]] == [(op[1], True)]
    guest.stop()
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"
    assert task_state(op)[0] == "Completed"
    assert dp("detach", uri, GUEST).stdout == b"null\n"


def untracked_daemons(state_dir):
    """qemu-storage-daemons serving this state directory that no record names."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        if proc.info["name"] == "qemu-storage-daemon" and proc.info["status"] != psutil.STATUS_ZOMBIE \
                and any(str(state_dir) in arg for arg in proc.info["cmdline"] or ()):
            found.add(proc.info["pid"])
    # Records after processes: a daemon records itself before it becomes
    # qemu-storage-daemon, so one found above is recorded by now.
    tracked = set()
    if (state_dir / "volumes").exists():
        tracked = {json.loads(p.read_text())["identity"]["pid"] for p in (state_dir / "volumes").glob("*.qsd")}
    return found - tracked


@pytest.mark.parametrize("method", ["attach", "detach", "mirror"])
def test_callers_killed_at_random_points_leave_nothing_untracked(state_dir, volumes, tmp_path, uri, servers, method):
    import random

    _, remote = slow_target(servers, tmp_path, rate="1G")
    rng = random.Random(11)
    for _ in range(8):
        if method != "attach":
            dp("attach", uri, GUEST)
        if method == "mirror":
            args, params = "Data.mirror", {"dbg": "t", "uri": uri, "domain": GUEST, "remote": remote}
        else:
            args, params = "Datapath." + method, {"dbg": "t", "uri": uri, "domain": GUEST}
        proc = subprocess.Popen([os.path.join(ROOT, "bin", args), "--json"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc.stdin.write(json.dumps(params).encode())
        proc.stdin.close()
        time.sleep(rng.uniform(0, 0.2))
        proc.kill()
        proc.wait()
        assert untracked_daemons(state_dir) == set()
        assert dp("detach", uri, GUEST).stdout == b"null\n"  # the way out, whatever state was left
    assert untracked_daemons(state_dir) == set()
    assert not list(volumes.glob("*.qsd"))
    # No task is left Pending for ever: every mirror started was ended by the detach.
    for task_id in run_bin("Task.ls", {"dbg": "t"}).json:
        wait_for(lambda t=task_id: run_bin("Task.stat", {"dbg": "t", "id": t}).json["state"][0] != "Pending", timeout=60,
                 what="task %s to end" % task_id)


def test_finished_mirrors_go_with_retention_and_leave_nothing_that_breaks_later_calls(
        state_dir, volumes, tmp_path, uri, servers, monkeypatch):
    # Nobody destroys mirror tasks on the toolstack's path: retention does.
    attach_guest(uri)
    _, remote = qemu_nbd_target(servers, tmp_path)
    drained = start_mirror(uri, remote)
    wait_for(lambda: data_stat(drained)["complete"], what="the first mirror to synchronise")
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"
    assert task_state(drained)[0] == "Completed"
    assert volume_record(volumes)["mirror"] is None  # the drain forgot it
    assert dp("activate", uri, GUEST).stdout == b"null\n"
    # A mirror that fails while the volume stays active.
    server, slow = slow_target(servers, tmp_path)
    broken = start_mirror(uri, slow)
    assert volume_record(volumes)["mirror"]["task"] == broken[1]
    server.kill()
    wait_for(lambda: task_state(broken)[0] == "Failed", what="the mirror to fail")
    # Retention short from now on: every later call sees both tasks expired.
    monkeypatch.setenv("TASK_RETENTION", "0.5")
    tasks = state_dir / "tasks"
    for op in (drained, broken):
        wait_for(lambda op=op: gone(run_bin("Data.stat", {"dbg": "t", "operation": op})),
                 what="retention to destroy task %s" % op[1])
        assert not any(p.name.startswith(op[1]) for p in tasks.iterdir())
        assert run_bin("Task.stat", {"dbg": "t", "id": op[1]}).error_name == "Task_does_not_exist"
    assert run_bin("Data.ls", {"dbg": "t"}).json == []
    # The record named the destroyed task: the next call on the volume forgets it...
    assert dp("activate", uri, GUEST).stdout == b"null\n"
    assert volume_record(volumes)["mirror"] is None
    assert run_bin("Plugin.diagnostics", {"dbg": "t"}).returncode == 0
    # ... and the volume mirrors, drains and detaches as if nothing happened.
    (tmp_path / "again").mkdir()
    _, again = qemu_nbd_target(servers, tmp_path / "again")
    op = start_mirror(uri, again)
    assert op not in (drained, broken)
    wait_for(lambda: data_stat(op)["complete"], what="the new mirror to synchronise")
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"
    assert task_state(op)[0] == "Completed"
    assert dp("detach", uri, GUEST).stdout == b"null\n"
    assert os.listdir(volumes) == []


def test_a_stalled_target_fails_the_mirror_instead_of_leaving_the_toolstack_polling(
        state_dir, volumes, tmp_path, uri, servers, monkeypatch):
    attach_guest(uri)
    server, remote = slow_target(servers, tmp_path)
    monkeypatch.setenv("TASK_MIRROR_STALL_TIMEOUT", "5")
    op = start_mirror(uri, remote)
    wait_for(lambda: data_stat(op).get("progress", 0) > 0, what="progress")
    os.kill(server.pid, signal.SIGSTOP)  # frozen: QEMU's NBD client waits for it forever
    try:
        wait_for(lambda: data_stat(op)["failed"], what="Data.stat to say failed")
        assert data_stat(op) == {"failed": True, "complete": False}
        state = task_state(op)
        assert state[0] == "Failed" and "completed nothing for 5s" in state[1]
    finally:
        server.kill()  # its in-flight requests fail: the job, if still there, can end
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"
    assert dp("detach", uri, GUEST).stdout == b"null\n"
    assert os.listdir(volumes) == []
