"""A real operation for tests: it writes a file in steps, taking a
controllable time, and declares that file as its artifact, so tests can
check rollback. Not a mock: it runs in a real detached worker."""

import signal
import time

from xapi_storage_tasks.wire.codec import UNIT_RESULT


def write_steps(ctx, path, steps=10, delay=0.05, ignore_term=False, fail_at=-1):
    """Write ``steps`` lines to ``path``, one every ``delay`` seconds,
    reporting progress after each. ``ignore_term`` makes the worker ignore
    SIGTERM (as a stuck worker would); ``fail_at`` raises at that step."""
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(ctx.create_artifact(path), "w") as f:
        for i in range(steps):
            if i == fail_at:
                raise RuntimeError("boom at step %d" % i)
            f.write("step %d\n" % i)
            f.flush()
            time.sleep(delay)
            ctx.progress((i + 1) / steps)
    return UNIT_RESULT
