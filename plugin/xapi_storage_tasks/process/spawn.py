"""Detached processes: the one way this plugin starts anything that must
outlive its caller (task workers, the cancel watchdog, the socket daemon).

The toolstack waits for end-of-file on a call's stdout and stderr with no
timeout, so nothing started by a call may keep them open: python-daemon's
DaemonContext closes every inherited descriptor, and the double fork makes
the process a child of init, never of the caller.

:class:`Readiness` is the one start-up handshake: the detached process
says "ready" (or why it cannot start) on a pipe the starter waits on.
"""

import os
import select
import signal
import sys
import time
from typing import Callable, ContextManager, List, NoReturn, Optional, Sequence, Tuple

_READY = b"!"
_REFUSED = b"?"


class Readiness:
    """A one-shot pipe from a detached process to the process that started
    it. Create it before :func:`detach`, pass :attr:`fd` in ``keep_fds``;
    the detached side calls :meth:`ready` or :meth:`refuse`, the starter
    calls :meth:`wait`."""

    def __init__(self) -> None:
        self._r, self.fd = os.pipe()

    def ready(self) -> None:
        """(Detached side) say that start-up succeeded."""
        self._send(_READY)

    def refuse(self, why: str) -> None:
        """(Detached side) say why start-up failed."""
        self._send(_REFUSED + why.encode("utf-8", "replace"))

    def exec(self, args: Sequence[str]) -> NoReturn:
        """(Detached side) become the program ``args``, saying "ready" only
        if the exec succeeds: the handshake's end is close-on-exec, so the
        starter's ``wait(until_closed=True)`` sees it close at the exec, or
        reads why the exec failed."""
        self._write(_READY)
        try:
            os.execv(args[0], list(args))
        except OSError as e:
            self.refuse("cannot run %s: %s" % (args[0], e.strerror or e))
            raise

    def _write(self, data: bytes) -> None:
        if self.fd < 0:
            return
        try:
            os.write(self.fd, data)
        except BrokenPipeError:
            pass  # the starter is gone: nobody to tell, and no reason to stop

    def _send(self, data: bytes) -> None:
        try:
            self._write(data)
        finally:
            self.close_sender()

    def close_sender(self) -> None:
        """Drop this process's copy of the sending end (the starter's side
        does it once the detached process has its own)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close_receiver(self) -> None:
        """(Detached side) drop the receiving end inherited from the starter."""
        if self._r >= 0:
            os.close(self._r)
            self._r = -1

    def wait(self, timeout: float, until_closed: bool = False) -> Tuple[Optional[bool], str]:
        """(Starter side) wait up to ``timeout`` seconds for the verdict;
        with ``until_closed``, also for the sender to close its end (so,
        once this returns, the detached process holds nothing of the
        handshake).
        Returns ``(True, "")`` when ready, ``(False, why)`` when the process
        refused (also after a "ready" an exec then took back) or exited
        without a word (``why`` is then empty), and ``(None, "")`` when it
        said nothing in time (it may still start)."""
        self.close_sender()
        chunks: List[bytes] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._r], [], [], left)[0]:
                    if not chunks:
                        return None, ""
                    break
                data = os.read(self._r, 4096)
                if not data:  # the sender has closed its end: the verdict is whole
                    break
                chunks.append(data)
                if chunks[0][:1] == _READY and not until_closed:
                    break
        finally:
            os.close(self._r)
            self._r = -1
        verdict = b"".join(chunks)
        if verdict == _READY or (verdict[:1] == _READY and not until_closed):
            return True, ""
        why = verdict[1:] if verdict[:1] == _REFUSED else verdict[2:]  # "!?why": an exec that failed
        return False, why.decode("utf-8", "replace")


def _daemonize(keep_fds: Sequence[int], pidfile: Optional[ContextManager[object]]) -> None:
    import daemon  # python-daemon; imported only by calls that detach something

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
        pidfile=pidfile,
        prevent_core=True,
    ).open()
    os.setpgid(0, 0)  # lead our own group, so a cancel can signal all of it


def detach(keep_fds: Sequence[int] = (), pidfile: Optional[ContextManager[object]] = None,
           readiness: Optional[Readiness] = None) -> bool:
    """Fork a detached daemon (its own session and process group, umask
    077, cwd ``/``, stdio on ``/dev/null``, SIGHUP ignored, no inherited
    descriptors but ``keep_fds`` and ``readiness``'s, holding ``pidfile``
    if given). Returns True in the daemon and False in the caller, once the
    daemon is detached, so the caller's pipes reach end-of-file when the
    caller exits. A daemon that cannot detach tells ``readiness`` why and
    exits 1."""
    keep = list(keep_fds) + ([readiness.fd] if readiness is not None else [])
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)  # the intermediate process exits once the daemon is detached
        return False
    try:
        if readiness is not None:
            readiness.close_receiver()
        _daemonize(keep, pidfile)
    except BaseException as exc:
        if readiness is not None:
            try:
                readiness.refuse(str(exc) or type(exc).__name__)
            except OSError:
                pass
        os._exit(1)
    return True


def spawn(target: Callable[[], object], keep_fds: Sequence[int] = (),
          readiness: Optional[Readiness] = None) -> None:
    """Run ``target()`` in a daemon made by :func:`detach`; returns in the
    caller once it is detached. The daemon exits 0 when ``target`` returns,
    1 when it raises; if it raises before saying "ready", ``readiness``
    carries the exception's text to the starter."""
    if not detach(keep_fds, readiness=readiness):
        return
    code = 1
    try:
        target()
        code = 0
    except BaseException as exc:
        if readiness is not None:
            readiness.refuse(str(exc) or type(exc).__name__)
    finally:
        os._exit(code)
