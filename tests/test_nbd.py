"""Tests for xapi_storage_tasks.nbd.protocol against real NBD servers (qemu-nbd and nbdkit).

Servers listen on Unix sockets inside tmp_path (or on 127.0.0.1 for the TCP
test) and are always killed by a fixture finalizer. A test is skipped only
when its server binary is missing.
"""

import os
import random
import signal
import socket
import subprocess
import time
import tracemalloc

import pytest

from xapi_storage_tasks.wire.errors import InvalidArguments, NbdError
from xapi_storage_tasks.nbd.protocol import Client, Timeouts
from xapi_storage_tasks.nbd.uri import Address, is_nbd_uri, parse_uri

QEMU_NBD = "/usr/bin/qemu-nbd"
NBDKIT = "/usr/bin/nbdkit"
MiB = 1 << 20


# ---- server fixtures ---------------------------------------------------------


def unix_listening(path):
    """Whether a Unix socket is bound at ``path`` *and* listening (the file
    appears at bind(), before listen(): connecting then is refused)."""
    with open("/proc/net/unix") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


class Server:
    """A running NBD server process and the Address of its export."""

    def __init__(self, argv, address, log):
        self.sock, self.address = address.socket_path, address
        with open(log, "wb") as logf:  # a file, not a pipe: it can never fill up
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=logf)
        deadline = time.monotonic() + 10
        while not self._listening():
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited: %s" % (argv[0], open(log).read()))
            if time.monotonic() > deadline:
                raise RuntimeError("%s is not listening on %s" % (argv[0], address))
            time.sleep(0.01)

    def _listening(self):
        if self.sock is not None:
            return unix_listening(self.sock)
        try:
            socket.create_connection((self.address.host, self.address.port), 1).close()
            return True
        except OSError:
            return False

    def connect(self, export=None, **kw):
        addr = self.address if export is None else self.address._replace(export=export)
        return Client.connect(addr, **kw)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def start_server(tmp_path):
    """Factory: start_server(kind, *options, plugin=None, file=None, size=...,
    read_only=False); ``plugin`` is nbdkit's plugin and its arguments."""
    servers = []

    def start(kind, *extra, plugin=None, file=None, size=64 * MiB, read_only=False,
              tcp=False):
        sock = str(tmp_path / ("s%d.sock" % len(servers)))
        address = Address(sock, None, 0, "exp")
        if tcp:
            with socket.socket() as probe:  # pick a free port (tiny race)
                probe.bind(("127.0.0.1", 0))
                address = Address(None, "127.0.0.1", probe.getsockname()[1], "exp")
        if kind == "qemu":
            if not os.access(QEMU_NBD, os.X_OK):
                pytest.skip("qemu-nbd not installed (Debian package qemu-utils)")
            if file is None:
                file = tmp_path / "disk.img"
                with open(file, "wb") as f:
                    f.truncate(size)
            argv = [QEMU_NBD, "--format=raw", "--export-name=exp", "--persistent",
                    "--shared=4"]
            argv += (["--bind=127.0.0.1", "--port=%d" % address.port] if tcp
                     else ["--socket=" + sock])
            argv += (["--read-only"] if read_only else []) + list(extra) + [str(file)]
        else:
            if not os.access(NBDKIT, os.X_OK):
                pytest.skip("nbdkit not installed (Debian package nbdkit)")
            argv = [NBDKIT, "--foreground"]
            argv += (["--ipaddr=127.0.0.1", "--port=%d" % address.port] if tcp
                     else ["--unix", sock])
            argv += (["--read-only"] if read_only else []) + list(extra)
            if plugin is None:
                plugin = ["file", str(file)] if file else ["memory", str(size)]
            argv += list(plugin)
        server = Server(argv, address, tmp_path / ("s%d.log" % len(servers)))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


def pattern(n, seed):
    """Deterministic pseudo-random bytes, fast enough for MiB sizes."""
    return random.Random(seed).randbytes(n)


# ---- URI parsing -------------------------------------------------------------


