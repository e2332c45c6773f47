#!/usr/bin/env python3
"""Start tests.ops.write_steps as a task, as an executable would: prints the
task id as JSON and exits. Arguments: PATH STEPS DELAY [ignore_term] [fail_at]."""

import json
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(os.path.dirname(here), "plugin"), here]

from ops import write_steps  # noqa: E402
from xapi_storage_tasks.tasks import worker  # noqa: E402

path, steps, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ignore = len(sys.argv) > 4 and sys.argv[4] == "1"
fail_at = int(sys.argv[5]) if len(sys.argv) > 5 else -1
args = {"path": path, "steps": steps, "delay": delay, "ignore_term": ignore, "fail_at": fail_at}
print(json.dumps(worker.start("test-dbg", write_steps, args, kind="Test")))
