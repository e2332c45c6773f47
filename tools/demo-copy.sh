#!/bin/sh
# The main job, end to end: make a sparse image, serve a target over NBD on
# a Unix socket (qemu-nbd), Data.copy into it, watch progress with
# Task.stat, verify the bytes, destroy the task.
set -eu
PYTHON=${PYTHON:-python3}
top=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
nbd_pid=
cleanup() {
    [ -n "$nbd_pid" ] && kill "$nbd_pid" 2>/dev/null && wait "$nbd_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
export TASK_STATE_DIR="$work/state" TASK_SYSLOG=0
call() { "$PYTHON" "$top/bin/$1" --json; }

echo "== a 1 GiB sparse source image with 256 MiB of data in four extents"
src="$work/source.img"
truncate -s 1G "$src"
for mib in 0 300 600 900; do
    head -c 64M /dev/urandom | dd of="$src" bs=1M seek="$mib" conv=notrunc status=none
done
du -h --apparent-size "$src"; du -h "$src"

echo "== qemu-nbd serves an empty 1 GiB target on $work/nbd.sock"
qemu-img create -q -f raw "$work/target.img" 1G
qemu-nbd --socket="$work/nbd.sock" --format=raw --export-name=target --persistent "$work/target.img" &
nbd_pid=$!
while [ ! -S "$work/nbd.sock" ]; do sleep 0.05; done

echo "== Data.copy"
op=$(printf '{"dbg":"demo","uri":"file://%s","domain":"0","remote":"nbd+unix:///target?socket=%s","blocklist":null}' \
     "$src" "$work/nbd.sock" | call Data.copy)
echo "$op"
id=$(echo "$op" | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)[1])')

echo "== Task.stat until it finishes"
while :; do
    record=$(printf '{"dbg":"demo","id":"%s"}' "$id" | call Task.stat)
    echo "$record"
    case "$record" in *'"Pending"'*) sleep 0.1 ;; *) break ;; esac
done
case "$record" in *'"Completed"'*) ;; *) echo "copy failed" >&2; exit 1 ;; esac
printf '{"dbg":"demo","operation":["CopyV1","%s"]}' "$id" | call Data.stat

echo "== verify: the target holds exactly the source's bytes"
kill "$nbd_pid"; wait "$nbd_pid" 2>/dev/null || true; nbd_pid=
cmp "$src" "$work/target.img" && echo "identical"

echo "== Task.destroy, then Task.ls"
printf '{"dbg":"demo","id":"%s"}' "$id" | call Task.destroy
echo '{"method": "Task.ls", "params": [{"dbg": "demo"}], "id": 44}' | "$PYTHON" "$top/bin/Task.ls"
