#!/usr/bin/env bash
# Benchmark: the cost of `shimcheck ports --all-netns` per network namespace, against the
# kernel's own cost (a bare sock_diag dump per namespace, examples/bare_dump.rs).
#
#   benches/netns.sh [--sockets 120000] [--extra 1,10,100] [--runs 3]
#
# Run as root from the repository root. Builds the issue-2 population (S ESTABLISHED loopback
# sockets, 300 idle processes) in a namespace of its own, then adds N empty `ip netns`
# namespaces and times both tools from the host namespace: wall time, and CPU (user+sys). Every
# per-namespace dump walks the kernel's shared socket table, so even an empty namespace costs
# the bare dump something; shimcheck reads an empty namespace's TCP counters instead and does
# not dump it. CPU above wall time means both cores were used.
set -euo pipefail

sockets=120000
extras=1,10,100
runs=3
while [ $# -gt 0 ]; do
  case "$1" in
    --sockets) sockets=$2; shift 2 ;;
    --extra) extras=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "usage: $0 [--sockets N] [--extra 1,10,100] [--runs N]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "run as root: the benchmark makes network namespaces" >&2; exit 2; }

cargo build --release --quiet --bin shimcheck --example bare_dump
shim=$PWD/target/release/shimcheck
bare=$PWD/target/release/examples/bare_dump

. benches/population.sh
made=()
cleanup() {
  for ns in "${made[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
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
  done
  # The namespaces shimcheck will find: every distinct one among processes, plus ip netns.
  paths=(/proc/self/ns/net "/proc/$ns_pid/ns/net")
  for ns in "${made[@]}"; do paths+=("/run/netns/$ns"); done
  results+=("$n $(measure shim "$shim" ports --all-netns | cut -d' ' -f2-) $(measure bare "$bare" "${paths[@]}" | cut -d' ' -f2-)")
done

python3 - "${results[@]}" <<'PY'
import sys
rows = [list(map(float, r.split())) for r in sys.argv[1:]]
print(f"{'extra ns':>8} {'shimcheck wall':>15} {'cpu':>8} {'bare dumps wall':>16} {'cpu':>8}")
for n, sw, sc, bw, bc in rows:
    print(f"{int(n):>8} {sw*1000:>13.1f}ms {sc*1000:>6.0f}ms {bw*1000:>14.1f}ms {bc*1000:>6.0f}ms")
base = rows[0]
print("\nper extra namespace (against 0 extra):")
for n, sw, sc, bw, bc in rows[1:]:
    shim_cpu = (sc - base[2]) / n * 1000
    bare_cpu = (bc - base[4]) / n * 1000
    print(f"  {int(n):>3} extra: shimcheck {shim_cpu:6.2f} ms CPU (target < 1 ms for an empty "
          f"namespace), wall {(sw - base[1]) / n * 1000:6.2f} ms; the kernel's own dump of it "
          f"{bare_cpu:6.2f} ms CPU")
PY
