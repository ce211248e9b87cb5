"""The benchmarks' socket population as a population.py spec: S ESTABLISHED sockets (S/2
loopback connections over several server and client processes, none holding more than its fd
hard limit, the clients of each server port from a loopback source address of their own, so
that a million sockets do not share one address's ephemeral ports) plus 300 idle processes
holding 100 open files each.

    python3 benches/spec.py SOCKETS FD_HARD_LIMIT
"""
import json
import math
import sys

sockets, hard = int(sys.argv[1]), int(sys.argv[2])
conns, budget, per_port = sockets // 2, hard - 64, 20000  # per_port: well inside the port range
servers, clients = [], []
for i in range(math.ceil(conns / per_port)):
    n = min(per_port, conns - i * per_port)
    procs = math.ceil(n / budget)
    servers.append({"name": "server", "addr": "127.0.0.1", "port": 5000 + i, "workers": procs})
    clients.append({"name": "client", "connect": f"127.0.0.1:{5000 + i}", "count": n, "procs": procs,
                    "source": f"127.0.1.{1 + i}"})
print(json.dumps({"servers": servers, "clients": clients, "idle": {"procs": 300, "files": 100},
                  "port_range": "10000 65535"}))
