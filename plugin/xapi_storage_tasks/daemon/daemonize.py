"""The task daemon as a process: foreground or detached, systemd, stop
signals, its log, and forking workers from its threads safely.

- In the foreground (the default; systemd's ``Type=notify``) the daemon
  tells systemd it is ready or stopping with :func:`sd_notify`, at the
  address :func:`take_notify_socket` takes out of the environment, and
  logs on stderr (the journal).
- ``--detach`` (:func:`detach`) becomes a daemon with python-daemon,
  optionally holding a :class:`PidFile`; the process that ran it waits
  until :func:`report_ready` and exits 0, or 1 saying why the daemon did
  not start. A detached daemon logs to the store's log (:class:`Log`).
- SIGTERM, SIGINT and SIGHUP (:data:`STOP_SIGNALS`) stop the daemon
  (:func:`install_stop_handlers`).
- :func:`prepare_for_forks` makes :func:`xapi_storage_tasks.process.spawn.spawn` safe to call
  from any server thread.
"""

import functools
import importlib
import os
import pkgutil
import signal
import socket
import sys
import threading
from types import FrameType
from typing import Any, Callable, Optional, Sequence, Tuple, TypeVar, cast

import xapi_storage_tasks
from xapi_storage_tasks.process import spawn
from xapi_storage_tasks.process.spawn import Readiness
from xapi_storage_tasks.daemon.listener import lock_pid_file, unlink_if_same
from xapi_storage_tasks.tasks.store import Store

PROG = "xapi-storage-tasksd"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# Held around every call in this process that can hold a C library lock
# while the GIL is released (syslog, stderr writes), and by the forking
# thread across fork(): see prepare_for_forks.
_FORK_GUARD = threading.Lock()
_F = TypeVar("_F", bound=Callable[..., Any])


# -- logging -------------------------------------------------------------------------


class Log:
    """Daemon events: on stderr in the foreground (the journal under
    systemd), in the store's log (syslog or ``logs/store.log``) when
    detached."""

    def __init__(self, to_stderr: bool) -> None:
        self.to_stderr = to_stderr

    def __call__(self, message: str) -> None:
        if self.to_stderr:
            with _FORK_GUARD:
                try:
                    sys.stderr.write("%s[%d]: %s\n" % (PROG, os.getpid(), message))
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
            return
        from xapi_storage_tasks.tasks import log

        try:
            with Store() as store:
                log.store_event(store, "%s: %s" % (PROG, message))
        except Exception:
            pass  # logging must never take the daemon down


# -- systemd ----------------------------------------------------------------------------


def take_notify_socket() -> Optional[str]:
    """The sd_notify address from ``$NOTIFY_SOCKET``, removed from the
    environment so that workers never inherit it."""
    address = os.environ.pop("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        return "\0" + address[1:]  # abstract namespace
    return address if address.startswith("/") else None


def sd_notify(address: Optional[str], state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd; False if there is no
    notify socket or it cannot be reached."""
    if not address:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


# -- stop signals ---------------------------------------------------------------------------


def install_stop_handlers(wake_fd: int, handler: Callable[[int, Optional[FrameType]], Any]) -> None:
    """Call ``handler(signum, frame)`` on each of :data:`STOP_SIGNALS`, and
    have the signal number written to ``wake_fd`` so that a loop waiting
    on its other end wakes up, whichever thread the kernel delivers the
    signal to."""
    signal.set_wakeup_fd(wake_fd)
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


# -- fork safety ------------------------------------------------------------------------


def _guard(function: _F) -> _F:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        with _FORK_GUARD:
            return function(*args, **kwargs)

    return cast(_F, functools.wraps(function)(guarded))  # sets __wrapped__


def _after_fork_in_child() -> None:
    _FORK_GUARD.release()
    # The child is a worker-to-be: give it the signal dispositions an
    # executable's child would have, and never let a signal write the
    # wake-up byte into whatever file later reuses that descriptor number.
    try:
        signal.set_wakeup_fd(-1)
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
    except ValueError:
        pass


def prepare_for_forks() -> None:
    """Make :func:`xapi_storage_tasks.process.spawn.spawn` safe to call from a server thread.

    fork() copies only the calling thread; a lock another thread held at
    that instant stays held forever in the child. The child runs Python (it
    opens a DaemonContext, then the operation), so:

    - every module of the package, python-daemon and syslog are
      imported now, so no server thread is ever inside an import (holding a
      module lock) when a worker is forked, and the child imports nothing
      new that a thread could be importing;
    - the only C-library lock a server thread can hold with the GIL
      released is syslog's (and the stderr buffer's): those calls and fork()
      itself take ``_FORK_GUARD``, so a fork never happens inside one;
    - in the child, the signal handlers and wake-up descriptor of the
      daemon are reset to the defaults an executable's child would have.

    Call once, in the process that will serve, before starting threads.
    """
    for info in pkgutil.walk_packages(xapi_storage_tasks.__path__, "xapi_storage_tasks."):
        importlib.import_module(info.name)
    for name in ("daemon", "syslog"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # without python-daemon no call can start a worker anyway
    import syslog

    for name in ("openlog", "syslog", "closelog"):
        if not hasattr(getattr(syslog, name), "__wrapped__"):
            setattr(syslog, name, _guard(getattr(syslog, name)))
    os.register_at_fork(before=_FORK_GUARD.acquire, after_in_parent=_FORK_GUARD.release,
                        after_in_child=_after_fork_in_child)


# -- detaching ---------------------------------------------------------------------------------


class PidFile:
    """A pidfile for python-daemon: written (and flocked) once the daemon
    has detached, removed when it exits."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.fd: Optional[int] = None
        self.ident: Optional[Tuple[int, int]] = None

    def __enter__(self) -> "PidFile":
        fd = lock_pid_file(self.path, 0o644, lambda holder: "pidfile %s is held by pid %s" % (self.path, holder))
        st = os.fstat(fd)
        self.fd, self.ident = fd, (st.st_dev, st.st_ino)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is None or self.ident is None:
            return
        unlink_if_same(self.path, self.ident)
        os.close(self.fd)
        self.fd = None


def detach(keep_fds: Sequence[int], pidfile: Optional[str]) -> Readiness:
    """Become a daemon through :func:`xapi_storage_tasks.process.spawn.detach`
    (own session, umask 077, cwd /, standard streams on /dev/null, every
    other descriptor closed), holding ``pidfile`` if given. The invoking
    process waits until the daemon says it is ready, then exits 0 (or 1,
    printing why it is not). Returns the handshake to report readiness on
    (see :func:`report_ready`)."""
    readiness = Readiness()
    if spawn.detach(keep_fds, PidFile(pidfile) if pidfile else None, readiness):
        return readiness
    started, why = readiness.wait(60.0, until_closed=True)
    if started:
        os._exit(0)
    sys.stderr.write("%s: %s\n" % (PROG, why or "the daemon exited during start-up"))
    sys.stderr.flush()
    os._exit(1)


def report_ready(readiness: Readiness) -> None:
    """Tell the process that ran ``--detach`` that the daemon serves."""
    readiness.ready()
