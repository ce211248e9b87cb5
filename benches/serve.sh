#!/usr/bin/env bash
# Benchmark: `shimcheck serve` as a node agent. For each size it builds the same population as
# benches/ports.sh (S ESTABLISHED loopback sockets plus 300 idle processes with 100 files
# each) in a network namespace of its own, starts `serve --interval 15s` there, and measures:
#   - steady CPU (user+sys from /proc/PID/stat) as a share of one core, over --seconds after
#     the first sample (the owner cache's full rescan every 60 samples is not in that span);
#   - RSS (VmRSS) and peak RSS (VmHWM);
#   - scrape latency of /metrics under 20 concurrent scrapers (wrk, 10 s, inside the namespace);
#   - the CPU of one later sample (`serve --interval 1s`, all its threads' run time from
#     /proc/PID/task/*/schedstat over the samples /metrics counts), once with nothing moving
#     and once with benches/churn.py opening 4 and closing 2 connections every 100 ms, as a
#     ratio to the CPU of one one-shot `shimcheck ports` (median of 3) on the same population.
#
#   benches/serve.sh [--sizes 10000,60000,120000] [--seconds 75]
#
# Run as root from the repository root. SHIMCHECK=/path/to/binary skips the release build.
# serve listens on 127.0.0.1:9000 there: the population's clients use ports 10000-65535.
set -euo pipefail

sizes=10000,60000,120000
seconds=75
while [ $# -gt 0 ]; do
  case "$1" in
    --sizes) sizes=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    *) echo "usage: $0 [--sizes 10000,60000,120000] [--seconds 75]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "run as root: the benchmark makes network namespaces" >&2; exit 2; }
command -v wrk >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk; }

if [ -z "${SHIMCHECK:-}" ]; then
  cargo build --release --quiet
  SHIMCHECK=$PWD/target/release/shimcheck
fi

out=$(mktemp -d)
pop_pid=
serve_pid=
cleanup() {
  if [ -n "$serve_pid" ]; then kill "$serve_pid" 2>/dev/null || true; fi
  if [ -n "$pop_pid" ]; then kill "$pop_pid" 2>/dev/null || true; wait "$pop_pid" 2>/dev/null || true; fi
  rm -rf "$out"
}
trap cleanup EXIT INT TERM

ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Run time of every thread of a process, in nanoseconds.
cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{t += $1} END {print t}'; }
samples_taken() {
  "${in_ns[@]}" python3 -c 'import re, urllib.request as u
t = u.urlopen("http://127.0.0.1:9000/metrics").read().decode()
print(re.search(r"^shimcheck_samples_total (\S+)", t, re.M).group(1).split(".")[0])'
}
wait_healthy() {
  local healthz='import urllib.request as u; print(u.urlopen("http://127.0.0.1:9000/healthz").status)'
  until [ "$("${in_ns[@]}" python3 -c "$healthz" 2>/dev/null)" = 200 ]; do
    kill -0 "$serve_pid" 2>/dev/null || { cat "$out/serve.err" >&2; exit 1; }
    sleep 0.5
  done
}
# CPU milliseconds of one later sample of `serve --interval 1s`, over 20 s; with "churn", while
# benches/churn.py moves the population.
sample_ms() {
  "${in_ns[@]}" "$SHIMCHECK" serve --interval 1s --listen 127.0.0.1:9000 2>"$out/serve.err" &
  serve_pid=$!
  wait_healthy
  local churn=
  if [ "$1" = churn ]; then
    "${in_ns[@]}" python3 benches/churn.py 127.0.0.1:5000 30 >/dev/null &
    churn=$!
  fi
  sleep 3
  local n0 c0 n1 c1
  n0=$(samples_taken); c0=$(cpu_ns "$serve_pid")
  sleep 20
  n1=$(samples_taken); c1=$(cpu_ns "$serve_pid")
  if [ -n "$churn" ]; then wait "$churn"; fi
  kill "$serve_pid"; wait "$serve_pid" 2>/dev/null || true; serve_pid=
  python3 -c "print(($c1 - $c0) / 1e6 / max($n1 - $n0, 1))"
}
# CPU milliseconds of one one-shot `shimcheck ports` (median of 3; exit 1 means findings).
oneshot_ms() {
  for _ in 1 2 3; do
    "${in_ns[@]}" /usr/bin/time -f "%U %S" "$SHIMCHECK" ports 2>&1 >/dev/null | tail -1 || true
  done | python3 -c 'import statistics, sys
print(statistics.median((float(u) + float(s)) * 1000 for u, s in (l.split() for l in sys.stdin)))'
}
status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

