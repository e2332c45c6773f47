"""The state store: transitions, atomic durable writes, locking, layout."""

import json
import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import SRC
from xapi_storage_tasks.tasks import listing
from xapi_storage_tasks.tasks import store as store_mod
from xapi_storage_tasks.wire.errors import InternalError, TaskDoesNotExist
from xapi_storage_tasks.tasks.state import Completed, Failed, Pending, TransitionRefused
from xapi_storage_tasks.tasks.store import Store


def test_create_then_transitions_follow_the_table(store):
    task = store.create("d", operation={"kind": "test", "args": {}})
    assert task.state == Pending(0.0)
    assert store.transition(task.id, lambda t: Pending(0.5)).state == Pending(0.5)
    # progress never goes backwards
    assert store.transition(task.id, lambda t: Pending(0.2)).state == Pending(0.5)
    assert store.transition(task.id, lambda t: Completed(2.0)).state == Completed(2.0)
    for later in (Pending(0.9), Failed("x"), Completed(3.0)):
        with pytest.raises(TransitionRefused):
            store.transition(task.id, lambda t, later=later: later)
    assert store.get(task.id).state == Completed(2.0)
    assert store.pending_ids() == []


def test_annotate_cannot_change_state(store):
    task = store.create("d")

    def sneaky(t):
        t.state = Completed(1.0)

    with pytest.raises(InternalError):
        store.annotate(task.id, sneaky)
    assert store.get(task.id).state == Pending(0.0)
    store.annotate(task.id, lambda t: t.artifacts.append("/tmp/x"))
    assert store.get(task.id).artifacts == ["/tmp/x"]


def test_modes_of_directory_and_files(store, state_dir):
    task = store.create("d")
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    for sub in ("tasks", "locks", "pending"):
        assert stat.S_IMODE(os.stat(state_dir / sub).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state_dir / "tasks" / (task.id + ".json")).st_mode) == 0o600
    on_disk = json.loads((state_dir / "tasks" / (task.id + ".json")).read_text())
    assert on_disk["version"] == 1 and on_disk["state"] == ["Pending", 0.0]


def test_symlinks_inside_the_store_are_not_followed(store, state_dir, tmp_path):
    outside = tmp_path / "outside.json"
    task = store.create("d")
    real = state_dir / "tasks" / (task.id + ".json")
    outside.write_text(real.read_text())
    real.unlink()
    real.symlink_to(outside)
    from xapi_storage_tasks.wire.errors import TaskCorrupt

    with pytest.raises(TaskCorrupt):
        store.get(task.id)
    (state_dir / "logs").rename(tmp_path / "logs-elsewhere")
    (state_dir / "logs").symlink_to(tmp_path / "logs-elsewhere")
    from xapi_storage_tasks.wire.errors import StateDirInvalid

    with Store(str(state_dir)) as fresh, pytest.raises(StateDirInvalid):
        fresh.dir_fd("logs")


def test_destroy_removes_every_file(store, state_dir):
    from xapi_storage_tasks.tasks import log

    task = store.create("d")
    log.task_event(store, task, "hello")
    store.transition(task.id, lambda t: Failed("boom"))
    store.destroy(task.id)
    leftovers = [p for p in state_dir.rglob("*") if task.id in p.name]
    assert leftovers == []
    with pytest.raises(TaskDoesNotExist):
        store.destroy(task.id)


