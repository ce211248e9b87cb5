#!/usr/bin/env bash
# Benchmark: the sock_diag decoder's own cost per socket (examples/decode_cost.rs), on a dump
# recorded once from a population of S ESTABLISHED sockets in a network namespace of its own.
#
#   benches/decode.sh [--sockets 120000] [--rounds 10]
#
# Run as root from the repository root. Prints the decoder's time per socket, three times.
set -euo pipefail

sockets=120000
rounds=10
while [ $# -gt 0 ]; do
  case "$1" in
    --sockets) sockets=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    *) echo "usage: $0 [--sockets N] [--rounds N]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "run as root: the benchmark makes a network namespace" >&2; exit 2; }

cargo build --release --quiet --example decode_cost
bin=$PWD/target/release/examples/decode_cost

. benches/population.sh
trap stop_population EXIT INT TERM
start_population "$sockets"
for _ in 1 2 3; do
  nsenter -t "$ns_pid" -n "$bin" "$rounds"
done
