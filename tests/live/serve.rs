//! `shimcheck serve`, live: in a network namespace each test makes, serve samples the leak
//! reproducer (or a churning population) and is scraped over loopback inside that namespace:
//! metrics, report and health; node_exporter's textfile collector; hostile clients; process
//! churn over thousands of samples.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Killed, PATIENCE, Population, in_netns, shimcheck_bin};
use serde_json::{Value, json};

/// A response: status, content type, body.
struct Got {
    status: u16,
    content_type: String,
    body: String,
}

/// `GET http://127.0.0.1:PORT/PATH` (with extra headers) from inside the namespace.
fn get_in(ns_pid: u32, port: u16, path: &str, headers: &[(&str, &str)]) -> Got {
    let url = format!("http://127.0.0.1:{port}{path}");
    in_netns(ns_pid, || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut req = agent.get(&url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut resp = req.call().unwrap();
        Got {
            status: resp.status().as_u16(),
            content_type: resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            body: resp.body_mut().read_to_string().unwrap(),
        }
    })
}

/// A running `shimcheck serve` inside a population's namespace.
struct Serve {
    child: Child,
    ns_pid: u32,
    port: u16,
}

impl Serve {
    fn start(pop: &Population, port: u16, args: &[&str]) -> Serve {
        let listen = format!("127.0.0.1:{port}");
        let child = pop
            .command(shimcheck_bin().to_str().unwrap())
            .args(["serve", "--listen", &listen])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let serve = Serve {
            child,
            ns_pid: pop.ns_pid,
            port,
        };
        serve.wait_for("the first sample", Duration::from_secs(60), || {
            serve.try_get("/healthz").is_some_and(|g| g.status == 200)
        });
        serve
    }

    fn try_get(&self, path: &str) -> Option<Got> {
        let url = format!("127.0.0.1:{}", self.port);
        in_netns(self.ns_pid, || TcpStream::connect(&url).ok()).map(|_| self.get(path))
    }

    fn get(&self, path: &str) -> Got {
        get_in(self.ns_pid, self.port, path, &[])
    }

    /// The 0.0.4 exposition parsed into `name{labels}` → value.
    fn metrics(&self) -> BTreeMap<String, f64> {
        let got = self.get("/metrics");
        assert_eq!(got.status, 200, "{}", got.body);
        parse(&got.body)
    }

