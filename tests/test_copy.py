"""The copy engine (xapi_storage_tasks.data.copy): plan() in the caller, run() in real
detached workers, onto real files, a loop block device, and real NBD
servers (qemu-nbd and nbdkit on Unix sockets in tmp_path, always killed by
a finalizer). Nothing is mocked except a few injected errno faults.
"""

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import SRC
from test_nbd import unix_listening
from xapi_storage_tasks.data import copy
from xapi_storage_tasks.tasks import lifecycle
from xapi_storage_tasks.process import identity
from xapi_storage_tasks.data import local
from xapi_storage_tasks.tasks import worker
from xapi_storage_tasks.wire.errors import InvalidArguments
from xapi_storage_tasks.tasks.state import CANCELLED, Completed, Failed, Pending

QEMU_NBD = "/usr/bin/qemu-nbd"
NBDKIT = "/usr/bin/nbdkit"
MiB = 1 << 20
BS = 64 * 1024
# What a Data.copy executable does, in a fresh process of its own.
STARTER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from xapi_storage_tasks.data import copy
from xapi_storage_tasks.tasks import worker
from xapi_storage_tasks.tasks.store import Store
uri, remote, blocklist = json.loads(sys.argv[3])
with Store(sys.argv[2]) as store:
    print(json.dumps(worker.start("d", copy.run, copy.plan(uri, remote, blocklist), kind="CopyV1", store=store)))
"""
SLOW = ("--filter=noparallel", "--filter=delay", "memory", "64M", "delay-write=100ms")  # ~80 MiB/s


# ---- helpers and fixtures ----------------------------------------------------


def build(path, size, data=(), seed=0, fill=None):
    """Create ``path``: ``size`` bytes, random data at the ``(offset,
    length)`` ranges ``data``, holes elsewhere (or ``fill`` bytes there, as
    data). Returns the content."""
    rnd = random.Random(seed)
    content = bytearray(size) if fill is None else bytearray(fill * size)
    for off, n in data:
        content[off:off + n] = rnd.randbytes(n)
    with open(path, "wb") as f:
        f.truncate(size)
        if fill is not None:
            f.write(content)
        for off, n in data:
            f.seek(off)
            f.write(content[off:off + n])
    return bytes(content)


def patterned(path, blocks):
    """A target of ``blocks`` blocks of BS bytes, block i all ``0x80 + i``."""
    data = b"".join(bytes([0x80 + i]) * BS for i in range(blocks))
    with open(path, "wb") as f:
        f.write(data)
    return data


def read(path):
    with open(path, "rb") as f:
        return f.read()


def same_files(a, b, length):
    """Compare the first ``length`` bytes of two files, 8 MiB at a time."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for _ in range(0, length, 8 * MiB):
            if fa.read(8 * MiB) != fb.read(8 * MiB):
                return False
    return True


def nbd_uri(sock):
    return "nbd+unix:///exp?socket=%s" % sock


@pytest.fixture
def nbd_server(tmp_path):
    """Factory: nbd_server(kind, *args) starts qemu-nbd on the disk file
    ``args[0]`` or nbdkit with ``args`` (filters, plugin, parameters) and
    returns ``(process, uri)``; every server is SIGKILLed at teardown."""
    procs = []

    def start(kind, *args, read_only=False):
        binary = QEMU_NBD if kind == "qemu" else NBDKIT
        if not os.access(binary, os.X_OK):
            pytest.skip("%s not installed" % binary)
        sock = str(tmp_path / ("nbd%d.sock" % len(procs)))
        ro = ["--read-only"] if read_only else []
        if kind == "qemu":
            argv = [binary, "--format=raw", "--export-name=exp", "--persistent", "--shared=4",
                    "--discard=unmap", "--socket=" + sock] + ro + [str(args[0])]
        else:
            argv = [binary, "--foreground", "--unix", sock] + ro + [str(a) for a in args]
        with open(tmp_path / ("nbd%d.log" % len(procs)), "wb") as log:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        procs.append(p)
        deadline = time.monotonic() + 10
        while not unix_listening(sock):
            assert p.poll() is None and time.monotonic() < deadline, "%s did not start" % kind
            time.sleep(0.01)
        return p, nbd_uri(sock)

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()


