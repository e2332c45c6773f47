"""A guest for the migration demo and tests: writes random blocks through
an NBD export (the project's own NBD client) until SIGTERM, every write
acknowledged before the next. Its count of acknowledged writes is kept in
COUNT_FILE (so callers can wait for writes to go on) and printed at the end.

    python3 tools/nbd-guest-writer.py NBD_URI SIZE COUNT_FILE [REPORT]

With REPORT, it also remembers what it last wrote where and, once stopped,
reads every such block back through the export and writes a JSON report:
``{"writes": N, "max_latency": SECONDS, "mismatches": M}`` (its longest
wait for one acknowledgement, and how many blocks do not read back as it
last wrote them: 0 when every acknowledged write stuck). SIGUSR1 starts
the longest wait afresh (to measure from an instant on).
"""

import json
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


def main(uri: str, size: int, count_file: str, report: str = "") -> None:
    global reset
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    rng = random.Random(os.getpid())
    count, longest = 0, 0.0
    last = {}  # block offset -> the 4 KiB last written there (REPORT only)
    with Client.connect(uri) as client:
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
