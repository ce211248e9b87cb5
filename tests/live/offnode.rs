//! A server whose clients are on other hosts, live (issue 14; `Target::Clients` in
//! src/detect.rs, "A server whose clients are on other hosts" in docs/detection.md): a
//! registry in one network namespace, a leaking client and a healthy one each in a namespace
//! of its own, joined to the registry's by veth pairs on a bridge the test makes, with private
//! addresses (10.203.0.0/24) that exist only in those namespaces: no route leads anywhere
//! else. Everything (processes, namespaces, the veths and the bridge with them) is torn down
//! when the test ends, passed or failed.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::support::{Killed, require_root, shimcheck_bin, spawn_ready, watch_with};

/// The registry's address, on the bridge in its namespace.
const REGISTRY: &str = "10.203.0.1";
/// The leaking client's node and the healthy client's.
const LEAKY: &str = "10.203.0.2";
const HEALTHY: &str = "10.203.0.3";

/// An `ip netns` namespace, deleted on drop (with the veths and bridge inside it).
struct Netns(String);

impl Netns {
    fn add(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns(name)
    }

    /// `ip -n NAME ARGS`, which must succeed.
    fn ip(&self, args: &str) {
        let out = Command::new("ip")
            .args(["-n", &self.0])
            .args(args.split_whitespace())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip -n {} {args}: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `program` inside the namespace (`ip netns exec` execs it: the child's pid is its).
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    /// Runs the Python `script ARGS` in the namespace and returns once it has printed its
    /// first line (it is ready); killed when the test ends.
    fn python(&self, script: &str, args: &[&str]) -> Killed {
        let mut python = self.command("python3");
        python.args(["-c", script]).args(args).stdin(Stdio::null());
        spawn_ready(python, &format!("{args:?}"))
    }

    /// `shimcheck ports --watch -o json ARGS` in the namespace.
    fn watch(&self, args: &[&str]) -> Command {
        let mut c = self.command(shimcheck_bin().to_str().unwrap());
        c.args(["ports", "--watch", "-o", "json"]).args(args);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// The registry's node and two client nodes: processes first in the struct, so that they
/// die before their namespaces are deleted.
struct Lab {
    procs: Vec<Killed>,
    registry: Netns,
    leaky: Netns,
    healthy: Netns,
}

impl Lab {
    /// Three namespaces: the registry's with a bridge `br0` holding REGISTRY/24, and one per
    /// client whose veth's other end is a port of the bridge.
    fn new() -> Lab {
        require_root();
        let tag = std::process::id();
        let lab = Lab {
            procs: Vec::new(),
            registry: Netns::add(format!("shimcheck-offnode-reg-{tag}")),
            leaky: Netns::add(format!("shimcheck-offnode-leak-{tag}")),
            healthy: Netns::add(format!("shimcheck-offnode-ok-{tag}")),
        };
        let r = &lab.registry;
        r.ip("link set lo up");
        r.ip("link add br0 type bridge");
        r.ip(&format!("addr add {REGISTRY}/24 dev br0"));
        r.ip("link set br0 up");
        for (ns, addr, veth) in [(&lab.leaky, LEAKY, "vleak"), (&lab.healthy, HEALTHY, "vok")] {
            // Made in the registry's namespace with its peer straight in the client's: no end
            // ever exists in the test's own namespace.
            r.ip(&format!(
                "link add {veth}0 type veth peer name {veth}1 netns {}",
                ns.0
            ));
            r.ip(&format!("link set {veth}0 master br0 up"));
            ns.ip("link set lo up");
            ns.ip(&format!("addr add {addr}/24 dev {veth}1"));
            ns.ip(&format!("link set {veth}1 up"));
        }
        lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.procs.clear();
    }
}

/// The registry: accepts on ADDR:5000 and holds every connection (it never times one out),
/// answering each request; closes a connection only when its client does. Named "registry".
const REGISTRY_PY: &str = r#"
import ctypes, selectors, socket, sys
ctypes.CDLL(None).prctl(15, b"registry", 0, 0, 0)
lsn = socket.socket()
lsn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lsn.bind((sys.argv[1], 5000))
lsn.listen(1024)
lsn.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(lsn, selectors.EVENT_READ)
print("listening", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is lsn:
            try:
                c, _ = lsn.accept()
            except BlockingIOError:
                continue
            sel.register(c, selectors.EVENT_READ)
            continue
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if data:
            s.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        else:
            sel.unregister(s)
            s.close()
"#;

/// A request and its answer on `c`: one exchange, as an image lookup makes.
const EXCHANGE: &str = r#"
def exchange(c):
    c.sendall(b"GET /v2/ HTTP/1.1\r\nHost: registry\r\n\r\n")
    if not c.recv(4096):
        raise SystemExit("the registry closed a connection")
"#;

/// The leak: a new keep-alive connection to ADDR:5000 every PERIOD_MS, one exchange on it,
/// never used or closed again (image-cri-shim's new HTTP transport per lookup). At most 1,000.
fn leaky_py() -> String {
    format!(
        r#"
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, b"leaky-client", 0, 0, 0)
{EXCHANGE}
addr, period = sys.argv[1], int(sys.argv[2]) / 1000
held, next_at = [], time.monotonic()
while len(held) < 1000:
    c = socket.create_connection((addr, 5000), timeout=30)
    exchange(c)
    held.append(c)
    if len(held) == 1:
        print("leaking", flush=True)
    next_at += period
    time.sleep(max(0.0, next_at - time.monotonic()))
while True:
    time.sleep(3600)
"#
    )
}

/// A healthy client: two keep-alive connections to ADDR:5000, each reused for a request every
/// 200 ms, for ever.
fn healthy_py() -> String {
    format!(
        r#"
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, b"healthy-client", 0, 0, 0)
{EXCHANGE}
pool = [socket.create_connection((sys.argv[1], 5000), timeout=30) for _ in range(2)]
for c in pool:
    exchange(c)
print("pooled", flush=True)
while True:
    time.sleep(0.2)
    for c in pool:
        exchange(c)
"#
    )
}

/// The server-side sockets of a `--by pair` report's groups held by `pid`: client address →
/// connections.
fn clients_of(report: &Value, pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for g in report["groups"].as_array().unwrap() {
        if g["pid"] == pid {
            *out.entry(g["remote_addr"].as_str().unwrap().to_string())
                .or_default() += g["count"].as_u64().unwrap();
        }
    }
    out
}

/// Catches: growth of a server's clients on other hosts not flagged (the server's own view is
/// all a master has), the leaking client's address not named, the healthy client flagged
/// with it (clients lumped per service instead of per address, or growth judged by the
/// server's total), a finding counting other clients' connections, and, on the client's own
/// node, the leaking process not named.
#[test]
fn a_server_flags_the_client_address_that_leaks_and_not_the_healthy_one() {
    skip_unless_live!();
    let mut lab = Lab::new();
    let registry = lab.registry.python(REGISTRY_PY, &[REGISTRY]);
    let registry_pid = registry.0.id();
    lab.procs.push(registry);
    lab.procs
        .push(lab.healthy.python(&healthy_py(), &[REGISTRY]));
    let leaky = lab.leaky.python(&leaky_py(), &[REGISTRY, "300"]);
    let leaky_pid = leaky.0.id();
    lab.procs.push(leaky);

    // Both views at once: the registry's node, and the leaking client's own node.
    let args = [
        "--interval",
        "1s",
        "--window",
        "10s",
        "--count",
        "60",
        "--by",
        "pair",
    ];
    let (server_view, client_view) = std::thread::scope(|s| {
        let server = s.spawn(|| {
            let (mut samples, mut flagged_at, mut saw_healthy) = (0, None, false);
            let mut flagged = None;
            let mut wrong = Vec::new();
            watch_with(lab.registry.watch(&args), |v, _| {
                samples += 1;
                let clients = clients_of(v, registry_pid);
                saw_healthy |= clients.get(HEALTHY) == Some(&2);
                for f in v["findings"].as_array().unwrap() {
                    let msg = f["message"].as_str().unwrap_or_default();
                    if f["kind"] == "growth" && msg.contains(&format!("from clients at {LEAKY} on"))
                    {
                        // Exactly the leaking address's connections, from this very sample.
                        assert_eq!(f["count"], clients[LEAKY], "{f:#}\n{clients:?}");
                        flagged_at.get_or_insert(samples);
                        flagged = Some(f.clone());
                    } else {
                        wrong.push(f.clone());
                    }
                }
                // Three samples past the flag: the healthy client had every chance to be
                // flagged beside it.
                flagged_at.is_none_or(|at| samples < at + 3)
            });
            (flagged_at, flagged, saw_healthy, wrong)
        });
        let client = s.spawn(|| {
            let mut found = None;
            watch_with(lab.leaky.watch(&args), |v, _| {
                found = v["findings"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|f| f["kind"] == "growth")
                    .cloned();
                found.is_none()
            });
            found
        });
        (server.join().unwrap(), client.join().unwrap())
    });

    let (flagged_at, flagged, saw_healthy, wrong) = server_view;
    assert!(
        saw_healthy,
        "the registry never held the healthy client's 2 connections"
    );
    let f = flagged.unwrap_or_else(|| {
        panic!("the registry never flagged the clients at {LEAKY} in 60 samples")
    });
    eprintln!(
        "the registry flagged the clients at {LEAKY} at sample {}",
        flagged_at.unwrap_or_default()
    );
    assert!(wrong.is_empty(), "other findings: {wrong:#?}");
    // Off-node the process cannot be known: the finding is the server's, names the address.
    assert_eq!(f["pid"], registry_pid, "{f:#}");
    assert_eq!(f["comm"], "registry", "{f:#}");
    assert_eq!(f["remote"], Value::Null, "{f:#}");
    assert_eq!(f["service"], format!("{REGISTRY}:5000"), "{f:#}");
    assert!(f["quiet"].as_u64().unwrap() >= 10, "{f:#}");

    // On the leaking client's own node, the culprit is named: the process and the registry.
    let c = client_view.expect("the leaking client was not flagged on its own node");
    assert_eq!(c["pid"], leaky_pid, "{c:#}");
    assert_eq!(c["comm"], "leaky-client", "{c:#}");
    assert_eq!(c["remote"], format!("{REGISTRY}:5000"), "{c:#}");

    // The leak frozen, the registry's count of each client address equals ss's.
    let pid = rustix::process::Pid::from_raw(leaky_pid as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    let out = lab
        .registry
        .command(shimcheck_bin().to_str().unwrap())
        .args(["ports", "--by", "pair", "-o", "json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ss = lab
        .registry
        .command("ss")
        .args(["-Htn", "state", "established", "( sport = :5000 )"])
        .output()
        .unwrap();
    let mut theirs: BTreeMap<String, u64> = BTreeMap::new();
    for line in String::from_utf8(ss.stdout).unwrap().lines() {
        // Recv-Q Send-Q Local Peer: the peer's address.
        let peer = line.split_whitespace().nth(3).unwrap();
        *theirs
            .entry(peer.rsplit_once(':').unwrap().0.to_string())
            .or_default() += 1;
    }
    assert_eq!(clients_of(&report, registry_pid), theirs);
    assert_eq!(theirs[HEALTHY], 2);
    assert!(theirs[LEAKY] >= 10, "{theirs:?}");
}