@pytest.fixture
def copies(store, monkeypatch):
    """``start(uri, remote, blocklist=None)`` does what Data.copy does
    (plan, then a CopyV1 task), from this process or, ``fresh``, from a
    new one as an executable would; at teardown every worker must be gone."""
    monkeypatch.setenv("TASK_CANCEL_GRACE", "2")
    started = []

    def start(uri, remote, blocklist=None, fresh=False):
        if fresh:
            out = subprocess.run([sys.executable, "-c", STARTER, SRC, store.path,
                                  json.dumps([uri, remote, blocklist])],
                                 capture_output=True, timeout=30, check=True)
            task_id = json.loads(out.stdout)
        else:
            args = copy.plan(uri, remote, blocklist)
            task_id = worker.start("copy-test", copy.run, args, kind="CopyV1", store=store)
        started.append(task_id)
        return task_id

    yield start
    stuck = []
    for task_id in started:
        ident = store.get(task_id).worker
        if ident and not identity.wait_gone(ident, 10):
            os.killpg(ident["pgid"], signal.SIGKILL)
            identity.wait_gone(ident, 5)
            stuck.append(task_id)
    assert not stuck, "workers still running after the test: %s" % stuck


def finish(store, task_id, timeout=30, on_progress=None):
    """Poll until the task is finished; return ``(state, progress seen)``.
    ``on_progress(p)`` is called for every Pending progress observed."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = store.get(task_id).state
        if state.terminal:
            return state, seen
        seen.append(state.progress)
        if on_progress is not None:
            on_progress(state.progress)
        time.sleep(0.003)
    pytest.fail("task %s still %r after %ss" % (task_id, state, timeout))


def completed(store, task_id):
    state, seen = finish(store, task_id)
    assert isinstance(state, Completed), state
    assert seen == sorted(seen) and all(0.0 <= p <= 1.0 for p in seen)
    assert store.get(task_id).artifacts == []
    return state


def run_here(store, args):
    """Run the operation in this process with a real Context on a real
    task, so the final Pending progress can be read back."""
    task = store.create("in-process")
    copy.run(worker.Context(store, task), **args)
    return store.get(task.id)


def listing(directory):
    return sorted(os.listdir(directory))


# A 4.5 MiB sparse source: data, a hole, data, a hole, data to the end.
SPARSE = (4 * MiB + 512 * 1024, [(0, MiB), (2 * MiB, 64 * 1024), (4 * MiB, 512 * 1024)])


# ---- full copies -------------------------------------------------------------


def test_full_copy_to_new_file_keeps_holes(copies, store, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    size = 64 * MiB  # mostly holes
    data = build(src, size, [(0, MiB), (40 * MiB, 3 * MiB), (size - 4096, 4096)])
    state = completed(store, copies("file://" + str(src), str(dst)))
    assert read(dst) == data
    assert os.stat(dst).st_blocks <= os.stat(src).st_blocks + 16  # holes stay holes
    assert listing(tmp_path) == ["dst", "src", "state"]  # no temporary left
    assert os.stat(dst).st_mode & 0o777 == 0o600
    assert state.duration > 0


@pytest.mark.parametrize("old_size", [SPARSE[0] + 3 * MiB, MiB])
def test_full_copy_over_existing_file(copies, store, tmp_path, old_size):
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = build(src, SPARSE[0], SPARSE[1])
    build(dst, old_size, fill=b"\xaa")
    completed(store, copies(str(src), "file://" + str(dst)))
    assert read(dst) == data  # resized to the source, old bytes gone from holes
    assert os.stat(dst).st_blocks <= os.stat(src).st_blocks + 16  # punched, not written


@pytest.mark.parametrize("kind", ["qemu", "nbdkit", "nbdkit-nozero"])
def test_full_copy_to_nbd(copies, store, nbd_server, tmp_path, kind):
    src, disk = tmp_path / "src", tmp_path / "disk"
    data = build(src, SPARSE[0], SPARSE[1])
    build(disk, SPARSE[0] + MiB, fill=b"\xaa")  # larger than needed, all non-zero
    if kind == "qemu":
        _, uri = nbd_server("qemu", disk)
    else:
        _, uri = nbd_server("nbdkit", *(["--filter=nozero"] if kind == "nbdkit-nozero" else []), "file", disk)
    completed(store, copies(str(src), uri))
    image = read(disk)
    assert image[:len(data)] == data  # holes became zeros: write-zeroes were sent
    assert image[len(data):] == b"\xaa" * MiB  # past the source: untouched
    if kind != "nbdkit-nozero":  # trimming write-zeroes punched the backing file
        assert os.stat(disk).st_blocks * 512 < len(image) - 2 * MiB


def test_full_copy_onto_loop_block_device(copies, store, tmp_path):
    src, backing = tmp_path / "src", tmp_path / "backing"
    data = build(src, SPARSE[0], SPARSE[1])
    build(backing, SPARSE[0] + MiB, fill=b"\xaa")
    out = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("no loop device: %s" % out.stderr.strip())
    dev = out.stdout.strip()
    try:
        build(tmp_path / "big", 8 * MiB)
        with pytest.raises(InvalidArguments, match="is %d bytes, the copy needs %d" % (SPARSE[0] + MiB, 8 * MiB)):
            copy.plan(str(tmp_path / "big"), dev, None)
        completed(store, copies(str(src), "file://" + dev))
        with open(dev, "rb") as f:
            image = f.read()
        # And back: a block device source has no holes to find, all is data.
        completed(store, copies("raw+block://" + dev, str(tmp_path / "back")))
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)
    assert image[:len(data)] == data and image[len(data):] == b"\xaa" * MiB
    assert read(tmp_path / "back") == image


# ---- blocklists --------------------------------------------------------------


def _source_for_blocklist(path):
    """40 blocks + 1000 bytes: data, a hole (blocks 10-19), data, a hole
    (30-35), data to the partial last block."""
    size = 40 * BS + 1000
    return build(path, size, [(0, 10 * BS), (20 * BS, 10 * BS), (36 * BS, size - 36 * BS)], seed=5)


# Ranges crossing data->hole edges, one wholly in a hole, and the partial last block.
RANGES = [(0, 2), (5, 8), (15, 3), (28, 4), (34, 1), (40, 1)]


@pytest.mark.parametrize("kind", ["file", "qemu", "nbdkit"])
def test_blocklist_copy_changes_only_listed_blocks(copies, store, nbd_server, tmp_path, kind):
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = _source_for_blocklist(src)
    before = patterned(dst, 48)
    remote = str(dst)
    if kind != "file":
        remote = nbd_server(kind, dst)[1] if kind == "qemu" else nbd_server(kind, "file", dst)[1]
    completed(store, copies(str(src), remote, (BS, RANGES)))
    after = read(dst)
    assert len(after) == len(before)  # a blocklist copy never shrinks a target
    listed = {b for start, n in RANGES for b in range(start, start + n)}
    for b in range(48):
        got, old, new = (x[b * BS:(b + 1) * BS] for x in (after, before, data))
        if b not in listed:
            assert got == old, "unlisted block %d changed" % b
        else:  # a block partly past the source's end keeps its tail
            assert got == new + old[len(new):], "listed block %d not copied" % b
    assert after[12 * BS:13 * BS] == bytes(BS)  # listed hole: zeroed


def test_blocklist_copy_to_new_file_and_growing_file(copies, store, tmp_path):
    src = tmp_path / "src"
    data = _source_for_blocklist(src)
    completed(store, copies(str(src), str(tmp_path / "new"), (BS, [(3, 2), (21, 1)])))
    assert read(tmp_path / "new") == bytes(3 * BS) + data[3 * BS:5 * BS] + bytes(16 * BS) + data[21 * BS:22 * BS]
    before = patterned(tmp_path / "small", 4)
    completed(store, copies(str(src), str(tmp_path / "small"), (BS, [(1, 1), (6, 1)])))
    assert read(tmp_path / "small") == (before[:BS] + data[BS:2 * BS] + before[2 * BS:]
                                        + bytes(2 * BS) + data[6 * BS:7 * BS])


# ---- nothing to copy -----------------------------------------------------------


def test_zero_length_source_and_empty_blocklist(copies, store, nbd_server, tmp_path):
    empty, src = tmp_path / "empty", tmp_path / "src"
    empty.touch()
    data = build(src, SPARSE[0], SPARSE[1])
    completed(store, copies(str(empty), str(tmp_path / "out")))
    assert read(tmp_path / "out") == b""
    _, uri = nbd_server("nbdkit", "memory", "1M")
    completed(store, copies(str(empty), uri))
    before = patterned(tmp_path / "old", 8)
    completed(store, copies(str(src), str(tmp_path / "old"), (BS, [])))
    assert read(tmp_path / "old") == before
    # Progress reaches exactly 1.0 even when there is nothing to do.
    assert run_here(store, copy.plan(str(empty), str(tmp_path / "out2"), None)).state == Pending(1.0)
    assert run_here(store, copy.plan(str(src), str(tmp_path / "old"), (BS, []))).state == Pending(1.0)
    assert run_here(store, copy.plan(str(src), str(tmp_path / "out3"), None)).state == Pending(1.0)
    assert read(tmp_path / "out3") == data


# ---- plan: validation in the caller ---------------------------------------------


def test_plan_accepts_the_uri_spellings_of_smapiv3_plugins(tmp_path):
    src = tmp_path / "a dir" / "src img"
    src.parent.mkdir()
    build(src, 3 * BS + 5)
    quoted = str(src).replace(" ", "%20")
    for uri in (str(src), "file://" + quoted, "file://localhost" + quoted, "raw+file:///" + quoted,
                "raw+file://" + quoted, "loop+blkback://" + quoted, "raw+block://" + quoted):
        args = copy.plan(uri, str(tmp_path / "dst"), (BS, [(0, 1), (1, 1), (3, 1)]))
        assert args == {"source": str(src), "source_size": 3 * BS + 5,
                        "blocklist": [BS, [[0, 2], [3, 1]]],  # adjacent ranges merged
                        "target": {"kind": "new", "path": str(tmp_path / "dst")}}
        assert list(copy.byte_ranges(args["blocklist"], 3 * BS + 5)) == [(0, 2 * BS), (3 * BS, 5)]
    build(tmp_path / "old", 10)
    assert copy.plan(str(src), "file://" + str(tmp_path / "old"), None)["target"] == {
        "kind": "file", "path": str(tmp_path / "old")}
    # A path spelled with "//" or "." but no link is not reported as one.
    assert copy.plan(str(src), str(tmp_path) + "//./old", None)["target"] == {
        "kind": "file", "path": str(tmp_path / "old")}
    for uri in ("nbd+unix:///e?socket=/no/such.sock", "nbd:unix:/no/such.sock:exportname=e",
                "nbd://127.0.0.1:1/e"):
        assert copy.plan(str(src), uri, None)["target"] == {"kind": "nbd", "uri": uri}  # not contacted


def _bad_cases(t):
    src, d = str(t / "src"), str(t / "dst")
    return [
        ("http://example.com/src", d, None, "unsupported scheme 'http'"),
        ("nbd+unix:///e?socket=/s", d, None, "NBD sources are not supported"),
        ("relative/src.img", d, None, "neither an absolute path nor a URI"),
        ("file://otherhost" + src, d, None, "names host 'otherhost'"),
        ("file://" + src + "?x", d, None, "query or fragment"),
        ("file:///%ff", d, None, "not a valid URI"),
        ("", d, None, "non-empty string"),
        (str(t / "missing"), d, None, "does not exist"),
        (str(t), d, None, "neither a regular file nor a block device"),
        (str(t / "fifo"), d, None, "neither a regular file nor a block device"),
        (src, d, (BS, [(11, 1)]), r"range \[11, 1\] is out of range"),
        (src, d, (BS, [(5, 7)]), r"range \[5, 7\] is out of range: .* source is %d bytes \(11 blocks\)" % (10 * BS + 100)),
        (src, "nbd+unix:///exp", None, "invalid NBD URI"),
        (src, "nbds://host/exp", None, "unsupported scheme"),
        (src, "ftp://host/dst", None, "unsupported scheme 'ftp'"),
        (src, "dst.img", None, "neither an absolute path nor a URI"),
        (src, str(t / "nodir" / "dst"), None, "target directory .*nodir does not exist"),
        (src, str(t), None, "neither a regular file nor a block device"),
        (src, str(t) + "/", None, "names a directory"),
        (src, "file://" + src, None, "source and target are the same"),
        (src, str(t / "dangling"), None, "dangling symbolic link"),
    ]


def test_plan_rejects_bad_arguments_and_no_task_is_created(copies, store, tmp_path):
    build(tmp_path / "src", 10 * BS + 100)
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for uri, remote, blocklist, message in _bad_cases(tmp_path):
        with pytest.raises(InvalidArguments, match=message):
            copies(uri, remote, blocklist)
    copy.plan(str(tmp_path / "src"), str(tmp_path / "dst"), (BS, [(10, 1)]))  # partial last block: fine
    # Too many ranges for a task record: refused now, not a corrupt task later.
    os.truncate(tmp_path / "src", 1 << 30)
    with pytest.raises(InvalidArguments, match="blocklist too large: 200000 ranges"):
        copies(str(tmp_path / "src"), str(tmp_path / "dst"), (512, [(2 * i, 1) for i in range(200000)]))
    assert store.ids() == []
    assert not (tmp_path / "dst").exists()


# ---- failures ------------------------------------------------------------------


def test_export_smaller_than_source_fails_clearly(copies, store, nbd_server, tmp_path):
    src = tmp_path / "src"
    build(src, 3 * MiB, [(0, MiB)])
    _, uri = nbd_server("nbdkit", "memory", "2M")
    state, _ = finish(store, copies(str(src), uri))
    assert state == Failed("Nbd_error: export 'exp' is %d bytes, the copy needs %d" % (2 * MiB, 3 * MiB))
    _, uri = nbd_server("qemu", tmp_path / "src", read_only=True)
    build(tmp_path / "other", MiB, [(0, 4096)])
    state, _ = finish(store, copies(str(tmp_path / "other"), uri))
    assert isinstance(state, Failed) and "export 'exp'" in state.message and "is read-only" in state.message


def test_server_killed_mid_copy_fails_naming_the_lost_connection(copies, store, nbd_server, tmp_path):
    src = tmp_path / "src"
    build(src, 64 * MiB, [(0, 64 * MiB)])
    server, uri = nbd_server("nbdkit", *SLOW)
    task_id = copies(str(src), uri)

    def kill(p):
        if p > 0 and server.poll() is None:
            server.kill()

    state, seen = finish(store, task_id, on_progress=kill)
    assert seen and seen[-1] < 1.0
    assert isinstance(state, Failed), state
    assert state.message.startswith("Nbd_error: connection to unix socket %s" % (tmp_path / "nbd0.sock"))
    assert " lost while " in state.message


def test_enospc_from_nbd_server(copies, store, nbd_server, tmp_path):
    src = tmp_path / "src"
    build(src, 2 * MiB, [(MiB, MiB)])
    _, uri = nbd_server("nbdkit", "full", "4M")  # every write: ENOSPC
    state, _ = finish(store, copies(str(src), uri))
    assert isinstance(state, Failed) and state.message.startswith("Nbd_error: ")
    assert "ENOSPC" in state.message


def _fail_with(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


def test_enospc_on_local_target_leaves_nothing(copies, store, tmp_path, monkeypatch):
    src = tmp_path / "src"
    build(src, 2 * MiB, [(0, 2 * MiB)])
    monkeypatch.setattr(os, "copy_file_range", _fail_with(errno.ENOSPC))  # the worker is forked from here
    state, _ = finish(store, copies(str(src), str(tmp_path / "dst")))
    assert state == Failed("Operation_failed: copying to %s at offset 0 failed: No space left on device"
                           % (tmp_path / "dst"))
    assert listing(tmp_path) == ["src", "state"]


@pytest.mark.parametrize("change", ["removed", "truncated"])
def test_source_changed_after_plan(copies, store, tmp_path, change):
    src = tmp_path / "src"
    build(src, MiB, [(0, MiB)])
    args = copy.plan(str(src), str(tmp_path / "dst"), None)
    src.unlink() if change == "removed" else os.truncate(src, 4096)
    task_id = worker.start("d", copy.run, args, kind="CopyV1", store=store)
    state, _ = finish(store, task_id)
    expect = "no longer exists" if change == "removed" else "changed size since the copy was planned: %d, now 4096" % MiB
    assert isinstance(state, Failed) and expect in state.message
    assert identity.wait_gone(store.get(task_id).worker, 10)
    assert not (tmp_path / "dst").exists()


def test_target_created_after_plan_is_left_alone(store, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    build(src, MiB, [(0, MiB)])
    args = copy.plan(str(src), str(dst), None)
    dst.write_bytes(b"someone else's")
    task_id = worker.start("d", copy.run, args, kind="CopyV1", store=store)
    state, _ = finish(store, task_id)
    assert state == Failed("Operation_failed: target %s appeared after the copy was planned; left alone" % dst)
    assert identity.wait_gone(store.get(task_id).worker, 10)
    assert dst.read_bytes() == b"someone else's" and listing(tmp_path) == ["dst", "src", "state"]


@pytest.mark.parametrize("broken", [("copy_file_range",), ("copy_file_range", "sendfile")])
def test_fallback_routes_copy_the_same_bytes(copies, store, tmp_path, monkeypatch, broken):
    src = tmp_path / "src"
    data = build(src, SPARSE[0], SPARSE[1])
    build(tmp_path / "dst", SPARSE[0], fill=b"\x55")
    for name in broken:
        monkeypatch.setattr(os, name, _fail_with(errno.EXDEV if name == "copy_file_range" else errno.EINVAL))
    monkeypatch.setattr(local, "punch_hole", _fail_with(errno.EOPNOTSUPP))  # zeros are written instead
    completed(store, copies(str(src), str(tmp_path / "dst")))
    assert read(tmp_path / "dst") == data
    completed(store, copies(str(src), str(tmp_path / "new")))
    assert read(tmp_path / "new") == data


# ---- big copies: cancel, progress, memory ----------------------------------------


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    """512 MiB of data (no holes): every MiB differs."""
    path = tmp_path_factory.mktemp("big") / "src"
    block = bytearray(random.Random(7).randbytes(MiB))
    with open(path, "wb") as f:
        for i in range(512):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)
    yield path
    path.unlink()


def _kib(status_line):
    """The number in ``VmHWM:   13860 kB``."""
    return int(status_line.split()[1])


def test_big_copy_progress_and_bounded_memory(copies, store, state_dir, nbd_server, big_source, tmp_path):
    size = 512 * MiB
    disk = tmp_path / "disk"
    with open(disk, "wb") as f:
        f.truncate(size)
    _, uri = nbd_server("qemu", disk)
    for remote, result in ((str(tmp_path / "dst"), tmp_path / "dst"), (uri, disk)):
        task_id = copies(str(big_source), remote, fresh=True)  # not a fork of pytest's heap
        pid, peak = store.get(task_id).worker["pid"], [0]

        def sample(_, pid=pid, peak=peak):
            try:
                with open("/proc/%d/status" % pid) as f:
                    peak[0] = max([peak[0]] + [_kib(line) for line in f if line.startswith("VmHWM:")])
            except OSError:
                pass  # just exited

        state, seen = finish(store, task_id, on_progress=sample)
        assert isinstance(state, Completed), state
        assert len(seen) > 3 and seen == sorted(seen) and 0 < seen[-1] <= 1.0
        assert 0 < peak[0] < 40 * 1024, "worker VmHWM %d KiB" % peak[0]
        # Logged by the copy before Completed and by the worker just after.
        assert identity.wait_gone(store.get(task_id).worker, 10)
        log = (state_dir / "logs" / (task_id + ".log")).read_text()
        logged = re.findall(r"(operation returned)\b.*peak RSS (\d+) KiB", log)
        assert [k for k, _ in logged] == ["operation returned"], log
        assert all(int(kib) < 40 * 1024 for _, kib in logged), log
        assert same_files(big_source, result, size)
        result.unlink() if result != disk else None


@pytest.mark.parametrize("kind", ["new-file", "nbd"])
def test_cancel_mid_copy(copies, store, nbd_server, big_source, tmp_path, kind):
    dst = tmp_path / "dst"
    src = big_source
    if kind == "nbd":  # throttled, so there is time to cancel
        src = tmp_path / "src"
        build(src, 64 * MiB, [(0, 64 * MiB)])
        _, remote = nbd_server("nbdkit", *SLOW)
    else:
        remote = str(dst)
    task_id = copies(str(src), remote)
    cancelled = []

    def cancel(p):
        if p > 0 and not cancelled:
            cancelled.append(p)
            lifecycle.request_cancel(store, task_id)

    state, seen = finish(store, task_id, on_progress=cancel)
    if isinstance(state, Completed) and kind == "new-file" and not (cancelled and cancelled[0] < 1.0):
        # 512 MiB normally takes a good fraction of a second here; a
        # reflinking filesystem (XFS, btrfs) clones it in an instant, so no
        # progress below 1.0 is seen to cancel at. A cancel requested below
        # 1.0 that still ended Completed fails below.
        pytest.skip("the copy finished before a cancel could land (%s)" % (cancelled or "no progress seen"))
    assert cancelled and state == Failed(CANCELLED)
    assert seen[-1] < 1.0
    assert store.get(task_id).artifacts == []
    assert kind == "nbd" or not dst.exists()
    assert listing(tmp_path) == sorted(["state"] + (["nbd0.log", "nbd0.sock", "src"] if kind == "nbd" else []))
    assert identity.wait_gone(store.get(task_id).worker, 10)


# ---- stalled and silent servers (issue 12, item 4) --------------------------------


def _freeze_when_copying(store, task_id, server):
    """Poll until the copy has made progress, then SIGSTOP the server (the
    worker soon blocks on a full socket or a missing reply)."""
    state, seen = finish(store, task_id, on_progress=lambda p: p > 0 and server.send_signal(signal.SIGSTOP))
    return state, seen


def _wait_stopped(pid):
    """Wait until the kernel shows ``pid`` stopped (SIGSTOP lands async)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.001)
    pytest.fail("process %d did not stop" % pid)


