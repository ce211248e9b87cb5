"""A socket population that keeps moving, for the benchmarks' "later sample, something
changed" figure: every PERIOD_MS it opens OPEN connections to ADDR:PORT and keeps them (a leak)
and closes the CLOSE oldest of those it opened (churn), for SECONDS; the server holds its end.

    python3 benches/churn.py ADDR:PORT SECONDS [PERIOD_MS OPEN CLOSE]

Run it inside the benchmark's network namespace (`nsenter -t PID -n`), against one of the
population's servers. Only loopback addresses are accepted. It prints the number of
connections it holds at the end on stdout.
"""
import ipaddress
import socket
import sys
import time

addr, port = sys.argv[1].rsplit(":", 1)
if not ipaddress.ip_address(addr).is_loopback:
    sys.exit(f"churn.py: {addr} is not a loopback address")
seconds = float(sys.argv[2])
period, opens, closes = (float(sys.argv[3]) / 1000, int(sys.argv[4]), int(sys.argv[5])) \
    if len(sys.argv) > 5 else (0.1, 4, 2)
held = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(opens):
        held.append(socket.create_connection((addr, int(port))))
    for s in held[:closes]:
        s.close()
    del held[:closes]
    time.sleep(period)
print(len(held))
