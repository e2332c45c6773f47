"""Fuzzing the input boundary with hypothesis: arbitrary stdin bytes,
arbitrary params objects (right and wrong keys and types), JSON-RPC
envelopes and positional argv, for every method in xapi_storage_tasks.registry.METHODS.

The answer must always be a valid result with exit 0 or a valid error
record with exit 1 (every field present and typed; stdout one line of
strict JSON; stderr one line); bad input is reported as such, never as
``Internal_error``; and a call that fails leaves the store (tasks, locks,
marks, temporary files) byte for byte as it was.

Most examples run in-process through ``xapi_storage_tasks.entry.main`` (the code every
``bin/`` executable runs) with stdin/stdout swapped for in-memory streams;
a smaller number go through the real executables. Violations are collected
by category over the whole run (smallest example kept) and reported at
the end, so one run shows every kind of problem at once.

``RELIABILITY_FUZZ_EXAMPLES`` (per in-process test, default 300) and
``RELIABILITY_FUZZ_EXEC_EXAMPLES`` (default 40) set the counts.
"""

import atexit
import io
import json
import os
import shutil
import subprocess
import sys
import time

import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from conftest import BIN, run_bin
from faults import env_int, report, snapshot
from xapi_storage_tasks.wire import codec
from xapi_storage_tasks.wire import ids
from xapi_storage_tasks.tasks import lifecycle
from xapi_storage_tasks import registry
from xapi_storage_tasks import entry
from xapi_storage_tasks.tasks.state import Completed, Failed, from_wire
from xapi_storage_tasks.tasks.store import Store

pytestmark = pytest.mark.reliability

# No example database, and hypothesis' own caches go to a temporary
# directory rather than .hypothesis/ in the checkout.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="reliability-hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, True)

METHODS = sorted(registry.METHODS)
ERROR_NAMES = {"Task_does_not_exist", "Task_in_progress", "Task_corrupt", "Invalid_arguments", "Unimplemented",
               "State_directory_invalid", "Internal_error", "Volume_not_attached", "Volume_busy", "Volume_in_use",
               "Storage_daemon_failed", "Storage_daemon_lost", "Mirror_failed", "SR_does_not_exist",
               "Volume_does_not_exist"}
SLOTS = ("done", "failed", "pending", "copy_done", "copy_pending", "corrupt", "absent")
ABSENT = "01a222d6-2dae-7d19-96ed-88b4b83c3579"
# Data.copy with well-typed params is only ever run with this source: its
# validation refuses it before anything is started or touched.
NOWHERE = "/nonexistent-reliability-fuzz/source"


# -- rendering generated values as JSON text ------------------------------------


