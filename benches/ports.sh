#!/usr/bin/env bash
# Benchmark: `shimcheck ports` against ss, netstat and lsof on the same socket population.
#
#   benches/ports.sh [--sizes 10000,60000,120000] [--runs N]
#
# Run as root from the repository root. For each size S it builds, in a network namespace of
# its own, S ESTABLISHED sockets (S/2 loopback connections spread over several server and
# client processes, none holding more than its fd hard limit) plus 300 idle processes holding
# 100 open files each, then times every command with hyperfine inside that namespace and
# prints wall times, the ratios the issue sets targets for, shimcheck's peak RSS and its time
# per 1,000 sockets. SHIMCHECK=/path/to/binary skips the release build.
set -euo pipefail

sizes=10000,60000,120000
runs=5
while [ $# -gt 0 ]; do
  case "$1" in
    --sizes) sizes=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "usage: $0 [--sizes 10000,60000,120000] [--runs N]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "run as root: the benchmark makes network namespaces" >&2; exit 2; }

missing=()
command -v hyperfine >/dev/null || missing+=(hyperfine)
[ -x /usr/bin/time ] || missing+=(time)
command -v ss >/dev/null || missing+=(iproute2)
command -v netstat >/dev/null || missing+=(net-tools)
command -v lsof >/dev/null || missing+=(lsof)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

if [ -z "${SHIMCHECK:-}" ]; then
  cargo build --release --quiet
  SHIMCHECK=$PWD/target/release/shimcheck
fi

out=$(mktemp -d)
pop_pid=
cleanup() {
  if [ -n "$pop_pid" ]; then kill "$pop_pid" 2>/dev/null || true; wait "$pop_pid" 2>/dev/null || true; fi
  rm -rf "$out"
}
trap cleanup EXIT INT TERM

# label|command|runs ("" = --runs). The slow anchors get fewer runs.
commands=(
  "shimcheck ports|$SHIMCHECK ports|"
  "ss -tan state established|ss -tan state established|"
  "ss -tanp state established|ss -tanp state established|3"
  "netstat -anp|netstat -anp|3"
  "lsof -nPi|lsof -nPi|3"
)

spec_for() { # $1: number of ESTABLISHED sockets
  python3 benches/spec.py "$1" "$(ulimit -Hn)"
}

IFS=, read -r -a size_list <<<"$sizes"
for size in "${size_list[@]}"; do
  echo "== $size ESTABLISHED sockets: building the population" >&2
  fifo=$out/ready.$size
  mkfifo "$fifo"
  # stdin from a sleeping pipe: population.py tears down when it is killed or stdin closes.
  (sleep infinity | unshare -n python3 tests/support/population.py "$(spec_for "$size")" >"$fifo") &
  pop_pid=$!
  read -r line <"$fifo"
  case "$line" in READY*) ;; *) echo "population failed: $line" >&2; exit 1 ;; esac
  ns=$(sed 's/.*"netns_pid": \([0-9]*\).*/\1/' <<<"$line")
  in_ns=(nsenter -t "$ns" -n)
  echo "   sockets: $("${in_ns[@]}" ss -Htan state established | wc -l)," \
       "processes: $(ls -d /proc/[0-9]* | wc -l), fds: $(find /proc/[0-9]*/fd -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)" >&2
  for entry in "${commands[@]}"; do
    IFS='|' read -r label cmd n <<<"$entry"
    "${in_ns[@]}" hyperfine --style none --warmup 1 --runs "${n:-$runs}" --output null \
      --export-json "$out/$size.$(tr -c 'a-z0-9' _ <<<"$label").json" -n "$label" "$cmd" >/dev/null
  done
  "${in_ns[@]}" /usr/bin/time -f %M "$SHIMCHECK" ports 2>"$out/$size.rss" >/dev/null
  # Watch mode: CPU (user+sys) of 1 sample against 11; the difference over 10 is the cost of
  # a sample after the first, compared with a one-shot run's CPU.
  for count in 1 11; do
    "${in_ns[@]}" /usr/bin/time -f "%U %S" "$SHIMCHECK" ports --watch --interval 200ms --count "$count" \
      2>&1 >/dev/null | tail -1 >"$out/$size.watch$count"
  done
  "${in_ns[@]}" /usr/bin/time -f "%U %S" "$SHIMCHECK" ports 2>&1 >/dev/null | tail -1 >"$out/$size.oneshot"
  pkill -P "$pop_pid" 2>/dev/null || true
  kill "$pop_pid" 2>/dev/null || true
  wait "$pop_pid" 2>/dev/null || true
  pop_pid=
done

python3 - "$out" "$sizes" <<'PY'
import glob, json, os, sys
out, sizes = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
per_k = []
for size in sizes:
    means = {}
    for f in glob.glob(os.path.join(out, f"{size}.*.json")):
        r = json.load(open(f))["results"][0]
        means[r["command"]] = r["mean"]
    rss = int(open(os.path.join(out, f"{size}.rss")).read().split()[-1]) / 1024
    shim = means["shimcheck ports"]
    print(f"\n{size} ESTABLISHED sockets (mean wall time)")
    for label, mean in sorted(means.items(), key=lambda kv: kv[1]):
        print(f"  {label:<28} {mean * 1000:9.1f} ms")
    print(f"  shimcheck / ss -tan          {shim / means['ss -tan state established']:9.2f} x   (target <= 1.2)")
    print(f"  shimcheck / ss -tanp         {shim / means['ss -tanp state established']:9.3f} x   (target <= 0.1)")
    print(f"  shimcheck / netstat -anp     {shim / means['netstat -anp']:9.3f} x")
    print(f"  shimcheck / lsof -nPi        {shim / means['lsof -nPi']:9.3f} x")
    print(f"  shimcheck peak RSS           {rss:9.1f} MiB (target <= 64)")
    cpu = lambda name: sum(map(float, open(os.path.join(out, f"{size}.{name}")).read().split()))
    one, w1, w11 = cpu("oneshot"), cpu("watch1"), cpu("watch11")
    per = (w11 - w1) / 10
    print(f"  one-shot CPU                 {one * 1000:9.1f} ms")
    print(f"  watch CPU per later sample   {per * 1000:9.1f} ms = {per / one:.2f} x one-shot (target <= 0.10)")
    per_k.append((size, shim * 1000 / (size / 1000)))
print("\nshimcheck time per 1,000 sockets, overall and between sizes (flat marginal = linear):")
prev = None
for size, ms in per_k:
    total = ms * size / 1000
    marginal = "" if prev is None else f", marginal {(total - prev[1]) / ((size - prev[0]) / 1000):.2f} ms"
    print(f"  {size:>7}: {ms:6.2f} ms{marginal}")
    prev = (size, total)
PY
