"""The socket daemon (xapi_storage_tasks.daemon.server), run for real: daemon processes started
with ``python3 -m xapi_storage_tasks.daemon.server --socket ...``, real curl, raw sockets,
real signals, real workers. Every daemon is killed in a finalizer."""

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import ROOT, SRC, run_bin
from xapi_storage_tasks.process import identity as proc
from xapi_storage_tasks import registry
from xapi_storage_tasks.tasks.state import CANCELLED, Completed
from xapi_storage_tasks.tasks.store import Store

CURL = "/usr/bin/curl"
TESTS = os.path.join(ROOT, "tests")
UNKNOWN_ID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"  # well-formed, never created
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

needs_curl = pytest.mark.skipif(not os.access(CURL, os.X_OK), reason="curl is not installed at /usr/bin/curl")

# A daemon with one extra, test-only method: Test.start runs tests/ops.py's
# write_steps as a task in a worker forked by the daemon, so tests can start
# workers of controllable duration through the socket.
WRAPPER = r'''
import sys
sys.path[:0] = [%(root)r, %(tests)r]
from ops import write_steps
from xapi_storage_tasks import registry
from xapi_storage_tasks.daemon import server
from xapi_storage_tasks.tasks import worker

def start_steps(dbg, path, steps, delay, ignore_term):
    """Test.start: write_steps as a task started by this daemon."""
    args = {"path": path, "steps": int(steps), "delay": float(delay), "ignore_term": ignore_term == "1"}
    return "Test", worker.start(dbg, write_steps, args, kind="Test")

registry.METHODS["Test.start"] = registry.Method("Test.start", params=%(spec)r, result="operation", impl=start_steps)
sys.exit(server.main(sys.argv[1:]))
'''
TEST_START_SPEC = (("dbg", "str"), ("path", "str"), ("steps", "str"), ("delay", "str"), ("ignore_term", "str"))


# ---------------------------------------------------------------------------
# Daemon processes


class DaemonProc:
    """One daemon process; readiness is its sd_notify READY=1."""

    count = 0

    def __init__(self, tmp_path, sock, args=(), wrapper=False, env=None):
        DaemonProc.count += 1
        self.sock = str(sock)
        self.tmp_path = tmp_path
        self.log_path = tmp_path / ("daemon%d.log" % DaemonProc.count)
        self.notify_path = str(tmp_path / ("notify%d" % DaemonProc.count))
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = SRC
        env["NOTIFY_SOCKET"] = self.notify_path
        if wrapper:
            code = WRAPPER % {"root": SRC, "tests": TESTS, "spec": TEST_START_SPEC}
            argv = [sys.executable, "-c", code]
        else:
            argv = [sys.executable, "-m", "xapi_storage_tasks.daemon.server"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv + ["--socket", self.sock, *args], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, env=env, cwd="/")
        self.pid = self.proc.pid

    def messages(self, timeout):
        """sd_notify datagrams received within ``timeout`` seconds."""
        self.notify.settimeout(timeout)
        try:
            return self.notify.recv(4096).decode()
        except socket.timeout:
            return ""

    def wait_ready(self, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.messages(0.05)
            if "READY=1" in got:
                assert "MAINPID=%d" % self.pid in got
                return self
            if self.proc.poll() is not None:
                break
        pytest.fail("daemon did not get ready (status %s):\n%s" % (self.proc.poll(), self.log()))

    def log(self):
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout=15):
        """Signal the daemon and return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.notify.close()


@pytest.fixture
def daemons(tmp_path, state_dir):
    """``daemons(sock=None, *args, wrapper=False, ready=True)`` starts a
    daemon on the test's state directory; all are killed at teardown."""
    started = []

    def start(*args, sock=None, wrapper=False, ready=True, env=None):
        d = DaemonProc(tmp_path, sock or tmp_path / "d.sock", args, wrapper, env)
        started.append(d)
        return d.wait_ready() if ready else d

    yield start
    for d in started:
        d.kill()


@pytest.fixture
def daemon(daemons):
    return daemons()


class Shared:
    """A daemon shared by the tests of a module that only need one that
    serves (edge cases of HTTP and JSON-RPC), with its own state directory."""

    def __init__(self, tmp, args=()):
        self.state = str(tmp / "state")
        env = dict(os.environ, TASK_STATE_DIR=self.state, TASK_SYSLOG="0")
        self.daemon = DaemonProc(tmp, tmp / "d.sock", args, env=env).wait_ready()
        self.sock = self.daemon.sock

    def store(self):
        return Store(self.state)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    s = Shared(tmp_path_factory.mktemp("shared"))
    yield s
    s.daemon.kill()


