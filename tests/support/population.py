"""Socket population for shimcheck's live tests and benchmarks.

Run it inside a network namespace the caller made (it changes that namespace's sysctls):

    unshare -n python3 tests/support/population.py SPEC

SPEC is a JSON object: a literal (its first non-blank character is "{") or a file path.

    {"servers": [{"name": "registry", "addr": "127.0.0.1", "port": 5000,
                  "workers": 1, "close_accepted": false}],
     "clients": [{"name": "image-cri-shim", "connect": "127.0.0.1:5000",
                  "count": 40, "procs": 1, "source": "127.0.0.1"}],
     "idle": {"procs": 0, "files": 100},
     "port_range": "1024 65535"}

Every key is optional except a server's name, addr and port and a client's name, connect and
count; the values shown for the others are their defaults (no port_range: the sysctl is kept).

- server: a listening socket on addr:port (IPv4, or IPv6 such as "::1") shared by `workers`
  forked processes named `name`. Each accepts and holds every connection, never reading,
  until it holds its fd hard limit - 64; with `close_accepted` each connection is closed as
  soon as it is accepted, which leaves the client's end in CLOSE_WAIT.
- client: `procs` processes named `name` holding `count` connections to `connect`
  ("127.0.0.1:5000" or "[::1]:8443") between them, split evenly; no data is sent. With
  `source` (a loopback address of the same family), they connect from that address: each
  source address has its own ephemeral ports, which a million connections need.
- idle: `procs` processes named "idle-holder", each holding `files` open fds on /dev/null.
- port_range: written to net.ipv4.ip_local_port_range (refused in the host's namespace).

Names are process names (comm, set with prctl): UTF-8, cut to 15 bytes as the kernel does;
lone surrogates U+DC80..U+DCFF stand for raw bytes 0x80..0xFF. Only loopback addresses
(127.0.0.0/8, ::1) are accepted. Each process keeps 64 fds of its hard limit free.

Protocol: when every client connection is established and (except for close_accepted
servers) accepted by a server process, one line goes to stdout:

    READY {"pids": {"<name>": [pid, ...]}, "netns_pid": PID, "connections": {"<client name>": n}}

Then it waits. When stdin reaches EOF, or on SIGTERM or SIGINT, it kills its children
(SIGKILL), reaps them and exits 0; its children die with it if it dies (PR_SET_PDEATHSIG).
A bad spec or a failed setup step (bind, connect, timeout) prints `population.py: ...` on
stderr, kills the children and exits 2.
"""

import ctypes
import ipaddress
import json
import mmap
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time

LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
HEADROOM = 64  # fds every process keeps free for itself
BACKLOG = 65535  # the kernel caps it at net.core.somaxconn, which setup_namespace raises
SETUP_TIMEOUT_S = 100  # the Rust harness gives up after 120 s
IDLE_NAME = "idle-holder"


class SpecError(Exception):
    """A bad spec or a failed setup step: reported on stderr, exit status 2."""


class Stop(Exception):
    """SIGTERM or SIGINT arrived: tear down and exit 0."""


def get(obj, key, kind, where, default=None):
    """obj[key], checked to be a `kind`; `default` when absent (None: the key is required)."""
    if key not in obj:
        if default is None:
            raise SpecError(f'{where}: "{key}" is missing')
        return default
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SpecError(f'{where}: "{key}" must be a {kind.__name__}, not {value!r}')
    if kind is int and value < 0:
        raise SpecError(f'{where}: "{key}" must not be negative')
    return value


def only_keys(obj, allowed, where):
    """Refuse a non-object or an unknown key (most likely a typo)."""
    if not isinstance(obj, dict):
        raise SpecError(f"{where}: expected a JSON object, not {obj!r}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; expected {sorted(allowed)}")


def loopback(text, where):
    """The ip_address of `text`, refused unless it is loopback: no traffic leaves the host."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise SpecError(f"{where}: {text!r} is not an IP address") from None
    if not addr.is_loopback:
        raise SpecError(f"{where}: {text} is not a loopback address (127.0.0.0/8 or ::1 only)")
    return addr


def endpoint(text, where):
    """'127.0.0.1:5000' or '[::1]:8443' -> (ip_address, port)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise SpecError(f"{where}: write an IPv6 endpoint as [addr]:port, not {text!r}")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise SpecError(f"{where}: {text!r} is not ADDR:PORT")
    return loopback(host, where), int(port)