    fn wait_for(&self, what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !done() {
            assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }

    /// SIGTERM, then the exit status and what it said on stderr.
    fn stop(mut self) -> (Option<i32>, String) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not end within 10 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status.code(), err)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name{labels} value` lines → map; comments skipped.
fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The value of one label in a series key such as `m{a="x",b="y"}`.
fn label<'a>(series: &'a str, name: &str) -> Option<&'a str> {
    let start = series.find(&format!("{name}=\""))? + name.len() + 2;
    let end = series[start..].find('"')? + start;
    Some(&series[start..end])
}

#[test]
fn serve_names_the_leak_in_metrics_report_and_health_and_ends_on_sigterm() {
    skip_unless_live!();
    let pop = Population::leak_reproducer();
    let serve = Serve::start(
        &pop,
        10188,
        &["--interval", "1s", "--window", "10s", "--idle-after", "2s"],
    );
    let growth = "shimcheck_finding{kind=\"growth\",severity=\"critical\",netns=\"host\",\
                  process=\"image-cri-shim\",endpoint=\"127.0.0.1:5000\"}";
    let mut m = BTreeMap::new();
    serve.wait_for("the growth finding", Duration::from_secs(60), || {
        m = serve.metrics();
        m.contains_key(growth)
    });
    // Only the leak is a finding: not the fixed client, the churner or the stable pool.
    let findings: Vec<&String> = m
        .keys()
        .filter(|k| k.starts_with("shimcheck_finding{"))
        .collect();
    assert!(
        findings
            .iter()
            .all(|k| label(k, "process") == Some("image-cri-shim") || k.contains("kind=\"idle\"")),
        "{findings:?}"
    );
    assert!(
        !findings
            .iter()
            .any(|k| matches!(label(k, "process"), Some("fixed-shim" | "churner"))),
        "{findings:?}"
    );
    // Both ends on this node: the registry serves exactly what the clients hold, per state.
    let client_total: f64 = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with("shimcheck_connections{")
                && label(k, "side") == Some("client")
                && label(k, "endpoint") == Some("127.0.0.1:5000")
                && label(k, "state") == Some("established")
        })
        .map(|(_, v)| v)
        .sum();
    let server = "shimcheck_connections{netns=\"host\",process=\"registry\",\
                  endpoint=\"127.0.0.1:5000\",side=\"server\",state=\"established\"}";
    assert!(client_total > 60.0, "{m:#?}");
    assert_eq!(m[server], client_total, "{m:#?}");
    // No label is a pid or an ephemeral port: every endpoint is the registry's, or serve's
    // own (this test's scrapes: one in flight when a sample is taken is in it, as `ss` would
    // show it; both ends, on the listening port).
    let own = format!("127.0.0.1:{}", serve.port);
    for k in m.keys().filter(|k| k.contains("endpoint=\"")) {
        let endpoint = label(k, "endpoint");
        assert!(
            endpoint == Some("127.0.0.1:5000") || endpoint == Some(own.as_str()),
            "{k}"
        );
    }
    assert_eq!(m["shimcheck_build_info{version=\"0.1.0\"}"], 1.0);
    assert!(m["shimcheck_samples_total"] >= 6.0);
    assert_eq!(m["shimcheck_sample_errors_total"], 0.0);

    // promtool accepts the exposition.
    let text = serve.get("/metrics").body;
    let (ok, said) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .output_with_stdin(text.as_bytes());
    assert!(ok, "promtool check metrics: {}", said.trim());

    // OpenMetrics when asked for.
    let om = get_in(
        serve.ns_pid,
        serve.port,
        "/metrics",
        &[(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )],
    );
    assert_eq!(
        om.content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(om.body.ends_with("# EOF\n"));
    assert!(om.body.contains("# TYPE shimcheck_samples counter\n"));
    let plain = serve.get("/metrics");
    assert_eq!(
        plain.content_type,
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert!(
        plain
            .body
            .contains("# TYPE shimcheck_samples_total counter\n")
    );
    assert!(!plain.body.contains("# EOF"));

    // The report: `ports --by pair -o json`, findings included, no command lines.
    let report: Value = serde_json::from_str(&serve.get("/report").body).unwrap();
    assert_eq!(report["schema_version"], 1);
    assert_eq!(report["group_by"], "pair");
    let shim = pop.pid("image-cri-shim");
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "growth" && f["pid"] == shim),
        "{report:#}"
    );
    assert!(
        report["groups"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["cmdline"].is_null()),
        "command lines must not be served without --report-cmdline"
    );

    // Only GET, only these paths.
    let post = in_netns(serve.ns_pid, || {
        raw(
            serve.port,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
    });
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    assert_eq!(serve.get("/nope").status, 404);
    assert_eq!(serve.get("/healthz").status, 200);

    let (code, err) = serve.stop();
    assert_eq!(code, Some(0), "serve's stderr: {err}");
}

/// Sends raw bytes and returns what came back before the server closed or 3 s passed.
fn raw(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(request).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

trait OutputWithStdin {
    fn output_with_stdin(&mut self, input: &[u8]) -> (bool, String);
}

impl OutputWithStdin for Command {
    /// Runs the command with `input` on stdin; (success, stdout + stderr).
    fn output_with_stdin(&mut self, input: &[u8]) -> (bool, String) {
        let mut child = self
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{self:?}: {e} (is Debian's prometheus installed?)"));
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

#[test]
fn node_exporter_reads_the_textfile_and_nothing_else_is_left_beside_it() {
    skip_unless_live!();
    let Some(node_exporter) = tool("prometheus-node-exporter", "prometheus-node-exporter") else {
        return;
    };
    let pop = Population::leak_reproducer();
    let dir = tempfile::tempdir().unwrap();
    let prom = dir.path().join("shimcheck.prom");
    // --textfile alone opens no port: there is no server to wait for, only the file.
    let mut serve = pop
        .command(shimcheck_bin().to_str().unwrap())
        .args(["serve", "--interval", "500ms", "--textfile"])
        .arg(&prom)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !prom.exists() {
        assert!(Instant::now() < deadline, "no textfile after 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let listening = pop.sh("ss -Htlnp");
    assert!(
        !listening.contains("shimcheck"),
        "serve --textfile listens: {listening}"
    );
    let mut exporter = pop
        .command(&node_exporter)
        .args([
            "--web.listen-address=127.0.0.1:19100",
            "--collector.disable-defaults",
            "--collector.textfile",
        ])
        .arg(format!(
            "--collector.textfile.directory={}",
            dir.path().display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut body = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !body.contains("shimcheck_connections{") {
        assert!(
            Instant::now() < deadline,
            "node_exporter never showed shimcheck: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
        let up = in_netns(pop.ns_pid, || TcpStream::connect("127.0.0.1:19100").is_ok());
        if up {
            body = get_in(pop.ns_pid, 19100, "/metrics", &[]).body;
        }
    }
    let m = parse(&body);
    assert_eq!(m["node_textfile_scrape_error"], 0.0, "{body}");
    assert!(
        body.contains("# TYPE shimcheck_samples_total counter"),
        "{body}"
    );
    assert!(m.keys().any(|k| k.starts_with("shimcheck_connections{")
        && label(k, "process") == Some("image-cri-shim")));
    // Renames leave nothing else in node_exporter's directory, sample after sample.
    for _ in 0..10 {
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names
                .iter()
                .all(|n| n == "shimcheck.prom" || n.ends_with(".tmp")),
            "{names:?}"
        );
        std::thread::sleep(Duration::from_millis(120));
    }
    let _ = exporter.kill();
    let _ = exporter.wait();
    let pid = rustix::process::Pid::from_raw(serve.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert_eq!(serve.wait().unwrap().code(), Some(0));
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["shimcheck.prom"], "left behind after SIGTERM");
}

/// The path of an installed tool; when it is missing, a failure under CI (which installs it)
/// and a skip elsewhere.
fn tool(name: &str, package: &str) -> Option<String> {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is missing: install Debian's {package} (.ci/run does)"
        );
        eprintln!("skipped: {name} is not installed (apt-get install {package})");
    }
    found
}

/// Catches: an HTTP server that a client can hold up (one that sends nothing, one that sends
/// its headers a byte at a time, garbage, a 64 KiB header), whether it delays the scrapes of
/// others or the sampler; errors answered by a hang instead of 400/431.
///
/// What "not delayed" means, on a machine whose load no test controls: a scrape held up by a
/// hostile client waits for that client's header timeout (serve's `HEADER_TIMEOUT`, 5 s), so
/// every scrape must take well under it (4 s) however slow the box, and a sampler held up by
/// them would stop, so it must go on sampling while they are connected: samples are waited
/// for, not counted against the clock (the sampler runs at nice 10, so on a loaded box it may
/// take far longer than its interval without anything being wrong).
#[test]
fn hostile_clients_delay_neither_scrapes_nor_samples() {
    skip_unless_live!();
    let pop = Population::leak_reproducer();
    let serve = Serve::start(&pop, 10188, &["--interval", "200ms"]);
    let samples = || serve.metrics()["shimcheck_samples_total"];
    let (port, ns) = (serve.port, serve.ns_pid);
    let (ok, slow) = in_netns(ns, || {
        // 100 connections that never send a byte, and 10 that send a header a byte at a time.
        let idle: Vec<TcpStream> = (0..100)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let mut dribbling: Vec<TcpStream> = (0..10)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        for s in &mut dribbling {
            s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").unwrap();
        }
        let before = samples();
        // Malformed and oversized requests get an error answer, not a hang.
        let garbage = raw(port, b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n");
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage:?}");
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let huge = raw(port, huge.as_bytes());
        assert!(huge.starts_with("HTTP/1.1 431"), "{huge:?}");
        // 20 scrapers, 25 scrapes each, all at once.
        let scrapers: Vec<_> = (0..20)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut ok = 0;
                    let mut slowest = Duration::ZERO;
                    for _ in 0..25 {
                        let t = Instant::now();
                        let got = get_in(ns, port, "/metrics", &[]);
                        slowest = slowest.max(t.elapsed());
                        if got.status == 200 && got.body.contains("shimcheck_samples_total") {
                            ok += 1;
                        }
                    }
                    (ok, slowest)
                })
            })
            .collect();
        let results: Vec<(usize, Duration)> =
            scrapers.into_iter().map(|h| h.join().unwrap()).collect();
        // The sampler goes on with the hostile clients still connected: 5 more samples.
        for s in &mut dribbling {
            let _ = s.write_all(b"x");
        }
        serve.wait_for("5 samples beside the hostile clients", PATIENCE, || {
            samples() >= before + 5.0
        });
        drop(idle);
        drop(dribbling);
        (
            results.iter().map(|r| r.0).sum::<usize>(),
            results.iter().map(|r| r.1).max().unwrap_or_default(),
        )
    });
    assert_eq!(ok, 500, "every scrape is answered in full");
    assert!(
        slow < Duration::from_secs(4),
        "the slowest scrape took {slow:?}: as long as a hostile client's header timeout (5 s)"
    );
}

/// Forks a short-lived client a name of its own every 25 ms until its stdin closes: each
/// connects to 127.0.0.1:6000 (which closes its end at once, so the population stays the same
/// size), holds the connection 300 ms and exits. Then it waits for them all and exits.
const CHURN: &str = r#"
import ctypes, os, select, socket, sys, time
libc = ctypes.CDLL(None)
def stopped():
    ready, _, _ = select.select([0], [], [], 0)
    return bool(ready) and os.read(0, 1) == b""
i = 0
while not stopped():
    i += 1
    if os.fork() == 0:
        libc.prctl(15, ctypes.c_char_p(b"tr-%d" % i), 0, 0, 0)
        s = socket.create_connection(("127.0.0.1", 6000))
        time.sleep(0.3)
        os._exit(0)
    time.sleep(0.025)
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"#;

/// Catches: series of exited processes left behind (one per transient client: unbounded),
/// memory that grows with samples or with the processes seen. Thousands of samples are waited
/// for (2,000: 10 s at a 5 ms interval on an idle box), with the clients churning throughout.
#[test]
fn churning_processes_leave_no_series_and_memory_stays_flat_over_thousands_of_samples() {
    skip_unless_live!();
    let pop = Population::start(&json!({
        "servers": [{"name": "svc", "addr": "127.0.0.1", "port": 6000, "close_accepted": true}]
    }));
    let serve = Serve::start(&pop, 10188, &["--interval", "5ms", "--max-series", "50"]);
    let mut churn = Killed(
        pop.command("python3")
            .args(["-c", CHURN])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let samples = || serve.metrics()["shimcheck_samples_total"];
    let mut seen_transient = false;
    serve.wait_for("300 samples", PATIENCE, || {
        let m = serve.metrics();
        seen_transient |= m
            .keys()
            .any(|k| label(k, "process").is_some_and(|p| p.starts_with("tr-")));
        m["shimcheck_samples_total"] >= 300.0
    });
    let rss_early = serve.rss_kib();
    let series_early = serve.metrics().len();
    serve.wait_for("2,000 samples", Duration::from_secs(300), || {
        samples() >= 2000.0
    });
    // Closing its stdin ends the churn; it returns once every client has exited.
    drop(churn.0.stdin.take());
    assert!(
        churn.0.wait().unwrap().success(),
        "the churning client failed"
    );
    let n = samples();
    let rss_late = serve.rss_kib();
    // Every transient client has exited: 20 samples later none of them has a series.
    serve.wait_for("20 samples after the churn", PATIENCE, || {
        samples() >= n + 20.0
    });
    let m = serve.metrics();
    let left: Vec<&String> = m
        .keys()
        .filter(|k| label(k, "process").is_some_and(|p| p.starts_with("tr-")))
        .collect();
    assert!(seen_transient, "the transient clients were never seen");
    assert!(
        left.is_empty(),
        "series of exited processes remain: {left:?}"
    );
    assert!(
        m.len() <= series_early + 60,
        "{} series, {series_early} early",
        m.len()
    );
    eprintln!("serve RSS: {rss_early} KiB after 300 samples, {rss_late} KiB after {n}");
    assert!(
        rss_late <= rss_early + rss_early / 4,
        "RSS grew from {rss_early} KiB to {rss_late} KiB"
    );
}

/// `deploy/prometheus/rules.yaml` with every `for:` shortened to `for`, as an operator testing
/// the rules would do: nothing else changes.
fn rules_with_for(duration: &str) -> String {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules.yaml");
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for:") {
            Some(_) => format!("{}for: {duration}", &l[..l.len() - l.trim_start().len()]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn prometheus_fires_the_shipped_leak_alert_for_image_cri_shim_and_for_nothing_else() {
    skip_unless_live!();
    let Some(prometheus) = tool("prometheus", "prometheus") else {
        return;
    };
    let pop = Population::leak_reproducer();
    let serve = Serve::start(&pop, 10188, &["--interval", "1s", "--window", "10s"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), rules_with_for("3s")).unwrap();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files: [rules.yaml]\n\
         scrape_configs:\n  - job_name: shimcheck\n    static_configs:\n      \
         - targets: ['127.0.0.1:10188']\n",
    )
    .unwrap();
    let mut prom = pop
        .command(&prometheus)
        .current_dir(dir.path())
        .args([
            "--config.file=prometheus.yml",
            "--storage.tsdb.path=data",
            "--web.listen-address=127.0.0.1:19090",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let alerts = || -> Vec<Value> {
        let up = in_netns(pop.ns_pid, || TcpStream::connect("127.0.0.1:19090").is_ok());
        if !up {
            return Vec::new();
        }
        let got = get_in(pop.ns_pid, 19090, "/api/v1/alerts", &[]);
        let v: Value = serde_json::from_str(&got.body).unwrap_or_default();
        v["data"]["alerts"].as_array().cloned().unwrap_or_default()
    };
    let firing = |a: &Value| a["state"] == "firing";
    let mut seen = Vec::new();
    let mut leak = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while leak.is_none() {
        assert!(
            Instant::now() < deadline,
            "no leak alert within 120 s; alerts: {seen:#?}"
        );
        std::thread::sleep(Duration::from_millis(500));
        seen = alerts();
        leak = seen
            .iter()
            .find(|a| firing(a) && a["labels"]["alertname"] == "ShimcheckConnectionLeak")
            .cloned();
    }
    let leak = leak.unwrap();
    assert_eq!(leak["labels"]["process"], "image-cri-shim", "{leak:#}");
    assert_eq!(leak["labels"]["endpoint"], "127.0.0.1:5000", "{leak:#}");
    assert_eq!(leak["labels"]["severity"], "critical", "{leak:#}");
    assert!(
        leak["annotations"]["runbook_url"]
            .as_str()
            .is_some_and(|u| u.contains("docs/alerts.md#")),
        "{leak:#}"
    );
    // Ten more evaluations: the fixed client, the churner and the pool never alert, and
    // shimcheck itself stays up and sampling.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        for a in alerts().iter().filter(|a| firing(a)) {
            assert_eq!(
                a["labels"]["process"], "image-cri-shim",
                "unexpected alert {a:#}"
            );
        }
    }
    let _ = prom.kill();
    let _ = prom.wait();
    drop(serve);
}

/// `GET http://127.0.0.1:PORT/PATH` in the test's own namespace: status and body, or `None`
/// while nothing answers.
fn get_host(port: u16, path: &str) -> Option<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .get(format!("http://127.0.0.1:{port}{path}"))
        .call()
        .ok()?;
    Some((r.status().as_u16(), r.body_mut().read_to_string().unwrap()))
}

