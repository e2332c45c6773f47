"""Fault injection and checking helpers for the reliability suite
(``tests/test_reliability_*.py``).

:class:`OSProxy` stands in for the ``os`` module inside one plugin module
of the task store only (:func:`store_os`), so the test runner, the log
module and everything else keep the real ``os``. The
hook sees every call of a watched function and decides: pass it through,
raise an ``OSError``, or SIGKILL the calling process at that instant.

Everything else here is plain observation: snapshots of a state directory,
checks that every task file is whole, bystander processes, and running a
method through the executables' own code path in a forked child.
"""

import contextlib
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "bin")
STORE_DIRS = ("tasks", "tmp", "locks", "pending")


def store_os(value):
    """Make ``value`` (an :class:`OSProxy`, or the real ``os`` back) the
    ``os`` of every module through which the task store touches files."""
    import xapi_storage_tasks.files.dirs
    import xapi_storage_tasks.files.jsonfile
    import xapi_storage_tasks.files.lock
    import xapi_storage_tasks.tasks.index
    import xapi_storage_tasks.tasks.locks
    import xapi_storage_tasks.tasks.marks
    import xapi_storage_tasks.tasks.store
    import xapi_storage_tasks.tasks.sweep

    for module in (xapi_storage_tasks.files.dirs, xapi_storage_tasks.files.jsonfile, xapi_storage_tasks.files.lock,
                   xapi_storage_tasks.tasks.index, xapi_storage_tasks.tasks.locks, xapi_storage_tasks.tasks.marks,
                   xapi_storage_tasks.tasks.store, xapi_storage_tasks.tasks.sweep):
        module.os = value


def env_int(name, default):
    """A trial count from the environment (``RELIABILITY_*``), scaled by
    ``RELIABILITY_SCALE`` (a float, default 1)."""
    try:
        value = int(os.environ.get(name, default))
    except ValueError:
        value = default
    try:
        scale = float(os.environ.get("RELIABILITY_SCALE", "1"))
    except ValueError:
        scale = 1.0
    return max(1, int(round(value * scale)))


def env_float(name, default):
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def rng():
    """A seeded random generator; the seed is printed so a run can be
    repeated with ``RELIABILITY_SEED``."""
    seed = int(os.environ.get("RELIABILITY_SEED", random.randrange(1 << 30)))
    print("seed=%d (RELIABILITY_SEED to repeat)" % seed)
    return random.Random(seed)


class Failures:
    """The failed trials of one reliability test, counted: each trial runs
    under ``with failures.trial():``, whose AssertionError is kept while
    the run goes on to the next trial; :func:`report` prints the count and
    then fails the test if it is not zero."""

    def __init__(self):
        self.messages = []

    @contextlib.contextmanager
    def trial(self):
        try:
            yield
        except AssertionError as e:
            self.messages.append(str(e).strip() or "assertion failed")


def report(name, *, failures, **counts):
    """Print one line of counts, ``failures`` last (shown with ``pytest -s``
    / ``-rA``). ``failures`` is a :class:`Failures` (the test then fails
    here if any trial failed, naming the first ones) or a count the caller
    asserts on itself."""
    count = len(failures.messages) if isinstance(failures, Failures) else failures
    items = ["%s=%s" % kv for kv in counts.items()] + ["failures=%s" % count]
    print("[reliability] %s: %s" % (name, ", ".join(items)))
    if isinstance(failures, Failures):
        assert not failures.messages, "%s: %d failed trials; first: %s" % (name, count, " | ".join(failures.messages[:3]))


# -- os proxy and hooks ----------------------------------------------------------


def _flags(args, kwargs):
    return args[1] if len(args) > 1 else kwargs.get("flags", 0)


