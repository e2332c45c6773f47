#!/bin/sh
# A short tour: create a task through the Python API, then query and
# control it through the executables exactly as the toolstack does.
set -eu
PYTHON=${PYTHON:-python3}
top=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export TASK_STATE_DIR="$work/state" TASK_SYSLOG=0

id=$("$PYTHON" -c "
import sys; sys.path.insert(0, '$top')
from plugin.store import Store
print(Store().create('demo').id)")
echo "created task $id"
printf '{"dbg":"demo","id":"%s"}' "$id" | "$top/bin/Task.stat" --json
echo '{"method": "Task.ls", "params": [{"dbg": "demo"}], "id": 44}' | "$top/bin/Task.ls"
"$PYTHON" -c "
import sys; sys.path.insert(0, '$top')
from plugin.store import Store
from plugin.state import Completed
Store().transition('$id', lambda t: Completed(1.5))"
"$top/bin/Task.stat" demo "$id"
"$top/bin/Task.destroy" demo "$id"
"$top/bin/Task.ls" demo
