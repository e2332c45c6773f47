#!/bin/sh
# The main job, end to end: live storage migration of a running disk
# between two hosts, in the order and manner the two toolstacks drive it
# (every call is an executable run as [script, "--json"] with the params on
# stdin; each host is this plugin on its own state directory).
#
#   destination: a new qcow2 leaf attached + activated for MIR3fa9c1, and
#   attached again (get_nbd_server); the toolstack's relay accepting ONE
#   connection into its NBD socket.
#   source: a raw image attached + activated for guest domain 5; the guest
#   writes through the volume's block device with O_DIRECT (as blkback
#   does); the dom0 mirror dp u0_mirror_vbd_5_xvda attached; Data.mirror
#   through the relay; Data.stat polled back to back until complete;
#   writes going on; the dom0 dp deactivated and detached; the guest
#   stopped after a last burst; Datapath.deactivate (twice, as xapi does)
#   drains the mirror; the destination deactivates and detaches the leaf;
#   qemu-img compare of source and leaf.
set -eu
PYTHON=${PYTHON:-python3}
top=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
relay_pid= guest_pid=
src_state="$work/source-host" dst_state="$work/destination-host"
cleanup() {
    [ -n "$guest_pid" ] && kill "$guest_pid" 2>/dev/null && wait "$guest_pid" 2>/dev/null
    [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null && wait "$relay_pid" 2>/dev/null
    # Detach is idempotent and never fails: it releases the block device and stops the storage daemon.
    [ -n "${uri:-}" ] && src Datapath.detach "$uri" 5 >/dev/null 2>&1
    [ -n "${leaf_uri:-}" ] && dst Datapath.detach "$leaf_uri" MIR3fa9c1 >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
export TASK_SYSLOG=0
call() { "$PYTHON" "$top/bin/$1" --json; }
# src|dst METHOD URI DOMAIN: a Datapath call on one host.
src() { printf '{"dbg":"demo","uri":"%s","domain":"%s"}' "$2" "$3" | TASK_STATE_DIR=$src_state call "$1"; }
dst() { printf '{"dbg":"demo","uri":"%s","domain":"%s"}' "$2" "$3" | TASK_STATE_DIR=$dst_state call "$1"; }
on_src() { TASK_STATE_DIR=$src_state call "$1"; }
field() { "$PYTHON" -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1:]: v=v[int(k)] if isinstance(v, list) else v.get(k)  # a failed status has no progress
print(v)' "$@"; }
now() { "$PYTHON" -c 'import time; print(time.monotonic())'; }
size=$((512 * 1024 * 1024))

echo "== Plugin.Query (what the toolstack checks before registering the datapath)"
printf '{"dbg":"register"}' | call Plugin.Query

echo "== source host: a 512 MiB raw image with 256 MiB of data"
src_img="$work/disk.raw"
truncate -s $size "$src_img"
for mib in 0 128 256 384; do
    head -c 64M /dev/urandom | dd of="$src_img" bs=1M seek="$mib" conv=notrunc status=none
done
uri="raw+file://$src_img"

echo "== destination host: a new qcow2 leaf, Datapath.attach + activate for MIR3fa9c1, attach again (get_nbd_server)"
leaf="$work/leaf.qcow2"
qemu-img create -q -f qcow2 "$leaf" $size
leaf_uri="qcow2+file://$leaf"
leaf_answer=$(dst Datapath.attach "$leaf_uri" MIR3fa9c1)
dst Datapath.activate "$leaf_uri" MIR3fa9c1 >/dev/null
[ "$(dst Datapath.attach "$leaf_uri" MIR3fa9c1)" = "$leaf_answer" ]
leaf_nbd=$(echo "$leaf_answer" | field implementations 2 1 uri)
echo "the leaf's Nbd: $leaf_nbd"
leaf_sock=$(echo "$leaf_nbd" | cut -d: -f3) leaf_export=$(echo "$leaf_nbd" | cut -d: -f4 | sed 's/^exportname=//')

echo "== the toolstack's relay between the hosts: accepts ONE connection into the leaf's socket"
"$PYTHON" "$top/tools/accept-once-relay.py" "$work/relay.sock" "$leaf_sock" &
relay_pid=$!
while [ ! -S "$work/relay.sock" ]; do sleep 0.05; done

echo "== source host: Datapath.attach + Datapath.activate for guest domain 5"
answer=$(src Datapath.attach "$uri" 5)
echo "$answer"
src Datapath.activate "$uri" 5 >/dev/null
device=$(echo "$answer" | field implementations 1 1 path)

echo "== the guest writes random blocks through $device (O_DIRECT, as blkback)"
"$PYTHON" "$top/tools/guest-writer.py" "$device" $size "$work/writes" > "$work/guest.out" &
guest_pid=$!
writes() { cat "$work/writes" 2>/dev/null || echo 0; }
while [ "$(writes)" -lt 50 ]; do sleep 0.05; done

echo "== the dom0 mirror dp: Datapath.attach for u0_mirror_vbd_5_xvda (not activated)"
src Datapath.attach "$uri" u0_mirror_vbd_5_xvda >/dev/null

echo "== Data.mirror (domain 5, remote nbd+unix:///$leaf_export?socket=<relay>)"
began=$(now)
op=$(printf '{"dbg":"demo","uri":"%s","domain":"5","remote":"nbd+unix:///%s?socket=%s"}' "$uri" "$leaf_export" "$work/relay.sock" | on_src Data.mirror)
echo "$op"

echo "== Data.stat, back to back with no sleep, until complete"
polls=0 last=
while :; do
    status=$(printf '{"dbg":"demo","operation":%s}' "$op" | on_src Data.stat)
    polls=$((polls + 1))
    progress=$(echo "$status" | field progress)
    if [ "$progress" != "$last" ]; then echo "  poll $polls: $status"; last=$progress; fi
    case "$status" in
        *'"complete": true'*) break ;;
        *'"failed": true'*) echo "mirror failed" >&2; exit 1 ;;
    esac
