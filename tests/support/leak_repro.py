"""A faithful reproducer of the image-cri-shim registry-connection leak (sealos 4.1.x).

Run inside a network namespace the caller made:

    unshare -n python3 tests/support/leak_repro.py SPEC

SPEC (JSON; every part optional):

    {"registry": {"port": 5000},
     "leaky":  {"name": "image-cri-shim", "interval_ms": 500},
     "fixed":  {"name": "fixed-shim", "interval_ms": 500},
     "churn":  {"name": "churner", "interval_ms": 100},
     "pool":   {"name": "pool-holder", "size": 60}}

- registry: an HTTP/1.1 keep-alive server on 127.0.0.1:PORT that never times idle
  connections out, answering GET /v2/ and GET /v2/<repo>/tags/list.
- leaky: per image lookup, a NEW connection, both requests, both responses read, and the
  connection kept open forever (a new Go http.Transport per lookup, never closed).
- fixed: the same lookups over one reused keep-alive connection (v4.2.0).
- churn: a new connection per lookup, closed afterwards (busy but correct).
- pool: `size` connections opened at start, one request each, then held (a stable pool).

Prints `READY {"pids": {name: [pid]}, "netns_pid": PID}` once the registry listens, the
pool is open and every client has done its first lookup; tears down on stdin EOF or
SIGTERM. Clients stop making lookups after 10 minutes. Loopback only.
"""

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from population import become  # noqa: E402  (process naming and parent-death signal)

HOST = "127.0.0.1"
LIFETIME_S = 600


def respond(path):
    """The registry's answer to one GET: status line and JSON body."""
    if path == "/v2/":
        return "200 OK", b"{}"
    parts = path.strip("/").split("/")
    if len(parts) == 4 and parts[0] == "v2" and parts[2:] == ["tags", "list"]:
        return "200 OK", json.dumps({"name": parts[1], "tags": ["3.6"]}).encode()
    return "404 Not Found", b'{"errors":[{"code":"NOT_FOUND"}]}'


def serve(port):
    """Keep-alive HTTP/1.1 server, one thread, selectors; never times a connection out."""
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((HOST, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ)
    buffers = {}
    while True:
        for key, _ in sel.select():
            if key.fileobj is lsock:
                conn, _ = lsock.accept()
                conn.setblocking(True)
                sel.register(conn, selectors.EVENT_READ)
                buffers[conn] = b""
                continue
            conn = key.fileobj
            data = conn.recv(65536)
            if not data:  # the client closed: close our end too
                sel.unregister(conn)
                del buffers[conn]
                conn.close()
                continue
            buffers[conn] += data
            while b"\r\n\r\n" in buffers[conn]:
                head, buffers[conn] = buffers[conn].split(b"\r\n\r\n", 1)
                path = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
                status, body = respond(path)
                conn.sendall(
                    f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n".encode()
                    + body
                )


def get(sock, path):
    """One request on `sock` and its whole response (headers, then Content-Length body)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: sealos.hub:5000\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("registry closed the connection")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(4096)
    return body


def lookup(sock):
    """What ImageStatus made image-cri-shim do against the registry."""
    get(sock, "/v2/")
    get(sock, "/v2/pause/tags/list")


def client(mode, port, interval_ms, ready_fd):
    """A client loop: 'leaky' keeps every connection, 'fixed' reuses one, 'churn' closes each."""
    kept, shared = [], None
    deadline = time.monotonic() + LIFETIME_S
    first = True
    while time.monotonic() < deadline:
        if mode == "fixed":
            shared = shared or socket.create_connection((HOST, port))
            lookup(shared)
        else:
            sock = socket.create_connection((HOST, port))
            lookup(sock)
            if mode == "leaky":
                kept.append(sock)  # dropped by the code, never closed: the leak
            else:
                sock.close()
        if first:
            os.write(ready_fd, b"k")
            os.close(ready_fd)
            first = False
        time.sleep(interval_ms / 1000)
    while True:
        signal.pause()


def pool(port, size, ready_fd):
    """A stable pool: `size` connections, one request each, held without further traffic."""
    conns = [socket.create_connection((HOST, port)) for _ in range(size)]
    for c in conns:
        get(c, "/v2/")
    os.write(ready_fd, b"k")
    os.close(ready_fd)
    while True:
        signal.pause()


def fork(name, body, *args):
    """Fork a named child running body(*args); returns (pid, fd that says it is ready)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            become(name)
            body(*args, w)
        except BaseException as exc:
            print(f"leak_repro.py: {name}: {exc}", file=sys.stderr, flush=True)
            os._exit(2)
        os._exit(0)
    os.close(w)
    return pid, r


def main():
    spec = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    port = spec.get("registry", {}).get("port", 5000)
    kids, pids, waits = [], {}, []

    def stop(*_):
        for pid in reversed(kids):  # clients first, so none sees the registry vanish
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reg = os.fork()
    if reg == 0:
        become("registry")
        serve(port)
        os._exit(0)
    kids.append(reg)
    pids["registry"] = [reg]
    for _ in range(200):  # until the registry listens
        try:
            socket.create_connection((HOST, port)).close()
            break
        except OSError:
            time.sleep(0.01)
    defaults = {"leaky": ("image-cri-shim", 500), "fixed": ("fixed-shim", 500), "churn": ("churner", 100)}
    for mode, (name, interval) in defaults.items():
        if mode in spec:
            s = spec[mode]
            pid, r = fork(s.get("name", name), client, mode, port, s.get("interval_ms", interval))
            kids.append(pid)
            pids[s.get("name", name)] = [pid]
            waits.append(r)
    if "pool" in spec:
        s = spec["pool"]
        pid, r = fork(s.get("name", "pool-holder"), pool, port, s.get("size", 60))
        kids.append(pid)
        pids[s.get("name", "pool-holder")] = [pid]
        waits.append(r)
    for r in waits:
        if os.read(r, 1) != b"k":
            print("leak_repro.py: a client failed before its first lookup", file=sys.stderr, flush=True)
            stop()
    print("READY " + json.dumps({"pids": pids, "netns_pid": os.getpid()}), flush=True)
    sys.stdin.read()
    stop()


if __name__ == "__main__":
    main()
