"""Detached processes: the one way this plugin starts anything that must
outlive its caller (task workers, the cancel watchdog, storage daemons).

The toolstack waits for end-of-file on a call's stdout and stderr with no
timeout, so nothing started by a call may keep them open: python-daemon's
DaemonContext closes every inherited descriptor, and the double fork makes
the process a child of init, never of the caller.
"""

import os
import signal
import sys
from typing import Callable, Sequence


def _daemonize(keep_fds: Sequence[int]) -> None:
    import daemon  # python-daemon; imported only by calls that start workers

    # Drop the caller's stdio before anything else, and give DaemonContext
    # real stream objects even if the caller had replaced sys.std* (as
    # embedding programs and test runners do).
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    sys.stdin, sys.stdout, sys.stderr = (open(fd, mode, closefd=False) for fd, mode in ((0, "r"), (1, "w"), (2, "w")))

    ignore = {signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None, signal.SIGHUP: None}
    daemon.DaemonContext(
        detach_process=True,
        umask=0o077,
        working_directory="/",
        files_preserve=list(keep_fds),
        signal_map=ignore,
        prevent_core=True,
    ).open()
    os.setpgid(0, 0)  # lead our own group, so a cancel can signal all of it


def spawn(target: Callable[[], object], keep_fds: Sequence[int] = ()) -> None:
    """Run ``target()`` in a detached daemon (its own session and process
    group, umask 077, cwd ``/``, stdio on ``/dev/null``, no inherited
    descriptors but ``keep_fds``); returns once it is detached, so the
    caller's pipes reach end-of-file when the caller exits."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _daemonize(keep_fds)
            target()
            code = 0
        except BaseException:
            pass
        finally:
            os._exit(code)
    os.waitpid(pid, 0)  # the intermediate process exits once the daemon is detached
