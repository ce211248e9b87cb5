#!/usr/bin/env bash
# Benchmark: `shimcheck ports` against ss, netstat and lsof on the same socket population.
#
#   benches/ports.sh [--sizes 10000,60000,120000,1000000] [--runs N]
#
# Run as root from the repository root. For each size S it builds, in a network namespace of
# its own, S ESTABLISHED sockets (S/2 loopback connections spread over several server and
# client processes, none holding more than its fd hard limit, each server's clients from a
# loopback source address of their own) plus 300 idle processes holding 100 open files each,
# then times every command with hyperfine inside that namespace and prints wall times, the
# ratios the issue sets targets for, shimcheck's peak RSS (table and `--by pair -o json`), its
# time per 1,000 sockets, and the CPU of a watch sample after the first, once with nothing
# moving and once with benches/churn.py opening 4 and closing 2 connections every 100 ms, each
# in the population's namespace alone and with --all-netns (each CPU figure the median of three
# readings).
# `shimcheck ports` takes the BPF fd walk where it can (as root on 5.8+ with BTF); the
# `--no-bpf` row is the /proc walk on the same population.
# From 500,000 sockets up the slow anchors (ss -p, netstat -p, lsof) are left out: they take
# minutes there. SHIMCHECK=/path/to/binary skips the release build.
set -euo pipefail

sizes=10000,60000,120000
runs=5
while [ $# -gt 0 ]; do
  case "$1" in
    --sizes) sizes=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "usage: $0 [--sizes 10000,60000,120000,1000000] [--runs N]" >&2; exit 2 ;;
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
  "shimcheck ports --no-bpf|$SHIMCHECK ports --no-bpf|"
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
    if [ "$size" -ge 500000 ] && [ -n "$n" ]; then continue; fi
    "${in_ns[@]}" hyperfine --style none -i --warmup 1 --runs "${n:-$runs}" --output null \
      --export-json "$out/$size.$(tr -c 'a-z0-9' _ <<<"$label").json" -n "$label" "$cmd" >/dev/null
  done
  # Exit status 1 means findings, not failure (the churn below leaves CLOSE_WAIT sockets).
  findings_ok() { "$@" || [ $? -eq 1 ]; }
  findings_ok "${in_ns[@]}" /usr/bin/time -f %M "$SHIMCHECK" ports 2>"$out/$size.rss" >/dev/null
  findings_ok "${in_ns[@]}" /usr/bin/time -f "%e %M" "$SHIMCHECK" ports --by pair -o json \
    2>"$out/$size.json" >/dev/null
  # CPU readings have /usr/bin/time's 10 ms resolution and this machine's noise: each is
  # taken three times and the median printed.
  for rep in 1 2 3; do
    findings_ok "${in_ns[@]}" /usr/bin/time -f "%U %S" "$SHIMCHECK" ports 2>"$out/$size.oneshot.$rep" >/dev/null
  done
  # Watch mode: CPU (user+sys) of 1 sample against 11; the difference over 10 is the cost of
  # a sample after the first, compared with a one-shot run's CPU. First with nothing moving,
  # then with connections opening and closing all along.
  # The same with --all-netns (the DaemonSet's way), which also sweeps every other namespace.
  for rep in 1 2 3; do
    for all in "" --all-netns; do
      for count in 1 11; do
        findings_ok "${in_ns[@]}" /usr/bin/time -f "%U %S" "$SHIMCHECK" ports $all --watch \
          --interval 200ms --count "$count" 2>"$out/$size.watch$all$count.$rep" >/dev/null
      done
      for count in 1 11; do
        "${in_ns[@]}" python3 benches/churn.py 127.0.0.1:5000 $((count / 4 + 2)) >/dev/null &
        churn=$!
        sleep 0.3
        findings_ok "${in_ns[@]}" /usr/bin/time -f "%U %S" "$SHIMCHECK" ports $all --watch \
          --interval 200ms --count "$count" 2>"$out/$size.churn$all$count.$rep" >/dev/null
        wait "$churn"
      done
    done
  done
  pkill -P "$pop_pid" 2>/dev/null || true
  kill "$pop_pid" 2>/dev/null || true
  wait "$pop_pid" 2>/dev/null || true
  pop_pid=
done

python3 - "$out" "$sizes" <<'PY'
import glob, json, os, statistics, sys
out, sizes = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
per_k = []
for size in sizes:
    medians = {}
    for f in glob.glob(os.path.join(out, f"{size}.*.json")):
        r = json.load(open(f))["results"][0]
        medians[r["command"]] = r["median"]
    rss = int(open(os.path.join(out, f"{size}.rss")).read().splitlines()[-1]) / 1024
    json_wall, json_rss = open(os.path.join(out, f"{size}.json")).read().splitlines()[-1].split()
    shim = medians["shimcheck ports"]
    print(f"\n{size} ESTABLISHED sockets (median wall time)")
    for label, median in sorted(medians.items(), key=lambda kv: kv[1]):
        print(f"  {label:<28} {median * 1000:9.1f} ms")
    target = "1.5 at 1M" if size >= 500000 else "1.2"
    print(f"  shimcheck / ss -tan          {shim / medians['ss -tan state established']:9.2f} x   (target <= {target}; <= 1.0 on the BPF path)")
    if "shimcheck ports --no-bpf" in medians:
        print(f"  --no-bpf (/proc) / ss -tan   {medians['shimcheck ports --no-bpf'] / medians['ss -tan state established']:9.2f} x")
    for label, name in (("ss -tanp", "ss -tanp state established"), ("netstat -anp", "netstat -anp"),
                        ("lsof -nPi", "lsof -nPi")):
        if name in medians:
            print(f"  shimcheck / {label:<16} {shim / medians[name]:9.3f} x")
    print(f"  shimcheck peak RSS, table    {rss:9.1f} MiB (target <= 64 at 120k, 160 at 1M)")
    print(f"  --by pair -o json            {float(json_wall) * 1000:9.1f} ms, {int(json_rss) / 1024:.1f} MiB peak RSS")
    # /usr/bin/time writes its line last, after anything shimcheck said on stderr.
    cpu = lambda name: sum(map(float, open(os.path.join(out, f"{size}.{name}")).read().splitlines()[-1].split()))
    one = statistics.median(cpu(f"oneshot.{rep}") for rep in (1, 2, 3))
    print(f"  one-shot CPU                 {one * 1000:9.1f} ms (median of 3)")
    for all in ("", "--all-netns"):
        for kind, label, goal in (("watch", "nothing moving", "0.01"), ("churn", "churning", "0.10")):
            per = statistics.median((cpu(f"{kind}{all}11.{rep}") - cpu(f"{kind}{all}1.{rep}")) / 10
                                    for rep in (1, 2, 3))
            what = f"{label}{', ' + all if all else ''}"
            print(f"  later watch sample, {what:<27} {per * 1000:7.1f} ms CPU = {per / one:.3f} x one-shot (target <= {goal})")
    per_k.append((size, shim * 1000 / (size / 1000)))
print("\nshimcheck time per 1,000 sockets, overall and between sizes (flat marginal = linear):")
prev = None
for size, ms in per_k:
    total = ms * size / 1000
    marginal = "" if prev is None else f", marginal {(total - prev[1]) / ((size - prev[0]) / 1000):.2f} ms"
    print(f"  {size:>7}: {ms:6.2f} ms{marginal}")
    prev = (size, total)
PY