printf '%-8s %12s %10s %10s %12s %12s %12s\n' sockets "CPU/core" "RSS MiB" "peak MiB" "scrape p50" "scrape p99" "scrapes/s"
IFS=, read -r -a size_list <<<"$sizes"
for size in "${size_list[@]}"; do
  fifo=$out/ready.$size
  mkfifo "$fifo"
  (sleep infinity | unshare -n python3 tests/support/population.py \
      "$(python3 benches/spec.py "$size" "$(ulimit -Hn)")" >"$fifo") &
  pop_pid=$!
  read -r line <"$fifo"
  case "$line" in READY*) ;; *) echo "population failed: $line" >&2; exit 1 ;; esac
  ns=$(sed 's/.*"netns_pid": \([0-9]*\).*/\1/' <<<"$line")
  in_ns=(nsenter -t "$ns" -n)
  "${in_ns[@]}" "$SHIMCHECK" serve --interval 15s --listen 127.0.0.1:9000 2>"$out/serve.err" &
  serve_pid=$!
  # The first sample is the one-shot-sized full scan; wait for it, then measure steady state.
  wait_healthy
  sleep 1
  c0=$(cpu_ticks "$serve_pid"); t0=$(date +%s.%N)
  sleep "$seconds"
  c1=$(cpu_ticks "$serve_pid"); t1=$(date +%s.%N)
  "${in_ns[@]}" wrk -c20 -t2 -d10s --latency http://127.0.0.1:9000/metrics >"$out/wrk.$size"
  rss=$(status_kib "$serve_pid" VmRSS); hwm=$(status_kib "$serve_pid" VmHWM)
  python3 - "$size" "$c0" "$c1" "$t0" "$t1" "$ticks" "$rss" "$hwm" "$out/wrk.$size" <<'PY'
import re, sys
size, c0, c1, t0, t1, ticks, rss, hwm, wrk = sys.argv[1:]
share = (int(c1) - int(c0)) / int(ticks) / (float(t1) - float(t0))
text = open(wrk).read()
def pct(p):
    m = re.search(rf"^\s*{p}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
rate = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
print(f"{size:<8} {share * 100:11.2f}% {int(rss) / 1024:10.1f} {int(hwm) / 1024:10.1f} "
      f"{pct(50):10.2f}ms {pct(99):10.2f}ms {rate:12.0f}")
PY
  kill "$serve_pid"; wait "$serve_pid" 2>/dev/null || true; serve_pid=
  one=$(oneshot_ms); still=$(sample_ms still); moving=$(sample_ms churn)
  python3 - "$size" "$one" "$still" "$moving" <<'PY'
import sys
size, one, still, moving = sys.argv[1], *map(float, sys.argv[2:])
print(f"  {size}: one-shot ports {one:.0f} ms CPU; a later serve sample, nothing moving "
      f"{still:.2f} ms = {still / one:.4f}x (target <= 0.01), churning {moving:.1f} ms = "
      f"{moving / one:.3f}x (target <= 0.10)")
PY
  pkill -P "$pop_pid" 2>/dev/null || true
  kill "$pop_pid" 2>/dev/null || true
  wait "$pop_pid" 2>/dev/null || true
  pop_pid=
done
echo "targets at 120k: scrape p99 <= 10 ms, RSS <= 64 MiB (2-core machine)"