@pytest.mark.parametrize("uri, expected", [
    ("nbd+unix:///exp?socket=/run/x.sock", ("/run/x.sock", None, 0, "exp")),
    ("nbd+unix://?socket=/run/x.sock", ("/run/x.sock", None, 0, "")),
    ("nbd+unix:///?socket=/run/x.sock", ("/run/x.sock", None, 0, "")),
    ("nbd+unix:///a%20b%2Fc?socket=/tmp/my%20sock", ("/tmp/my sock", None, 0, "a b/c")),
    ("nbd+unix:///a+b?socket=/s", ("/s", None, 0, "a+b")),
    ("nbd://example.com/disk", (None, "example.com", 10809, "disk")),
    ("nbd://example.com", (None, "example.com", 10809, "")),
    ("nbd://10.0.0.1:10900/vm%2Fdisk", (None, "10.0.0.1", 10900, "vm/disk")),
    ("nbd://[::1]:4242/e", (None, "::1", 4242, "e")),
    ("nbd://[::1]/e", (None, "::1", 10809, "e")),
    ("nbd:unix:/run/x.sock:exportname=exp", ("/run/x.sock", None, 0, "exp")),
    ("nbd:unix:/run/x.sock", ("/run/x.sock", None, 0, "")),
    ("nbd:localhost:10810:exportname=a%20b", (None, "localhost", 10810, "a%20b")),
    ("nbd:localhost:10810", (None, "localhost", 10810, "")),
    ("nbd:[::1]:10810:exportname=e", (None, "::1", 10810, "e")),
])
def test_parse_uri_accepts(uri, expected):
    assert is_nbd_uri(uri)
    addr = parse_uri(uri)
    assert tuple(addr) == expected
    assert isinstance(addr.port, int)


@pytest.mark.parametrize("uri", [
    "http://example.com/disk",
    "nbds://example.com/disk",
    "nbd+tcp://example.com/disk",
    "nbd+unix:///exp",                          # missing socket=
    "nbd+unix:///exp?socket=",                  # empty socket=
    "nbd+unix:///exp?socket=relative/x.sock",   # relative socket path
    "nbd+unix:///exp?socket=/a&socket=/b",      # ambiguous
    "nbd+unix://host/exp?socket=/a",            # unix URIs have no host
    "nbd://example.com:notaport/disk",
    "nbd://example.com:70000/disk",
    "nbd://example.com:0/disk",
    "nbd:///disk",                              # no host
    "nbd://example.com/disk#frag",
    "nbd+unix:///%ff?socket=/s",                # not UTF-8 once decoded
    "nbd:unix:relative.sock:exportname=x",
    "nbd:localhost",                            # legacy form needs a port
    "nbd:localhost:port:exportname=x",
    "/var/disk.img",
    "",
])
def test_parse_uri_rejects(uri):
    with pytest.raises(InvalidArguments) as info:
        parse_uri(uri)
    assert repr(uri) in str(info.value)


def test_is_nbd_uri_is_a_prefix_check():
    assert not is_nbd_uri("/dev/sda")
    assert not is_nbd_uri("file:///x")
    assert not is_nbd_uri(None)
    assert is_nbd_uri("nbd://h/e") and is_nbd_uri("nbd+unix:///?socket=/s")


# ---- handshake ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qemu", "nbdkit"])
def test_handshake_reports_size_and_flags(start_server, kind):
    server = start_server(kind, size=48 * MiB)
    uri = "nbd+unix:///exp?socket=%s" % server.sock
    with Client.connect(uri) as c:
        assert c.size == 48 * MiB
        assert not c.read_only
        assert c.can_flush and c.can_write_zeroes
        assert 0 < c.max_payload <= 32 * MiB
    c.close()  # idempotent


@pytest.mark.parametrize("mask", ["0", "2"])
def test_old_newstyle_server_uses_export_name(start_server, mask):
    # --mask-handshake hides fixed-newstyle (so no NBD_OPT_GO); mask 2 keeps
    # NO_ZEROES, mask 0 makes the server send the 124 bytes of padding.
    server = start_server("nbdkit", "--mask-handshake=" + mask, size=2 * MiB)
    with server.connect() as c:
        assert c.size == 2 * MiB
        c.pwrite(b"old", 100)
        assert c.pread(5, 99) == b"\0old\0"


