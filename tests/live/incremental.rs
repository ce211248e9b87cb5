//! A loop's incremental sample against a full one-shot sample of the same moment, on a
//! population that leaks, churns, closes, gains a process and loses it, in a namespace the
//! test makes.
//!
//! No tolerance is needed for groups, counts, holders and findings: every change in the
//! namespace is made by the test itself, between samples, and the two samplers look one right
//! after the other while nothing moves. The timestamps differ, and so do the tcp_info clocks, by
//! the time between the two looks (measured, plus the kernel's clock tick): a sample the loop reused has its clocks
//! brought forward by exactly the time since its dump, which this checks.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use shimcheck::aggregate::{GroupBy, KeptGroups, Query};
use shimcheck::cli::NodeArgs;
use shimcheck::collect::events::Edits;
use shimcheck::detect::{DetectConfig, snapshot_findings};
use shimcheck::join::{Joined, Topology};
use shimcheck::model::{Sample, StateSet, TcpState};
use shimcheck::sample::{Look, Mode, Sampler, Taken};

use crate::support::{Population, in_netns};

/// Each socket (by cookie) with its state, endpoints and holders.
fn sockets(s: &Sample) -> BTreeMap<u64, String> {
    s.sockets
        .iter()
        .map(|x| {
            let owners: Vec<u32> = s.owners.owners(x.inode).iter().map(|p| p.1).collect();
            let cookie = x.cookie().unwrap_or_default();
            (
                cookie,
                format!("{} {} {} {owners:?}", x.state, x.local(), x.remote()),
            )
        })
        .collect()
}

/// Each socket (by cookie) with its peer's cookie and whether a listener accepts on it, as the
/// join finds them with `topology`.
fn peers(s: &Sample, topology: &Topology) -> BTreeMap<u64, (Option<u64>, bool)> {
    let j = Joined::with_topology_of(s, topology);
    (0..s.sockets.len())
        .map(|i| {
            let cookie = |i: usize| s.sockets[i].cookie().unwrap_or_default();
            (cookie(i), (j.peer(i).map(cookie), j.listens(i)))
        })
        .collect()
}

/// The groupings compared: every one a loop keeps (`--by port` folded and not).
fn queries() -> Vec<Query> {
    let by = |group_by: GroupBy, fold: bool| Query {
        group_by,
        states: [TcpState::Established, TcpState::CloseWait]
            .into_iter()
            .collect(),
        port: None,
        pid: None,
        process: None,
        top: None,
        fold,
    };
    vec![
        by(GroupBy::Port, false),
        by(GroupBy::Port, true),
        by(GroupBy::Pair, false),
        by(GroupBy::Process, false),
        by(GroupBy::Peer, false),
    ]
}

/// The report of `query` as JSON, joined with `topology`, without the time it was taken:
/// grouped from scratch, or by a loop's kept groups brought up to date by `edits`.
fn report(
    s: &Sample,
    topology: &Topology,
    query: &Query,
    kept: Option<(&mut KeptGroups, Option<&Edits>)>,
) -> Value {
    let joined = Joined::with_topology_of(s, topology);
    let report = match kept {
        Some((groups, edits)) => groups.report(&joined, query, edits, false).0,
        None => shimcheck::aggregate::aggregate(&joined, query),
    };
    let mut v = serde_json::to_value(report).unwrap();
    v.as_object_mut().unwrap().remove("taken_at");
    v
}

/// Findings as kind, pid, count and message (which names no clock below the thresholds).
fn findings(s: &Sample, topology: &Topology) -> Vec<String> {
    let cfg = DetectConfig {
        close_wait_min: 5,
        ..DetectConfig::default()
    };
    snapshot_findings(&Joined::with_topology_of(s, topology), &cfg)
        .into_iter()
        .map(|f| format!("{:?} {:?} {} {}", f.kind, f.pid, f.count, f.message))
        .collect()
}

#[test]
fn every_incremental_sample_equals_a_full_sample_of_the_same_moment() {
    skip_unless_live!();
    // The owner cache's slot reads are what this is about: the BPF walk re-reads every table
    // each time (tests/live/bpf.rs checks its loops), and without BPF no table is kept by
    // events either: the counters say when nothing moved.
    incremental_against_full(true);
}

#[test]
fn every_sample_kept_by_events_equals_a_full_sample_of_the_same_moment() {
    skip_unless_live!();
    // The socket table kept by state-change events, the peer match patched by its edits and
    // the BPF fd walk: the loop as a node runs it.
    if let Err(e) = shimcheck::bpf::events::StateChanges::load(None) {
        assert!(std::env::var_os("CI").is_none(), "must load under CI: {e}");
        eprintln!("skipped: BPF cannot be loaded here: {e}");
        return;
    }
    incremental_against_full(false);
}

