//! The pure stages' own cost, for profiling them apart from the kernel and /proc: reads
//! snapshots (`shimcheck snapshot -o FILE`, taken of a benchmark population), then runs the
//! stages a watch sample runs on each in turn (peer match, join, grouping `--by port`,
//! the detector's digest and history) and prints each stage's median time.
//!
//! `cargo run --release --example stage_cost -- SNAPSHOT... [--rounds N]`

use std::time::{Duration, Instant, SystemTime};

use anyhow::bail;
use shimcheck::aggregate::{self, GroupBy, Query};
use shimcheck::detect::{DetectConfig, Digest, History, MIN_RISES};
use shimcheck::join::{Joined, Topology};

const STAGES: [&str; 6] = [
    "topology",
    "join",
    "aggregate",
    "digest",
    "observe",
    "findings",
];

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut paths = Vec::new();
    let mut rounds = 20usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().unwrap_or_default().parse()?,
            _ => paths.push(a),
        }
    }
    if paths.is_empty() {
        bail!("usage: stage_cost SNAPSHOT... [--rounds N]");
    }
    let samples = paths
        .iter()
        .map(|p| shimcheck::snapshot::read(std::path::Path::new(p)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let query = Query {
        group_by: GroupBy::Port,
        states: shimcheck::sample::DETECT_STATES.into_iter().collect(),
        port: None,
        pid: None,
        process: None,
        top: None,
        fold: true,
    };
    let cfg = DetectConfig::default();
    let mut history = History::new(Duration::from_secs(600), MIN_RISES);
    let mut times: Vec<[Duration; 6]> = Vec::new();
    for r in 0..rounds {
        let mut sample = samples[r % samples.len()].clone();
        sample.taken_at = SystemTime::now();
        let t = Instant::now();
        let topology = Topology::with_inode_order(&sample.sockets);
        let t_topology = t.elapsed();
        let t = Instant::now();
        let joined = Joined::with_topology_of(&sample, &topology);
        let t_join = t.elapsed();
        let t = Instant::now();
        let (report, _) = aggregate::aggregate_with_counts(&joined, &query);
        let t_aggregate = t.elapsed();
        let t = Instant::now();
        let digest = Digest::new(&joined);
        let t_digest = t.elapsed();
        let t = Instant::now();
        history.observe_digest(&digest, &joined, &aggregate::KeptGroups::default(), None);
        let t_observe = t.elapsed();
        let t = Instant::now();
        let findings = digest.findings(&sample, Some(&history), &cfg);
        let t_findings = t.elapsed();
        std::hint::black_box((report, findings));
        times.push([
            t_topology,
            t_join,
            t_aggregate,
            t_digest,
            t_observe,
            t_findings,
        ]);
    }
    let median = |k: usize| {
        let mut v: Vec<Duration> = times.iter().map(|t| t[k]).collect();
        v.sort();
        v[v.len() / 2]
    };
    let total: Duration = (0..STAGES.len()).map(median).sum();
    let sockets = samples.iter().map(|s| s.sockets.len()).max().unwrap_or(0);
    let each: Vec<String> = STAGES
        .iter()
        .enumerate()
        .map(|(k, name)| format!("{name} {:.2}", median(k).as_secs_f64() * 1e3))
        .collect();
    println!(
        "{sockets} sockets, medians over {rounds} rounds (ms): {}; total {:.2}",
        each.join(", "),
        total.as_secs_f64() * 1e3
    );
    Ok(())
}
