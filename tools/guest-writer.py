"""A guest for the migration demo and tests: writes random blocks to a
volume until SIGTERM, every write acknowledged before the next, either
through a block device (``/dev/...``: with O_DIRECT, as a guest's blkback
does) or through an NBD export (an NBD URI: the project's own NBD client).
Its count of acknowledged writes is kept in COUNT_FILE (so callers can
wait for writes to go on) and printed at the end.

    python3 tools/guest-writer.py DEVICE_OR_NBD_URI SIZE COUNT_FILE [REPORT]

With REPORT, it also remembers what it last wrote where and, once stopped,
reads every such block back the same way and writes a JSON report:
``{"writes": N, "max_latency": SECONDS, "mismatches": M}`` (its longest
wait for one acknowledgement, and how many blocks do not read back as it
last wrote them: 0 when every acknowledged write stuck). SIGUSR1 starts
the longest wait afresh (to measure from an instant on).
"""

import json
import mmap
import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugin"))

from xapi_storage_tasks.nbd.protocol import Client  # noqa: E402

BLOCK = 4096
stop = False
reset = False


def on_term(signum: int, frame: object) -> None:
    global stop
    stop = True


def on_usr1(signum: int, frame: object) -> None:
    global reset
    reset = True


class Device:
    """A block device written with O_DIRECT (aligned buffers), with the
    NBD client's calls."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        self.buf = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT needs

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def pwrite(self, data: bytes, offset: int) -> None:
        self.buf[:len(data)] = data
        if os.pwrite(self.fd, memoryview(self.buf)[:len(data)], offset) != len(data):
            raise OSError("short write at %d" % offset)

    def drain(self) -> None:
        """O_DIRECT: a write has returned once the device acknowledged it."""

    def flush(self) -> None:
        os.fsync(self.fd)

    def pread(self, length: int, offset: int) -> bytes:
        got = os.preadv(self.fd, [memoryview(self.buf)[:length]], offset)
        return bytes(self.buf[:got])


def main(uri: str, size: int, count_file: str, report: str = "") -> None:
    global reset
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    rng = random.Random(os.getpid())
    count, longest = 0, 0.0
    last = {}  # block offset -> the 4 KiB last written there (REPORT only)
    with (Device(uri) if uri.startswith("/") else Client.connect(uri)) as client:
        while not stop:
            length = rng.choice((4096, 65536))
            offset = rng.randrange(0, size - length + 1) // BLOCK * BLOCK
            data = os.urandom(length)
            began = time.monotonic()
            client.pwrite(data, offset)
            client.drain()  # acknowledged
            longest = 0.0 if reset else max(longest, time.monotonic() - began)
            reset = False
            if report:
                for at in range(0, length, BLOCK):
                    last[offset + at] = data[at:at + BLOCK]
            count += 1
            if count % 10 == 0:
                with open(count_file + ".tmp", "w") as f:
                    f.write(str(count))
                os.replace(count_file + ".tmp", count_file)
        client.flush()
        mismatches = sum(client.pread(BLOCK, at) != data for at, data in last.items()) if report else 0
    if report:
        with open(report, "w") as f:
            json.dump({"writes": count, "max_latency": longest, "mismatches": mismatches}, f)
    print(count)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:5])