@pytest.mark.parametrize("connections", ["1", "4"])
def test_cancel_stops_a_copy_blocked_on_a_frozen_server(copies, store, state_dir, nbd_server, big_source, tmp_path,
                                                       monkeypatch, connections):
    """The worker must stop by itself, at once: the grace period before
    SIGKILL is longer than the test waits, and no stall timeout could fire
    first."""
    monkeypatch.setenv("TASK_NBD_CONNECTIONS", connections)
    monkeypatch.setenv("TASK_NBD_IO_TIMEOUT", "600")
    disk = tmp_path / "disk"
    build(disk, 512 * MiB)
    server, uri = nbd_server("qemu", disk)
    task_id = copies(str(big_source), uri)
    monkeypatch.setenv("TASK_CANCEL_GRACE", "600")  # for the cancel, not the copy started above
    frozen = []

    def freeze_then_cancel(p):
        if p > 0 and not frozen:
            server.send_signal(signal.SIGSTOP)
            frozen.append(p)
            _wait_stopped(server.pid)
            lifecycle.request_cancel(store, task_id)

    try:
        state, seen = finish(store, task_id, timeout=20, on_progress=freeze_then_cancel)
    finally:
        server.send_signal(signal.SIGCONT)
    assert frozen and state == Failed(CANCELLED)
    log = (state_dir / "logs" / (task_id + ".log")).read_text()
    assert "SIGKILL" not in log and "killed" not in log.lower(), log
    assert identity.wait_gone(store.get(task_id).worker, 10)