class Raw:
    """A piece of JSON text inserted as is (odd number literals)."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return "Raw(%r)" % (self.text if len(self.text) < 60 else self.text[:30] + "...%d chars" % len(self.text))


class Nested:
    """``depth`` nested arrays around 0."""

    def __init__(self, depth, kind="["):
        self.depth, self.kind = depth, kind

    def __repr__(self):
        return "Nested(%d, %r)" % (self.depth, self.kind)


class Seed:
    """The id of a seeded task, filled in at run time."""

    def __init__(self, slot):
        self.slot = slot

    def __repr__(self):
        return "Seed(%s)" % self.slot


def render(value, seeds, ascii_only=True):
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Nested):
        if value.kind == "[":
            return "[" * value.depth + "0" + "]" * value.depth
        return '{"a":' * value.depth + "0" + "}" * value.depth
    if isinstance(value, Seed):
        return json.dumps(seeds[value.slot])
    if isinstance(value, dict):
        return "{" + ",".join("%s:%s" % (json.dumps(k, ensure_ascii=ascii_only), render(v, seeds, ascii_only))
                              for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(render(v, seeds, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def concrete(value, seeds):
    """The Python value a strict parser would read (None if unsure)."""
    try:
        return json.loads(render(value, seeds))
    except (ValueError, RecursionError):
        return None


# -- strategies ----------------------------------------------------------------------

raw_numbers = st.one_of(
    st.from_regex(r"\A-?(0|[1-9][0-9]{0,2})(\.[0-9]{1,3})?([eE][+-]?[0-9]{1,4})?\Z"),
    st.sampled_from(["1e400", "-1e400", "1E999", "0.0", "-0", "1e-400", "123456789012345678901234567890"]),
    st.integers(4295, 4305).map(lambda n: "1" * n),  # around CPython's int digit limit
).map(Raw)
nested = st.one_of(st.integers(0, 60), st.integers(900, 3000)).flatmap(
    lambda d: st.sampled_from(["[", "{"]).map(lambda k: Nested(d, k)))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=20), raw_numbers)
json_values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), c, max_size=4)),
                           max_leaves=10)
junk = st.one_of(json_values, nested)
id_values = st.one_of(
    st.sampled_from(SLOTS).map(Seed),
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.sampled_from(["", "../x", "a/b", "x\u0000y", "/etc/passwd", ABSENT + "\n", " " + ABSENT, ABSENT[:-1]]),
    st.text(max_size=40),
    junk,
)
tags = st.sampled_from(["CopyV1", "MirrorV1", "copyv1", "COPYV1", "Nope", ""])


def value_for(kind):
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    right = {
        "str": st.text(max_size=30),
        "int": st.one_of(st.integers(), st.integers(-2, 1 << 40)),
        "bool": st.booleans(),
        # Never a real directory: an SR.create the fuzzer got right would
        # make one wherever it pointed (the SR tests make theirs in tmp).
        "config": st.one_of(
            st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3).filter(lambda d: "path" not in d),
            st.fixed_dictionaries({"path": st.sampled_from(["", "relative/sr", "/nonexistent-sr-dir/x"])})),
        "task_id": id_values,
        "operation": st.one_of(st.tuples(tags, id_values).map(list), st.lists(id_values, max_size=3)),
        "blocklist": st.fixed_dictionaries({
            "blocksize": st.one_of(st.integers(-2, 1 << 20), junk),
            "ranges": st.one_of(st.lists(st.tuples(st.integers(0, 100), st.integers(1, 8)).map(list), max_size=3),
                                st.lists(st.lists(st.integers(-5, 100), max_size=3), max_size=4), junk),
        }),
    }[kind]
    if optional:
        right = st.one_of(st.none(), right)
    if kind == "config":  # junk objects could name a real directory too
        return st.one_of(right, right, st.one_of(scalars, st.lists(scalars, max_size=3)))
    return st.one_of(right, right, junk)


def params_for(method):
    spec = registry.METHODS[method].params
    fields = {name: value_for(kind) for name, kind in spec}
    extra = st.dictionaries(st.text(max_size=6), json_values, max_size=2)
    full = st.fixed_dictionaries(fields)
    partial = st.fixed_dictionaries({}, optional=fields)
    params = st.tuples(st.one_of(full, full, partial), extra).map(lambda p: {**p[1], **p[0]})
    if method == "Data.copy":
        params = st.tuples(params, st.booleans()).map(lambda p: dict(p[0], uri=NOWHERE) if p[1] else p[0])
    return params


any_params = st.sampled_from(METHODS).flatmap(params_for)
method_names = st.one_of(
    st.sampled_from(METHODS),
    st.sampled_from(METHODS).map(str.lower),
    st.sampled_from(METHODS).map(str.upper),
    st.sampled_from(["Task.frobnicate", "Plugin.query", "Task.stat\n", "Task.", "."]),
)


def envelopes(method):
    params = st.one_of(params_for(method), any_params, junk)
    return st.fixed_dictionaries(
        {
            "method": st.one_of(st.just(method), method_names, st.text(max_size=12), junk),
            "params": st.one_of(params.map(lambda p: [p]), params, st.lists(params, max_size=3)),
        },
        optional={
            "id": st.one_of(json_values, raw_numbers),
            "jsonrpc": st.one_of(st.sampled_from(["2.0", "1.0"]), json_values),
        },
    )


def argv_bytes():
    return st.one_of(
        st.binary(max_size=24),
        st.tuples(st.binary(max_size=6), st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]),
                  st.binary(max_size=6)).map(b"".join),  # surely not UTF-8
    ).filter(lambda b: b"\0" not in b)


# -- running one call --------------------------------------------------------------------


def run_inprocess(name, args, stdin):
    """``entry.main`` with in-memory stdio; returns (status, stdout, stderr).
    ``status`` is ("exit", code) if it raised SystemExit (--help)."""
    saved = sys.stdin, sys.stdout, sys.stderr
    out, err = io.BytesIO(), io.BytesIO()
    streams = (
        io.TextIOWrapper(io.BytesIO(stdin)),
        io.TextIOWrapper(out, encoding="utf-8", write_through=True),
        io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True),
    )
    sys.stdin, sys.stdout, sys.stderr = streams
    try:
        try:
            status = entry.main([os.path.join(BIN, name), *args])
        except SystemExit as e:
            status = ("exit", e.code)
        for stream in streams[1:]:
            stream.flush()
        result = status, out.getvalue(), err.getvalue()
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
        for stream in streams:
            stream.detach()  # so that collecting the wrapper does not close our buffers
    return result


def nesting(data):
    """Maximum bracket depth of JSON text (outside strings)."""
    depth = top = 0
    in_str = escape = False
    for ch in data:
        if in_str:
            if escape:
                escape = False
            elif ch == 0x5C:
                escape = True
            elif ch == 0x22:
                in_str = False
        elif ch == 0x22:
            in_str = True
        elif ch in (0x5B, 0x7B):
            depth += 1
            top = max(top, depth)
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return top


def run_executable(name, args, stdin, links):
    path = links(name)
    p = subprocess.run([path, *args], input=stdin, capture_output=True, timeout=60)
    return p.returncode, p.stdout, p.stderr


def reaches_copy(name, args, stdin):
    """The decoded params if the call would get as far as Data.copy's
    implementation (which plans and may start a real copy), else None."""
    found = registry.lookup(os.path.basename(name))
    if found is None or found.name != "Data.copy":
        return None
    try:
        if args == ["--json"]:
            params = entry.parse_json(stdin)
        elif not args:
            params = entry.parse_json(stdin)
            if codec.is_envelope(params):
                method, params, _, _ = codec.decode_request(params)
                if method.lower() != "data.copy":
                    return None
        else:
            params = entry._positional(found, args)
        return codec.decode_params(found.params, params)
    except BaseException:
        return None


def _strict(data):
    def reject(name):
        raise ValueError("non-strict constant %s" % name)

    return json.loads(data.decode("utf-8"), parse_constant=reject)


def _record_ok(rec):
    try:
        bt = rec["backtrace"]
        return (
            set(rec) == {"code", "params", "backtrace"}
            and isinstance(rec["code"], str)
            and isinstance(rec["params"], list) and len(rec["params"]) >= 1
            and all(isinstance(p, str) for p in rec["params"])
            and rec["params"][0] in ERROR_NAMES
            and set(bt) == {"error", "files", "lines"}
            and isinstance(bt["error"], str)
            and isinstance(bt["files"], list) and all(isinstance(f, str) for f in bt["files"])
            and isinstance(bt["lines"], list) and all(type(n) is int for n in bt["lines"])
            and len(bt["files"]) == len(bt["lines"])
        )
    except (KeyError, TypeError):
        return False


def _result_ok(method, value):
    kind = registry.METHODS[method].result
    if kind == "task":
        return (isinstance(value, dict) and set(value) == {"id", "debug_info", "ctime", "state"}
                and ids.is_valid(value["id"]) and type(value["ctime"]) is float
                and isinstance(value["debug_info"], str) and _state_ok(value["state"]))
    if kind == "unit":
        return value is None
    if kind == "id_list":
        return isinstance(value, list) and all(ids.is_valid(v) for v in value) and value == sorted(value)
    if kind == "operation":
        return isinstance(value, list) and len(value) == 2 and value[0] in codec.OPERATION_TAGS and ids.is_valid(value[1])
    if kind == "operation_list":
        return isinstance(value, list) and all(_result_ok("Data.copy", v) for v in value)
    if kind == "query":
        return isinstance(value, dict) and value.get("required_api_version") == "5.0"
    if kind == "attach":
        return isinstance(value, dict) and isinstance(value.get("implementations"), list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "record":
        return isinstance(value, dict)
    if kind == "record_list":
        return isinstance(value, list) and all(isinstance(v, dict) for v in value)
    if kind == "status":
        return (isinstance(value, dict) and {"failed", "complete"} <= set(value) <= {"failed", "complete", "progress"}
                and type(value["failed"]) is bool and type(value["complete"]) is bool
                and (type(value.get("progress")) is float or ("progress" not in value and value["failed"])))
    return False


def _state_ok(state):
    try:
        from_wire(state)
    except ValueError:
        return False
    return type(state[1]) is float if state[0] == "Pending" else True


class Fuzzer:
    """Seeded store, oracle, and the violations found so far."""

    def __init__(self, state_dir):
        self.state_dir = str(state_dir)
        self.seeds = {"absent": ABSENT}
        self.violations = {}
        self.counts = {"calls": 0, "exit0": 0, "exit1": 0, "help": 0, "copy_validation_calls": 0,
                       "skipped_valid_copy": 0, "store_changed_ok": 0}
        self.error_names = {}
        self.ensure()
        self.before = snapshot(self.state_dir)

    def ensure(self):
        """(Re)create any seeded task a previous call destroyed."""
        with Store(self.state_dir) as store:
            for slot in SLOTS:
                current = self.seeds.get(slot)
                if slot == "absent" or (current and os.path.exists(os.path.join(self.state_dir, "tasks", current + ".json"))):
                    continue
                op = {"kind": "CopyV1", "args": {}} if slot.startswith("copy") else None
                task = store.create("fuzz-" + slot, operation=op)
                if slot in ("done", "copy_done"):
                    store.transition(task.id, lambda t: Completed(1.5, ["UnitResult", None]))
                elif slot == "failed":
                    store.transition(task.id, lambda t: Failed("boom"))
                elif slot == "corrupt":
                    with open(os.path.join(self.state_dir, "tasks", task.id + ".json"), "wb") as f:
                        f.write(b'{"version": 1, "id": ')
                self.seeds[slot] = task.id

    def violation(self, category, example):
        text = repr(example)
        old = self.violations.get(category)
        if old is None or len(text) < len(old[0]):
            self.violations[category] = (text, (old[1] if old else 0) + 1)
        else:
            self.violations[category] = (old[0], old[1] + 1)

    def check(self, name, args, stdin, status, stdout, stderr, example):
        self.counts["calls"] += 1
        canonical = registry.lookup(os.path.basename(name))
        canonical = canonical.name if canonical else None
        if isinstance(status, tuple):  # argparse --help
            if status[1] == 0 and any(a.startswith("-") for a in args):
                self.counts["help"] += 1
            else:
                self.violation("SystemExit %r escaped" % (status[1],), example)
            self.before = snapshot(self.state_dir)
            return
        if status not in (0, 1):
            self.violation("exit status %r" % status, example)
            return
        self.counts["exit%d" % status] += 1
        if not (stdout.endswith(b"\n") and stdout.count(b"\n") == 1):
            self.violation("stdout is not exactly one line", example)
        try:
            answer = _strict(stdout)
        except ValueError as e:
            self.violation("stdout is not strict JSON (%s)" % str(e).split(" ")[0], example)
            return
        request = None
        deep = nesting(stdin) >= 500  # whether that parses depends on the stack depth left
        if not args and not deep:
            try:
                request = entry.parse_json(stdin)
            except Exception:
                request = None
        envelope = codec.is_envelope(request)
        if not args and deep and isinstance(answer, dict) and "code" not in answer:
            request, envelope = {"id": answer.get("id"), "jsonrpc": answer.get("jsonrpc")}, True
        if envelope:
            v2 = request.get("jsonrpc") == "2.0"
            keys = {"jsonrpc", "result" if status == 0 else "error", "id"} if v2 else {"result", "error", "id"}
            if not isinstance(answer, dict) or set(answer) != keys or answer.get("id") != request.get("id"):
                self.violation("bad JSON-RPC response envelope", example)
                return
            if status == 0:
                payload = answer["result"]
            else:
                payload = answer["error"]["data"] if v2 else answer["error"]
                if v2 and not (type(answer["error"].get("code")) is int and isinstance(answer["error"].get("message"), str)):
                    self.violation("bad JSON-RPC 2.0 error object", example)
        else:
            payload = answer
        if status == 0:
            if canonical is None or not _result_ok(canonical, payload):
                self.violation("exit 0 with an invalid result for %s" % canonical, example)
            self.counts["store_changed_ok"] += snapshot(self.state_dir) != self.before
            self.ensure()
            self.before = snapshot(self.state_dir)
            return
        if not _record_ok(payload):
            self.violation("invalid error record", example)
            return
        err_name = payload["params"][0]
        self.error_names[err_name] = self.error_names.get(err_name, 0) + 1
        if err_name == "Internal_error":
            detail = payload["params"][1] if len(payload["params"]) > 1 else ""
            self.violation("Internal_error on bad input (%s)" % detail.split(":")[0], example)
        if stderr.count(b"\n") != 1 or not stderr.endswith(b"\n"):
            self.violation("stderr is not one line", example)
        after = snapshot(self.state_dir)
        if after != self.before:
            self.violation("a failed call changed the store", example)
            self.ensure()
            self.before = snapshot(self.state_dir)

    def finish(self, label):
        report(label, inputs_tried=self.counts["calls"] + self.counts["skipped_valid_copy"], **self.counts,
               error_names=self.error_names, violation_kinds=len(self.violations),
               failures=sum(n for _, n in self.violations.values()))
        for category, (example, n) in sorted(self.violations.items()):
            print("  VIOLATION %s (x%d), smallest: %s" % (category, n, example[:400]))
        assert self.violations == {}, "violations: %s" % sorted(self.violations)


@pytest.fixture
def fuzzer(state_dir, monkeypatch):
    import xapi_storage_tasks.tasks.worker

    monkeypatch.setattr(lifecycle, "START_TIMEOUT", 1e9)  # seeded Pending tasks stay Pending
    started = []

    def no_workers(*a, **k):
        started.append(a)
        raise RuntimeError("fuzz harness: a worker would have started")

    monkeypatch.setattr(xapi_storage_tasks.tasks.worker, "start", no_workers)
    f = Fuzzer(state_dir)
    yield f
    assert started == [], "a fuzz input started a worker"


def _settings(n):
    return settings(max_examples=n, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck))


def _call(fuzzer, name, args, stdin, example):
    decoded = reaches_copy(name, args, stdin)
    if decoded is not None:
        if decoded.get("uri") != NOWHERE:
            fuzzer.counts["skipped_valid_copy"] += 1  # could start a real copy
            return
        fuzzer.counts["copy_validation_calls"] += 1  # refused by the copy's own validation
    status, out, err = run_inprocess(name, args, stdin)
    fuzzer.check(name, args, stdin, status, out, err, example)


N = env_int("RELIABILITY_FUZZ_EXAMPLES", 300)


def test_fuzz_arbitrary_stdin_bytes(fuzzer):
    """Promise: any stdin bytes, in --json or envelope mode, for every
    method: a valid result (exit 0) or a valid error record (exit 1),
    never Internal_error, store unchanged on error."""

    @_settings(N)
    @given(name=method_names, json_mode=st.booleans(),
           data=st.one_of(st.binary(max_size=200),
                          st.text(max_size=60).map(lambda s: s.encode("utf-8", "surrogatepass")),
                          json_values.map(lambda v: render(v, {}).encode())))
    def inner(name, json_mode, data):
        _call(fuzzer, name, ["--json"] if json_mode else [], data, (name, json_mode, data[:300]))

    t0 = time.monotonic()
    inner()
    fuzzer.finish("fuzz stdin bytes (%.1fs)" % (time.monotonic() - t0))


def test_fuzz_params_objects(fuzzer):
    """Promise: any params object (missing keys, wrong types, odd numbers,
    deep nesting, seeded and unknown ids) for every method, in --json
    mode: a valid result or a valid, non-internal error record; a failing
    call never changes the store."""

    @_settings(N)
    @given(name=st.sampled_from(METHODS), data=st.data(), ascii_only=st.booleans())
    def inner(name, data, ascii_only):
        params = data.draw(st.one_of(params_for(name), params_for(name), junk))
        text = render(params, fuzzer.seeds, ascii_only).encode("utf-8", "surrogatepass")
        _call(fuzzer, name, ["--json"], text, (name, params))

    t0 = time.monotonic()
    inner()
    fuzzer.finish("fuzz params objects (%.1fs)" % (time.monotonic() - t0))


def test_fuzz_jsonrpc_envelopes(fuzzer):
    """Promise: any JSON-RPC request envelope sent to any executable: a
    response envelope with the request's id holding a valid result (exit 0)
    or a valid error record (exit 1, inside ``error``, or ``error.data``
    for JSON-RPC 2.0); never Internal_error; store unchanged on error."""

    @_settings(N)
    @given(name=st.sampled_from(METHODS), data=st.data())
    def inner(name, data):
        envelope = data.draw(envelopes(name))
        _call(fuzzer, name, [], render(envelope, fuzzer.seeds).encode(), (name, envelope))

    t0 = time.monotonic()
    inner()
    fuzzer.finish("fuzz JSON-RPC envelopes (%.1fs)" % (time.monotonic() - t0))


def test_fuzz_positional_argv(fuzzer):
    """Promise: any positional arguments (arbitrary bytes as the OS passes
    them, seeded ids, JSON text) for every method: a valid result or a
    valid error record naming the bad input (never Internal_error), and
    --help exits 0."""

    def as_arg(value):
        if isinstance(value, str):
            return value
        if isinstance(value, Seed):
            return fuzzer.seeds[value.slot]
        return render(value, fuzzer.seeds)

    @_settings(N)
    @given(name=st.sampled_from(METHODS), data=st.data())
    def inner(name, data):
        spec = registry.METHODS[name].params
        args = [data.draw(st.one_of(argv_bytes().map(os.fsdecode), value_for(kind).map(as_arg))) for _, kind in spec]
        n = data.draw(st.one_of(st.just(len(args)), st.integers(0, len(args) + 1)))
        args = args[:n] if n <= len(args) else args + [os.fsdecode(data.draw(argv_bytes()))]
        args = [a for a in args if "\0" not in a]
        if name == "Data.copy" and len(args) > 1 and data.draw(st.booleans()):
            args[1] = NOWHERE
        _call(fuzzer, name, args, b"", (name, args))

    t0 = time.monotonic()
    inner()
    fuzzer.finish("fuzz positional argv (%.1fs)" % (time.monotonic() - t0))


def test_fuzz_data_copy_validation(fuzzer):
    """Promise: Data.copy with well-typed but unusable arguments (a source
    that does not exist, NBD sources, odd targets, domains and
    blocklists) is refused by its validation in the caller with a valid,
    non-internal error record, starts no worker and changes no task."""
    sources = st.one_of(
        st.just(NOWHERE),
        st.text(alphabet=st.characters(blacklist_characters="./\0"), max_size=20).map(lambda t: NOWHERE + "/" + t),
        st.just("file://" + NOWHERE),
        st.sampled_from(["nbd://nowhere.invalid/x", "nbd+unix:///x?socket=/nonexistent-reliability-fuzz/sock", ""]),
    )
    params = st.fixed_dictionaries(
        {"dbg": st.text(max_size=10), "uri": sources, "domain": st.text(max_size=10),
         "remote": st.one_of(st.text(max_size=30), st.just("/nonexistent-reliability-fuzz/target"),
                             st.just("nbd://nowhere.invalid/t"))},
        optional={"blocklist": value_for("blocklist?")},
    )

    @_settings(max(30, N // 2))
    @given(p=params, envelope=st.booleans())
    def inner(p, envelope):
        if envelope:
            text = render({"method": "Data.copy", "params": [p], "id": 7}, fuzzer.seeds).encode()
            _call_copy(fuzzer, [], text, p)
        else:
            _call_copy(fuzzer, ["--json"], render(p, fuzzer.seeds).encode(), p)

    t0 = time.monotonic()
    inner()
    fuzzer.finish("fuzz Data.copy validation (%.1fs)" % (time.monotonic() - t0))


def _call_copy(fuzzer, args, stdin, example):
    fuzzer.counts["copy_validation_calls"] += 1  # nothing here can start: the source is missing
    status, out, err = run_inprocess("Data.copy", args, stdin)
    fuzzer.check("Data.copy", args, stdin, status, out, err, ("Data.copy", example))


def test_fuzz_through_real_executables(state_dir, tmp_path):
    """Promise: the same properties hold for the real executables run as
    subprocesses (a smaller sample of every input kind)."""
    n = env_int("RELIABILITY_FUZZ_EXEC_EXAMPLES", 40)
    f = Fuzzer(state_dir)
    links_dir = tmp_path / "links"
    links_dir.mkdir()

    def links(name):
        path = os.path.join(BIN, name)
        if os.path.exists(path):
            return path
        link = links_dir / name
        if not link.exists():
            link.symlink_to(os.path.join(BIN, "dispatch"))
        return str(link)

    kinds = st.sampled_from(["bytes", "params", "envelope", "argv"])

    @_settings(n)
    @given(name=st.sampled_from(METHODS + ["Task.frobnicate", "data.STAT"]), kind=kinds, data=st.data())
    def inner(name, kind, data):
        found = registry.lookup(name)
        canonical = found.name if found else name
        if kind == "bytes":
            args, stdin = ["--json"], data.draw(st.binary(max_size=120))
        elif kind == "params":
            params = data.draw(params_for(canonical) if canonical in registry.METHODS else any_params)
            args, stdin = ["--json"], render(params, f.seeds).encode()
        elif kind == "envelope":
            env = data.draw(envelopes(canonical if canonical in registry.METHODS else "Task.ls"))
            args, stdin = [], render(env, f.seeds).encode()
        else:
            raw = data.draw(st.lists(argv_bytes(), min_size=1, max_size=4))
            args, stdin = [os.fsdecode(b) for b in raw], b""
        if reaches_copy(name, args, stdin) is not None:
            f.counts["skipped_valid_copy"] += 1  # no worker guard out of process: never run it
            return
        status, out, err = run_executable(name, [os.fsencode(a) for a in args], stdin, links)
        if status == 0 and any(a.startswith("-") for a in args) and not out.startswith((b"{", b"[", b"n", b"\"")):
            f.counts["help"] += 1
            return
        f.check(name, args, stdin, status, out, err, (name, kind, args, stdin[:200]))

    t0 = time.monotonic()
    inner()
    f.finish("fuzz real executables (%.1fs)" % (time.monotonic() - t0))


# -- one deterministic test per bug the fuzzing found -----------------------------------


def test_jsonrpc_id_that_overflows_is_not_echoed_as_infinity(state_dir):
    """Promise: stdout is always strict JSON. A request id like ``1e400``
    (valid JSON text) parses to float('inf') and must not come back as
    the non-JSON token ``Infinity``."""
    res = run_bin("Task.ls", b'{"method": "Task.ls", "params": [{"dbg": "d"}], "id": 1e400}', args=())
    report("id 1e400", trials=1, inputs_tried=1, answer=res.stdout.decode()[:120], failures=int(b"Infinity" in res.stdout))
    _strict(res.stdout)


def test_deeply_nested_input_is_invalid_arguments(state_dir):
    """Promise: input that is not acceptable JSON is Invalid_arguments (and
    logs no traceback); 100000 nested arrays are well under the 1 MiB
    limit."""
    res = run_bin("Task.ls", b"[" * 100000 + b"]" * 100000)
    report("deep nesting", trials=1, inputs_tried=1, answer=res.stdout.decode()[:120],
           failures=int(res.json["params"][0] != "Invalid_arguments"))
    assert res.returncode == 1 and res.json["params"][0] == "Invalid_arguments", res.json["params"]


def test_non_utf8_positional_argument_is_invalid_arguments(store):
    """Promise: input that is not UTF-8 is Invalid_arguments: a positional
    argument of a JSON-valued parameter (Data.stat's operation) that is
    not UTF-8 must not become Internal_error (UnicodeEncodeError)."""
    res = run_bin("Data.stat", args=("d", os.fsdecode(b"\xff")))
    report("non-UTF-8 argv", trials=1, inputs_tried=1, answer=res.stdout.decode()[:120],
           failures=int(res.json["params"][0] != "Invalid_arguments"))
    assert res.returncode == 1 and res.json["params"][0] == "Invalid_arguments", res.json["params"]


def test_stderr_is_one_line_whatever_the_request_says(state_dir):
    """Promise (README): any failure prints one readable line on stderr,
    even when the request carries a method name with a newline."""
    res = run_bin("Task.stat", {"method": "Task.stat\nInjected: line", "params": [{"dbg": "d"}], "id": 1}, args=())
    lines = res.stderr.decode().count("\n")
    report("stderr lines", trials=1, inputs_tried=1, stderr=res.stderr.decode(), failures=int(lines != 1))
    assert res.returncode == 1 and lines == 1, res.stderr