/// Eight looks of a loop's sampler (`--no-bpf` or not) at a population the test changes
/// between them, each against a one-shot sample right after it.
fn incremental_against_full(no_bpf: bool) {
    let pop = Population::start(&json!({
        "servers": [{"name": "registry", "addr": "127.0.0.1", "port": 5000},
                    {"name": "closer", "addr": "127.0.0.1", "port": 7000,
                     "close_accepted": true}],
        "clients": [{"name": "kubelet", "connect": "127.0.0.1:5000", "count": 20}]
    }));
    let node = NodeArgs {
        proc_root: PathBuf::from("/proc"),
        pods_dir: PathBuf::from("/nonexistent"),
        all_netns: false,
        no_bpf,
    };
    let states: StateSet = [TcpState::Established, TcpState::CloseWait, TcpState::Listen]
        .into_iter()
        .collect();
    in_netns(pop.ns_pid, || {
        let mut loop_sampler = Sampler::open(&node, Mode::Incremental);
        let mut leaked: Vec<TcpStream> = Vec::new();
        let mut child = None;
        let mut unchanged_at = Vec::new();
        let mut kept: Option<(Sample, Topology, Option<Box<Edits>>)> = None;
        let queries = queries();
        let mut grouped: Vec<KeptGroups> = queries.iter().map(|_| KeptGroups::default()).collect();
        for step in 0..8 {
            match step {
                // The leak: connections opened and kept.
                1 => leaked.extend((0..25).map(|_| TcpStream::connect("127.0.0.1:5000").unwrap())),
                // Churn: some closed, as many opened; a server that closes what it accepts
                // leaves these clients in CLOSE_WAIT.
                2 => {
                    leaked.drain(..10);
                    leaked.extend((0..10).map(|_| TcpStream::connect("127.0.0.1:5000").unwrap()));
                    leaked.extend((0..8).map(|_| TcpStream::connect("127.0.0.1:7000").unwrap()));
                }
                // A new process with connections of its own.
                4 => {
                    let mut c = Command::new("python3")
                        .args([
                            "-c",
                            "import socket,sys,time\n\
                             k=[socket.create_connection(('127.0.0.1',5000)) for _ in range(15)]\n\
                             print('ready',flush=True)\ntime.sleep(600)",
                        ])
                        .stdout(Stdio::piped())
                        .spawn()
                        .unwrap();
                    let mut line = String::new();
                    BufReader::new(c.stdout.take().unwrap())
                        .read_line(&mut line)
                        .unwrap();
                    assert_eq!(line.trim(), "ready");
                    child = Some(c);
                }
                // It exits, and its connections with it.
                6 => {
                    let mut c = child.take().unwrap();
                    c.kill().unwrap();
                    c.wait().unwrap();
                }
                // 0, 3, 5 and 7: nothing moves.
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(200));
            let looked = std::time::Instant::now();
            // As a loop does: the last sample's sockets go back to the source (a table kept by
            // events lends its own, and patches the peer match by what it wrote since).
            let looked_at = loop_sampler
                .look(states, || kept.take().map(|(s, _, _)| s.sockets))
                .unwrap();
            let (inc, inc_topology, edits) = match looked_at {
                Look::New(Taken {
                    sample,
                    topology,
                    edits,
                }) => (sample, topology, edits),
                Look::Same(moved) => {
                    unchanged_at.push(step);
                    let (mut last, topology, edits) = kept.take().expect("a sample before");
                    last.apply(moved);
                    (last, topology, edits)
                }
            };
            let Taken {
                sample: full,
                topology: full_topology,
                ..
            } = Sampler::open(&node, Mode::OneShot).sample(states).unwrap();
            // The clocks of the two samples can differ by at most the time between the looks
            // (plus the kernel's clock tick): a loaded machine widens it, a wrong aging does not.
            let apart = looked.elapsed().as_millis() as u64 + 20;
            assert_eq!(
                sockets(&inc),
                sockets(&full),
                "step {step}: sockets and holders"
            );
            assert_eq!(
                peers(&inc, &inc_topology),
                peers(&full, &full_topology),
                "step {step}: peers and listening ends"
            );
            // The loop's groups kept from sample to sample, against groups made from scratch.
            for (query, kept) in queries.iter().zip(&mut grouped) {
                assert_eq!(
                    report(&inc, &inc_topology, query, Some((kept, edits.as_deref()))),
                    report(&full, &full_topology, query, None),
                    "step {step}: --by {:?}, fold {}",
                    query.group_by,
                    query.fold
                );
            }
            assert_eq!(
                findings(&inc, &inc_topology),
                findings(&full, &full_topology),
                "step {step}: findings"
            );
            // Clocks: the reused sample's are as old as the full one's, to the time between them.
            let idle = |s: &Sample| -> u64 {
                s.sockets
                    .iter()
                    .filter_map(|x| s.data_idle_ms(x))
                    .min()
                    .unwrap_or(0)
            };
            assert!(
                idle(&full).abs_diff(idle(&inc)) <= apart,
                "step {step}: {} vs {} ms idle, looks {apart} ms apart",
                idle(&inc),
                idle(&full)
            );
            if step == 2 {
                let found = findings(&inc, &inc_topology);
                assert!(
                    found.iter().any(|f| f.starts_with("CloseWait")),
                    "the CLOSE_WAIT pile-up is found: {found:?}"
                );
            }
            kept = Some((inc, inc_topology, edits));
        }
        // Steps 3, 5 and 7 change nothing since the sample before: answered without a dump.
        assert_eq!(
            unchanged_at,
            [3, 5, 7],
            "samples answered from the last dump"
        );
    });
}
