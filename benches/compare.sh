#!/usr/bin/env bash
# GrapeVine beside LCM and ZeroMQ on the same payloads, in one table.
#
#   sudo benches/compare.sh [PAYLOAD] [SECONDS]
#
# Needs root (a private network namespace), gcc, Debian's liblcm-dev and libzmq3-dev. Everything
# runs inside `unshare -n` whose only interface is loopback, so no packet can leave the machine
# (LCM sends multicast on the default route's interface and has no option to choose it).
set -euo pipefail
payload=${1:-64}
seconds=${2:-5}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for header in /usr/include/lcm/lcm.h /usr/include/zmq.h; do
  [ -f "$header" ] || { echo "missing $header: apt-get install liblcm-dev libzmq3-dev" >&2; exit 2; }
done
gcc -O2 -o "$work/lcm_peer" "$here/peers/lcm_peer.c" -llcm -lpthread
gcc -O2 -o "$work/zmq_peer" "$here/peers/zmq_peer.c" -lzmq -lpthread
(cd "$root" && cargo build --release --quiet)
grapevine="$root/target/release/grapevine"

run_isolated() {
  unshare -n sh -c 'ip link set lo up && ip link set lo multicast on && ip route add 224.0.0.0/4 dev lo && exec "$@"' sh "$@"
}

echo "payload $payload B, $seconds s per run, loopback only (private network namespace)" >&2
gv_closed=$(run_isolated "$grapevine" bench throughput --payload "$payload" --seconds "$seconds" --json 2>/dev/null)
gv_open=$(run_isolated "$grapevine" bench throughput --payload "$payload" --seconds "$seconds" --window 0 --json 2>/dev/null)
lcm=$(run_isolated "$work/lcm_peer" "$payload" "$seconds")
zmq=$(run_isolated "$work/zmq_peer" tcp://127.0.0.1:47790 "$payload" "$seconds" 1000)
zmq_unbounded=$(run_isolated "$work/zmq_peer" tcp://127.0.0.1:47791 "$payload" "$seconds" 0)

python3 - "$payload" "$gv_closed" "$gv_open" "$lcm" "$zmq" "$zmq_unbounded" <<'PY'
import json, sys
payload = int(sys.argv[1])
closed, opened = json.loads(sys.argv[2]), json.loads(sys.argv[3])
def peer(line):
    f = dict(kv.split("=") for kv in line.split()[1:] if "=" in kv)
    sent, received, seconds = int(f["sent"]), int(f["received"]), float(f["seconds"])
    return received / seconds, 1 - received / max(sent, 1)
rows = [
    ("grapevine, flow-controlled", closed["grapevine"]["messages_per_second"], closed["grapevine"]["loss"], "counted, recovered"),
    ("raw udp, same packing", closed["raw"]["messages_per_second"], closed["raw"]["loss"], "counted (kernel)"),
    ("grapevine, open loop", opened["grapevine"]["messages_per_second"], opened["grapevine"]["loss"], "counted, recovered"),
    ("raw udp, open loop", opened["raw"]["messages_per_second"], opened["raw"]["loss"], "counted (kernel)"),
    ("lcm (udpm multicast)", *peer(sys.argv[4]), "silent"),
    ("zeromq pub/sub (tcp), HWM 1000", *peer(sys.argv[5]), "silent (HWM)"),
    ("zeromq pub/sub (tcp), no HWM", *peer(sys.argv[6]), "none (queues grow)"),
]
print(f"{'stack':<32} {'msgs/s':>12} {'MB/s':>8} {'loss':>7}  lost messages")
for name, rate, loss, how in rows:
    print(f"{name:<32} {rate:>12,.0f} {rate * payload / 1e6:>8.1f} {loss * 100:>6.1f}%  {how}")
unbounded = peer(sys.argv[6])[0]
print(f"grapevine (flow-controlled) / zeromq (no HWM): {closed['grapevine']['messages_per_second'] / max(unbounded, 1):.2f}")
PY
