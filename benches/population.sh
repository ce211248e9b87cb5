# Sourced by the benchmarks: starts the benchmark population of S ESTABLISHED sockets
# (benches/spec.py) in a network namespace of its own, in a process group of its own.
#
#   start_population S   # sets pop_pid (the group to kill) and ns_pid (for nsenter -t)
#   stop_population      # ends the whole group
start_population() {
  local spec fifo line
  spec=$(python3 benches/spec.py "$1" "$(ulimit -Hn)")
  fifo=$(mktemp -u)
  mkfifo "$fifo"
  set -m
  (sleep infinity | unshare -n python3 tests/support/population.py "$spec" >"$fifo") &
  pop_pid=$!
  set +m
  read -r line <"$fifo"
  rm -f "$fifo"
  case "$line" in READY*) ;; *) echo "population failed: $line" >&2; exit 1 ;; esac
  ns_pid=$(sed 's/.*"netns_pid": \([0-9]*\).*/\1/' <<<"$line")
}

stop_population() {
  if [ -n "${pop_pid:-}" ]; then
    kill -- "-$pop_pid" 2>/dev/null || true
    wait "$pop_pid" 2>/dev/null || true
  fi
}