def comm(name, where):
    """The process name as bytes for prctl: UTF-8 (surrogate escapes = raw bytes), 15 bytes."""
    if not isinstance(name, str) or not name:
        raise SpecError(f'{where}: "name" must be a non-empty string')
    try:
        return name.encode("utf-8", "surrogateescape")[:15]
    except UnicodeEncodeError as exc:
        raise SpecError(f"{where}: name {name!r} cannot be encoded: {exc}") from None


def fd_budget():
    """How many sockets or files one process may hold: its fd hard limit less the headroom."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1] - HEADROOM


def load_spec(arg):
    """Parse and check the whole spec before anything starts; returns normalised dicts."""
    try:
        text = arg if arg.lstrip().startswith("{") else open(arg, encoding="utf-8").read()
        spec = json.loads(text)
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot read the spec {arg[:80]!r}: {exc}") from None
    only_keys(spec, ("servers", "clients", "idle", "port_range"), "spec")
    budget = fd_budget()
    servers, clients = [], []
    for i, s in enumerate(get(spec, "servers", list, "spec", [])):
        where = f"servers[{i}]"
        only_keys(s, ("name", "addr", "port", "workers", "close_accepted"), where)
        port = get(s, "port", int, where)
        if not 0 < port < 65536:
            raise SpecError(f"{where}: port {port} is out of range")
        servers.append({"name": get(s, "name", str, where), "comm": comm(s.get("name"), where),
                        "key": (loopback(get(s, "addr", str, where), where), port),
                        "workers": max(1, get(s, "workers", int, where, 1)),
                        "close": get(s, "close_accepted", bool, where, False), "expected": 0})
    for i, c in enumerate(get(spec, "clients", list, "spec", [])):
        where = f"clients[{i}]"
        only_keys(c, ("name", "connect", "count", "procs", "source"), where)
        count, procs = get(c, "count", int, where), max(1, get(c, "procs", int, where, 1))
        if -(-count // procs) > budget:
            raise SpecError(f"{where}: {count} connections over {procs} process(es) is more than "
                            f"{budget} per process (fd hard limit - {HEADROOM}); raise procs")
        clients.append({"name": get(c, "name", str, where), "comm": comm(c.get("name"), where),
                        "key": endpoint(get(c, "connect", str, where), where),
                        "connect": c["connect"], "count": count, "procs": procs,
                        "source": loopback(c["source"], where) if "source" in c else None})
    idle = get(spec, "idle", dict, "spec", {})
    only_keys(idle, ("procs", "files"), "idle")
    idle = {"procs": get(idle, "procs", int, "idle", 0), "files": get(idle, "files", int, "idle", 100)}
    if idle["files"] > budget:
        raise SpecError(f"idle: {idle['files']} files is more than {budget} per process")
    port_range = get(spec, "port_range", str, "spec", "")
    if port_range and not (len(port_range.split()) == 2 and all(p.isdigit() for p in port_range.split())):
        raise SpecError(f'spec: "port_range" must look like "1024 65535", not {port_range!r}')
    by_key = {s["key"]: s for s in servers}
    for c in clients:
        if c["key"] in by_key:
            by_key[c["key"]]["expected"] += c["count"]
    for s in servers:
        if not s["close"] and s["expected"] > s["workers"] * budget:
            raise SpecError(f"server {s['name']!r}: {s['expected']} connections need more than "
                            f"{s['workers']} worker(s) holding {budget} each; raise workers")
    return servers, clients, idle, port_range


def links_up():
    """Names of the interfaces that are up in this network namespace."""
    out = subprocess.run(["ip", "-o", "link", "show", "up"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SpecError(f"ip link show failed: {out.stderr.strip()}")
    return {line.split(":")[1].strip() for line in out.stdout.splitlines()}


def own_netns(fresh):
    """True only in a namespace made for us, whose sysctls we may change: no interface up but
    lo, and either lo was down when we started (`fresh`) or our parent is in another network
    namespace (`unshare -n` and `ip netns exec` exec us from the caller's)."""
    if not links_up() <= {"lo"}:
        return False
    try:
        ours, theirs = (os.stat(f"/proc/{p}/ns/net").st_ino for p in ("self", os.getppid()))
    except OSError:
        return fresh
    return fresh or ours != theirs


def setup_namespace(port_range):
    """Bring loopback up, raise our fd soft limit to the hard one, and (only in a namespace of
    our own) raise somaxconn so a listen backlog of 65535 holds, and set the port range."""
    fresh = "lo" not in links_up()
    done = subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SpecError(f"ip link set lo up failed: {done.stderr.strip()}")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if not own_netns(fresh):
        if port_range:
            raise SpecError("refusing to set port_range: this network namespace does not look "
                            "like one made for us (the host's?); run me under unshare -n")
        return
    try:
        with open("/proc/sys/net/core/somaxconn", "w") as f:
            f.write(str(BACKLOG))
    except OSError:
        pass  # a smaller backlog only makes setup slower
    if port_range:
        try:
            with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
                f.write(port_range)
        except OSError as exc:
            raise SpecError(f"cannot set ip_local_port_range to {port_range!r}: {exc}") from None


def become(name):
    """In a fresh child: drop the parent's signal handlers (SIGTERM must end the child, not run
    the parent's teardown), take the process name (str or bytes) and die with the parent.
    leak_repro.py uses this too."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    raw = name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")
    LIBC.prctl(PR_SET_NAME, ctypes.c_char_p(raw[:15]), 0, 0, 0)
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def keep_only(fds):
    """Point stdin and stdout at /dev/null (a reader of our stdout sees EOF when we exit) and
    close every inherited fd above 2 but `fds`, so a child holds exactly what it opens."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    low = 3
    for fd in sorted(fd for fd in fds if fd >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def hold_forever():
    """Sleep until killed, holding every fd open."""
    while True:
        signal.pause()


def fork_child(comm_name, body, keep=()):
    """Fork a child named `comm_name` that keeps the fds `keep` and runs body(); returns its
    pid. The child never returns into the parent's code: it exits 2 if body() raises."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    status = 0
    try:
        become(comm_name)
        if os.getppid() != parent:  # the parent died before PDEATHSIG was armed
            os._exit(0)
        keep_only(keep)
        body()
    except BaseException as exc:  # pylint: disable=broad-except
        print(f"population.py: {comm_name!r} (pid {os.getpid()}): {exc}", file=sys.stderr, flush=True)
        status = 2
    os._exit(status)


def serve(lsock, counts, slot, close):
    """Worker body: accept forever. Hold each connection (counts[slot] = how many) until the fd
    budget is reached, then stop accepting; or, with `close`, close each one at once."""
    held, budget = [], fd_budget()
    while close or len(held) < budget:
        conn, _ = lsock.accept()
        if close:
            conn.close()
        else:
            held.append(conn)
            counts[slot] = len(held)
    hold_forever()


IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: pick the port at connect(), by the whole 4-tuple


def connect(family, addr, port, n, ready_w, source=None):
    """Client body: open `n` connections to addr:port (blocking connect) from `source` if
    given, report on ready_w."""
    held = []
    for i in range(n):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if source is not None:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((source, 0))
            sock.connect((addr, port))
        except OSError as exc:
            raise SpecError(f"connection {i + 1} of {n} to {addr}:{port} failed: {exc}") from None
        held.append(sock)
    os.write(ready_w, b"k")
    os.close(ready_w)
    hold_forever()


def hold_files(files):
    """Idle body: open /dev/null `files` times and sleep."""
    for _ in range(files):
        os.open(os.devnull, os.O_RDONLY)
    hold_forever()


def family_of(addr):
    """AF_INET or AF_INET6 for an ip_address."""
    return socket.AF_INET6 if addr.version == 6 else socket.AF_INET


def start(servers, clients, idle, names, counts):
    """Start the servers (listening before any client runs), the clients and the idle
    holders; records pid -> name in `names`; returns [(pipe read end, pid)] of the clients."""
    slot = 0
    for s in servers:
        (addr, port), close = s["key"], s["close"]
        lsock = socket.socket(family_of(addr), socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            lsock.bind((str(addr), port))
        except OSError as exc:
            raise SpecError(f"server {s['name']!r}: cannot bind {addr}:{port}: {exc}") from None
        lsock.listen(BACKLOG)
        s["slots"] = range(slot, slot + s["workers"])
        for i in s["slots"]:
            pid = fork_child(s["comm"], lambda i=i: serve(lsock, counts, i, close), [lsock.fileno()])
            names[pid] = s["name"]
        slot += s["workers"]
        lsock.close()
    waits = []
    for c in clients:
        (addr, port), procs = c["key"], c["procs"]
        for i in range(procs):
            n = c["count"] // procs + (i < c["count"] % procs)
            r, w = os.pipe()
            source = None if c["source"] is None else str(c["source"])
            body = lambda n=n, w=w, src=source: connect(family_of(addr), str(addr), port, n, w, src)  # noqa: E731
            pid = fork_child(c["comm"], body, [w])
            os.close(w)
            names[pid] = c["name"]
            waits.append((r, pid))
    for _ in range(idle["procs"]):
        names[fork_child(IDLE_NAME, lambda: hold_files(idle["files"]))] = IDLE_NAME
    return waits


def check_children(names):
    """Fail if any child has already exited (it printed why on stderr)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        raise SpecError(f"{names.get(pid, '?')!r} (pid {pid}) exited during setup "
                        f"(status {os.waitstatus_to_exitcode(status)})")


def wait_ready(waits, servers, counts, names, deadline):
    """Wait for every client's report, then for the servers to hold every connection."""
    poller, pending = select.poll(), {}
    for r, pid in waits:
        poller.register(r, select.POLLIN)
        pending[r] = pid
    while pending:
        if time.monotonic() > deadline:
            raise SpecError(f"{len(pending)} client process(es) still connecting after "
                            f"{SETUP_TIMEOUT_S} s")
        events = poller.poll(100)
        if not events:
            check_children(names)
        for r, _ in events:
            ok = os.read(r, 1) == b"k"
            pid = pending.pop(r)
            poller.unregister(r)
            os.close(r)
            if not ok:
                raise SpecError(f"client {names[pid]!r} (pid {pid}) failed (its message is above)")
    while True:
        short = [(s["name"], s["expected"], sum(counts[i] for i in s["slots"]))
                 for s in servers if not s["close"]]
        short = [x for x in short if x[2] < x[1]]
        if not short:
            return
        check_children(names)
        if time.monotonic() > deadline:
            raise SpecError(f"servers still accepting after {SETUP_TIMEOUT_S} s "
                            f"(name, expected, accepted): {short}")
        time.sleep(0.01)


def teardown(names):
    """SIGKILL every child and reap it."""
    for pid in names:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in names:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def main():
    """Build the population, print READY, hold it until stdin closes or a signal arrives."""
    names, status = {}, 0

    def on_signal(*_):
        raise Stop

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if len(sys.argv) != 2:
            raise SpecError("usage: population.py SPEC_JSON_OR_FILE")
        servers, clients, idle, port_range = load_spec(sys.argv[1])
        setup_namespace(port_range)
        workers = sum(s["workers"] for s in servers)
        counts = (ctypes.c_uint64 * max(1, workers)).from_buffer(mmap.mmap(-1, 8 * max(1, workers)))
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        waits = start(servers, clients, idle, names, counts)
        wait_ready(waits, servers, counts, names, deadline)
        pids, connections = {}, {}
        for pid, name in names.items():
            pids.setdefault(name, []).append(pid)
        for c in clients:
            connections[c["name"]] = connections.get(c["name"], 0) + c["count"]
        ready = {"pids": pids, "netns_pid": os.getpid(), "connections": connections}
        sys.stdout.write("READY " + json.dumps(ready) + "\n")
        sys.stdout.flush()
        while os.read(0, 65536):  # until EOF
            pass
    except Stop:
        pass
    except (SpecError, OSError) as exc:
        print(f"population.py: {exc}", file=sys.stderr, flush=True)
        status = 2
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        teardown(names)
    sys.exit(status)


if __name__ == "__main__":
    main()
