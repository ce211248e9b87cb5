#!/usr/bin/env bash
# Benchmark: the cost of `shimcheck ports --all-netns` per network namespace, against the
# kernel's own cost (a bare sock_diag dump per namespace, examples/bare_dump.rs).
#
#   benches/netns.sh [--sockets 120000] [--extra 1,10,100] [--runs 3] [--filled]
#
# Run as root from the repository root. Builds the issue-2 population (S ESTABLISHED loopback
# sockets, 300 idle processes) in a namespace of its own, then adds N empty `ip netns`
# namespaces and times both tools from the host namespace: wall time, and CPU (user+sys). Every
# per-namespace dump walks the kernel's shared socket table, so even an empty namespace costs
# the bare dump something; shimcheck reads an empty namespace's TCP counters instead and does
# not dump it. CPU above wall time means both cores were used. With --filled, each extra
# namespace holds a listener and 5 connections to it (a process of its own, on loopback), so
# shimcheck dumps it like the kernel's bare dump does: what it costs above that dump is
# shimcheck's own per-namespace work (entering, decoding, owners, grouping).
set -euo pipefail

sockets=120000
extras=1,10,100
runs=3
filled=0
while [ $# -gt 0 ]; do
  case "$1" in
    --filled) filled=1; shift ;;
    --sockets) sockets=$2; shift 2 ;;
    --extra) extras=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "usage: $0 [--sockets N] [--extra 1,10,100] [--runs N] [--filled]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "run as root: the benchmark makes network namespaces" >&2; exit 2; }

cargo build --release --quiet --bin shimcheck --example bare_dump
shim=$PWD/target/release/shimcheck
bare=$PWD/target/release/examples/bare_dump

. benches/population.sh
made=()
cleanup() {
  for ns in "${made[@]}"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  stop_population
}
trap cleanup EXIT INT TERM
start_population "$sockets"

measure() { # label command...: median "wall cpu" (seconds) of $runs runs, CPU from getrusage
  local label=$1; shift
  python3 - "$label" "$runs" "$@" <<'PY'
import resource, statistics, subprocess, sys, time
label, runs, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # warm-up
walls, cpus = [], []
for _ in range(runs):
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    r1, t1 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    walls.append(t1 - t0)
    cpus.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
print(label, statistics.median(walls), statistics.median(cpus))
PY
}

results=()
IFS=, read -r -a extra_list <<<"0,$extras"
have=0
for n in "${extra_list[@]}"; do
  while [ "$have" -lt "$n" ]; do
    have=$((have + 1)); ip netns add "shimbench-$have"; made+=("shimbench-$have")
    if [ "$filled" = 1 ]; then
      ip -n "shimbench-$have" link set lo up
      # A listener and 5 connections to it, held until the namespace is deleted.
      ip netns exec "shimbench-$have" python3 -c '
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 7000)); s.listen(16)
held = [socket.create_connection(("127.0.0.1", 7000)) for _ in range(5)]
held += [s.accept()[0] for _ in range(5)]
print("ready", flush=True)
time.sleep(86400)' | head -1 >/dev/null &
    fi
  done
  # Each filled namespace's process is ready (its 11 sockets made) before anything is timed.
  if [ "$filled" = 1 ]; then
    for ns in "${made[@]}"; do
      until [ "$(ip netns exec "$ns" ss -Htan | wc -l)" -ge 11 ]; do sleep 0.1; done
    done
  fi
  # The namespaces shimcheck will find: every distinct one among processes, plus ip netns.
  paths=(/proc/self/ns/net "/proc/$ns_pid/ns/net")
  for ns in "${made[@]}"; do paths+=("/run/netns/$ns"); done
  results+=("$n $(measure shim "$shim" ports --all-netns | cut -d' ' -f2-) $(measure bare "$bare" "${paths[@]}" | cut -d' ' -f2-)")
done

python3 - "$filled" "${results[@]}" <<'PY'
import sys
filled = sys.argv[1] == "1"
rows = [list(map(float, r.split())) for r in sys.argv[2:]]
print(f"{'extra ns':>8} {'shimcheck wall':>15} {'cpu':>8} {'bare dumps wall':>16} {'cpu':>8}")
for n, sw, sc, bw, bc in rows:
    print(f"{int(n):>8} {sw*1000:>13.1f}ms {sc*1000:>6.0f}ms {bw*1000:>14.1f}ms {bc*1000:>6.0f}ms")
base = rows[0]
print("\nper extra namespace (against 0 extra):")
for n, sw, sc, bw, bc in rows[1:]:
    shim_cpu = (sc - base[2]) / n * 1000
    bare_cpu = (bc - base[4]) / n * 1000
    if filled:
        print(f"  {int(n):>3} extra: shimcheck {shim_cpu:6.2f} ms CPU, wall "
              f"{(sw - base[1]) / n * 1000:6.2f} ms; the kernel's own dump of it {bare_cpu:6.2f} ms "
              f"CPU; shimcheck above it {shim_cpu - bare_cpu:6.2f} ms (target <= 1 ms)")
    else:
        print(f"  {int(n):>3} extra: shimcheck {shim_cpu:6.2f} ms CPU (target < 1 ms for an empty "
              f"namespace), wall {(sw - base[1]) / n * 1000:6.2f} ms; the kernel's own dump of it "
              f"{bare_cpu:6.2f} ms CPU")
PY
