//! Test support. `builders`: sockets, processes and samples for the pure tests. The rest is
//! the live-test harness: a socket population inside a network namespace the test makes
//! (`unshare -n` + `tests/support/population.py`), and helpers to run shimcheck and the
//! oracles (`ss`, `netstat`) inside it. Dropping a `Population` tears the namespace down.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod builders;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Whether a live test can run here: true as root. Otherwise the test must return at once:
/// outside CI this says on stderr that it was skipped and why; under CI (`CI` set) a live test
/// that cannot run is a failure, not a skip.
pub fn live(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: this live test needs root (it makes network namespaces) and CI must run it"
    );
    // Straight to stderr: the test harness captures `eprintln!` of a passing test, and a skip
    // nobody sees is a pass nobody earned.
    let _ = writeln!(
        std::io::stderr(),
        "skipped {test}: needs root to make network namespaces (run `sudo cargo test`)"
    );
    false
}

/// Begins a live test: `skip_unless_live!();` returns from the test, skipped, where `live`
/// says it cannot run, naming the test by its path (`live::ports::...`).
#[allow(unused_macros)]
macro_rules! skip_unless_live {
    () => {{
        fn here() {}
        let name = std::any::type_name_of_val(&here);
        if !$crate::support::live(name.strip_suffix("::here").unwrap_or(name)) {
            return;
        }
    }};
}

/// The harness's own check before it makes a namespace, for a test that did not begin with
/// `if !support::live(..) { return; }`: says so plainly instead of failing obscurely.
pub fn require_root() {
    let euid = rustix::process::geteuid();
    assert!(
        euid.is_root(),
        "this live test makes network namespaces (unshare -n) and needs root: begin it with \
         `if !support::live(\"name\") {{ return; }}`, and run `sudo cargo test`"
    );
}

/// A socket as the live comparisons of two sources see it: cookie, state, both ends, inode.
pub type SocketRow = (u64, shimcheck::model::TcpState, String, String, u64);

/// The rows of `sockets`: two sources that list the same sockets give equal sets.
pub fn socket_rows(sockets: &[shimcheck::model::Socket]) -> BTreeSet<SocketRow> {
    sockets
        .iter()
        .map(|s| {
            (
                s.cookie().unwrap_or_default(),
                s.state,
                s.local().to_string(),
                s.remote().to_string(),
                s.inode,
            )
        })
        .collect()
}

/// Runs `f` on a thread that has entered the network namespace of `pid`: loopback there is
/// the population's loopback.
pub fn in_netns<T: Send>(pid: u32, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// The shimcheck binary cargo built for these tests.
pub fn shimcheck_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shimcheck"))
}

/// A running population: its processes and the namespace they live in.
pub struct Population {
    child: Child,
    stdin: Option<ChildStdin>,
    /// A pid inside the namespace, for `nsenter -t PID -n`.
    pub ns_pid: u32,
    /// Process name → pids, as population.py started them.
    pub pids: BTreeMap<String, Vec<u32>>,
    /// The `ip netns` name of the namespace, removed on drop.
    ip_netns: Option<String>,
}

impl Population {
    /// Starts `spec` (population.py's JSON spec) in a fresh network namespace and waits until
    /// every connection is established.
    pub fn start(spec: &Value) -> Population {
        Population::start_script("population.py", spec)
    }

    /// Starts `tests/support/SCRIPT SPEC` (population.py or leak_repro.py) the same way.
    pub fn start_script(script: &str, spec: &Value) -> Population {
        Population::launch(Command::new("unshare").arg("-n"), script, spec, None)
    }

    /// The leak itself (`leak_repro.py`): an HTTP/1.1 keep-alive registry on 127.0.0.1:5000,
    /// the leaky image-cri-shim and the fixed one each asking every 500 ms, a client churning
    /// every 100 ms and a stable pool of 60.
    pub fn leak_reproducer() -> Population {
        Population::start_script(
            "leak_repro.py",
            &serde_json::json!({
                "registry": {"port": 5000},
                "leaky": {"interval_ms": 500},
                "fixed": {"interval_ms": 500},
                "churn": {"interval_ms": 100},
                "pool": {"size": 60}
            }),
        )
    }

