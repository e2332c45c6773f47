"""The Python client (xapi_storage_tasks.client.connection) over the daemon's socket and over the
executables, and the operator CLI (xapi_storage_tasks.client.cli) built on it. Real daemons,
real executables, real workers."""

import json
import os
import pty
import re
import subprocess
import sys
import threading
import time

import pytest

from conftest import BIN, SRC
from xapi_storage_tasks.client import connection as client
from xapi_storage_tasks.wire import errors
from xapi_storage_tasks.wire import httpio
from xapi_storage_tasks import registry
from xapi_storage_tasks.tasks.state import CANCELLED, Completed, Pending
import test_server
from test_server import (
    TEST_START_SPEC, UNKNOWN_ID, Raw, make_context, needs_setpriv, normalize, rpc, sample_params, settle, start_task,
)

# The daemon fixtures, shared with the daemon's tests (pytest finds them by name).
daemon = test_server.daemon
daemons = test_server.daemons
no_stray_workers = test_server.no_stray_workers
open_dir = test_server.open_dir


@pytest.fixture
def test_method(monkeypatch):
    """Make the wrapper daemon's Test.start visible to this process's
    client (methods come from the registry)."""
    def start_steps(dbg, path, steps, delay, ignore_term):  # served by the wrapper daemon, never run here
        raise AssertionError("Test.start runs in the daemon")

    method = registry.Method("Test.start", params=TEST_START_SPEC, result="operation", impl=start_steps)
    monkeypatch.setitem(registry.METHODS, "Test.start", method)


def outcome(c, method, params):
    """("ok", result) or (error class, details, record params)."""
    try:
        return "ok", c.call(method, params)
    except errors.PluginError as e:
        return type(e), e.details, e.params


# ---------------------------------------------------------------------------
# Every method, both transports


@pytest.mark.parametrize("method", sorted(registry.METHODS))
def test_every_method_through_the_client_answers_as_the_executables(daemon, store, state_dir, tmp_path, method, no_stray_workers):
    by_socket = client.connect(socket=daemon.sock)
    by_exec = client.Client(client.ExecTransport(BIN))
    sock_ctx, exec_ctx = make_context(store, tmp_path, "sock"), make_context(store, tmp_path, "exec")
    got = outcome(by_socket, method, sample_params(method, sock_ctx))
    expected = outcome(by_exec, method, sample_params(method, exec_ctx))
    both = (sock_ctx, exec_ctx)
    assert got[0] == expected[0]
    assert normalize(list(got[1:]), both) == normalize(list(expected[1:]), both)
    # The attribute form is the same call (as a dict, as the documents show it).
    interface, name = method.split(".")
    again = make_context(store, tmp_path, "attr")
    via_attribute = getattr(getattr(by_socket, interface), name)
    try:
        attr_outcome = "ok", via_attribute(sample_params(method, again))
    except errors.PluginError as e:
        attr_outcome = type(e), e.details, e.params
    assert attr_outcome[0] == got[0]
    if method not in ("Task.ls", "Data.ls"):  # the listings now hold one more context
        assert normalize(list(attr_outcome[1:]), (again,)) == normalize(list(got[1:]), both)
    settle(state_dir)


def test_call_forms_from_the_interface_document(daemon, store):
    task = store.create("forms")
    c = client.connect(socket=daemon.sock)
    record = c.Task.stat(dbg="d", id=task.id)
    assert record == {"id": task.id, "debug_info": "forms", "ctime": task.ctime, "state": ["Pending", 0.0]}
    assert c.Task.stat({"dbg": "d", "id": task.id}) == record  # as in task-interface.md
    assert c.Task.stat("d", task.id) == record  # positional, in the registry's order
    assert c.Task.stat({"dbg": "d"}, id=task.id) == record
    assert c.Task.ls(dbg="d") == [task.id] and c.Data.ls(dbg="d") == []
    with pytest.raises(TypeError):
        c.Task.stat({"dbg": "d", "id": task.id}, id=task.id)
    with pytest.raises(TypeError):
        c.Task.stat("d", task.id, "extra")
    with pytest.raises(AttributeError):
        c.Task.frobnicate  # noqa: B018  (the attribute lookup is what raises)
    with pytest.raises(AttributeError):
        c.Frobnicator  # noqa: B018  (no such interface)
    assert set(dir(c.Task)) == {"stat", "cancel", "destroy", "ls"}
    assert {"Task", "Data"} <= set(dir(c))


