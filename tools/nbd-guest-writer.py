"""A guest for the migration demo and tests: writes random blocks through
an NBD export (the project's own NBD client) until SIGTERM, every write
acknowledged before the next. Its count of acknowledged writes is kept in
COUNT_FILE (so callers can wait for writes to go on) and printed at the end.

    python3 tools/nbd-guest-writer.py NBD_URI SIZE COUNT_FILE
"""

import os
import random
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugin"))

from xapi_storage_tasks.nbd.protocol import Client  # noqa: E402

stop = False


def on_term(signum: int, frame: object) -> None:
    global stop
    stop = True


def main(uri: str, size: int, count_file: str) -> None:
    signal.signal(signal.SIGTERM, on_term)
    rng = random.Random(os.getpid())
    count = 0
    with Client.connect(uri) as client:
        while not stop:
            length = rng.choice((4096, 65536))
            offset = rng.randrange(0, size - length + 1) // 4096 * 4096
            client.pwrite(os.urandom(length), offset)
            client.drain()  # acknowledged
            count += 1
            if count % 10 == 0:
                with open(count_file + ".tmp", "w") as f:
                    f.write(str(count))
                os.replace(count_file + ".tmp", count_file)
        client.flush()
    print(count)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