def test_silent_server_times_out(tmp_path):
    path = str(tmp_path / "mute.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)  # accepts in the kernel backlog, never answers
        with pytest.raises(NbdError, match=r"stalled: no progress for 0.3s while negotiating \(the server sent no greeting\)"):
            Client.connect(Address(path, None, 0, "x"), Timeouts(handshake=0.3))
    finally:
        listener.close()


@pytest.mark.parametrize("kind", ["qemu", "nbdkit"])
def test_tcp_connection(start_server, kind):
    server = start_server(kind, tcp=True, size=4 * MiB)
    uri = "nbd://127.0.0.1:%d/exp" % server.address.port
    with Client.connect(uri) as c:
        assert c.size == 4 * MiB
        c.pwrite(b"tcp" * 1000, 12345)
        assert c.pread(3000, 12345) == b"tcp" * 1000


def test_unknown_export_names_it(start_server):
    server = start_server("qemu")
    with pytest.raises(NbdError, match="export 'nosuch' not found"):
        server.connect("nosuch")


def test_missing_socket_is_nbd_error(tmp_path):
    addr = Address(str(tmp_path / "nope.sock"), None, 0, "")
    with pytest.raises(NbdError, match="cannot connect to unix socket .*nope.sock"):
        Client.connect(addr)


def test_not_listening_tcp_is_nbd_error():
    with pytest.raises(NbdError, match="cannot connect to 127.0.0.1:1 "):
        Client.connect("nbd://127.0.0.1:1/x", Timeouts(connect=5))


# ---- data path ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qemu", "nbdkit"])
def test_pwrite_pread_round_trip(start_server, kind):
    server = start_server(kind)
    data = pattern(3 * MiB + 123, 1)
    with server.connect() as c:
        c.pwrite(data, 4096 + 7)
        c.pwrite(b"", 0)
        assert c.pread(len(data), 4096 + 7) == data
        assert c.pread(4096 + 7, 0) == bytes(4096 + 7)
        # Force splitting of large requests into several commands.
        c.max_payload = 256 * 1024
        c.pwrite(data[::-1], 8 * MiB)
        assert c.pread(len(data), 8 * MiB) == data[::-1]


def test_pwrite_from_fd_copies_file_region(start_server, tmp_path):
    src = tmp_path / "src.bin"
    data = pattern(5 * MiB + 999, 2)
    src.write_bytes(data)
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(16 * MiB)
    server = start_server("qemu", file=disk)
    fd = os.open(src, os.O_RDONLY)
    try:
        with server.connect() as c:
            c.max_payload = 1 * MiB  # several requests, each via sendfile
            c.pwrite_from_fd(fd, 1234, 4 * MiB + 77, 3 * MiB)
            c._sendfile_ok = False  # exercise the read+send fallback too
            c.pwrite_from_fd(fd, 0, 100000, 10 * MiB + 1)
            with pytest.raises(NbdError, match="only"):
                c.pwrite_from_fd(fd, 5 * MiB, 1 * MiB, 0)  # past source EOF
            c.flush()
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # fd position untouched
    finally:
        os.close(fd)
    image = disk.read_bytes()
    assert image[3 * MiB:7 * MiB + 77] == data[1234:1234 + 4 * MiB + 77]
    assert image[10 * MiB + 1:10 * MiB + 100001] == data[:100000]
    assert image[:3 * MiB] == bytes(3 * MiB)
    assert len(image) == 16 * MiB


@pytest.mark.parametrize("kind, extra, native", [
    ("qemu", (), True),
    ("nbdkit", (), True),
    ("nbdkit", ("--filter=nozero",), False),
])
def test_write_zeroes(start_server, kind, extra, native):
    server = start_server(kind, *extra)
    data = pattern(6 * MiB, 3)
    with server.connect() as c:
        assert c.can_write_zeroes is native
        c.pwrite(data, 0)
        c.write_zeroes(4096, 5 * MiB - 1)
        c.write_zeroes(5 * MiB + 10, 100, may_trim=False)
        c.write_zeroes(6 * MiB, 0)  # empty range: a no-op, even at the end
        c.flush()
        got = c.pread(6 * MiB, 0)
    expect = bytearray(data)
    expect[4096:4096 + 5 * MiB - 1] = bytes(5 * MiB - 1)
    expect[5 * MiB + 10:5 * MiB + 110] = bytes(100)
    assert got == bytes(expect)


def test_write_zeroes_fallback_memory_is_bounded(start_server):
    server = start_server("nbdkit", "--filter=nozero", size=256 * MiB)
    with server.connect() as c:
        assert not c.can_write_zeroes
        c.pwrite(b"\xff" * 4096, 200 * MiB)
        tracemalloc.start()
        try:
            c.write_zeroes(0, 256 * MiB)
            c.drain()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * MiB
        assert c.pread(4096, 200 * MiB) == bytes(4096)


def test_write_zeroes_larger_than_32bit_is_split(start_server):
    server = start_server("qemu", size=5 << 30)  # sparse file
    with server.connect() as c:
        c.pwrite(b"\x01" * 512, (5 << 30) - 512)
        c.pwrite(b"\x02" * 512, 0)
        c.write_zeroes(0, 5 << 30)
        assert c.pread(512, (5 << 30) - 512) == bytes(512)
        assert c.pread(512, 0) == bytes(512)


def test_flush(start_server, tmp_path):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(MiB)
    server = start_server("qemu", file=disk)
    with server.connect() as c:
        assert c.can_flush
        c.pwrite(b"flushed!", 512)
        c.flush()
        with open(disk, "rb") as f:
            f.seek(512)
            assert f.read(8) == b"flushed!"


def test_writes_beyond_end_refused(start_server):
    server = start_server("nbdkit", size=MiB)
    with server.connect() as c:
        for op in (lambda: c.pwrite(b"x" * 10, MiB - 5),
                   lambda: c.write_zeroes(MiB, 1),
                   lambda: c.pread(2, MiB - 1),
                   lambda: c.pwrite(b"x", -1)):
            with pytest.raises(NbdError, match=r"beyond the end of the export \(size 1048576\)"):
                op()
        c.pwrite(b"y" * 5, MiB - 5)  # still usable; the exact end is fine
        assert c.pread(5, MiB - 5) == b"yyyyy"


@pytest.mark.parametrize("kind", ["qemu", "nbdkit"])
def test_read_only_export_refuses_writes(start_server, kind):
    server = start_server(kind, read_only=True)
    with server.connect() as c:
        assert c.read_only
        for op in (lambda: c.pwrite(b"x", 0), lambda: c.write_zeroes(0, 512),
                   lambda: c.pwrite_from_fd(0, 0, 1, 0)):
            with pytest.raises(NbdError, match="export 'exp' is read-only"):
                op()
        assert c.pread(16, 0) == bytes(16)


def test_server_error_reply_names_command(start_server):
    # nbdkit's error filter makes every write fail with EIO on the server side.
    server = start_server("nbdkit", "--filter=error", plugin=[
        "memory", "1M", "error=EIO", "error-pwrite-rate=100%"])
    with server.connect() as c:
        c.pwrite(b"a" * 512, 1024)
        with pytest.raises(NbdError, match="write at offset 1024 length 512 failed .*EIO"):
            c.drain()
        assert c.pread(512, 1024) == bytes(512)  # connection survives


def test_server_killed_mid_stream(start_server):
    server = start_server("qemu", size=256 * MiB)
    chunk = bytes(MiB)
    with pytest.raises(NbdError, match="connection to unix socket .* lost while"):
        with server.connect() as c:
            c.pwrite(chunk, 0)
            server.kill()
            for i in range(256):
                c.pwrite(chunk, i * MiB)
            c.flush()
    with pytest.raises(NbdError, match="is closed"):
        c.pread(1, 0)


def test_pipelined_scattered_writes(start_server):
    server = start_server("qemu", size=64 * MiB)
    # 200 distinct 64 KiB slots in random order, each with its own content.
    offsets = [s * 64 * 1024 for s in random.Random(4).sample(range(1024), 200)]
    blocks = {o: pattern(64 * 1024, o) for o in offsets}
    peak = 0
    with server.connect() as c:
        for o in offsets:
            c.pwrite(blocks[o], o)
            peak = max(peak, len(c._inflight))
        assert 1 < peak <= 16  # really pipelined, and within the window
        c.flush()
        for o in offsets:
            assert c.pread(64 * 1024, o) == blocks[o], o


def test_overlapping_requests_are_never_in_flight_together(start_server):
    """A server may reorder requests in flight: a write that overlaps an
    unanswered one must wait for it, so the later write always wins."""
    server = start_server("nbdkit", "--filter=nozero")
    with server.connect() as c:
        for round_ in range(20):
            c.pwrite(pattern(MiB, round_ + 1), 0)
            assert any(o == 0 for _, o, _, _, _ in c._inflight.values())
            c.write_zeroes(4096, 8192)  # overlaps the write still in flight
            # the big write was answered before the overlapping one was sent
            assert not any(o == 0 and n == MiB for _, o, n, _, _ in c._inflight.values())
            got = c.pread(MiB, 0)
            assert got[4096:4096 + 8192] == bytes(8192), round_


def test_writes_go_in_requests_of_the_servers_preferred_size(start_server):
    """qemu-nbd prefers 4 KiB blocks: requests are a multiple of that, cut
    on multiples of the request size, within the server's maximum."""
    server = start_server("qemu", size=64 * MiB)
    with server.connect() as c:
        size = c.request_size
        assert c.preferred_block == 4096 and size % 4096 == 0 and 4096 <= size <= c.max_payload
        sent = []
        request = c._request

        def record(cmd, offset, length, *args, **kwargs):
            sent.append((offset, length))
            return request(cmd, offset, length, *args, **kwargs)

        c._request = record
        data = pattern(5 * size + 100, 9)
        c.pwrite(data, size // 2)
        c._request = request
        c.flush()
        assert sent[0] == (size // 2, size - size // 2)  # up to the next multiple
        assert all(o % size == 0 and n <= size for o, n in sent[1:])
        assert sum(n for _, n in sent) == len(data)
        assert c.pread(len(data), size // 2) == data


class Interrupted(BaseException):
    pass


def _interrupt(signum, frame):
    raise Interrupted()


def test_stalled_write_fails_after_the_io_timeout_naming_it(start_server):
    server = start_server("qemu", size=256 * MiB)
    c = server.connect(timeouts=Timeouts(io=0.5))
    server.proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(NbdError, match=r"stalled: no progress for 0.5s while "
                                           r"(sending write data|sending a write request|waiting for the reply to a write)"):
            for i in range(256):
                c.pwrite(bytes(MiB), i * MiB)
    finally:
        server.proc.send_signal(signal.SIGCONT)


def test_abort_never_waits_for_a_frozen_server(start_server):
    """A cancel is a signal whose handler raises inside a blocked send; the
    abort that follows must return at once though the server is frozen
    and a request is half sent (no timeout is set: only abort can end it)."""
    server = start_server("qemu", size=256 * MiB)
    c = server.connect(timeouts=Timeouts(io=0))
    server.proc.send_signal(signal.SIGSTOP)
    old = signal.signal(signal.SIGALRM, _interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Interrupted):
            for i in range(256):
                c.pwrite(bytes(MiB), i * MiB)
        assert c._mid_request  # the cancel landed inside a request
        signal.setitimer(signal.ITIMER_REAL, 10)  # a watchdog: abort must not need it
        c.abort()
        c.abort()  # idempotent
        signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        server.proc.send_signal(signal.SIGCONT)
    with pytest.raises(NbdError, match="is closed"):
        c.pwrite(b"x", 0)


def test_connect_times_out_on_a_full_backlog(tmp_path):
    """A server that listens but never accepts: once its backlog is full,
    connecting waits, for the connect timeout only."""
    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    queued = []
    try:
        listener.bind(path)
        listener.listen(0)
        with pytest.raises(NbdError, match=r"cannot connect to unix socket .*: timed out after 0.3s while connecting"):
            for _ in range(8):  # fill the backlog, then one more
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                queued.append(s)
                s.setblocking(False)
                try:
                    s.connect(path)
                except BlockingIOError:
                    break  # full: the next blocking connect must wait
            Client.connect(Address(path, None, 0, "x"), Timeouts(connect=0.3))
    finally:
        for s in queued:
            s.close()
        listener.close()
