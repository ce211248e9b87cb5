"""Socket population for shimcheck's live tests and benchmark.

Run inside a network namespace the caller made:

    unshare -n python3 tests/support/population.py SPEC

SPEC is a JSON object (a literal starting with "{" or a file path):

    {"servers": [{"name": "registry", "addr": "127.0.0.1", "port": 5000,
                  "workers": 1, "close_accepted": false}],
     "clients": [{"name": "image-cri-shim", "connect": "127.0.0.1:5000",
                  "count": 40, "procs": 1}],
     "idle": {"procs": 0, "files": 100},
     "port_range": "10000 65535"}

Servers: a listening socket shared by `workers` forked processes named `name` that accept
and hold every connection (or close each at once with `close_accepted`, leaving the client
in CLOSE_WAIT). Clients: `procs` processes named `name` holding `count` connections between
them. Idle: processes named "idle-holder" holding `files` open fds each.

When every connection is established it prints one line, `READY {"pids": {name: [pid...]},
"netns_pid": PID, "connections": {name: n}}`, then waits; when stdin closes (or on
SIGTERM) it kills its children and exits 0. Only loopback addresses are accepted.
"""

import ctypes
import ipaddress
import json
import os
import resource
import signal
import socket
import subprocess
import sys

LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
HEADROOM = 64  # fds a process keeps free for itself


def fail(msg):
    """Print an error and exit 2 (the caller's test reports it)."""
    print(f"population.py: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def loopback(addr):
    """Refuse anything that is not a loopback address: tests never send traffic elsewhere."""
    if not ipaddress.ip_address(addr).is_loopback:
        fail(f"{addr} is not a loopback address")
    return addr


def parse_endpoint(text):
    """'127.0.0.1:5000' or '[::1]:8443' -> (family, addr, port)."""
    if text.startswith("["):
        addr, port = text[1:].split("]:")
    else:
        addr, port = text.rsplit(":", 1)
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    return family, loopback(addr), int(port)


def become(name):
    """In a fresh child: take the process name, die with the parent, and drop the parent's
    signal handlers (SIGTERM must end the child, not run the parent's teardown)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    raw = name.encode("utf-8")[:15]
    LIBC.prctl(PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def fork_child(name, body):
    """Fork a child named `name` running body(); returns its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            become(name)
            body()
        except BaseException as exc:  # report, never fall back into the parent's code
            print(f"population.py: {name}: {exc}", file=sys.stderr, flush=True)
            os._exit(2)
        os._exit(0)
    return pid


def fd_budget():
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1] - HEADROOM


def hold_forever(keep):
    del keep  # referenced by the caller's frame; just sleep
    while True:
        signal.pause()


def start_server(spec, kids, pids):
    family = socket.AF_INET6 if ":" in spec["addr"] else socket.AF_INET
    lsock = socket.socket(family, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((loopback(spec["addr"]), spec["port"]))
    lsock.listen(65535)
    close = spec.get("close_accepted", False)

    def worker():
        keep = []
        limit = fd_budget()
        while len(keep) < limit:
            conn, _ = lsock.accept()
            if close:
                conn.close()
            else:
                keep.append(conn)
        hold_forever(keep)

    for _ in range(spec.get("workers", 1)):
        pid = fork_child(spec["name"], worker)
        kids.append(pid)
        pids.setdefault(spec["name"], []).append(pid)
    lsock.close()


def start_clients(spec, kids, pids):
    family, addr, port = parse_endpoint(spec["connect"])
    procs = spec.get("procs", 1)
    total = spec["count"]
    share = -(-total // procs)
    if share > fd_budget():
        fail(f"{spec['name']}: {share} connections per process exceed the fd limit; raise procs")
    done = []
    for i in range(procs):
        n = min(share, total - i * share)
        r, w = os.pipe()

        def client(n=n, r=r, w=w):
            os.close(r)
            keep = []
            for _ in range(n):
                s = socket.socket(family, socket.SOCK_STREAM)
                s.connect((addr, port))
                keep.append(s)
            os.write(w, b"k")
            os.close(w)
            hold_forever(keep)

        pid = fork_child(spec["name"], client)
        os.close(w)
        kids.append(pid)
        pids.setdefault(spec["name"], []).append(pid)
        done.append((r, pid))
    return done


def start_idle(spec, kids, pids):
    files = spec.get("files", 100)

    def idle():
        keep = [open("/dev/null", "rb") for _ in range(files)]
        hold_forever(keep)

    for _ in range(spec.get("procs", 0)):
        pid = fork_child("idle-holder", idle)
        kids.append(pid)
        pids.setdefault("idle-holder", []).append(pid)


def main():
    if len(sys.argv) != 2:
        fail("usage: population.py SPEC_JSON_OR_FILE")
    arg = sys.argv[1]
    spec = json.loads(arg if arg.lstrip().startswith("{") else open(arg).read())
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    if "port_range" in spec:
        with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
            f.write(spec["port_range"])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    kids, pids = [], {}

    def stop(*_):
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in kids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for server in spec.get("servers", []):
            start_server(server, kids, pids)
        connections = {}
        waits = []
        for client in spec.get("clients", []):
            waits += start_clients(client, kids, pids)
            connections[client["name"]] = connections.get(client["name"], 0) + client["count"]
        start_idle(spec.get("idle", {}), kids, pids)
        for r, pid in waits:
            if os.read(r, 1) != b"k":
                fail(f"client process {pid} failed to connect")
            os.close(r)
        wait_accepted(spec)
    except SystemExit:
        stop()
        raise
    except Exception as exc:
        print(f"population.py: {exc}", file=sys.stderr, flush=True)
        for pid in kids:
            os.kill(pid, signal.SIGKILL)
        sys.exit(2)
    ready = {"pids": pids, "netns_pid": os.getpid(), "connections": connections}
    print("READY " + json.dumps(ready), flush=True)
    sys.stdin.read()
    stop()


def wait_accepted(spec):
    """Wait until the kernel's accept queues are drained: every connection the clients made
    is held by a server process, so the population is complete when READY is printed."""
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = subprocess.run(["ss", "-Htln"], capture_output=True, text=True, check=True).stdout
        # For a listener, Recv-Q is the number of connections waiting to be accepted.
        if all(line.split()[1] == "0" for line in out.splitlines() if line.strip()):
            return
        time.sleep(0.05)
    fail("servers did not accept every connection within 60 s")


if __name__ == "__main__":
    main()
