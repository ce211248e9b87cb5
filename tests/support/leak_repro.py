"""A faithful reproducer of the image-cri-shim registry-connection leak (sealos before v4.2.0).

The bug: for every image lookup image-cri-shim built a new Go http.Transport, sent
`GET /v2/` and `GET /v2/<repo>/tags/list` to the registry, read both bodies and dropped the
client without closing it. The keep-alive connection stayed open on both ends forever (the
registry never times idle connections out): +1 ESTABLISHED connection per lookup.

Run inside a network namespace the caller made:

    unshare -n python3 tests/support/leak_repro.py SPEC

SPEC is a JSON object (a literal starting with "{" or a file path); every part is optional,
and a client runs only if its key is present:

    {"registry": {"port": 5000},
     "leaky":  {"name": "image-cri-shim", "interval_ms": 500},
     "fixed":  {"name": "fixed-shim", "interval_ms": 500},
     "churn":  {"name": "churner", "interval_ms": 100},
     "pool":   {"name": "pool-holder", "size": 60},
     "warm":   {"name": "warming-pool", "interval_ms": 1000, "size": 40}}

- registry (always started, process `registry`): HTTP/1.1 keep-alive on 127.0.0.1:PORT, one
  process multiplexing every connection with `selectors`, never timing one out. `GET /v2/`
  -> 200 `{}`; `GET /v2/<repo>/tags/list` -> 200 `{"name":"<repo>","tags":["3.6"]}`; anything
  else -> 404. Every response has Content-Length and `Connection: keep-alive`; sequential and
  pipelined requests are answered in order; it closes its end only when the client closes.
- leaky: every interval, a NEW connection, both requests, both responses read in full, and
  the connection kept open forever (the pre-v4.2.0 behaviour).
- fixed: the same lookups over ONE reused keep-alive connection (v4.2.0).
- churn: a new connection per lookup, closed by the client afterwards (busy but correct; the
  client's side ends in TIME_WAIT).
- pool: `size` connections opened at start, one `GET /v2/` each, then held with no traffic.
- warm: a connection pool warming up under rising load: every interval one more connection
  (up to `size`), and a `GET /v2/` on every connection it holds. It grows like the leak, but
  its connections keep carrying data (a JDBC or HTTP pool after a deploy).

Clients stop making lookups after 10 minutes and just hold what they have. When the registry
listens, the pool is open and every client has finished its first lookup it prints one line,
`READY {"pids": {name: [pid]}, "netns_pid": PID}`, then waits; when stdin closes (or on
SIGTERM) it kills its children and exits 0. Only loopback addresses are used.
"""

import json
import os
import resource
import select
import selectors
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from population import become  # noqa: E402  (prctl process name + parent-death signal)

HOST = "127.0.0.1"
LIFETIME_S = 600  # clients stop looking images up after this long
READY_TIMEOUT_S = 60
IO_TIMEOUT_S = 10  # a client waiting this long for the registry fails loudly
CLIENTS = {"leaky": ("image-cri-shim", 500), "fixed": ("fixed-shim", 500),
           "churn": ("churner", 100)}  # mode -> default (name, interval_ms)


def fail(msg):
    """Print an error and exit 2 (the caller's test reports it)."""
    print(f"leak_repro.py: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def respond(head):
    """The registry's full keep-alive response to one request head (all before CRLFCRLF)."""
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    method, path = (parts[0], parts[1]) if len(parts) == 3 else ("", "")
    repo = path[len("/v2/"):-len("/tags/list")] if path.endswith("/tags/list") else ""
    status, body = "404 Not Found", b'{"errors":[{"code":"NOT_FOUND","message":"not found"}]}'
    if method == "GET" and path == "/v2/":
        status, body = "200 OK", b"{}"
    elif method == "GET" and path.startswith("/v2/") and repo.strip("/"):
        doc = {"name": repo, "tags": ["3.6"]}
        status, body = "200 OK", json.dumps(doc, separators=(",", ":")).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode() + body


def serve(lsock):
    """The registry: one thread, level-triggered epoll, every connection kept until the client
    closes it. Sockets stay blocking for sendall (responses are tiny) but are only read when
    the selector says so."""
    sel = selectors.DefaultSelector()
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ)
    pending = {}  # connection -> bytes received but not yet a complete request head

    def drop(conn):
        sel.unregister(conn)
        del pending[conn]
        conn.close()

    while True:
        for key, _ in sel.select():
            conn = key.fileobj
            if conn is lsock:
                try:
                    new, _ = lsock.accept()
                except BlockingIOError:
                    continue
                except OSError as exc:  # out of fds: leave it in the backlog, do not spin
                    print(f"leak_repro.py: registry: accept: {exc}", file=sys.stderr, flush=True)
                    time.sleep(0.1)
                    continue
                new.setblocking(True)
                sel.register(new, selectors.EVENT_READ)
                pending[new] = b""
                continue
            try:
                data = conn.recv(65536)
                if not data:  # the client closed: close our end too
                    drop(conn)
                    continue
                pending[conn] += data
                while b"\r\n\r\n" in pending[conn]:  # pipelined requests, answered in order
                    head, pending[conn] = pending[conn].split(b"\r\n\r\n", 1)
                    conn.sendall(respond(head))
            except OSError:  # reset by the peer (a client killed mid-request)
                drop(conn)


def recv_some(sock):
    """One recv that refuses EOF: the registry never closes first."""
    chunk = sock.recv(4096)
    if not chunk:
        raise ConnectionError("registry closed the connection")
    return chunk