done
echo "complete after $polls polls, $("$PYTHON" -c "print('%.2f' % ($(now) - $began))")s; the guest has written $(writes) blocks"

echo "== writes go on while the mirror keeps the leaf in step"
mark=$(writes); while [ "$(writes)" -lt $((mark + 200)) ]; do sleep 0.05; done
echo "the guest has written $(writes) blocks"

echo "== the dom0 mirror dp goes: Datapath.deactivate + Datapath.detach u0_mirror_vbd_5_xvda"
src Datapath.deactivate "$uri" u0_mirror_vbd_5_xvda >/dev/null
src Datapath.detach "$uri" u0_mirror_vbd_5_xvda >/dev/null
printf '{"dbg":"demo","operation":%s}' "$op" | on_src Data.stat

echo "== the guest's last burst, then it is suspended"
kill "$guest_pid"; wait "$guest_pid"; guest_pid=
"$PYTHON" - "$device" <<'EOF'
import mmap, os, sys
buf, fd = mmap.mmap(-1, 1 << 20), os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT)
for i in range(64):
    buf[:] = os.urandom(1 << 20)
    os.pwrite(fd, buf, (i * 37 % 512) << 20)
os.close(fd)
EOF
echo "the guest wrote $(cat "$work/guest.out") blocks and a 64 MiB burst, every write acknowledged"

echo "== Datapath.deactivate for domain 5 (VBD.deactivate, then DP.destroy's): drains the mirror"
t0=$(now)
src Datapath.deactivate "$uri" 5
echo "deactivate took $("$PYTHON" -c "print('%.3f' % ($(now) - $t0))")s"
src Datapath.deactivate "$uri" 5
printf '{"dbg":"demo","id":"%s"}' "$(echo "$op" | field 1)" | on_src Task.stat
wait "$relay_pid" 2>/dev/null || true; relay_pid=   # the relay ends once the mirror's one connection has gone

echo "== destination host: Datapath.deactivate + Datapath.detach MIR3fa9c1"
dst Datapath.deactivate "$leaf_uri" MIR3fa9c1
dst Datapath.detach "$leaf_uri" MIR3fa9c1

echo "== verify: the leaf holds exactly the source's bytes"
qemu-img compare -q -f raw -F qcow2 "$src_img" "$leaf" && echo "identical"

echo "== source host: Datapath.detach for domain 5: the block device goes, the storage daemon stops"
src Datapath.detach "$uri" 5
