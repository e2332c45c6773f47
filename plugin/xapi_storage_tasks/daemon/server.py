"""The task daemon: every method of :mod:`xapi_storage_tasks.registry` as JSON-RPC over
HTTP/1.1 on a Unix-domain socket.

    python3 -m xapi_storage_tasks.daemon.server [--socket PATH] [--foreground | --detach [--pidfile F]]
                             [--group NAME] [--max-connections N] [--processes N]

A request is the same JSON-RPC envelope the executables read in envelope
mode, POSTed to any path::

    curl --unix-socket /run/xapi-storage-tasks/daemon.sock \\
         -d '{"method": "Task.ls", "params": [{"dbg": "x"}], "id": 1}' http://localhost/

and the answer is the envelope they print, byte for byte (errors carry the
same XAPI error record). Every call goes through :func:`xapi_storage_tasks.entry.call`,
in this process, on the state directory of ``TASK_STATE_DIR`` (or the
default), so the daemon and the executables can be used at the same time on
the same tasks.

Requests that fail before a request object exists (HTTP refusals, bodies
that are not JSON or not an object) are answered in the JSON-RPC 2.0 form,
``{"jsonrpc": "2.0", "error": {"code", "message", "data": <record>}, "id":
null}``, the only form that defines an answer to a request whose id is
unknown: -32700 for unparseable JSON, -32600 for an invalid request,
-32000 for refusals. Such answers come with an HTTP error status; every
answer to a parsed request is HTTP 200.

Connections: one thread each, at most ``--max-connections`` at a time (the
next one is answered 503 and closed, without a thread); keep-alive; a
request must arrive within ``--timeout`` seconds of its first byte, and an
idle connection is closed after as long. Peers are checked with
SO_PEERCRED: the daemon's own uid, root and, with ``--group``, members of
that group; others get 403. The socket is 0600 (0660 and the group with
``--group``).

With ``--processes N`` (N > 1), N serving processes accept on the one
listening socket, each with its own connection threads and its own
``--max-connections``: one process's threads share one interpreter lock,
so processes spread the calls over the CPUs. The first process then only
supervises: it forwards the stop signals, replaces a serving process that
dies, and exits once they have all stopped; they stop with it however it
ends (``PR_SET_PDEATHSIG``), so none keeps the socket.

Start-up refuses to steal a live socket (a lock file beside it is held for
the daemon's life, and a socket that accepts a connection is live); a
socket left by a crashed daemon refuses connections and is replaced.
SIGTERM (or SIGINT, SIGHUP) stops accepting, removes the socket, closes
idle connections, lets requests in progress finish (at most
``--shutdown-timeout`` seconds; a second signal stops waiting) and exits 0.

Workers started through the daemon (``Data.copy``) are forked by
:mod:`xapi_storage_tasks.process.spawn` from a thread of this process; see
:func:`xapi_storage_tasks.daemon.daemonize.prepare_for_forks` for what makes that safe. They
are detached exactly as when an executable starts them, so stopping or
restarting the daemon neither kills nor orphans a task.

This module is the command line; the daemon is made of:

- :mod:`xapi_storage_tasks.daemon.listener`: the listening socket's life (its directory, the
  lock file, stale and live sockets, permissions) and the peer checks;
- :mod:`xapi_storage_tasks.daemon.acceptor`: the accept loop, admission, connection limits and
  the clean stop;
- :mod:`xapi_storage_tasks.daemon.rpc`: one connection's requests, and the JSON-RPC dispatch
  through :func:`xapi_storage_tasks.entry.call`;
- :mod:`xapi_storage_tasks.daemon.daemonize`: the process (foreground or ``--detach``,
  sd_notify, stop signals, its log, fork safety);
- :mod:`xapi_storage_tasks.wire.httpio`: the HTTP/1.1 framing, shared with the client.
"""

from __future__ import annotations

import argparse
import grp
import os
import signal
import sys
import time

from xapi_storage_tasks import registry, settings
from xapi_storage_tasks.daemon.acceptor import DEFAULT_MAX_CONNECTIONS, DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_TIMEOUT, Acceptor
from xapi_storage_tasks.daemon.daemonize import (
    PROG, STOP_SIGNALS, Log, detach, prepare_for_forks, report_ready, sd_notify, take_notify_socket,
)
from xapi_storage_tasks.daemon.listener import StartupError
from xapi_storage_tasks.tasks.store import Store
from xapi_storage_tasks.wire import httpio
from xapi_storage_tasks.wire.boundary import unexpected_text
from xapi_storage_tasks.wire.errors import PluginError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType
    from typing import NoReturn

    from xapi_storage_tasks.process.spawn import Readiness

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m xapi_storage_tasks.daemon.server",
        description="Serve the storage plugin's methods (%s) as JSON-RPC over HTTP/1.1 on a Unix socket."
        % ", ".join(sorted(registry.METHODS)),
    )
    parser.add_argument("--socket", default=None, help="socket path (default: %s)" % httpio.default_socket())
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--foreground", action="store_true", help="stay in the foreground (the default; for systemd, Type=notify)")
    mode.add_argument("--detach", action="store_true", help="detach with python-daemon once listening")
    parser.add_argument("--pidfile", help="with --detach: write the daemon's pid here")
    parser.add_argument("--group", help="also allow members of this group (socket mode 0660)")
    parser.add_argument("--max-connections", type=_positive(int), default=DEFAULT_MAX_CONNECTIONS,
                        help="concurrent connections; more are answered 503 (default %d)" % DEFAULT_MAX_CONNECTIONS)
    parser.add_argument("--timeout", type=_positive(float), default=DEFAULT_TIMEOUT,
                        help="seconds a request may take to arrive, and a connection may idle (default %g)" % DEFAULT_TIMEOUT)
    parser.add_argument("--shutdown-timeout", type=_positive(float), default=DEFAULT_SHUTDOWN_TIMEOUT,
                        help="seconds to let requests in progress finish on SIGTERM (default %g)" % DEFAULT_SHUTDOWN_TIMEOUT)
    parser.add_argument("--processes", type=_positive(int), default=1,
                        help="serving processes sharing the socket, each with its own --max-connections (default 1)")
    return parser


