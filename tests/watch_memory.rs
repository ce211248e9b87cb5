//! Watch mode's memory stays bounded: a long watch of a churning population (its own test
//! binary, so its CPU load does not disturb the timing of the other live tests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod support;

use serde_json::json;
use support::{Population, watch};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn memory_stays_bounded_over_10000_samples_of_a_churning_population() {
    skip_unless_live!();
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
    eprintln!("watch RSS: {at_100} KiB after 100 samples, {at_end} KiB after 9,990");
    assert!(
        at_end * 2 <= at_100 * 3,
        "RSS grew from {at_100} KiB after 100 samples to {at_end} KiB after 10,000"
    );
}