def test_frozen_server_fails_the_copy_after_the_io_timeout_naming_what_stalled(copies, store, nbd_server, big_source,
                                                                               tmp_path, monkeypatch):
    monkeypatch.setenv("TASK_NBD_IO_TIMEOUT", "0.5")
    disk = tmp_path / "disk"
    build(disk, 512 * MiB)
    server, uri = nbd_server("qemu", disk)
    task_id = copies(str(big_source), uri)
    try:
        state, seen = _freeze_when_copying(store, task_id, server)
    finally:
        server.send_signal(signal.SIGCONT)
    assert isinstance(state, Failed), state
    assert re.match(r"Nbd_error: connection to unix socket %s \(export 'exp'\) stalled: no progress for 0.5s while "
                    r"(sending write data|sending a write request|waiting for the reply to a write at offset \d+ length \d+)$"
                    % re.escape(str(tmp_path / "nbd0.sock")), state.message), state.message
    assert seen[-1] < 1.0


SILENT = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen(8)
conns = []
while True:
    conns.append(s.accept()[0])  # accepts, never speaks
"""


def test_silent_server_fails_after_the_handshake_timeout(copies, store, tmp_path, monkeypatch):
    monkeypatch.setenv("TASK_NBD_HANDSHAKE_TIMEOUT", "0.5")
    src, sock = tmp_path / "src", tmp_path / "mute.sock"
    build(src, MiB, [(0, MiB)])
    server = subprocess.Popen([sys.executable, "-c", SILENT, str(sock)])
    try:
        while not unix_listening(str(sock)):
            assert server.poll() is None
            time.sleep(0.01)
        state, _ = finish(store, copies(str(src), nbd_uri(sock)))
    finally:
        server.kill()
        server.wait()
    assert state == Failed("Nbd_error: connection to unix socket %s (export 'exp') stalled: no progress for 0.5s "
                           "while negotiating (the server sent no greeting)" % sock)


# ---- several connections, or one -----------------------------------------------------


PROXY = """
import os, socket, sys, threading
# Like the toolstack's migration proxy: accepts exactly once, then relays.
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1]); listener.listen(1)
client = listener.accept()[0]
if sys.argv[3] == "close":
    listener.close()
    os.unlink(sys.argv[1])
