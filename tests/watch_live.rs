//! The leak itself, live: an HTTP/1.1 keep-alive registry on 127.0.0.1:5000 and the clients of
//! `tests/support/leak_repro.py` (the leaky image-cri-shim, the fixed one, a churning client,
//! a stable pool), watched and compared with a baseline, in a namespace each test makes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use serde_json::{Value, json};
use support::Population;

fn reproducer() -> Population {
    Population::start_script(
        "leak_repro.py",
        &json!({
            "registry": {"port": 5000},
            "leaky": {"interval_ms": 500},
            "fixed": {"interval_ms": 500},
            "churn": {"interval_ms": 100},
            "pool": {"size": 60}
        }),
    )
}

/// Runs `shimcheck ports --watch ARGS -o json` in the namespace and calls `each` with every
/// JSON line as it arrives (and the watcher's pid); returns the exit status.
fn watch(pop: &Population, args: &[&str], mut each: impl FnMut(&Value, u32)) -> Option<i32> {
    let bin = support::shimcheck_bin();
    let mut child = pop
        .command(bin.to_str().unwrap())
        .args(["ports", "--watch", "-o", "json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        let v: Value = serde_json::from_str(&line.unwrap()).expect("one JSON object per line");
        each(&v, child.id());
    }
    child.wait().unwrap().code()
}

#[test]
fn watch_flags_the_leaky_shim_within_12_samples_and_nothing_else_in_30() {
    let pop = reproducer();
    let shim = pop.pid("image-cri-shim");
    let mut flagged_at = None;
    let mut samples = 0;
    let mut others = Vec::new();
    let code = watch(
        &pop,
        &[
            "--interval",
            "1s",
            "--window",
            "10s",
            "--count",
            "30",
            "--by",
            "pair",
        ],
        |v, _| {
            samples += 1;
            assert_eq!(v["sample"], samples);
            for f in v["findings"].as_array().unwrap() {
                if f["pid"] == shim && f["kind"] == "growth" {
                    if flagged_at.is_none() {
                        flagged_at = Some(samples);
                        assert_eq!(f["remote"], "127.0.0.1:5000");
                        assert_eq!(f["severity"], "critical");
                        assert!(
                            f["message"]
                                .as_str()
                                .unwrap()
                                .contains("image-cri-shim before v4.2.0")
                        );
                        assert!(
                            f["remediation"]
                                .as_str()
                                .unwrap()
                                .contains("systemctl restart image-cri-shim")
                        );
                        assert!(f["retained"].as_f64().unwrap() >= 0.9);
                    }
                } else {
                    others.push(f.clone());
                }
            }
            // Each group carries its change since the previous and the first sample.
            let g = &v["groups"][0];
            assert!(
                g.get("delta").is_some() && g.get("delta_total").is_some(),
                "{g}"
            );
        },
    );
    assert_eq!(samples, 30);
    let at = flagged_at.expect("the leaky client was never flagged");
    assert!(at <= 12, "flagged only at sample {at}");
    assert!(
        others.is_empty(),
        "the fixed client, the churner, the pool or the registry were flagged: {others:#?}"
    );
    assert_eq!(code, Some(1), "the last sample has a finding");
}

#[test]
fn baseline_finds_growth_since_a_snapshot() {
    let pop = reproducer();
    let dir = std::env::temp_dir().join(format!("shimcheck-baseline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let snap = dir.join("before.json");
    assert!(
        pop.shimcheck(&["snapshot", "-o", snap.to_str().unwrap()])
            .status
            .success()
    );
    std::thread::sleep(std::time::Duration::from_secs(7));
    let report = pop.report(&["--baseline", snap.to_str().unwrap(), "--by", "pair"]);
    let shim = pop.pid("image-cri-shim");
    let growth: Vec<&Value> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "growth")
        .collect();
    assert_eq!(growth.len(), 1, "{growth:#?}");
    assert_eq!(growth[0]["pid"], shim);
    let g = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["key"] == format!("image-cri-shim({shim}) -> 127.0.0.1:5000"))
        .unwrap();
    assert!(g["delta_total"].as_i64().unwrap() >= 10, "{g}");
    assert!(report["baseline_taken_at"].is_string());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn memory_stays_bounded_over_10000_samples_of_a_churning_population() {
    let pop = Population::start_script(
        "leak_repro.py",
        &json!({"registry": {"port": 5000}, "churn": {"interval_ms": 5}, "pool": {"size": 200}}),
    );
    let (mut at_100, mut at_end) = (0, 0);
    let code = watch(
        &pop,
        &[
            "--interval",
            "1ms",
            "--window",
            "2s",
            "--count",
            "10000",
            "--top",
            "3",
        ],
        |v, pid| match v["sample"].as_u64().unwrap() {
            100 => at_100 = rss_kib(pid),
            9990 => at_end = rss_kib(pid),
            _ => {}
        },
    );
    assert!(matches!(code, Some(0 | 1)));
    assert!(at_100 > 0 && at_end > 0);
    assert!(
        at_end * 2 <= at_100 * 3,
        "RSS grew from {at_100} KiB after 100 samples to {at_end} KiB after 10,000"
    );
}