def _group_id(name: str) -> int:
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise StartupError("no group named %r" % name) from None


def main(argv: list[str] | None = None) -> int:
    """Run the daemon; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.pidfile and not args.detach:
        parser.error("--pidfile needs --detach")
    # Everything absolute before detaching moves us to /.
    state = os.environ.get(settings.STATE_DIR)
    if state:
        os.environ[settings.STATE_DIR] = os.path.abspath(state)
    os.umask(0o077)
    log = Log(to_stderr=not args.detach)
    try:
        gid = _group_id(args.group) if args.group else None
        try:
            with Store():
                pass  # a bad state directory fails now, not at the first call
        except PluginError as e:
            raise StartupError(str(e)) from None
        server = Acceptor(args.socket or httpio.default_socket(), gid, args.max_connections, args.timeout,
                        args.shutdown_timeout, log)
        server.bind()
    except StartupError as e:
        sys.stderr.write("%s: %s\n" % (PROG, e))
        return 1
    ready = None
    if args.detach:
        ready = detach(server.fds(), args.pidfile)
        server.record_pid()  # the lock file named the process that ran --detach
    notify = take_notify_socket()
    log("serving %s (pid %d, state directory %s)" % (server.path, os.getpid(), os.path.abspath(settings.state_dir())))
    if args.processes > 1:
        return _supervise(server, args.processes, log, notify, ready)
    prepare_for_forks()
    server.install_signal_handlers()
    server.notify = notify
    if ready is not None:
        report_ready(ready)
    sd_notify(notify, "READY=1\nMAINPID=%d\nSTATUS=serving %s" % (os.getpid(), server.path))
    server.serve()
    log("stopped")
    return 0


# -- several serving processes ---------------------------------------------------------------

RESPAWN_PAUSE = 1.0  # seconds between replacing serving processes that keep dying


def _supervise(server: Acceptor, count: int, log: Log, notify: str | None, ready: Readiness | None) -> int:
    """Serve with ``count`` processes that all accept on the one listening
    socket, each a complete :class:`Acceptor` (its own connection threads,
    limits and clean stop); this process only starts them, forwards the
    stop signals to them, replaces one that dies, and exits once all have
    stopped. Spreading the connections over processes spreads them over
    the CPUs: one process's threads share one interpreter lock."""
    children: set[int] = set()
    signals: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if not signals:
            sd_notify(notify, "STOPPING=1")
        signals.append(signum)
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def start() -> None:
        pid = os.fork()
        if pid == 0:
            _serve_child(server, log, parent)
        children.add(pid)

    parent = os.getpid()
    # Signals wait until every child can receive them: a child unblocks
    # them once its own handlers are in place.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    for _ in range(count):
        start()
    for signum in STOP_SIGNALS:
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if ready is not None:
        report_ready(ready)
    sd_notify(notify, "READY=1\nMAINPID=%d\nSTATUS=serving %s with %d processes" % (parent, server.path, count))
    last_start = 0.0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        children.discard(pid)
        if signals:
            continue
        log("serving process %d ended (%s); starting another" % (pid, _status_text(status)))
        pause = last_start + RESPAWN_PAUSE - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if not signals:
            start()
            last_start = time.monotonic()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    server.close_lock()
    log("stopped")
    return 0


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return "signal %d" % os.WTERMSIG(status)
    return "exit status %d" % os.waitstatus_to_exitcode(status)


def _serve_child(server: Acceptor, log: Log, parent: int) -> NoReturn:
    """The life of one serving process: it stops with the supervisor,
    however the supervisor ends (SIGKILL included)."""
    status = 1
    try:
        server.after_fork()
        prepare_for_forks()
        server.install_signal_handlers()
        _stop_with_parent(parent)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        server.serve()
        status = 0
    except BaseException as exc:
        log(unexpected_text("a serving process", exc))
    finally:
        os._exit(status)


def _stop_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM to this process when its parent (pid
    ``parent``) dies (``PR_SET_PDEATHSIG``), so that no serving process
    outlives its supervisor and keeps the socket."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died before the request
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