def get(sock, path):
    """One request on `sock`, its whole response read (headers, then Content-Length bytes)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: sealos.hub:5000\r\n"
                 "User-Agent: containerd/v1.6\r\nAccept: application/json\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += recv_some(sock)
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in lines[1:]
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += recv_some(sock)
    if lines[0].split(b" ")[1] != b"200":
        raise ConnectionError(f"GET {path}: {lines[0].decode()}")
    return body


def connect(port):
    """A new TCP connection to the registry."""
    return socket.create_connection((HOST, port), timeout=IO_TIMEOUT_S)


def lookup(sock):
    """What one ImageStatus call made image-cri-shim do against the registry."""
    get(sock, "/v2/")
    get(sock, "/v2/pause/tags/list")


def hold_forever(keep):
    """Sleep for good, keeping `keep` (open sockets) referenced."""
    del keep  # still referenced by the caller's frame
    while True:
        signal.pause()


def client(port, mode, interval_ms, ready_w):
    """A lookup loop on a fixed schedule: 'leaky' keeps every connection, 'fixed' reuses one,
    'churn' closes each. Signals `ready_w` after the first lookup; stops after LIFETIME_S."""
    kept = []
    start = next_at = time.monotonic()
    while time.monotonic() - start < LIFETIME_S:
        if mode == "fixed":
            if not kept:
                kept.append(connect(port))
            lookup(kept[0])
        else:
            sock = connect(port)
            lookup(sock)
            if mode == "leaky":
                kept.append(sock)  # the Transport is dropped, its connection never closed
            else:
                sock.close()
        if ready_w is not None:
            os.write(ready_w, b"k")
            os.close(ready_w)
            ready_w = None
        next_at = max(next_at + interval_ms / 1000, time.monotonic())  # no catch-up bursts
        time.sleep(max(0.0, next_at - time.monotonic()))
    hold_forever(kept)


def pool(port, size, ready_w):
    """A stable pool: `size` connections, one request each, then held with no traffic."""
    conns = [connect(port) for _ in range(size)]
    for conn in conns:
        get(conn, "/v2/")
    os.write(ready_w, b"k")
    os.close(ready_w)
    hold_forever(conns)


def warming(port, interval_ms, size, ready_w):
    """A pool growing by one connection per interval to `size`, using every one each interval."""
    conns = []
    start = next_at = time.monotonic()
    while time.monotonic() - start < LIFETIME_S:
        if len(conns) < size:
            conns.append(connect(port))
        for conn in conns:
            get(conn, "/v2/")
        if ready_w is not None:
            os.write(ready_w, b"k")
            os.close(ready_w)
            ready_w = None
        next_at = max(next_at + interval_ms / 1000, time.monotonic())
        time.sleep(max(0.0, next_at - time.monotonic()))
    hold_forever(conns)


def fork_child(name, body, *args):
    """Fork a child named `name` running body(*args); returns its pid."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's teardown handler
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            become(name)
            if os.getppid() != parent:  # the parent died before PDEATHSIG was armed
                os._exit(0)
            body(*args)
        except BaseException as exc:  # report, never fall back into the parent's code
            print(f"leak_repro.py: {name}: {exc!r}", file=sys.stderr, flush=True)
            os._exit(2)
        os._exit(0)
    return pid


def await_ready(waits):
    """Wait (bounded) for one b"k" from each (name, pipe read end)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for name, r in waits:
        ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
        if not ready or os.read(r, 1) != b"k":
            raise RuntimeError(f"{name} did not finish its first lookup")
        os.close(r)


def main():
    """Start the registry, then the clients the spec names; READY; tear down on stdin EOF."""
    if len(sys.argv) > 2:
        fail("usage: leak_repro.py [SPEC_JSON_OR_FILE]")
    arg = sys.argv[1] if len(sys.argv) == 2 else "{}"
    spec = json.loads(arg if arg.lstrip().startswith("{") else open(arg).read())
    unknown = set(spec) - {"registry", "pool", "warm", *CLIENTS}
    if unknown:
        fail(f"unknown spec keys {sorted(unknown)}")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the leak outgrows 1024 fds
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = int(spec.get("registry", {}).get("port", 5000))
    kids, pids, waits = [], {}, []

    def stop(*_, code=0):
        for pid in reversed(kids):  # clients first, the registry last
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        sys.exit(code)

    def start(name, body, *args):
        pid = fork_child(name, body, *args)
        kids.append(pid)
        pids.setdefault(name, []).append(pid)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        lsock = socket.socket()  # listening before the fork: clients can connect at once
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((HOST, port))
        lsock.listen(4096)
        start("registry", serve, lsock)
        lsock.close()
        parts = [(spec[m].get("name", n), client, m, int(spec[m].get("interval_ms", i)))
                 for m, (n, i) in CLIENTS.items() if m in spec]
        if "pool" in spec:
            p = spec["pool"]
            parts.append((p.get("name", "pool-holder"), pool, int(p.get("size", 60))))
        if "warm" in spec:
            w = spec["warm"]
            parts.append((w.get("name", "warming-pool"), warming,
                          int(w.get("interval_ms", 1000)), int(w.get("size", 40))))
        for name, body, *args in parts:
            r, w = os.pipe()
            start(name, body, port, *args, w)
            os.close(w)
            waits.append((name, r))
        await_ready(waits)
    except Exception as exc:
        print(f"leak_repro.py: {exc}", file=sys.stderr, flush=True)
        stop(code=2)
    print("READY " + json.dumps({"pids": pids, "netns_pid": os.getpid()}), flush=True)
    while os.read(0, 65536):  # until stdin closes, buffering nothing
        pass
    stop()


if __name__ == "__main__":
    main()