@pytest.fixture
def no_stray_workers(state_dir):
    """At teardown: no worker of this test's store may still run. A worker
    whose task has finished gets a moment to exit (it logs, then exits)."""
    yield
    with Store(str(state_dir)) as store:
        for task_id in store.ids():
            try:
                task = store.get(task_id)
            except Exception:
                continue
            ident = task.worker
            if not ident or (task.state.terminal and proc.wait_gone(ident, 10)):
                continue
            if proc.matches(ident):
                os.killpg(ident["pgid"], signal.SIGKILL)
                proc.wait_gone(ident, 5)
                pytest.fail("worker of %s was still running after the test" % task_id)


# ---------------------------------------------------------------------------
# Talking to it


class Raw:
    """A raw client connection with its own minimal HTTP response parser
    (independent of xapi_storage_tasks.wire.httpio)."""

    def __init__(self, path, timeout=10):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def post(self, body, extra=b""):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.send(b"POST / HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body))
        return self.response()

    def _more(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError
        self.buf += chunk

    def response(self):
        """(status, headers, body bytes); EOFError if the server closed."""
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers["content-length"])
        while len(self.buf) < length:
            self._more()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed(self):
        """True once the server has closed the connection."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


def curl(sock, data=None, *extra, timeout=30):
    """POST ``data`` (bytes, str or JSON-able; ``@file`` for a file) with
    curl; returns (HTTP status, body bytes)."""
    if data is not None and not isinstance(data, (bytes, str)):
        data = json.dumps(data)
    args = [CURL, "-sS", "--unix-socket", str(sock), "-o", "-", "-w", "\n%{http_code}", *extra]
    if data is not None:
        args += ["--data-binary", data if isinstance(data, str) else "@-"]
    args.append("http://localhost/")
    out = subprocess.run(args, input=data if isinstance(data, bytes) else None, capture_output=True, timeout=timeout)
    body, _, code = out.stdout.rpartition(b"\n")
    return int(code or 0), body


def rpc(method, params, rid=1, v2=False):
    request = {"method": method, "params": [params], "id": rid}
    if v2:
        request["jsonrpc"] = "2.0"
    return request


def strip_trace(value):
    """A response with backtrace files/lines removed (they name the
    process's own frames, which differ between daemon and executable)."""
    if isinstance(value, dict):
        return {k: strip_trace(v) for k, v in value.items() if k not in ("files", "lines")}
    if isinstance(value, list):
        return [strip_trace(v) for v in value]
    return value


def snapshot(state_dir):
    """Every file in the store with its content (logs excepted)."""
    out = {}
    for dirpath, _, files in os.walk(state_dir):
        for name in files:
            path = os.path.join(dirpath, name)
            if "/logs" not in path:
                with open(path, "rb") as f:
                    out[os.path.relpath(path, state_dir)] = f.read()
    return out


def open_fds(pid):
    """fd -> what it points to, for a running process (descriptors closed
    while we look are skipped)."""
    out = {}
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            out[int(fd)] = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except FileNotFoundError:
            pass
    return out


def wait_for(predicate, timeout=15, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail("timed out waiting for %s" % what)


def settle(state_dir, timeout=20):
    """Wait until no task of the store is Pending (reconciling as stat does)."""
    def done():
        with Store(str(state_dir)) as store:
            pending = store.pending_ids()
        return all(run_bin("Task.stat", {"dbg": "d", "id": i}).json["state"][0] != "Pending" for i in pending)
    wait_for(done, timeout, 0.05, "tasks to finish")


# ---------------------------------------------------------------------------
# Every method, as the executables answer it


def make_context(store, tmp_path, tag):
    """Tasks and paths for one side of a daemon-vs-executable comparison."""
    plain = store.create("ctx").id
    store.transition(plain, lambda t: Completed(1.5))
    copy = store.create("ctx", operation={"kind": "CopyV1", "args": {}}).id
    store.transition(copy, lambda t: Completed(2.5))
    src = tmp_path / "src.img"
    if not src.exists():
        src.write_bytes(os.urandom(64 << 10))
    return {"plain": plain, "copy": copy, "uri": str(src), "domain": "0",
            "remote": "file://" + str(tmp_path / ("dst-" + tag))}


def sample_params(method, ctx):
    """Well-formed params for any registered method, from its spec."""
    params = {}
    for name, kind in registry.METHODS[method].params:
        if kind.endswith("?"):
            continue
        if kind == "task_id":
            params[name] = ctx["plain"]
        elif kind == "operation":
            params[name] = ["CopyV1", ctx["copy"]]
        elif kind == "blocklist":
            params[name] = {"blocksize": 512, "ranges": []}
        else:
            params[name] = "d" if name == "dbg" else ctx.get(name, "x")
    return params


def normalize(value, contexts):
    """Ids and paths of the contexts replaced by their roles; ctimes and
    backtrace positions dropped; ids made during the call -> <new>."""
    roles = {}
    for ctx in contexts:
        roles.update({ctx["plain"]: "<plain>", ctx["copy"]: "<copy>", ctx["remote"]: "<remote>"})
    if isinstance(value, dict):
        return {k: normalize(v, contexts) for k, v in value.items() if k not in ("ctime", "files", "lines")}
    if isinstance(value, list):
        return [normalize(v, contexts) for v in value]
    if isinstance(value, str):
        for old, new in roles.items():
            value = value.replace(old, new)
        return UUID.sub("<new>", value)
    return value


@needs_curl
@pytest.mark.parametrize("method", sorted(registry.METHODS))
def test_every_method_through_curl_answers_as_the_executable(daemon, store, state_dir, tmp_path, method, no_stray_workers):
    for v2 in (False, True):
        tag = "v2" if v2 else "v1"
        exe_ctx, curl_ctx = make_context(store, tmp_path, "exe-" + tag), make_context(store, tmp_path, "curl-" + tag)
        by_exe = run_bin(method, rpc(method, sample_params(method, exe_ctx), 7, v2), args=())
        status, body = curl(daemon.sock, rpc(method, sample_params(method, curl_ctx), 7, v2))
        assert status == 200 and body.endswith(b"\n")
        by_daemon = json.loads(body)
        both = (exe_ctx, curl_ctx)
        assert normalize(by_daemon, both) == normalize(by_exe.json, both)
        assert (by_daemon.get("error") is None) == (by_exe.returncode == 0)
    settle(state_dir)


@needs_curl
def test_successful_answers_are_byte_for_byte_the_executables(daemon, store):
    task = store.create("bytes")
    store.transition(task.id, lambda t: Completed(0.25, ["UnitResult", None]))
    for request in (rpc("Task.stat", {"dbg": "d", "id": task.id}, 41), rpc("Task.ls", {"dbg": "d"}, "x", v2=True),
                    rpc("Data.ls", {"dbg": "d"}, None), rpc("Task.cancel", {"dbg": "d", "id": task.id}, 3)):
        status, body = curl(daemon.sock, request)
        assert (status, body) == (200, run_bin(request["method"], request, args=()).stdout)


@needs_curl
def test_task_methods_do_what_they_say_through_curl(daemon, store):
    pending = store.create("p")
    done = store.create("d")
    store.transition(done.id, lambda t: Completed(1.0))
    assert json.loads(curl(daemon.sock, rpc("Task.ls", {"dbg": "d"}))[1])["result"] == [pending.id, done.id]
    record = json.loads(curl(daemon.sock, rpc("Task.stat", {"dbg": "d", "id": pending.id}))[1])["result"]
    assert record["state"] == ["Pending", 0.0] and record["debug_info"] == "p"
    refused = json.loads(curl(daemon.sock, rpc("Task.destroy", {"dbg": "d", "id": pending.id}))[1])
    assert refused["error"]["params"] == ["Task_in_progress", pending.id]
    assert json.loads(curl(daemon.sock, rpc("Task.destroy", {"dbg": "d", "id": done.id}))[1])["result"] is None
    assert store.ids() == [pending.id]


def test_jsonrpc_errors_match_the_executables_in_both_versions(daemon, store):
    for v2 in (False, True):
        for method, params in (("Task.stat", {"dbg": "d", "id": UNKNOWN_ID}), ("Task.stat", {"dbg": "d", "id": "../x"}),
                               ("Task.stat", {"dbg": 5}), ("Data.stat", {"dbg": "d", "operation": "CopyV1"}),
                               ("Data.mirror", {"dbg": "d", "uri": "file:///x", "domain": "0", "remote": "nbd://h/e"})):
            request = rpc(method, params, "req", v2)
            conn = Raw(daemon.sock)
            status, _, body = conn.post(request)
            conn.close()
            assert status == 200
            assert strip_trace(json.loads(body)) == strip_trace(run_bin(method, request, args=()).json)


# ---------------------------------------------------------------------------
# HTTP: keep-alive and limits


def test_keep_alive_serves_many_requests_on_one_connection_and_pipelines(shared):
    with shared.store() as store:
        task = store.create("k")
    conn = Raw(shared.sock)
    for i in range(20):
        status, headers, body = conn.post(rpc("Task.stat", {"dbg": "d", "id": task.id}, i))
        assert status == 200 and headers["connection"] == "keep-alive" and json.loads(body)["id"] == i
    pipelined = b"".join(
        b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b)
        for b in (json.dumps(rpc("Task.ls", {"dbg": "d"}, n)).encode() for n in ("a", "b", "c")))
    conn.send(pipelined)
    assert [json.loads(conn.response()[2])["id"] for _ in range(3)] == ["a", "b", "c"]
    conn.send(b"POST / HTTP/1.1\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
    status, headers, body = conn.response()
    assert headers["connection"] == "close" and conn.closed()
    conn.close()


def test_http_1_0_closes_unless_asked_to_keep_alive(shared):
    body = json.dumps(rpc("Task.ls", {"dbg": "d"})).encode()
    conn = Raw(shared.sock)
    conn.send(b"POST / HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert conn.response()[0] == 200 and conn.closed()
    conn = Raw(shared.sock)
    conn.send(b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert conn.response()[1]["connection"] == "keep-alive"
    assert conn.post(rpc("Task.ls", {"dbg": "d"}))[0] == 200


@needs_curl
def test_curl_reuses_its_connection(shared):
    body = json.dumps(rpc("Task.ls", {"dbg": "d"}))
    out = subprocess.run([CURL, "-sv", "--unix-socket", shared.sock, "--data-binary", body, "http://localhost/",
                          "http://localhost/"], capture_output=True, timeout=30)
    assert out.stdout.count(b'"error": null') == 2
    assert b"Re-using existing connection" in out.stderr or b"Reusing existing connection" in out.stderr


def error_of(body):
    """(JSON-RPC code, error name) of a JSON-RPC 2.0 error body."""
    error = json.loads(body)["error"]
    return error["code"], error["data"]["params"][0]


@needs_curl
def test_oversized_requests_get_413_and_touch_nothing(daemon, store, state_dir, tmp_path):
    store.create("keep")
    before = snapshot(state_dir)
    # Exactly 1 MiB is accepted: the executables' limit, inclusive.
    request = json.dumps(rpc("Task.ls", {"dbg": "d"})).encode()
    exact = request + b" " * ((1 << 20) - len(request))
    big = tmp_path / "big.json"
    big.write_bytes(exact)
    status, body = curl(daemon.sock, "@" + str(big))
    assert status == 200 and json.loads(body)["error"] is None
    big.write_bytes(exact + b" ")
    status, body = curl(daemon.sock, "@" + str(big))
    assert status == 413 and error_of(body) == (-32600, "Invalid_arguments")
    # A huge declared length is refused before a byte of the body is sent.
    conn = Raw(daemon.sock)
    conn.send(b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n")
    status, headers, body = conn.response()
    assert status == 413 and headers["connection"] == "close" and conn.closed()
    # A header block over 16 KiB.
    conn = Raw(daemon.sock)
    conn.send(b"POST / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n")
    assert conn.response()[0] == 431
    assert snapshot(state_dir) == before
    assert curl(daemon.sock, rpc("Task.ls", {"dbg": "d"}))[0] == 200


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"HELLO\r\n\r\n", 400),
        (b"POST /\r\n\r\n", 400),
        (b"POST / HTTP/1.1 extra\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\n folded\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411),
        (b"POST / HTTP/1.1\r\n\r\n", 411),
        (b"POST / HTTP/2.0\r\nContent-Length: 2\r\n\r\n{}", 505),
        (b"GET / HTTP/1.1\r\n\r\n", 405),
        (b"PUT / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 405),
    ],
)
def test_malformed_http_is_refused_and_closed(shared, raw, status):
    with shared.store() as store:
        store.create("keep")
    before = snapshot(shared.state)
    conn = Raw(shared.sock)
    conn.send(raw)
    got, headers, body = conn.response()
    assert got == status and headers["connection"] == "close" and conn.closed()
    assert error_of(body) == (-32600, "Invalid_arguments")
    if status == 405:
        assert headers["allow"] == "POST"
    assert snapshot(shared.state) == before
    assert Raw(shared.sock).post(rpc("Task.ls", {"dbg": "d"}))[0] == 200


@pytest.mark.parametrize(
    "body, code, name",
    [
        (b"not json", -32700, "Invalid_arguments"),
        (b"\xff\xfe{}", -32700, "Invalid_arguments"),
        (b'{"method": "Task.ls", "params": [{"dbg": NaN}]}', -32700, "Invalid_arguments"),
        (b"[]", -32600, "Invalid_arguments"),
        (b"42", -32600, "Invalid_arguments"),
        (b'{"jsonrpc": "2.0", "params": [{}], "id": 1}', -32600, "Invalid_arguments"),
        (b'{"jsonrpc": "2.0", "method": "Task.ls", "id": 1}', -32600, "Invalid_arguments"),
        (b'{"jsonrpc": "2.0", "method": 5, "params": [{}], "id": 1}', -32600, "Invalid_arguments"),
        (b'{"jsonrpc": "2.0", "method": "Task.ls", "params": [{}, {}], "id": 1}', -32600, "Invalid_arguments"),
        (b'{"jsonrpc": "2.0", "method": "Task.ls", "params": [7], "id": 1}', -32602, "Invalid_arguments"),
        (b'{"jsonrpc": "2.0", "method": "Task.stat", "params": [{"dbg": "d", "id": "../../x"}], "id": 1}', -32602,
         "Invalid_arguments"),
        (b'{"jsonrpc": "2.0", "method": "Task.bogus", "params": [{"dbg": "d"}], "id": 1}', -32601, "Unimplemented"),
    ],
)
def test_malformed_jsonrpc_is_an_error_record_and_touches_nothing(shared, body, code, name):
    with shared.store() as store:
        task = store.create("keep")
    before = snapshot(shared.state)
    conn = Raw(shared.sock)
    status, headers, answer = conn.post(body)
    assert status == 200 and headers["connection"] == "keep-alive"
    assert error_of(answer) == (code, name)
    record = json.loads(answer)["error"]["data"]
    assert set(record) == {"code", "params", "backtrace"} and record["code"] == "SR_BACKEND_FAILURE"
    assert snapshot(shared.state) == before
    assert conn.post(rpc("Task.stat", {"dbg": "d", "id": task.id}))[0] == 200  # same connection, still served


def test_v1_request_with_bad_envelope_gets_a_v1_error(shared):
    status, _, body = Raw(shared.sock).post(b'{"method": "Task.ls", "params": [1, 2], "id": 9}')
    answer = json.loads(body)
    assert set(answer) == {"result", "error", "id"} and answer["id"] == 9
    assert answer["error"]["params"][0] == "Invalid_arguments"


def test_slow_and_half_sent_requests_time_out_without_blocking_others(daemons, store):
    d = daemons("--timeout", "1")
    task = store.create("t")
    half = Raw(d.sock)
    half.send(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"method\"")
    dribble = Raw(d.sock)
    idle = Raw(d.sock)
    t0 = time.monotonic()

    def drip():  # one byte every 0.3 s: each arrives in time, the request never does
        try:
            for byte in b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}":
                dribble.send(bytes([byte]))
                time.sleep(0.3)
        except OSError:
            pass

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    # Others are served at once meanwhile.
    for _ in range(5):
        t1 = time.monotonic()
        assert Raw(d.sock).post(rpc("Task.stat", {"dbg": "d", "id": task.id}))[0] == 200
        assert time.monotonic() - t1 < 0.5
    assert half.response()[0] == 408
    assert dribble.response()[0] == 408
    assert 0.8 < time.monotonic() - t0 < 4
    assert idle.closed()  # idle past the timeout: closed without an answer
    assert Raw(d.sock).post(rpc("Task.ls", {"dbg": "d"}))[0] == 200


def test_connections_over_the_limit_get_503(daemons):
    d = daemons("--max-connections", "2")
    held = [Raw(d.sock), Raw(d.sock)]
    for conn in held:
        assert conn.post(rpc("Task.ls", {"dbg": "d"}))[0] == 200
    extra = Raw(d.sock)
    extra.send(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
    status, headers, body = extra.response()
    assert status == 503 and headers["connection"] == "close" and extra.closed()
    assert error_of(body) == (-32000, "Service_unavailable")
    held.pop().close()
    wait_for(lambda: Raw(d.sock).post(rpc("Task.ls", {"dbg": "d"}))[0] == 200, what="a free slot")


# ---------------------------------------------------------------------------
# Who may connect


@pytest.fixture
def open_dir():
    """A directory other users can reach (tmp_path's parents are private)."""
    path = tempfile.mkdtemp(prefix="tasksd-", dir="/tmp")
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or not os.access(CURL, os.X_OK),
    reason="running a client as another user needs root, setpriv and curl",
)


def as_nobody(*argv, gid=65534):
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=%d" % gid, "--clear-groups", *argv],
                          capture_output=True, timeout=30)


def test_socket_is_private_by_default(shared):
    st = os.lstat(shared.sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()


@needs_setpriv
def test_a_peer_with_another_uid_is_refused(daemons, open_dir, store, state_dir):
    d = daemons(sock=os.path.join(open_dir, "d.sock"))
    store.create("keep")
    before = snapshot(state_dir)
    request = json.dumps(rpc("Task.ls", {"dbg": "d"}))
    # The file mode alone stops it...
    out = as_nobody(CURL, "-sS", "--unix-socket", d.sock, "--data-binary", request, "http://localhost/")
    assert out.returncode == 7, out  # curl: could not connect
    # ...and with the mode opened up, the peer credentials still do.
    os.chmod(d.sock, 0o666)
    out = as_nobody(CURL, "-sS", "--unix-socket", d.sock, "-w", "\n%{http_code}", "--data-binary", request, "http://localhost/")
    body, _, code = out.stdout.rpartition(b"\n")
    assert code == b"403", out
    assert error_of(body) == (-32000, "Permission_denied")
    assert "uid 65534" in json.loads(body)["error"]["message"]
    assert snapshot(state_dir) == before
    assert "refused a connection: pid" in d.log()


@needs_setpriv
def test_group_members_are_allowed_with_group(daemons, open_dir):
    d = daemons("--group", "nogroup", sock=os.path.join(open_dir, "d.sock"))
    st = os.lstat(d.sock)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 65534
    request = json.dumps(rpc("Task.ls", {"dbg": "d"}))
    out = as_nobody(CURL, "-sS", "--unix-socket", d.sock, "--data-binary", request, "http://localhost/")
    assert out.returncode == 0 and json.loads(out.stdout)["result"] == [], out
    os.chmod(d.sock, 0o666)
    out = as_nobody(CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", d.sock,
                    "--data-binary", request, "http://localhost/", gid=100)
    assert out.stdout == b"403", out  # neither its uid nor its group is allowed


# ---------------------------------------------------------------------------
# Start, stop, takeover


def test_sigterm_lets_requests_in_flight_finish_and_removes_the_socket(daemon, store):
    task = store.create("t")
    body = json.dumps(rpc("Task.stat", {"dbg": "d", "id": task.id}, "late")).encode()
    in_flight = Raw(daemon.sock)
    in_flight.send(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body[:10]))
    idle = Raw(daemon.sock)
    assert idle.post(rpc("Task.ls", {"dbg": "d"}))[0] == 200
    time.sleep(0.1)
    daemon.proc.send_signal(signal.SIGTERM)
    assert "STOPPING=1" in daemon.messages(5)
    wait_for(lambda: not os.path.lexists(daemon.sock), 5, what="the socket to go")
    assert idle.closed()  # idle keep-alive connections are closed at once
    with pytest.raises(OSError):
        Raw(daemon.sock)
    assert daemon.proc.poll() is None  # still finishing the request in flight
    in_flight.send(body[10:])
    status, headers, answer = in_flight.response()
    assert status == 200 and headers["connection"] == "close"
    assert json.loads(answer)["result"]["id"] == task.id and json.loads(answer)["id"] == "late"
    assert daemon.proc.wait(10) == 0
    assert "stopped" in daemon.log()


def test_shutdown_waits_only_so_long_for_a_stuck_request(daemons):
    d = daemons("--shutdown-timeout", "0.5", "--timeout", "30")
    stuck = Raw(d.sock)
    stuck.send(b"POST / HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
    time.sleep(0.1)
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 5
    assert "1 request(s) still in progress" in d.log()
    assert not os.path.lexists(d.sock)


def serving_processes(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
        return sorted(int(p) for p in f.read().split())


def running(pid):
    """Whether ``pid`` runs (a zombie nobody reaps yet does not)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_several_serving_processes_share_the_socket_and_stop_together(daemons, store):
    task = store.create("t")
    d = daemons("--processes", "3")
    children = serving_processes(d.pid)
    assert len(children) == 3

    def sockets(pid):
        return sum(1 for target in open_fds(pid).values() if target.startswith("socket:"))

    before = {pid: sockets(pid) for pid in [d.pid, *children]}
    conns = [Raw(d.sock) for _ in range(24)]
    for i, conn in enumerate(conns):  # all answered, kept open
        status, _, answer = conn.post(rpc("Task.stat", {"dbg": "d", "id": task.id}, i))
        assert status == 200 and json.loads(answer)["result"]["id"] == task.id and json.loads(answer)["id"] == i
    # The serving processes hold every accepted connection; the
    # supervisor accepts none.
    assert sockets(d.pid) <= before[d.pid]  # (its sd_notify socket may have been open before)
    assert sum(sockets(pid) - before[pid] for pid in children) == len(conns)
    for conn in conns:
        conn.sock.close()
    assert d.stop() == 0
    assert not os.path.lexists(d.sock)
    assert not any(running(child) for child in children)
    assert "stopped" in d.log()


def test_a_serving_process_that_dies_is_replaced_and_none_outlives_the_supervisor(daemons, store):
    d = daemons("--processes", "2")
    first, second = serving_processes(d.pid)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(serving_processes(d.pid)) == 2 and first not in serving_processes(d.pid), 10,
             what="a replacement serving process")
    assert "serving process %d ended (signal 9); starting another" % first in d.log()
    assert Raw(d.sock).post(rpc("Task.ls", {"dbg": "d"}))[0] == 200
    children = serving_processes(d.pid)
    d.stop(signal.SIGKILL)  # the supervisor dies: its serving processes stop (and remove the socket)
    wait_for(lambda: not any(running(c) for c in children), 15, what="the serving processes to stop")
    assert not os.path.lexists(d.sock)
    again = daemons()
    assert Raw(again.sock).post(rpc("Task.ls", {"dbg": "d"}))[0] == 200


def test_a_stale_socket_of_a_crashed_daemon_is_replaced(daemons, store):
    first = daemons()
    first.stop(signal.SIGKILL)
    assert stat.S_ISSOCK(os.lstat(first.sock).st_mode)  # left behind
    with pytest.raises(ConnectionRefusedError):
        Raw(first.sock)
    second = daemons()
    assert "replaced the stale socket" in second.log()
    assert Raw(second.sock).post(rpc("Task.ls", {"dbg": "d"}))[0] == 200


def test_a_stale_socket_without_a_lock_file_is_replaced(daemons, tmp_path):
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(tmp_path / "d.sock"))
    leftover.close()  # bound, never listening: connecting is refused
    d = daemons()
    assert Raw(d.sock).post(rpc("Task.ls", {"dbg": "d"}))[0] == 200


def test_a_second_daemon_does_not_steal_a_live_socket(daemons):
    first = daemons()
    inode = os.lstat(first.sock).st_ino
    second = daemons(ready=False)
    assert second.proc.wait(15) == 1
    assert "another daemon (pid %d) is serving" % first.pid in second.log()
    assert os.lstat(first.sock).st_ino == inode
    assert Raw(first.sock).post(rpc("Task.ls", {"dbg": "d"}))[0] == 200


def test_a_live_foreign_server_is_not_replaced(daemons, tmp_path):
    path = str(tmp_path / "d.sock")
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    other.listen(1)
    inode = os.lstat(path).st_ino
    try:
        d = daemons(ready=False)
        assert d.proc.wait(15) == 1
        assert "a live server (pid %d) is serving" % os.getpid() in d.log()
        assert os.lstat(path).st_ino == inode
    finally:
        other.close()


def test_a_path_that_is_not_a_socket_is_left_alone(daemons, tmp_path):
    (tmp_path / "d.sock").write_text("precious")
    d = daemons(ready=False)
    assert d.proc.wait(15) == 1
    assert "is not a socket" in d.log()
    assert (tmp_path / "d.sock").read_text() == "precious"


def test_detach_writes_a_pidfile_and_cleans_up(tmp_path, state_dir):
    sock, pidfile = str(tmp_path / "d.sock"), str(tmp_path / "d.pid")
    env = dict(os.environ, PYTHONPATH=SRC)
    argv = [sys.executable, "-m", "xapi_storage_tasks.daemon.server", "--socket", sock, "--detach", "--pidfile", pidfile]
    out = subprocess.run(argv, capture_output=True, env=env, timeout=30, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr  # returns once serving, pipes closed
    pid = int(open(pidfile).read())
    try:
        fds = open_fds(pid)
        assert Raw(sock).post(rpc("Task.ls", {"dbg": "d"}))[0] == 200
        status = open("/proc/%d/status" % pid).read()
        assert "Umask:\t0077" in status
        assert os.readlink("/proc/%d/cwd" % pid) == "/"
        assert os.getsid(pid) != os.getsid(0)
        assert all(fds[fd] == "/dev/null" for fd in (0, 1, 2))
        # Nothing inherited (the launcher's stdout/stderr pipes in particular):
        # the listener, the socket's lock, the pidfile, and the daemon's own
        # wake-up pipe and selector.
        others = sorted(re.sub(r"\[\d+\]$", "", t) for fd, t in fds.items() if fd > 2)
        assert others == sorted(["socket:", sock + ".lock", pidfile, "pipe:", "pipe:", "anon_inode:[eventpoll]"]), fds
        again = subprocess.run(argv, capture_output=True, env=env, timeout=30)
        assert again.returncode == 1 and b"another daemon (pid %d)" % pid in again.stderr
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not os.path.exists("/proc/%d" % pid) or "Z" in open("/proc/%d/stat" % pid).read().split(")")[1][:3],
                 what="the daemon to exit")
        assert not os.path.lexists(sock) and not os.path.lexists(pidfile)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------
# Workers started through the daemon


def start_task(sock, path, steps, delay, ignore_term=False):
    params = {"dbg": "via-daemon", "path": str(path), "steps": str(steps), "delay": str(delay),
              "ignore_term": "1" if ignore_term else "0"}
    status, _, body = Raw(sock).post(rpc("Test.start", params))
    result = json.loads(body)
    assert status == 200 and result["error"] is None, result
    return result["result"][1]


def test_workers_started_by_the_daemon_are_detached_and_outlive_a_restart(daemons, store, tmp_path, no_stray_workers):
    d = daemons(wrapper=True)
    out = tmp_path / "out"
    task_id = start_task(d.sock, out, 40, 0.05)
    ident = store.get(task_id).worker
    pid = ident["pid"]
    assert ident["pid"] == ident["pgid"] and os.getsid(pid) not in (os.getsid(d.pid), d.pid)
    assert os.readlink("/proc/%d/cwd" % pid) == "/"
    assert "Umask:\t0077" in open("/proc/%d/status" % pid).read()
    fds = open_fds(pid).values()
    assert not [f for f in fds if f.startswith("socket:")], fds  # no daemon socket inherited
    assert not [f for f in fds if f.endswith(".lock")], fds
    # Restart the daemon mid-task: the worker goes on, the new daemon sees it.
    assert d.stop() == 0
    # Normally still running here; on a very loaded machine it may be done,
    # which is fine: a killed worker would end "Worker lost", checked below.
    assert proc.matches(ident) or isinstance(store.get(task_id).state, Completed)
    d2 = daemons(wrapper=True)

    def finished():
        record = json.loads(Raw(d2.sock).post(rpc("Task.stat", {"dbg": "d", "id": task_id}))[2])["result"]
        return record if record["state"][0] != "Pending" else None

    record = wait_for(finished, 20, 0.05, "the task to complete")
    assert record["state"][0] == "Completed" and record["state"][1]["result"] == ["UnitResult", None]
    assert out.read_text().count("step") == 40
    assert proc.wait_gone(ident, 10)


def test_cancel_through_the_daemon_escalates_to_sigkill(daemons, store, tmp_path, monkeypatch, no_stray_workers):
    monkeypatch.setenv("TASK_CANCEL_GRACE", "0.3")
    d = daemons(wrapper=True)
    out = tmp_path / "out"
    task_id = start_task(d.sock, out, 2000, 0.01, ignore_term=True)
    ident = store.get(task_id).worker
    # The escalator is forked by a daemon thread; nobody polls afterwards.
    assert Raw(d.sock).post(rpc("Task.cancel", {"dbg": "d", "id": task_id}))[0] == 200
    assert proc.wait_gone(ident, 15)
    wait_for(lambda: store.get(task_id).state.terminal, 10, what="the task to fail")
    assert store.get(task_id).state.message == CANCELLED
    assert not out.exists()


def test_many_forks_while_serving_do_not_deadlock(daemons, store, tmp_path, no_stray_workers):
    d = daemons(wrapper=True)
    started, errors = [], []

    def starter(n):
        try:
            for i in range(3):
                started.append(start_task(d.sock, tmp_path / ("out-%d-%d" % (n, i)), 3, 0.01))
        except Exception as e:  # reported below
            errors.append(e)

    def poller():
        try:
            conn = Raw(d.sock)
            for _ in range(100):
                assert conn.post(rpc("Task.ls", {"dbg": "d"}))[0] == 200
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=starter, args=(n,)) for n in range(6)]
    threads += [threading.Thread(target=poller) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a starter or poller hung"
    assert not errors and len(started) == 18
    wait_for(lambda: all(store.get(i).state.terminal for i in started), 30, 0.05, "every task to finish")
    assert {type(store.get(i).state) for i in started} == {Completed}


@needs_curl
def test_a_real_copy_through_the_daemon(daemon, store, tmp_path, no_stray_workers):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(os.urandom(3 << 20))
    params = {"dbg": "copy", "uri": str(src), "domain": "0", "remote": "file://" + str(dst)}
    status, body = curl(daemon.sock, rpc("Data.copy", params))
    operation = json.loads(body)["result"]
    assert status == 200 and operation[0] == "CopyV1"

    def complete():
        return json.loads(curl(daemon.sock, rpc("Data.stat", {"dbg": "d", "operation": operation}))[1])["result"]["complete"]

    wait_for(complete, 20, 0.05, "the copy")
    assert dst.read_bytes() == src.read_bytes()


# ---------------------------------------------------------------------------
# Daemon and executables on one store


def test_daemon_and_executables_interleave_on_one_store(daemons, store, tmp_path, no_stray_workers):
    d = daemons(wrapper=True)
    conn = Raw(d.sock)

    def via_daemon(method, params):
        answer = json.loads(conn.post(rpc(method, params))[2])
        return answer["result"] if answer["error"] is None else answer["error"]["params"][0]

    def via_exe(method, params):
        res = run_bin(method, params)
        return res.json if res.returncode == 0 else res.error_name

    running = start_task(d.sock, tmp_path / "out", 2000, 0.01)
    assert via_exe("Task.stat", {"dbg": "d", "id": running})["state"][0] == "Pending"
    assert via_exe("Task.cancel", {"dbg": "d", "id": running}) is None
    wait_for(lambda: via_daemon("Task.stat", {"dbg": "d", "id": running})["state"] == ["Failed", CANCELLED], what="cancel")
    assert via_daemon("Task.destroy", {"dbg": "d", "id": running}) is None
    assert via_exe("Task.stat", {"dbg": "d", "id": running}) == "Task_does_not_exist"
    made = store.create("api").id
    assert via_daemon("Task.ls", {"dbg": "d"}) == via_exe("Task.ls", {"dbg": "d"}) == [made]
    assert via_exe("Task.destroy", {"dbg": "d", "id": made}) == "Task_in_progress"
    store.transition(made, lambda t: Completed(1.0))
    assert via_exe("Task.destroy", {"dbg": "d", "id": made}) is None
    assert via_daemon("Task.ls", {"dbg": "d"}) == []
    # At the same time: executables and daemon threads on the same tasks.
    ids = [store.create("many").id for _ in range(5)]
    errors = []

    def hammer():
        try:
            c = Raw(d.sock)
            for i in ids * 4:
                assert json.loads(c.post(rpc("Task.stat", {"dbg": "d", "id": i}))[2])["result"]["id"] == i
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for i in ids:
        assert via_exe("Task.cancel", {"dbg": "d", "id": i}) is None
        assert via_exe("Task.stat", {"dbg": "d", "id": i})["id"] == i
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not errors
