#!/bin/sh
# The main job, end to end: live storage migration of a running disk, in
# the order and manner the toolstack drives it (every call is an executable
# run as [script, "--json"] with the params on stdin).
#
#   a raw image attached and activated for guest domain 7, served by a
#   qemu-storage-daemon; a guest process writing to it through the NBD
#   export all along; the dom0 mirror dp attached; Data.mirror to a qemu-nbd
#   that accepts ONE connection; Data.stat polled back to back until
#   complete; writes going on; the dom0 dp deactivated and detached; the
#   guest stopped; Datapath.deactivate drains the mirror; cmp of source and
#   target; the task Completed.
set -eu
PYTHON=${PYTHON:-python3}
top=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
nbd_pid= guest_pid=
cleanup() {
    [ -n "$guest_pid" ] && kill "$guest_pid" 2>/dev/null && wait "$guest_pid" 2>/dev/null
    [ -n "$nbd_pid" ] && kill "$nbd_pid" 2>/dev/null && wait "$nbd_pid" 2>/dev/null
    # Detach is idempotent and never fails: it stops the storage daemon.
    [ -n "${uri:-}" ] && printf '{"dbg":"demo","uri":"%s","domain":"7"}' "$uri" | call Datapath.detach >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
export TASK_STATE_DIR="$work/state" TASK_SYSLOG=0
call() { "$PYTHON" "$top/bin/$1" --json; }
field() { "$PYTHON" -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1:]: v=v[int(k)] if isinstance(v, list) else v.get(k)  # a failed status has no progress
print(v)' "$@"; }
now() { "$PYTHON" -c 'import time; print(time.monotonic())'; }
size=$((512 * 1024 * 1024))

echo "== Plugin.Query (what the toolstack checks before registering the datapath)"
printf '{"dbg":"register"}' | call Plugin.Query

echo "== a 512 MiB raw image with 256 MiB of data"
src="$work/disk.raw"
truncate -s $size "$src"
for mib in 0 128 256 384; do
    head -c 64M /dev/urandom | dd of="$src" bs=1M seek="$mib" conv=notrunc status=none
done
uri="raw+file://$src"

echo "== Datapath.attach + Datapath.activate for guest domain 7"
answer=$(printf '{"dbg":"demo","uri":"%s","domain":"7"}' "$uri" | call Datapath.attach)
echo "$answer"
printf '{"dbg":"demo","uri":"%s","domain":"7"}' "$uri" | call Datapath.activate >/dev/null
export_uri=$(echo "$answer" | field implementations 0 1 uri)

echo "== the guest writes random blocks through $export_uri"
"$PYTHON" "$top/tools/nbd-guest-writer.py" "$export_uri" $size "$work/writes" > "$work/guest.out" &
guest_pid=$!
writes() { cat "$work/writes" 2>/dev/null || echo 0; }
while [ "$(writes)" -lt 50 ]; do sleep 0.05; done

echo "== the destination: qemu-nbd serves an empty image and accepts ONE connection"
qemu-img create -q -f raw "$work/target.raw" $size
qemu-nbd --format=raw --export-name=dst --socket="$work/dst.sock" "$work/target.raw" &
nbd_pid=$!
while [ ! -S "$work/dst.sock" ]; do sleep 0.05; done

echo "== the dom0 mirror dp: Datapath.attach for u0-mirror_demo (not activated)"
printf '{"dbg":"demo","uri":"%s","domain":"u0-mirror_demo"}' "$uri" | call Datapath.attach >/dev/null

echo "== Data.mirror (domain 7, remote nbd+unix:///dst?socket=...)"
began=$(now)
op=$(printf '{"dbg":"demo","uri":"%s","domain":"7","remote":"nbd+unix:///dst?socket=%s"}' "$uri" "$work/dst.sock" | call Data.mirror)
echo "$op"

echo "== Data.stat, back to back with no sleep, until complete"
polls=0 last=
while :; do
    status=$(printf '{"dbg":"demo","operation":%s}' "$op" | call Data.stat)
    polls=$((polls + 1))
    progress=$(echo "$status" | field progress)
    if [ "$progress" != "$last" ]; then echo "  poll $polls: $status"; last=$progress; fi
    case "$status" in
        *'"complete": true'*) break ;;
        *'"failed": true'*) echo "mirror failed" >&2; exit 1 ;;
    esac
done
echo "complete after $polls polls, $("$PYTHON" -c "print('%.2f' % ($(now) - $began))")s; the guest has written $(writes) blocks"

echo "== writes go on while the mirror keeps the target in step"
mark=$(writes); while [ "$(writes)" -lt $((mark + 200)) ]; do sleep 0.05; done
echo "the guest has written $(writes) blocks"

echo "== the dom0 mirror dp goes: Datapath.deactivate + Datapath.detach u0-mirror_demo"
printf '{"dbg":"demo","uri":"%s","domain":"u0-mirror_demo"}' "$uri" | call Datapath.deactivate >/dev/null
printf '{"dbg":"demo","uri":"%s","domain":"u0-mirror_demo"}' "$uri" | call Datapath.detach >/dev/null
printf '{"dbg":"demo","operation":%s}' "$op" | call Data.stat

echo "== the guest stops"
kill "$guest_pid"; wait "$guest_pid"; guest_pid=
echo "the guest wrote $(cat "$work/guest.out") blocks, every one acknowledged"

echo "== Datapath.deactivate for domain 7: drains the mirror"
t0=$(now)
printf '{"dbg":"demo","uri":"%s","domain":"7"}' "$uri" | call Datapath.deactivate
echo "deactivate took $("$PYTHON" -c "print('%.3f' % ($(now) - $t0))")s"
printf '{"dbg":"demo","id":"%s"}' "$(echo "$op" | field 1)" | call Task.stat

echo "== verify: the target holds exactly the source's bytes"
wait "$nbd_pid" 2>/dev/null || true; nbd_pid=   # qemu-nbd exits once its one client has gone
cmp "$src" "$work/target.raw" && echo "identical"

echo "== Datapath.detach for domain 7: the storage daemon stops"
printf '{"dbg":"demo","uri":"%s","domain":"7"}' "$uri" | call Datapath.detach