def test_failed_write_keeps_the_previous_file(store, state_dir, monkeypatch):
    import errno

    task = store.create("d")
    store.transition(task.id, lambda t: Pending(0.25))

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_mod.os, "write", full)
    with pytest.raises(InternalError, match="No space left"):
        store.transition(task.id, lambda t: Pending(0.75))
    monkeypatch.undo()
    assert store.get(task.id).state == Pending(0.25)
    assert [p.name for p in (state_dir / "tasks").iterdir()] == [task.id + ".json"]


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from xapi_storage_tasks.tasks.store import Store
    from xapi_storage_tasks.tasks.state import Pending
    s = Store(sys.argv[2])
    for i in range(1, int(sys.argv[4]) + 1):
        s.transition(sys.argv[3], lambda t, i=i: Pending(i / 1e6))
    """
)


def test_readers_never_see_a_partial_file(store, state_dir):
    task = store.create("d" * 5000)  # a bigger file makes torn reads likelier
    writes = 400
    writer = subprocess.Popen([sys.executable, "-c", WRITER, SRC, str(state_dir), task.id, str(writes)])
    seen, reads = set(), 0
    path = state_dir / "tasks" / (task.id + ".json")
    try:
        while writer.poll() is None or reads == 0:
            obj = json.loads(path.read_bytes())  # raises on a torn file
            seen.add(obj["state"][1])
            reads += 1
    finally:
        writer.wait()
    assert writer.returncode == 0
    assert reads > 10 and len(seen) > 1
    assert store.get(task.id).state == Pending(writes / 1e6)


def test_concurrent_transitions_are_serialized(store, state_dir):
    task = store.create("d")
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        from xapi_storage_tasks.tasks.store import Store
        s = Store(sys.argv[2], lock_wait=60)  # a writer that must not give up, as a worker
        for _ in range(50):
            s.annotate(sys.argv[3], lambda t: t.artifacts.append("x"))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, SRC, str(state_dir), task.id]) for _ in range(4)]
    assert [p.wait() for p in procs] == [0] * 4
    assert len(store.get(task.id).artifacts) == 200  # no lost update


def test_default_path_uses_env_then_runtime_dir(monkeypatch, tmp_path):
    from xapi_storage_tasks import settings

    monkeypatch.setenv("TASK_STATE_DIR", str(tmp_path / "x"))
    assert settings.state_dir() == str(tmp_path / "x")
    monkeypatch.delenv("TASK_STATE_DIR")
    if os.geteuid() == 0:
        assert settings.state_dir() == "/run/xapi-storage-tasks"
    else:
        assert settings.state_dir().endswith("xapi-storage-tasks") or "xapi-storage-tasks-" in settings.state_dir()


class _Clock:
    """``time`` for the store module, two hours behind: set-up only, so
    that tasks can have ended long ago."""

    def __init__(self, offset):
        import time as real

        self.real, self.offset = real, offset

    def time(self):
        return self.real.time() - self.offset

    def __getattr__(self, name):
        return getattr(self.real, name)


def _finished_long_ago(store, monkeypatch, count):
    from xapi_storage_tasks.tasks import log

    made = []
    with monkeypatch.context() as m:
        m.setattr(store_mod, "time", _Clock(7200))
        for i in range(count):
            task = store.create("old-%d" % i)
            log.task_event(store, task, "a line of its log")
            store.transition(task.id, lambda t: Completed(0.5))
            made.append(task.id)
    return made


def _names(state_dir, sub):
    try:
        return sorted(os.listdir(os.path.join(str(state_dir), sub)))
    except FileNotFoundError:
        return []


def test_retention_destroys_expired_tasks_a_few_per_call(store, state_dir, monkeypatch):
    """Promise: with TASK_RETENTION=3600, a task that finished two hours ago
    is gone for the call that looks at it (Task_does_not_exist, its log
    removed), and every call (Task.ls, Task.stat) destroys at most 8 other
    expired tasks (oldest minutes of end times first), until none is
    left; recent and Pending tasks stay."""
    from conftest import run_bin

    old = _finished_long_ago(store, monkeypatch, 30)
    recent = store.create("recent")
    store.transition(recent.id, lambda t: Completed(0.5))
    pending = store.create("pending")
    monkeypatch.setenv("TASK_RETENTION", "3600")
    assert len(_names(state_dir, "logs")) >= 30

    before = set(store.ids())
    assert run_bin("Task.stat", {"dbg": "d", "id": old[-1]}).error_name == "Task_does_not_exist"
    assert old[-1] + ".log" not in _names(state_dir, "logs")
    left = set(store.ids())
    removed_per_call = [len(before - left)]  # the one looked at, and up to 4 others
    assert removed_per_call[0] <= 5
    calls = 0
    while left & set(old) and calls < 40:
        method, params = ("Task.ls", {"dbg": "d"}) if calls % 2 else ("Task.stat", {"dbg": "d", "id": recent.id})
        res = run_bin(method, params)
        assert res.returncode == 0, res.stdout
        now = set(store.ids())
        removed_per_call.append(len(left - now))
        left = now
        calls += 1
    assert left == {recent.id, pending.id}
    assert max(removed_per_call[1:]) <= 4 and sum(removed_per_call) == 30, removed_per_call
    logs = _names(state_dir, "logs")
    assert not any(name.startswith(tuple(old)) for name in logs), logs
    ended = [(b, os.listdir(os.path.join(str(state_dir), "ended", b))) for b in _names(state_dir, "ended")]
    assert ended == [(b, [recent.id]) for b, _ in ended] and len(ended) == 1


def test_retention_zero_keeps_tasks_forever(store, state_dir, monkeypatch):
    from conftest import run_bin

    old = _finished_long_ago(store, monkeypatch, 3)
    monkeypatch.setenv("TASK_RETENTION", "0")
    assert run_bin("Task.stat", {"dbg": "d", "id": old[0]}).json["state"][0] == "Completed"
    assert run_bin("Task.ls", {"dbg": "d"}).json == old


def _settle(state_dir, store, monkeypatch):
    """Cache every listing, however recent the change."""
    monkeypatch.setattr(listing, "SETTLED", -(10**10))


def test_ids_cache_is_used_only_for_the_directory_it_listed(state_dir, monkeypatch):
    """The listing cache answers only while tasks/ is unchanged since it was
    listed: a task created or destroyed through the store, or a file put
    there behind its back, is seen at once; a cache of an earlier boot or a
    damaged one is ignored."""
    store = Store(str(state_dir))
    _settle(state_dir, store, monkeypatch)
    made = [store.create("a").id for _ in range(3)]
    assert store.ids() == made
    cache = os.path.join(str(state_dir), listing.CACHE)
    assert open(cache).read().splitlines()[2:] == made
    # Served from the cache: a listdir would fail.
    monkeypatch.setattr(listing.os, "listdir", lambda *a: pytest.fail("listed"))
    assert store.ids() == made
    monkeypatch.undo()
    _settle(state_dir, store, monkeypatch)
    time.sleep(0.03)  # the settling waived: a change must fall in a later clock tick
    store.transition(made[0], lambda t: Completed(1.0))
    store.destroy(made[0])
    assert store.ids() == made[1:]
    time.sleep(0.03)
    extra = store.create("b").id
    assert store.ids() == made[1:] + [extra]
    # A file written behind the store's back (as the benches do).
    time.sleep(0.03)
    planted = "01" + extra[2:-1] + ("0" if extra[-1] != "0" else "1")
    with open(os.path.join(str(state_dir), "tasks", planted + ".json"), "w") as f:
        f.write("{}")
    assert store.ids() == sorted(made[1:] + [extra, planted])
    # Another boot's cache, or a damaged one, is not used.
    want = store.ids()
    text = open(cache).read()
    for bad in (text.replace(text.splitlines()[1].split()[0], "0" * 36), text[:-5], text.replace("ids 1", "ids 2"), ""):
        with open(cache, "w") as f:
            f.write(bad)
        assert store.ids() == want
    store.close()


def test_ids_cache_not_written_while_tasks_change(state_dir):
    """A directory changed within listing.SETTLED is listed, not cached: a change
    in the same clock tick could keep its times."""
    with Store(str(state_dir)) as store:
        made = store.create("a").id
        assert store.ids() == [made]
    assert not os.path.exists(os.path.join(str(state_dir), listing.CACHE))