@pytest.mark.parametrize("transport", ["socket", "exec"])
def test_errors_raise_the_plugin_error_classes_with_their_details(daemon, store, transport):
    c = client.connect(socket=daemon.sock) if transport == "socket" else client.Client(client.ExecTransport(BIN))
    pending = store.create("p").id
    cases = [
        (lambda: c.Task.stat(dbg="d", id=UNKNOWN_ID), errors.TaskDoesNotExist, (UNKNOWN_ID,)),
        (lambda: c.Task.destroy(dbg="d", id=pending), errors.TaskInProgress, (pending,)),
        (lambda: c.Task.stat(dbg="d", id="../etc"), errors.InvalidArguments,
         ("parameter 'id' is not a valid task id: '../etc'",)),
        (lambda: c.Task.stat(dbg="d"), errors.InvalidArguments, ("missing parameter 'id'",)),
        (lambda: c.Data.mirror(dbg="d", uri="file:///x", domain="0", remote="nbd://h/e"), errors.InvalidArguments,
         ("URI 'file:///x': scheme 'file' is not served here (served: qcow2+file, raw+file)",)),
    ]
    for call, cls, details in cases:
        with pytest.raises(cls) as caught:
            call()
        assert type(caught.value) is cls and caught.value.details == details
        assert caught.value.record["params"] == [cls.name, *details]
        assert caught.value.record["code"] == "SR_BACKEND_FAILURE"


def test_unknown_error_names_become_plugin_errors_of_that_name():
    exc = client.error_from_record({"code": "SR_BACKEND_FAILURE", "params": ["Brand_new", "a", "b"], "backtrace": {}})
    assert isinstance(exc, errors.PluginError) and exc.name == "Brand_new" and exc.details == ("a", "b")
    assert type(exc) is client.error_class("Brand_new")
    assert client.error_class("Internal_error") is errors.InternalError
    assert client.error_class("Nbd_error") is errors.NbdError
    assert client.error_class("Permission_denied") is errors.PermissionDenied


def test_oversized_params_are_invalid_on_both_transports(daemon):
    big = {"dbg": "x" * (1 << 20), "id": UNKNOWN_ID}
    for c in (client.connect(socket=daemon.sock), client.Client(client.ExecTransport(BIN))):
        with pytest.raises(errors.InvalidArguments):
            c.Task.stat(big)


# ---------------------------------------------------------------------------
# Connections


def test_one_persistent_connection_is_reused(daemon, store):
    task = store.create("reuse")
    c = client.connect(socket=daemon.sock)
    for _ in range(100):
        assert c.Task.stat(dbg="d", id=task.id)["id"] == task.id
    assert c.transport.connections_made == 1


def test_threads_share_a_client(daemon, store):
    ids = [store.create("t%d" % i).id for i in range(4)]
    c = client.connect(socket=daemon.sock)
    failures = []

    def work():
        try:
            for _ in range(25):
                for i in ids:
                    assert c.Task.stat(dbg="d", id=i)["id"] == i
        except Exception as e:  # reported below
            failures.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures and 1 <= c.transport.connections_made <= 8


def test_the_client_survives_a_daemon_restart(daemons, store):
    first = daemons()
    c = client.connect(socket=first.sock)
    assert c.Task.ls(dbg="d") == []
    assert first.stop() == 0
    with pytest.raises(client.DaemonUnavailable) as caught:
        c.Task.ls(dbg="d")  # explicit socket: no daemon is an error, not a fallback
    assert caught.value.absent
    daemons()
    task = store.create("after")
    assert c.Task.ls(dbg="d") == [task.id]
    assert c.transport.connections_made == 2


def test_a_stale_keep_alive_connection_is_retried_once(daemons, store):
    d = daemons("--timeout", "0.3")
    c = client.connect(socket=d.sock)
    assert c.Task.ls(dbg="d") == []
    time.sleep(0.6)  # the daemon closes the idle connection
    assert c.Task.ls(dbg="d") == []
    assert c.transport.connections_made == 2


def test_a_busy_daemon_raises_service_unavailable(daemons):
    d = daemons("--max-connections", "1")
    held = Raw(d.sock)
    assert held.post(rpc("Task.ls", {"dbg": "d"}))[0] == 200
    with pytest.raises(errors.ServiceUnavailable):
        client.connect(socket=d.sock).Task.ls(dbg="d")


@needs_setpriv
def test_a_refused_peer_gets_permission_denied(daemons, open_dir):
    d = daemons(sock=os.path.join(open_dir, "d.sock"))
    os.chmod(d.sock, 0o666)
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from xapi_storage_tasks.client import connection as client\n"
            "try:\n"
            "    client.connect(socket=%r).Task.ls(dbg='d')\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e.name)\n") % (SRC, d.sock)
    # The system interpreter: the test's may live where uid 65534 cannot read.
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", code],
                         capture_output=True, timeout=30, cwd="/")
    if out.returncode != 0 and b"ModuleNotFoundError" in out.stderr:
        pytest.skip("the system python3 cannot import the checkout: %s" % out.stderr[-200:])
    assert out.stdout.decode().split() == ["PermissionDenied", "Permission_denied"], out