    /// Starts `tests/support/SCRIPT SPEC` in a namespace made with `ip netns add NAME`, so that
    /// it has a name; the namespace is deleted on drop.
    pub fn start_in_ip_netns(name: &str, script: &str, spec: &Value) -> Population {
        require_root();
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let added = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("ip netns add");
        assert!(added.success(), "ip netns add {name} failed");
        Population::launch(
            Command::new("ip").args(["netns", "exec", name]),
            script,
            spec,
            Some(name.to_string()),
        )
    }

    fn launch(
        prefix: &mut Command,
        script: &str,
        spec: &Value,
        ip_netns: Option<String>,
    ) -> Population {
        require_root();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/support")
            .join(script);
        let mut child = prefix
            .arg("python3")
            .arg(&script)
            .arg(spec.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn unshare -n python3 population.py");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("population stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("population did not become ready within 120 s: {spec}");
            }
        };
        let Some(json) = line.strip_prefix("READY ") else {
            let _ = child.kill();
            let status = child.wait();
            panic!("population failed ({status:?}): {line:?}");
        };
        let ready: Value = serde_json::from_str(json.trim()).expect("READY json");
        let ns_pid = ready["netns_pid"].as_u64().expect("netns_pid") as u32;
        let pids = ready["pids"]
            .as_object()
            .expect("pids")
            .iter()
            .map(|(name, v)| {
                let list = v
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_u64().unwrap() as u32)
                    .collect();
                (name.clone(), list)
            })
            .collect();
        Population {
            child,
            stdin,
            ns_pid,
            pids,
            ip_netns,
        }
    }

    /// The inode of the population's network namespace.
    pub fn netns_inode(&self) -> u64 {
        let st = std::fs::metadata(format!("/proc/{}/ns/net", self.ns_pid)).expect("ns/net");
        std::os::unix::fs::MetadataExt::ino(&st)
    }

    /// A command that runs `program` inside the population's network namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.ns_pid.to_string())
            .arg("-n")
            .arg(program);
        c
    }

    /// Runs shimcheck inside the namespace.
    pub fn shimcheck(&self, args: &[&str]) -> Output {
        let bin = shimcheck_bin();
        self.command(bin.to_str().unwrap())
            .args(args)
            .output()
            .expect("run shimcheck")
    }

    /// Runs `shimcheck ports -o json ARGS` and parses the document; panics on a failure.
    pub fn report(&self, args: &[&str]) -> Value {
        let mut all = vec!["ports", "-o", "json"];
        all.extend_from_slice(args);
        let out = self.shimcheck(&all);
        // 0: no finding, 1: findings; both carry a full report.
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "shimcheck {all:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("shimcheck JSON")
    }

    /// Runs a shell pipeline inside the namespace and returns its stdout.
    pub fn sh(&self, script: &str) -> String {
        let out = self
            .command("bash")
            .arg("-c")
            .arg(script)
            .output()
            .expect("run bash");
        assert!(
            out.status.success(),
            "`{script}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// The single pid population.py started under `name`.
    pub fn pid(&self, name: &str) -> u32 {
        let pids = &self.pids[name];
        assert_eq!(pids.len(), 1, "{name} has several processes: {pids:?}");
        pids[0]
    }
}

impl Drop for Population {
    fn drop(&mut self) {
        // Closing stdin tells population.py to kill its children and exit; the namespace goes
        // with its last process.
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        let mut exited = false;
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(name) = &self.ip_netns {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// `{"key": count}` of a shimcheck report's groups.
pub fn group_counts(report: &Value) -> BTreeMap<String, u64> {
    report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["key"].as_str().unwrap().to_string(),
                g["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// netstat prints IPv6 endpoints as `::1:8443`; shimcheck and ss as `[::1]:8443`.
pub fn bracket_v6(endpoint: &str) -> String {
    match endpoint.rsplit_once(':') {
        Some((addr, port)) if addr.contains(':') => format!("[{addr}]:{port}"),
        _ => endpoint.to_string(),
    }
}

/// Parses `uniq -c` output (`  28 10.0.0.101:6443`) into endpoint → count.
pub fn uniq_counts(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let n = it.next()?.parse().ok()?;
            Some((bracket_v6(it.next()?), n))
        })
        .collect()
}

/// Runs shimcheck in the test's own namespace (for `--from`, which needs no live node).
pub fn shimcheck_cmd(args: &[&str]) -> Output {
    Command::new(shimcheck_bin())
        .args(args)
        .output()
        .expect("run shimcheck")
}

/// `shimcheck_cmd` that must print a JSON report (exit 0 or 1).
pub fn shimcheck_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend_from_slice(&["-o", "json"]);
    let out = shimcheck_cmd(&all);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "shimcheck {all:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("shimcheck JSON")
}

/// Runs `shimcheck ports --watch ARGS -o json` in the namespace and calls `each` with every
/// JSON line as it arrives (and the watcher's pid); returns the exit status.
pub fn watch(pop: &Population, args: &[&str], mut each: impl FnMut(&Value, u32)) -> Option<i32> {
    let bin = shimcheck_bin();
    let mut cmd = pop.command(bin.to_str().unwrap());
    cmd.args(["ports", "--watch", "-o", "json"]).args(args);
    watch_with(cmd, |v, pid| {
        each(v, pid);
        true
    })
}

/// Runs `cmd`, a `shimcheck ports --watch -o json` command line, and calls `each` with every
/// JSON line as it arrives (and the watcher's pid) until `each` returns false, when the
/// watcher is killed (status `None`), or until the watcher ends (its exit status). A panic in
/// `each` kills the watcher too.
pub fn watch_with(mut cmd: Command, mut each: impl FnMut(&Value, u32) -> bool) -> Option<i32> {
    let mut child = Killed(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let stdout = child.0.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        let v: Value = serde_json::from_str(&line.unwrap()).expect("one JSON object per line");
        if !each(&v, pid) {
            return None;
        }
    }
    child.0.wait().unwrap().code()
}

/// How long a live test waits for a condition before it fails: generous, so that a loaded
/// machine (two cores shared with a fuzzer or a mutation run) slows a test but does not fail
/// it. A condition that holds on an idle box within a second or two.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// Polls `done` every 100 ms until it holds; fails naming `what` once `limit` has passed.
/// Live tests wait on conditions (a sample number, a count reached), never on a sleep.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    poll_until(what, limit, || done().then_some(()));
}

/// Polls `poll` every 100 ms until it returns a value; fails naming `what` once `limit` has
/// passed.
pub fn poll_until<T>(what: &str, limit: Duration, mut poll: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = poll() {
            return v;
        }
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Installs a seccomp filter in `cmd`'s child before exec, inherited by everything it runs,
/// that refuses syscall `nr` with EACCES, only when its first argument is `first_arg` if one
/// is given (`socket(AF_NETLINK, ...)`); every other call is allowed.
pub fn refuse_syscall(cmd: &mut Command, nr: libc::c_long, first_arg: Option<u32>) {
    use std::os::unix::process::CommandExt;
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xC000_00B7;
    const LOAD: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    // struct seccomp_data: nr at 0, arch at 4, args[0] at 16 (low half first). Jumps count
    // the instructions skipped; "allow" and "deny" are the last two.
    let mut filter = vec![
        op(LOAD, 0, 0, 4),
        op(JEQ, 0, 0, AUDIT_ARCH),
        op(LOAD, 0, 0, 0),
        op(JEQ, 0, 0, nr as u32),
    ];
    if let Some(arg) = first_arg {
        filter.extend([op(LOAD, 0, 0, 16), op(JEQ, 0, 0, arg)]);
    }
    let allow = filter.len();
    filter.extend([
        op(RET, 0, 0, libc::SECCOMP_RET_ALLOW),
        op(RET, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EACCES as u32),
    ]);
    // Every test jumps to "allow" when false; the last one to "deny" when true.
    let last_test = allow - 1;
    for (i, insn) in filter.iter_mut().enumerate().take(allow) {
        if insn.code == JEQ {
            insn.jf = (allow - i - 1) as u8;
            insn.jt = if i == last_test {
                (allow + 1 - i - 1) as u8
            } else {
                0
            };
        }
    }
    let filter = Box::leak(filter.into_boxed_slice());
    let prog = Box::leak(Box::new(libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    }));
    // An address, not a pointer, crosses into the closure (which must be Send + Sync).
    let prog = std::ptr::from_ref::<libc::sock_fprog>(prog) as usize;
    // SAFETY: only prctl between fork and exec; the filter program lives for the whole test
    // process (leaked above), so the pointer the kernel copies from is valid.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, prog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Forks a child every 2 ms that connects to a server of its own on 127.0.0.1:6000, holds
/// the socket for 20 ms and exits (about 300 processes a second, some 6 alive at any time):
/// processes born and gone during a scan. Prints one line when it starts forking.
pub const FORKER: &str = r#"
import os, socket, threading, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 6000)); srv.listen(4096)
def serve():
    while True:
        c, _ = srv.accept(); c.close()
threading.Thread(target=serve, daemon=True).start()
print("forking", flush=True)
while True:
    if os.fork() == 0:
        try:
            s = socket.create_connection(("127.0.0.1", 6000)); time.sleep(0.02)
        finally:
            os._exit(0)
    time.sleep(0.002)
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0: pass
    except ChildProcessError:
        pass
"#;

/// A child killed when the test ends, passed or failed: nothing a test starts outlives it.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `command` with its stdout piped and returns once it has printed its first line,
/// which says it is ready; `what` names it if it ends first. Killed when dropped.
pub fn spawn_ready(mut command: Command, what: &str) -> Killed {
    let mut child = Killed(command.stdout(Stdio::piped()).spawn().unwrap());
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(!line.is_empty(), "ended before it was ready: {what}");
    child
}

impl Population {
    /// Runs the Python `script` in the namespace (stdin kept open) and returns once it has
    /// printed its first line, which says it is ready.
    pub fn script(&self, script: &str) -> Killed {
        let mut python = self.command("python3");
        python.args(["-c", script]).stdin(Stdio::piped());
        spawn_ready(python, script)
    }
}

/// A report's groups without the fields a watch adds (`delta`, `delta_total`): comparable with
/// a one-shot report's.
pub fn without_deltas(groups: &Value) -> Vec<Value> {
    groups
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let mut g = g.clone();
            if let Some(g) = g.as_object_mut() {
                g.remove("delta");
                g.remove("delta_total");
            }
            g
        })
        .collect()
}

/// `setpriv` as uid/gid 65534 with no supplementary groups, holding `caps` (setpriv's
/// `+name,...` form, "" for none) as ambient capabilities so that they survive the exec, then
/// shimcheck: the words of the command line.
pub fn nobody_args(caps: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
    ]
    .map(String::from)
    .to_vec();
    if !caps.is_empty() {
        a.extend(["--inh-caps", caps, "--ambient-caps", caps].map(String::from));
    }
    a.push(shimcheck_bin().display().to_string());
    a
}

/// The datagrams of a recorded netlink dump under `fixtures/netlink/`: each a little-endian
/// u32 length, then its bytes.
pub fn netlink_datagrams(name: &str) -> Vec<Vec<u8>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/netlink")
        .join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        out.push(rest[4..4 + len].to_vec());
        rest = &rest[4 + len..];
    }
    out
}