def is_mutating(name, args, kwargs):
    """True for calls that change the file system (an ``open`` counts
    only when it may create, by name or nameless)."""
    if name == "open":
        flags = _flags(args, kwargs)
        return bool(flags & os.O_CREAT) or flags & os.O_TMPFILE == os.O_TMPFILE
    return name in ("write", "fsync", "link", "rename", "unlink", "mkdir", "makedirs")


class OSProxy:
    """The ``os`` module, with the watched functions routed through
    ``hook(name, real_function, args, kwargs)``."""

    WATCHED = frozenset(("open", "write", "fsync", "link", "rename", "unlink", "mkdir", "makedirs"))

    def __init__(self, hook):
        self._hook = hook

    def __getattr__(self, name):
        real = getattr(os, name)
        if name not in self.WATCHED:
            return real
        hook = self._hook

        def call(*args, **kwargs):
            return hook(name, real, args, kwargs)

        return call


class Counter:
    """Pass every call through; remember the mutating ones in order."""

    def __init__(self):
        self.calls = []

    def __call__(self, name, real, args, kwargs):
        if is_mutating(name, args, kwargs):
            self.calls.append(name)
        return real(*args, **kwargs)

    def count(self, name):
        return self.calls.count(name)


class FailAt:
    """Fail the ``n``-th (1-based) mutating call of ``name`` with
    ``OSError(err)`` instead of making it."""

    def __init__(self, name, n, err):
        self.name, self.n, self.err = name, n, err
        self.seen = 0
        self.fired = False

    def __call__(self, name, real, args, kwargs):
        if name == self.name and is_mutating(name, args, kwargs):
            self.seen += 1
            if self.seen == self.n:
                self.fired = True
                raise OSError(self.err, os.strerror(self.err))
        return real(*args, **kwargs)


class CrashAt:
    """SIGKILL the calling process at its ``n``-th mutating call, just
    before the call (``after=False``) or just after it returned.

    ``where="others"`` acts only in processes forked after the hook was
    made (a worker forked from the test runner); ``where="self"`` only in
    the process that made it (a caller, not the escalator it forks).
    ``trace`` (a path) gets one line per counted call; ``n=0`` never
    crashes, which is how a run's crash points are enumerated. ``name``
    counts only calls of that function (e.g. the 2nd ``open``).
    """

    def __init__(self, n, after=False, where="others", trace=None, name=None):
        self.n, self.after, self.where, self.trace, self.name = n, after, where, trace, name
        self.owner = os.getpid()
        self.pid = None
        self.count = 0

    def __call__(self, name, real, args, kwargs):
        pid = os.getpid()
        active = (pid != self.owner) if self.where == "others" else (pid == self.owner)
        if not active or not is_mutating(name, args, kwargs) or self.name not in (None, name):
            return real(*args, **kwargs)
        if pid != self.pid:
            self.pid, self.count = pid, 0
        self.count += 1
        if self.trace:
            fd = os.open(self.trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, ("%d %s\n" % (self.count, name)).encode())
            finally:
                os.close(fd)
        if self.count == self.n and not self.after:
            os.kill(pid, signal.SIGKILL)
        try:
            return real(*args, **kwargs)
        finally:  # after the call, whether it returned or raised
            if self.count == self.n and self.after:
                os.kill(pid, signal.SIGKILL)


class SigtermOnWrite:
    """In processes forked after it was made, send SIGTERM to the process
    itself (what ``Task.cancel`` does to a worker) while it writes a task
    record for which ``predicate(record_dict, previous_record_dict)`` is
    true: a cancel landing at one precise instant."""

    def __init__(self, predicate, proof=None):
        self.predicate = predicate
        self.proof = proof  # a path touched when it fires, for the parent to see
        self.owner = os.getpid()
        self.previous = None
        self.fired = False

    def __call__(self, name, real, args, kwargs):
        if name == "write" and os.getpid() != self.owner and not self.fired:
            try:
                record = json.loads(bytes(args[1]))
            except ValueError:
                record = None
            if isinstance(record, dict):
                if self.predicate(record, self.previous):
                    self.fired = True
                    if self.proof:
                        open(self.proof, "w").close()
                    os.kill(os.getpid(), signal.SIGTERM)
                self.previous = record
        return real(*args, **kwargs)