# ---------------------------------------------------------------------------
# Finding the daemon, or not


def test_no_daemon_falls_back_to_the_executables(store, state_dir):
    task = store.create("exe")
    c = client.connect()
    assert not os.path.exists(httpio.default_socket())
    assert c.Task.ls(dbg="d") == [task.id]
    assert c.Task.stat({"dbg": "d", "id": task.id})["debug_info"] == "exe"
    with pytest.raises(errors.TaskDoesNotExist):
        c.Task.stat(dbg="d", id=UNKNOWN_ID)
    assert c.transport.socket.connections_made == 0


def test_the_daemon_at_the_default_socket_is_used_and_then_not(daemons, store, state_dir):
    d = daemons(sock=httpio.default_socket())
    assert d.sock == os.path.join(str(state_dir), "daemon.sock")
    task = store.create("default")
    c = client.connect()
    assert c.Task.ls(dbg="d") == [task.id]
    assert c.transport.socket.connections_made == 1
    d.stop()
    assert c.Task.ls(dbg="d") == [task.id]  # the executables now, transparently
    assert c.transport.socket.connections_made == 1


def test_an_explicit_socket_without_a_daemon_is_an_error(tmp_path):
    with pytest.raises(client.DaemonUnavailable) as caught:
        client.connect(socket=str(tmp_path / "none.sock")).Task.ls(dbg="d")
    assert caught.value.absent and "none.sock" in str(caught.value)


def test_workers_through_the_client_and_wait(daemons, store, tmp_path, test_method, no_stray_workers):
    d = daemons(wrapper=True)
    c = client.connect(socket=d.sock)
    kind, task_id = c.Test.start(dbg="w", path=str(tmp_path / "out"), steps="10", delay="0.02", ignore_term="0")
    assert kind == "Test"
    record = client.wait(c, task_id, interval=0.02, timeout=20)
    assert record["state"][0] == "Completed"
    assert store.get(task_id).state == Completed(record["state"][1]["duration"], ["UnitResult", None])


# ---------------------------------------------------------------------------
# The CLI


def cli(*args, sock=None, timeout=30):
    argv = [sys.executable, "-m", "xapi_storage_tasks.client.cli", *(["--socket", sock] if sock else []), *args]
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run(argv, capture_output=True, env=env, timeout=timeout, cwd="/")


def test_cli_ls_json_and_table(daemon, store):
    pending = store.create("first-task")
    store.transition(pending.id, lambda t: Pending(0.42))
    done = store.create("second-task")
    store.transition(done.id, lambda t: Completed(1.0))
    out = cli("--json", "ls", sock=daemon.sock)
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)
    assert [r["id"] for r in records] == [pending.id, done.id]
    assert records[0]["state"] == ["Pending", 0.42] and records[1]["state"] == ["Completed", {"duration": 1.0}]
    table = cli("ls", sock=daemon.sock).stdout.decode().splitlines()
    assert table[0].split() == ["ID", "STATE", "PROGRESS", "AGE", "DBG"]
    rows = [line.split() for line in table[1:]]
    assert [r[:3] + r[4:] for r in rows] == [[pending.id, "Pending", "42%", "first-task"],
                                             [done.id, "Completed", "100%", "second-task"]]
    assert all(re.match(r"^\d+s$", r[3]) for r in rows)  # ages, in seconds
    assert cli("ls", "--json", sock=daemon.sock).stdout == out.stdout  # options after the command too


