#!/usr/bin/env bash
# Benchmark: the pure stages' own cost (examples/stage_cost.rs: peer match, join, grouping,
# the detector's digest and history), on two snapshots taken a second apart of a population
# of S ESTABLISHED sockets in a network namespace of its own, with benches/churn.py moving
# connections between them. No kernel, no /proc: what a later watch sample spends after its
# sockets and owners are known.
#
#   benches/stages.sh [--sockets 120000] [--rounds 30]
#
# Run as root from the repository root. Prints each stage's median time, three times.
set -euo pipefail

sockets=120000
rounds=30
while [ $# -gt 0 ]; do
  case "$1" in
    --sockets) sockets=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    *) echo "usage: $0 [--sockets N] [--rounds N]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "run as root: the benchmark makes a network namespace" >&2; exit 2; }

cargo build --release --quiet --bin shimcheck --example stage_cost
shimcheck=$PWD/target/release/shimcheck
bin=$PWD/target/release/examples/stage_cost
snaps=$(mktemp -d)

. benches/population.sh
trap 'stop_population; rm -rf "$snaps"' EXIT INT TERM
start_population "$sockets"
in_ns=(nsenter -t "$ns_pid" -n)
"${in_ns[@]}" python3 benches/churn.py 127.0.0.1:5000 3 >/dev/null &
churn=$!
"${in_ns[@]}" "$shimcheck" snapshot -o "$snaps/a.json"
sleep 1
"${in_ns[@]}" "$shimcheck" snapshot -o "$snaps/b.json"
wait "$churn"
for _ in 1 2 3; do
  "$bin" "$snaps/a.json" "$snaps/b.json" --rounds "$rounds"
done