# -- the state directory -----------------------------------------------------------


def snapshot(state_dir, dirs=STORE_DIRS):
    """``{relative path: bytes}`` of every file under ``dirs`` (logs are
    left out: logging is allowed on any call)."""
    out = {}
    for sub in dirs:
        base = os.path.join(str(state_dir), sub)
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            continue
        for name in names:
            path = os.path.join(base, name)
            try:
                with open(path, "rb") as f:
                    out[os.path.join(sub, name)] = f.read()
            except FileNotFoundError:
                pass
    return out


def tree(path):
    """Every entry under ``path`` with its type, mode, owner and content
    (files) or target (links): to check that nothing was touched."""
    out = {}
    for top, dirs, files in os.walk(str(path)):
        for name in dirs + files:
            full = os.path.join(top, name)
            st = os.lstat(full)
            if os.path.islink(full):
                body = os.readlink(full)
            elif os.path.isfile(full):
                with open(full, "rb") as f:
                    body = f.read()
            else:
                body = None
            out[os.path.relpath(full, str(path))] = (st.st_mode, st.st_uid, st.st_gid, body)
    st = os.lstat(str(path))
    out["."] = (st.st_mode, st.st_uid, st.st_gid, None)
    return out


def task_file_problems(state_dir):
    """Everything wrong with ``tasks/``: names that are not ``<id>.json``
    (temporary files included) and files that do not parse as a task."""
    from xapi_storage_tasks.wire import ids
    from xapi_storage_tasks.tasks.record import Task

    problems = []
    tasks = os.path.join(str(state_dir), "tasks")
    for name in sorted(os.listdir(tasks)):
        if not (name.endswith(".json") and ids.is_valid(name[:-5])):
            problems.append("unexpected file in tasks/: %s" % name)
            continue
        try:
            with open(os.path.join(tasks, name), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        try:
            Task.from_disk(json.loads(data))
        except ValueError as e:
            problems.append("%s does not parse: %s: %r" % (name, e, data[:120]))
    return problems


def leftovers(state_dir, sub):
    try:
        return sorted(os.listdir(os.path.join(str(state_dir), sub)))
    except FileNotFoundError:
        return []


# -- processes -----------------------------------------------------------------------


class Bystander:
    """A process that must survive: ``sleep 60`` in its own session,
    optionally as another user (uid/gid 65534 through setpriv)."""

    def __init__(self, uid=None, argv=("sleep", "60"), comm=None):
        argv = list(argv)
        comm = comm or os.path.basename(argv[0])
        if uid is not None:
            argv = ["setpriv", "--reuid=%d" % uid, "--regid=%d" % uid, "--clear-groups", *argv]
        self.popen = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL)
        self.pid = self.popen.pid
        from xapi_storage_tasks.process import identity

        deadline = time.monotonic() + 5
        while True:  # wait until setpriv has exec'd the program
            ident = identity.identity(self.pid)
            try:
                with open("/proc/%d/comm" % self.pid) as f:
                    seen = f.read().strip()
            except FileNotFoundError:
                seen = ""
            if seen == comm or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        self.identity = ident

    def state(self):
        """The process state letter from /proc/PID/stat, or None."""
        try:
            with open("/proc/%d/stat" % self.pid, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data[data.rindex(b")") + 2:].split()[0].decode()

    def alive(self):
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return self.popen.poll() is None and self.state() not in (None, "Z", "X")

    def stop(self):
        """Kill the bystander and its whole group (its own session)."""
        if self.popen.returncode is None:  # not reaped: its pid, the group id, cannot be reused yet
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait()


def pidfd_kill(pidfd):
    """SIGKILL through a pidfd: never reaches a process that reused the
    pid. False if the process had already exited."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def wait_pidfd(pidfd, timeout):
    import select

    return bool(select.select([pidfd], [], [], timeout)[0])


def fork_call(method, stdin, hook=None, args=("--json",)):
    """Run ``method`` through :func:`xapi_storage_tasks.entry.main` (what every
    ``bin/`` executable runs) in a forked child, with ``hook`` installed on
    the store's ``os`` in the child only. Returns ``(wait status, stdout
    bytes)``; a negative-signal status means the child was killed."""
    if not isinstance(stdin, bytes):
        stdin = json.dumps(stdin).encode()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the test runner
        code = 99
        try:
            os.dup2(in_r, 0)
            os.dup2(out_w, 1)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            for fd in (in_r, in_w, out_r, out_w, null):
                os.close(fd)
            sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), errors="backslashreplace")
            if hook is not None:
                store_os(OSProxy(hook(os.getpid())))
            from xapi_storage_tasks import entry

            code = entry.main([os.path.join(BIN, method), *args])
            sys.stdout.flush()
        except BaseException:
            pass
        finally:
            os._exit(code)
    os.close(in_r)
    os.close(out_w)
    os.write(in_w, stdin)
    os.close(in_w)
    chunks = []
    while True:
        chunk = os.read(out_r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(out_r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks)


def run_killed(argv, stdin, delay, env=None):
    """Start ``argv``, feed it ``stdin``, SIGKILL it ``delay`` seconds
    after it started (unless it finished first). Returns
    ``(exit status, stdout, killed)``."""
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    pidfd = os.pidfd_open(p.pid)
    try:
        p.stdin.write(stdin)
        p.stdin.close()
        finished = wait_pidfd(pidfd, delay)
        killed = False if finished else pidfd_kill(pidfd)
        out = p.stdout.read()
        p.wait()
        return p.returncode, out, killed
    finally:
        os.close(pidfd)


ERRNO_NAMES = {errno.ENOSPC: "ENOSPC", errno.EIO: "EIO", errno.EDQUOT: "EDQUOT"}


def names_errno(text, err):
    """True when ``text`` names ``err`` (its message or symbol)."""
    return os.strerror(err) in text or errno.errorcode[err] in text


def kill_live_workers(state_dir):
    """Teardown: SIGKILL every worker still alive that a task file in
    ``state_dir`` names (only verified identities). Returns how many."""
    from xapi_storage_tasks.process import identity

    killed = 0
    tasks = os.path.join(str(state_dir), "tasks")
    for name in leftovers(state_dir, "tasks"):
        try:
            with open(os.path.join(tasks, name), "rb") as f:
                ident = json.loads(f.read()).get("worker")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(ident, dict) and identity.matches(ident) and ident.get("pid") == ident.get("pgid"):
            try:
                pidfd = os.pidfd_open(ident["pid"])
            except OSError:
                continue
            try:
                if identity.matches(ident) and pidfd_kill(pidfd):
                    killed += 1
                    wait_pidfd(pidfd, 5)
            finally:
                os.close(pidfd)
    return killed


def stand_in_worker(state_dir, task_id):
    """A sleeper that holds the task's mark (``pending/<id>``) open on
    descriptor 7, as a real worker does: the identity it returns is
    vouched for by the kernel. Returns ``(bystander, identity)``."""
    mark = os.path.join(str(state_dir), "pending", task_id)
    b = Bystander(argv=("sh", "-c", 'exec sleep 60 7<"$0"', mark), comm="sleep")
    return b, dict(b.identity, fd=7)


def dead_identity():
    """The identity of a process that has exited (well-formed, this boot)."""
    from xapi_storage_tasks.process import identity

    p = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open("/proc/%d/comm" % p.pid) as f:
                if f.read().strip() == "sleep":
                    break
            time.sleep(0.005)
        ident = identity.identity(p.pid)
    finally:
        p.kill()
        p.wait()
    return ident