/// A port nothing listens on right now, on the host's loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Needs no root: sock_diag works unprivileged, and `--proc-root` names a directory that does
/// not exist, so every sample fails at the /proc scan.
#[test]
fn healthz_is_503_while_every_sample_fails_and_says_why() {
    let port = free_port();
    let serve = Command::new(shimcheck_bin())
        .args([
            "serve",
            "--interval",
            "100ms",
            "--proc-root",
            "/nonexistent/proc",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let get = |path: &str| get_host(port, path);
    let deadline = Instant::now() + Duration::from_secs(20);
    let health = loop {
        assert!(
            Instant::now() < deadline,
            "serve never reported its failures"
        );
        std::thread::sleep(Duration::from_millis(100));
        if let Some((code, body)) = get("/healthz") {
            if body.contains("samples failed") {
                break (code, body);
            }
            assert_eq!(code, 503, "no sample has succeeded: {body}");
        }
    };
    assert_eq!(health.0, 503);
    // The metrics say so too, for the ShimcheckSampleErrors and ShimcheckNotSampling alerts.
    let (code, metrics) = get("/metrics").unwrap();
    assert_eq!(code, 200);
    let m = parse(&metrics);
    assert!(m["shimcheck_sample_errors_total"] >= 3.0, "{metrics}");
    assert_eq!(m["shimcheck_samples_total"], 0.0);
    assert!(!m.contains_key("shimcheck_last_sample_timestamp_seconds"));
    let pid = rustix::process::Pid::from_raw(serve.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let out = serve.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot list processes in /nonexistent/proc"),
        "{err}"
    );
}

/// What the DaemonSet runs: `serve --all-netns` from the host's namespace sees a leak inside a
/// named network namespace and labels it with that name.
#[test]
fn serve_all_netns_labels_a_leak_in_another_namespace_with_its_name() {
    skip_unless_live!();
    let pop = Population::start_in_ip_netns(
        "shimcheck-serve-ns",
        "leak_repro.py",
        &json!({"registry": {"port": 5000}, "leaky": {"interval_ms": 500}}),
    );
    let port = free_port();
    let mut serve = Command::new(shimcheck_bin())
        .args([
            "serve",
            "--all-netns",
            "--interval",
            "1s",
            "--window",
            "10s",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let metrics = || {
        get_host(port, "/metrics")
            .filter(|(code, _)| *code == 200)
            .map(|(_, body)| parse(&body))
    };
    let growth = "shimcheck_finding{kind=\"growth\",severity=\"critical\",\
                  netns=\"shimcheck-serve-ns\",process=\"image-cri-shim\",\
                  endpoint=\"127.0.0.1:5000\"}";
    let deadline = Instant::now() + Duration::from_secs(60);
    let m = loop {
        assert!(
            Instant::now() < deadline,
            "no growth finding in the named namespace"
        );
        std::thread::sleep(Duration::from_millis(300));
        if let Some(m) = metrics().filter(|m| m.contains_key(growth)) {
            break m;
        }
    };
    let clients = "shimcheck_connections{netns=\"shimcheck-serve-ns\",process=\"image-cri-shim\",\
                   endpoint=\"127.0.0.1:5000\",side=\"client\",state=\"established\"}";
    assert!(m[clients] >= 10.0, "{m:#?}");
    let _ = serve.kill();
    let _ = serve.wait();
    drop(pop);
}