# else: keeps listening, never accepts again (connections wait in the backlog)
upstream = socket.socket(socket.AF_UNIX)
upstream.connect(sys.argv[2])

def pump(a, b):
    while True:
        data = a.recv(1 << 20)
        if not data:
            b.shutdown(socket.SHUT_WR)
            return
        b.sendall(data)

threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
pump(client, upstream)
"""


def _connections_logged(state_dir, task_id):
    log = (state_dir / "logs" / (task_id + ".log")).read_text()
    return int(re.search(r"(\d+) connection\(s\), requests of \d+ bytes", log).group(1)), log


@pytest.mark.parametrize("setting, expected", [(None, 4), ("2", 2), ("1", 1)])
def test_multi_conn_server_gets_several_connections(copies, store, state_dir, nbd_server, tmp_path, monkeypatch,
                                                    setting, expected):
    if setting:
        monkeypatch.setenv("TASK_NBD_CONNECTIONS", setting)
    src, disk = tmp_path / "src", tmp_path / "disk"
    data = build(src, 48 * MiB, [(0, 20 * MiB), (24 * MiB, 3 * MiB + 5), (40 * MiB, 8 * MiB)], seed=3)
    build(disk, 48 * MiB, fill=b"\xaa")
    _, uri = nbd_server("nbdkit", "file", disk)  # nbdkit's file plugin advertises multi-conn
    task_id = copies(str(src), uri)
    completed(store, task_id)
    assert _connections_logged(state_dir, task_id)[0] == expected
    assert read(disk) == data


@pytest.mark.parametrize("listener", ["close", "keep"])
def test_a_server_accepting_once_gets_one_connection(copies, store, state_dir, nbd_server, tmp_path, listener):
    src, disk, sock = tmp_path / "src", tmp_path / "disk", tmp_path / "proxy.sock"
    data = build(src, 16 * MiB, [(0, 5 * MiB), (9 * MiB, 7 * MiB)], seed=4)
    build(disk, 16 * MiB, fill=b"\xaa")
    _, uri = nbd_server("nbdkit", "file", disk)  # advertises multi-conn, through the proxy too
    proxy = subprocess.Popen([sys.executable, "-c", PROXY, str(sock), uri.split("socket=")[1], listener])
    try:
        while not unix_listening(str(sock)):
            assert proxy.poll() is None
            time.sleep(0.01)
        task_id = copies(str(src), nbd_uri(sock))
        completed(store, task_id)
    finally:
        proxy.kill()
        proxy.wait()
    count, log = _connections_logged(state_dir, task_id)
    assert count == 1 and "another one failed" in log
    if listener == "keep":
        assert "stalled: no progress for 2s while negotiating" in log
    assert read(disk) == data


# ---- edges: pseudo-filesystems, symbolic links (issue 12, item 7) ------------------


@pytest.mark.parametrize("uri, remote, message", [
    ("SRC", "file:///proc/self/mem", "target /proc/self/mem is on a proc pseudo-filesystem, not storage"),
    ("SRC", "/proc/self/status", "target /proc/self/status is on a proc pseudo-filesystem"),
    ("SRC", "/sys/kernel/uevent_seqnum", "target /sys/kernel/uevent_seqnum is on a sysfs pseudo-filesystem"),
    ("SRC", "/proc/self/new-file", "target /proc/self/new-file would be on a proc pseudo-filesystem"),
    ("/proc/self/mem", "DST", "source /proc/self/mem is on a proc pseudo-filesystem, not storage"),
    ("file:///proc/kallsyms", "DST", "source /proc/kallsyms is on a proc pseudo-filesystem"),
])
def test_pseudo_filesystems_are_refused_at_call_time(call, store, tmp_path, uri, remote, message):
    build(tmp_path / "src", MiB, [(0, 4096)])
    params = {"dbg": "d", "uri": uri.replace("SRC", str(tmp_path / "src")), "domain": "0",
              "remote": remote.replace("DST", str(tmp_path / "dst")), "blocklist": None}
    result = call("Data.copy", params)
    assert result.error_name == "Invalid_arguments"
    assert message in result.json["params"][1]
    assert store.ids() == [] and not (tmp_path / "dst").exists()


def test_a_pseudo_file_swapped_in_after_the_plan_is_refused_by_the_worker(copies, store, tmp_path):
    src = tmp_path / "src"
    build(src, MiB, [(0, MiB)])
    args = copy.plan(str(src), str(tmp_path / "dst"), None)
    src.unlink()
    src.symlink_to("/proc/self/status")
    task_id = worker.start("d", copy.run, dict(args, source_size=0), kind="CopyV1", store=store)
    state, _ = finish(store, task_id)
    assert isinstance(state, Failed) and "Too many levels of symbolic links" in state.message, state


@pytest.mark.parametrize("kind", ["existing", "new-in-linked-dir"])
def test_symlinked_target_is_resolved_and_reported(copies, store, state_dir, tmp_path, kind):
    """Policy: a symbolic link is resolved when the call is made (LVM and
    /dev/disk names are links); the copy writes the file it resolves to,
    the link stays a link, and the task log names both."""
    src, real = tmp_path / "src", tmp_path / "real"
    data = build(src, SPARSE[0], SPARSE[1])
    if kind == "existing":
        build(real, MiB, fill=b"\xaa")
        link = tmp_path / "link"
        link.symlink_to(real)
        target, named = real, link
    else:
        real.mkdir()
        (tmp_path / "linkdir").symlink_to(real)
        target, named = real / "img", tmp_path / "linkdir" / "img"
    args = copy.plan(str(src), "file://" + str(named), None)
    assert args["target"] == {"kind": "file" if kind == "existing" else "new", "path": str(target), "named": str(named)}
    task_id = copies(str(src), "file://" + str(named))
    completed(store, task_id)
    assert read(target) == data
    if kind == "existing":
        assert os.readlink(named) == str(real)
    log = (state_dir / "logs" / (task_id + ".log")).read_text()
    assert "to %s (via the symbolic link %s)" % (target, named) in log


def test_a_link_swapped_in_at_the_target_after_the_plan_is_not_followed(copies, store, tmp_path):
    src, dst, victim = tmp_path / "src", tmp_path / "dst", tmp_path / "victim"
    build(src, MiB, [(0, MiB)])
    build(dst, MiB, fill=b"\x11")
    victim.write_bytes(b"precious")
    args = copy.plan(str(src), str(dst), None)
    dst.unlink()
    dst.symlink_to(victim)
    state, _ = finish(store, worker.start("d", copy.run, args, kind="CopyV1", store=store))
    assert isinstance(state, Failed) and "Too many levels of symbolic links" in state.message, state
    assert victim.read_bytes() == b"precious"


def test_flushes_start_early_so_the_final_flush_is_short(copies, store, nbd_server, tmp_path, monkeypatch):
    """A flush goes out (unawaited) after every 64 MiB of data, so the
    server writes back while the copy goes on."""
    monkeypatch.setenv("TASK_NBD_CONNECTIONS", "1")
    src, log = tmp_path / "src", tmp_path / "requests.log"
    build(src, 160 * MiB, [(0, 160 * MiB)])
    _, uri = nbd_server("nbdkit", "--filter=log", "memory", "160M", "logfile=%s" % log)
    completed(store, copies(str(src), uri))
    # "<date> <time> connection=1 Write id=... offset=... count=..."
    requests = [line.split()[3] for line in log.read_text().splitlines() if line.split()[3:4] in (["Write"], ["Flush"])]
    writes = [i for i, r in enumerate(requests) if r == "Write"]
    early = [i for i, r in enumerate(requests) if r == "Flush" and i < writes[-1]]
    assert len(early) == 2 and requests[-1] == "Flush", requests