def test_cli_watch_follows_a_task_to_completion(daemon, store):
    task = store.create("watched")
    watcher = subprocess.Popen([sys.executable, "-m", "xapi_storage_tasks.client.cli", "--socket", daemon.sock, "--json", "watch",
                                task.id,
                                "--interval", "0.05"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=dict(os.environ, PYTHONPATH=SRC), cwd="/")
    try:
        for p in (0.25, 0.5, 0.75):
            time.sleep(0.1)
            store.transition(task.id, lambda t, p=p: Pending(p))
        assert watcher.poll() is None
        store.transition(task.id, lambda t: Completed(0.5))
        out, err = watcher.communicate(timeout=20)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, err
    assert json.loads(out)["state"] == ["Completed", {"duration": 0.5}]


def test_cli_watch_draws_a_progress_bar_on_a_terminal(daemon, store):
    task = store.create("tty")
    store.transition(task.id, lambda t: Pending(0.5))
    master, slave = pty.openpty()
    watcher = subprocess.Popen([sys.executable, "-m", "xapi_storage_tasks.client.cli", "--socket", daemon.sock, "watch", task.id,
                                "--interval", "0.05"],
                               stdout=slave, stderr=slave, env=dict(os.environ, PYTHONPATH=SRC), cwd="/")
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 15
        while b"50%" not in seen and time.monotonic() < deadline:
            seen += os.read(master, 4096)
        store.transition(task.id, lambda t: Completed(2.0))
        assert watcher.wait(15) == 0
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        watcher.kill()
        os.close(master)
    text = seen.decode()
    assert "\r[" + "#" * 15 + "-" * 15 + "]" in text and "50%" in text
    assert "%s: Completed in 2.00s" % task.id in text


def test_cli_cancel_watch_and_destroy_a_running_task(daemons, store, tmp_path, no_stray_workers):
    d = daemons(wrapper=True)
    task_id = start_task(d.sock, tmp_path / "out", 2000, 0.01)
    out = cli("--json", "cancel", task_id, sock=d.sock)
    assert (out.returncode, out.stdout) == (0, b"null\n")
    out = cli("--json", "watch", task_id, "--interval", "0.05", sock=d.sock)
    assert out.returncode == 1 and json.loads(out.stdout)["state"] == ["Failed", CANCELLED]
    assert cli("watch", task_id, sock=d.sock).stdout.decode() == "%s: Failed: %s\n" % (task_id, CANCELLED)
    out = cli("--json", "destroy", task_id, sock=d.sock)
    assert (out.returncode, out.stdout) == (0, b"null\n")
    out = cli("--json", "destroy", task_id, sock=d.sock)
    assert out.returncode == 1 and json.loads(out.stdout)["params"] == ["Task_does_not_exist", task_id]
    assert b"Task_does_not_exist" in out.stderr
    human = cli("destroy", task_id, sock=d.sock)
    assert human.returncode == 1 and human.stdout == b"" and b"Task_does_not_exist: " + task_id.encode() in human.stderr


def test_cli_without_a_daemon_uses_the_executables(store, state_dir):
    task = store.create("no-daemon")
    store.transition(task.id, lambda t: Completed(1.0))
    out = cli("--json", "ls")
    assert out.returncode == 0 and [r["id"] for r in json.loads(out.stdout)] == [task.id]
    assert cli("destroy", task.id).stdout.decode() == "destroyed: %s\n" % task.id
    assert cli("ls").stdout == b"no tasks\n"
    unreachable = cli("--json", "ls", sock="/nonexistent/d.sock")
    assert unreachable.returncode == 1 and json.loads(unreachable.stdout)["params"][0] == "Daemon_unavailable"


# ---------------------------------------------------------------------------
# What importing the client costs


def _modules_after(code):
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, env=dict(os.environ, PYTHONPATH=SRC), check=True).stdout
    return set(json.loads(out))


def test_importing_the_client_loads_nothing_of_the_server_side():
    loaded = _modules_after("import xapi_storage_tasks.client.connection, xapi_storage_tasks.client.cli")
    ours = {m for m in loaded if m.startswith("xapi_storage_tasks")}
    assert "xapi_storage_tasks.client.connection" in ours  # the probe sees what it imported
    # The registry's interface modules (it refers to their functions) and
    # the wire's task ids are imported;
    # nothing that reads or writes the store, runs workers or serves.
    allowed = {"xapi_storage_tasks.tasks.api", "xapi_storage_tasks.data.api"}
    server_side = {m for m in ours if m.startswith(("xapi_storage_tasks.tasks.", "xapi_storage_tasks.process",
                                                    "xapi_storage_tasks.daemon", "xapi_storage_tasks.data.",
                                                    "xapi_storage_tasks.nbd", "xapi_storage_tasks.entry"))}
    assert server_side <= allowed, server_side - allowed
    assert "xapi_storage_tasks.tasks.store" not in loaded


def test_the_public_face_is_lazy_and_complete():
    ours = {m for m in _modules_after("import xapi_storage_tasks") if m.startswith("xapi_storage_tasks")}
    assert ours == {"xapi_storage_tasks"}
    loaded = _modules_after("from xapi_storage_tasks import connect, TaskDoesNotExist")
    assert "xapi_storage_tasks.tasks.store" not in loaded
    import xapi_storage_tasks
    from xapi_storage_tasks.tasks.state import Pending

    for name in xapi_storage_tasks.__all__:
        assert getattr(xapi_storage_tasks, name) is not None, name
    assert xapi_storage_tasks.Pending is Pending
    assert issubclass(xapi_storage_tasks.TaskDoesNotExist, LookupError)
    with pytest.raises(AttributeError):
        xapi_storage_tasks.Nothing_here  # noqa: B018
