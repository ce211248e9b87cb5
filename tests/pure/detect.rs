//! Detector tests on synthetic sample series: time is data, every sample carries its own
//! timestamp and no clock is read.

use std::collections::HashMap;
use std::time::Duration;

use shimcheck::aggregate::KeptGroups;
use shimcheck::detect::{self, Detail, DetectConfig, Finding, History, Kind, MIN_RISES, Severity};
use shimcheck::join::Joined;
use shimcheck::model::{FdUse, HostFacts, Sample, TcpInfo, TcpState};

use crate::support::builders::{self, ProcessWith, SocketWith, process, sock};

const REGISTRY: &str = "127.0.0.1:5000";
/// An idle time meaning "no data since it was opened, right after the previous sample": the
/// leak's signature (`watch` turns it into that socket's age).
const QUIET: u32 = u32::MAX;

/// A socket population at one instant: (cookie, state, local, remote, idle ms, holder pid).
struct Pop {
    sockets: Vec<(u64, TcpState, String, String, u32, u32)>,
    comms: HashMap<u32, &'static str>,
    host: HostFacts,
}

impl Pop {
    fn new() -> Pop {
        Pop {
            sockets: Vec::new(),
            comms: HashMap::from([
                (100, "image-cri-shim"),
                (200, "image-cri-shim"),
                (300, "app"),
                (900, "registry"),
            ]),
            host: HostFacts::default(),
        }
    }

    /// `n` client connections from `pid` to the registry, cookies `first..first+n`.
    fn clients(mut self, pid: u32, first: u64, n: u64, idle_ms: u32) -> Pop {
        for c in first..first + n {
            let local = format!("127.0.0.1:{}", 20000 + c % 40000);
            self.sockets.push((
                c,
                TcpState::Established,
                local,
                REGISTRY.into(),
                idle_ms,
                pid,
            ));
        }
        self
    }

    /// One socket, quiet since it was opened.
    fn with(mut self, cookie: u64, state: TcpState, local: &str, remote: &str, pid: u32) -> Pop {
        self.sockets
            .push((cookie, state, local.into(), remote.into(), QUIET, pid));
        self
    }

    /// Gives the socket added last data `idle_ms` old.
    fn idle_last(mut self, idle_ms: u32) -> Pop {
        if let Some(s) = self.sockets.last_mut() {
            s.4 = idle_ms;
        }
        self
    }

    /// Replaces each `QUIET` idle time by the socket's age at `t`: opened 0.5 s after the
    /// sample before the one that first had it (`prev`), or 0.5 s before `t` if none did.
    fn aged(mut self, t: u64, prev: Option<u64>, opened: &mut HashMap<u64, i64>) -> Pop {
        let now_ms = t as i64 * 1000;
        for (cookie, _, _, _, idle, _) in &mut self.sockets {
            if *idle == QUIET {
                let at_ms = *opened
                    .entry(*cookie)
                    .or_insert_with(|| prev.map_or(now_ms - 500, |p| p as i64 * 1000 + 500));
                *idle = (now_ms - at_ms) as u32;
            }
        }
        self
    }

    fn sample(&self, t: u64) -> Sample {
        let sockets = self
            .sockets
            .iter()
            .map(|(cookie, state, local, remote, idle, _)| {
                // Inode 0 means "no owner can be found" (TIME_WAIT): keep real ones non-zero.
                sock(*state, local, remote, cookie + 1)
                    .cookie(*cookie)
                    .tcp_info(TcpInfo {
                        last_data_sent_ms: *idle,
                        last_data_recv_ms: *idle,
                        ..TcpInfo::default()
                    })
            });
        builders::sample()
            .at(1_800_000_000 + t)
            .sockets(sockets)
            .owners(self.sockets.iter().map(|s| (s.0 + 1, s.5)))
            .processes(
                self.comms
                    .iter()
                    .map(|(&pid, &comm)| process(pid, comm).cmdline(comm)),
            )
            .host(self.host.clone())
            .build()
    }
}

fn cfg(window_s: u64) -> DetectConfig {
    DetectConfig {
        window: Duration::from_secs(window_s),
        ..DetectConfig::default()
    }
}

/// Feeds a series (time in seconds → population) through a watch-mode history and returns
/// the growth findings after each sample.
fn watch(series: impl IntoIterator<Item = (u64, Pop)>, c: &DetectConfig) -> Vec<Vec<Finding>> {
    let mut h = History::new(c.window, MIN_RISES);
    let mut opened = HashMap::new();
    let mut prev = None;
    series
        .into_iter()
        .map(|(t, pop)| {
            let s = pop.aged(t, prev, &mut opened).sample(t);
            prev = Some(t);
            let j = Joined::new(&s);
            h.observe(&j);
            h.growth(&j, c)
        })
        .collect()
}

fn first_flagged(results: &[Vec<Finding>]) -> Option<usize> {
    results.iter().position(|f| !f.is_empty())
}

#[test]
fn a_steady_leak_is_flagged_with_the_culprits_remedy() {
    // +2 connections every 5 s, none ever closed (the image-cri-shim leak).
    let results = watch(
        (0..12).map(|i| (i * 5, Pop::new().clients(100, 0, 2 * i + 2, QUIET))),
        &cfg(60),
    );
    assert_eq!(
        first_flagged(&results),
        Some(5),
        "rise of 10 reached at the 6th sample"
    );
    let f = &results[11][0];
    assert_eq!(
        (f.kind, f.pid, f.comm.as_str(), f.count),
        (Kind::Growth, Some(100), "image-cri-shim", 24)
    );
    assert_eq!(f.remote.as_deref(), Some(REGISTRY));
    assert_eq!(f.severity, Severity::Critical);
    assert!(
        f.message.contains(
            "image-cri-shim before v4.2.0 leaks one registry connection per image lookup"
        ),
        "{}",
        f.message
    );
    assert!(
        f.remediation
            .as_deref()
            .unwrap()
            .contains("systemctl restart image-cri-shim")
    );
    match f.detail {
        Detail::Growth {
            rate_per_min,
            retained,
            quiet,
            unjudged,
        } => {
            assert_eq!(retained, 1.0);
            assert_eq!(rate_per_min, 24.0, "22 more in 55 s");
            assert_eq!(
                (quiet, unjudged),
                (22, 0),
                "every connection opened since is quiet"
            );
        }
        ref other => panic!("{other:?}"),
    }
}

#[test]
fn a_slow_leak_of_four_a_minute_is_flagged_once_it_has_grown_by_ten() {
    // One more connection every 15 s over 5 minutes.
    let results = watch(
        (0..21).map(|i| (i * 15, Pop::new().clients(300, 0, 5 + i, QUIET))),
        &cfg(300),
    );
    assert_eq!(first_flagged(&results), Some(10));
    let f = &results[20][0];
    assert_eq!((f.comm.as_str(), f.severity), ("app", Severity::Warning));
    assert!(
        f.remediation.is_none(),
        "no known fix for an unknown program"
    );
    assert!(matches!(f.detail, Detail::Growth { rate_per_min, .. } if rate_per_min == 4.0));
}

#[test]
fn churn_at_a_stable_count_is_not_a_leak() {
    // 40 connections at any time, all replaced each sample; every few samples a burst of 15.
    let results = watch(
        (0..30).map(|i| {
            let n = if i % 4 == 3 { 55 } else { 40 };
            (i * 5, Pop::new().clients(300, i * 1000, n, QUIET))
        }),
        &cfg(60),
    );
    assert_eq!(first_flagged(&results), None);
}

#[test]
fn a_large_stable_pool_is_not_a_leak() {
    let results = watch(
        (0..30).map(|i| (i * 5, Pop::new().clients(300, 0, 2000, QUIET))),
        &cfg(60),
    );
    assert_eq!(first_flagged(&results), None);
}

#[test]
fn a_step_then_flat_is_not_a_leak() {
    // A pool warming up: 10 connections, then 60 in one go, then nothing more.
    let results = watch(
        (0..30).map(|i| {
            (
                i * 5,
                Pop::new().clients(300, 0, if i == 0 { 10 } else { 60 }, QUIET),
            )
        }),
        &cfg(60),
    );
    assert_eq!(first_flagged(&results), None);
}

#[test]
fn a_restarted_process_that_leaks_again_is_flagged_under_its_new_pid() {
    let mut series = Vec::new();
    for i in 0..6 {
        series.push((i * 5, Pop::new().clients(100, 0, 2 * i + 2, QUIET)));
    }
    // Restarted: pid 100 is gone with its sockets, pid 200 starts from nothing and leaks.
    for i in 0..10 {
        series.push((
            30 + i * 5,
            Pop::new().clients(200, 10_000, 2 * i + 2, QUIET),
        ));
    }
    let results = watch(series, &cfg(60));
    let last = &results[15];
    assert_eq!(last.len(), 1);
    assert_eq!((last[0].pid, last[0].count), (Some(200), 20));
    assert!(results[6..].iter().flatten().all(|f| f.pid == Some(200)));
}

#[test]
fn the_server_end_on_this_node_is_named_as_the_mirror_not_reported_twice() {
    let mut series = Vec::new();
    for i in 0..8u64 {
        let mut p = Pop::new().with(1, TcpState::Listen, "127.0.0.1:5000", "0.0.0.0:0", 900);
        for c in 0..2 * i + 2 {
            let port = 40000 + c;
            p = p
                .with(
                    10 + c,
                    TcpState::Established,
                    &format!("127.0.0.1:{port}"),
                    REGISTRY,
                    100,
                )
                .with(
                    5000 + c,
                    TcpState::Established,
                    REGISTRY,
                    &format!("127.0.0.1:{port}"),
                    900,
                );
        }
        series.push((i * 5, p));
    }
    let results = watch(series, &cfg(60));
    let last = &results[7];
    assert_eq!(last.len(), 1, "{last:#?}");
    assert_eq!(last[0].pid, Some(100));
    assert!(
        last[0]
            .message
            .contains("the other ends are held by registry(900) on this node"),
        "{}",
        last[0].message
    );
}

#[test]
fn growth_since_a_baseline_needs_no_window() {
    let c = cfg(300);
    let mut opened = HashMap::new();
    let before = Pop::new()
        .clients(100, 0, 100, QUIET)
        .aged(0, None, &mut opened)
        .sample(0);
    let after = Pop::new()
        .clients(100, 0, 180, QUIET)
        .aged(3600, Some(0), &mut opened)
        .sample(3600);
    let mut h = History::against_baseline();
    h.observe(&Joined::new(&before));
    let j = Joined::new(&after);
    h.observe(&j);
    let f = h.growth(&j, &c);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].count, 180);
    assert!(matches!(f[0].detail, Detail::Growth { retained, .. } if retained == 1.0));
}

#[test]
fn history_is_a_window_not_a_log() {
    let c = cfg(60);
    let mut h = History::new(c.window, MIN_RISES);
    for i in 0..1000u64 {
        let s = Pop::new().clients(300, i * 100, 50, 0).sample(i * 5);
        h.observe(&Joined::new(&s));
        assert!(h.len() <= 14, "{} samples held at sample {i}", h.len());
    }
}

#[test]
fn an_idle_pile_up_is_seen_in_one_look() {
    let c = DetectConfig {
        idle_after: Duration::from_secs(2),
        ..DetectConfig::default()
    };
    let s = Pop::new()
        .clients(100, 0, 60, 35_000)
        .clients(300, 1000, 60, 500)
        .sample(0);
    let f = detect::findings(&Joined::new(&s), None, &c);
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(
        (f[0].kind, f[0].pid, f[0].count),
        (Kind::Idle, Some(100), 60)
    );
    assert!(matches!(
        f[0].detail,
        Detail::Idle {
            idle_s_min: 35,
            idle_s_median: 35
        }
    ));
    assert!(
        f[0].message.contains("carried no data for at least 35s"),
        "{}",
        f[0].message
    );
    // Below the count threshold: nothing.
    let s = Pop::new().clients(100, 0, 49, 35_000).sample(0);
    assert!(detect::findings(&Joined::new(&s), None, &c).is_empty());
}

#[test]
fn a_close_wait_pile_up_is_flagged_per_process() {
    let mut p = Pop::new();
    for c in 0..60u64 {
        p = p.with(
            c,
            TcpState::CloseWait,
            &format!("127.0.0.1:{}", 30000 + c),
            "127.0.0.1:7000",
            300,
        );
    }
    let f = detect::findings(&Joined::new(&p.sample(0)), None, &DetectConfig::default());
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(
        (f[0].kind, f[0].pid, f[0].count),
        (Kind::CloseWait, Some(300), 60)
    );
    assert_eq!(f[0].remote.as_deref(), Some("127.0.0.1:7000"));
    assert!(f[0].message.contains("never called close()"));
}

#[test]
fn half_the_ephemeral_range_to_one_destination_is_port_exhaustion() {
    let mut p = Pop::new().clients(300, 0, 600, 0);
    p.host.port_range = Some((32768, 33767)); // 1,000 ports
    let f = detect::findings(&Joined::new(&p.sample(0)), None, &DetectConfig::default());
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0].kind, Kind::PortExhaustion);
    assert!(matches!(
        f[0].detail,
        Detail::PortExhaustion {
            used: 600,
            range: 1000
        }
    ));
    p.host.port_range = Some((32768, 60999));
    assert!(
        detect::findings(&Joined::new(&p.sample(0)), None, &DetectConfig::default()).is_empty()
    );
}

#[test]
fn a_process_near_its_fd_limit_is_flagged() {
    let mut p = Pop::new();
    p.host.fds.insert(
        300,
        FdUse {
            open: 1000,
            limit: Some(1024),
        },
    );
    p.host.fds.insert(
        100,
        FdUse {
            open: 700,
            limit: Some(1024),
        },
    );
    p.host.fds.insert(
        900,
        FdUse {
            open: 5000,
            limit: None,
        },
    );
    let f = detect::findings(&Joined::new(&p.sample(0)), None, &DetectConfig::default());
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(
        (f[0].kind, f[0].pid, f[0].severity),
        (Kind::FdLimit, Some(300), Severity::Critical)
    );
    assert!(matches!(
        f[0].detail,
        Detail::FdLimit {
            open: 1000,
            limit: 1024
        }
    ));
}

#[test]
fn findings_serialise_with_the_contract_fields() {
    let results = watch(
        (0..8).map(|i| (i * 5, Pop::new().clients(100, 0, 2 * i + 2, QUIET))),
        &cfg(60),
    );
    let v = serde_json::to_value(&results[7][0]).unwrap();
    for field in [
        "kind",
        "severity",
        "pid",
        "comm",
        "remote",
        "count",
        "message",
        "remediation",
        "rate_per_min",
        "retained",
        "quiet",
        "unjudged",
    ] {
        assert!(v.get(field).is_some(), "missing {field}: {v}");
    }
    assert_eq!(v["kind"], "growth");
    assert_eq!(v["severity"], "critical");
}

/// A client opening one connection a second, up to 40 (watched every second, 10 s window),
/// whose connections each carry `idle_ms`-old data (QUIET: none since opened).
fn ramp(pid: u32, first: u64, idle_ms: u32) -> Vec<(u64, Pop)> {
    (0..45)
        .map(|t| (t, Pop::new().clients(pid, first, (t + 1).min(40), idle_ms)))
        .collect()
}

#[test]
fn a_pool_warming_up_under_load_is_not_a_leak() {
    // Every connection carries a byte each second: its data clock is never older than 1 s.
    let results = watch(ramp(300, 0, 400), &cfg(10));
    assert_eq!(first_flagged(&results), None, "{:#?}", results.concat());
}

#[test]
fn the_same_ramp_of_connections_that_go_quiet_is_a_leak_as_fast_as_before() {
    let results = watch(ramp(300, 0, QUIET), &cfg(10));
    assert_eq!(
        first_flagged(&results),
        Some(10),
        "a rise of 10 over 3 rises"
    );
    let f = &results[20][0];
    assert!(
        f.message
            .contains("10 of the 10 opened since went quiet after their first exchanges"),
        "{}",
        f.message
    );
}

#[test]
fn connections_that_carry_data_once_and_then_go_quiet_are_a_leak() {
    // Each connection exchanges data 1 s after it is opened (after shimcheck first saw it),
    // then never again: active at first, quiet once the quiet time (window / 4) has passed.
    let mut series = Vec::new();
    for t in 0..45u64 {
        let mut p = Pop::new();
        for c in 0..(t + 1).min(40) {
            let since_data = (t - c).saturating_sub(1) * 1000;
            p = p.clients(300, c, 1, since_data as u32);
        }
        series.push((t, p));
    }
    let results = watch(series, &cfg(20));
    let first = first_flagged(&results).expect("flagged");
    eprintln!("carried data once, then quiet: first flagged at sample {first}");
    assert!((10..=20).contains(&first), "flagged at sample {first}");
}

#[test]
fn a_pool_that_ramps_up_and_shrinks_back_is_not_a_leak() {
    let series: Vec<(u64, Pop)> = (0..60u64)
        .map(|t| {
            let n = if t < 30 { t + 1 } else { 60 - t };
            (t, Pop::new().clients(300, 0, n, 300))
        })
        .collect();
    let results = watch(series, &cfg(10));
    assert_eq!(first_flagged(&results), None);
}

#[test]
fn only_the_leak_is_flagged_in_a_process_with_an_active_pool_beside_it() {
    let series: Vec<(u64, Pop)> = (0..45u64)
        .map(|t| {
            let n = (t + 1).min(40);
            let mut p = Pop::new().clients(300, 0, n, QUIET);
            for c in 0..n {
                p = p
                    .with(
                        10_000 + c,
                        TcpState::Established,
                        &format!("127.0.0.1:{}", 50_000 + c),
                        "127.0.0.1:6379",
                        300,
                    )
                    .idle_last(300);
            }
            (t, p)
        })
        .collect();
    let results = watch(series, &cfg(10));
    for f in results.iter().flatten() {
        assert_eq!(f.remote.as_deref(), Some(REGISTRY), "{f:#?}");
    }
    assert_eq!(results[30].len(), 1, "{:#?}", results[30]);
}

#[test]
fn without_tcp_info_growth_is_judged_as_before_and_says_so() {
    let mut h = History::new(Duration::from_secs(60), MIN_RISES);
    let mut last = Vec::new();
    for i in 0..8u64 {
        let sockets = (0..2 * i + 2).map(|c| {
            sock(
                TcpState::Established,
                &format!("127.0.0.1:{}", 20000 + c),
                REGISTRY,
                c + 1,
            )
        });
        let s = builders::sample()
            .at(1_800_000_000 + i * 5)
            .sockets(sockets)
            .owners((0..2 * i + 2).map(|c| (c + 1, 300)))
            .process(process(300, "app"))
            .build();
        let j = Joined::new(&s);
        h.observe(&j);
        last = h.growth(&j, &cfg(60));
    }
    assert_eq!(last.len(), 1);
    assert!(
        last[0].message.contains("could not be judged: no tcp_info"),
        "{}",
        last[0].message
    );
    assert!(matches!(
        last[0].detail,
        Detail::Growth { unjudged: 14, .. }
    ));
}

/// A loop whose collector saw nothing move judges the last sample again from the detector's
/// digest, its clocks moved on by the time since: the findings must be those of a fresh look at
/// the same sockets at that time, growth and idle alike, including an idle pile-up that only
/// crosses its threshold in between.
#[test]
fn a_digest_judged_later_gives_the_findings_of_a_fresh_look_then() {
    use shimcheck::detect::Digest;
    use shimcheck::model::Moved;
    let c = cfg(600);
    let mut h_digest = History::new(c.window, MIN_RISES);
    let mut h_fresh = History::new(c.window, MIN_RISES);
    let mut opened = HashMap::new();
    let mut prev = None;
    let mut last = None;
    for (t, leak) in [(0, 10), (10, 25), (20, 40), (30, 55), (40, 70)] {
        let s = Pop::new()
            .clients(100, 0, leak, QUIET)
            .clients(300, 10_000, 60, 290_000)
            .aged(t, prev, &mut opened)
            .sample(t);
        prev = Some(t);
        let j = Joined::new(&s);
        h_digest.observe(&j);
        h_fresh.observe(&j);
        last = Some(s);
    }
    let mut sample = last.unwrap();
    let digest = Digest::new(&Joined::new(&sample));
    let before = digest.findings(&sample, Some(&h_digest), &c);
    assert!(before.iter().any(|f| f.kind == Kind::Growth), "{before:#?}");
    assert!(!before.iter().any(|f| f.kind == Kind::Idle), "{before:#?}");

    // 20 s later, nothing moved.
    let later = sample.taken_at + Duration::from_secs(20);
    let changed = sample.apply(Moved {
        taken_at: later,
        fds: sample.host.fds.clone(),
        scan: sample.scan.clone(),
        warnings: sample.warnings.clone(),
        owners: None,
    });
    assert!(!changed);
    assert_eq!(sample.tcp_info_age_ms, 20_000);
    h_digest.observe_same(later);
    let judged = digest.findings(&sample, Some(&h_digest), &c);

    let fresh_sample = Pop::new()
        .clients(100, 0, 70, QUIET)
        .clients(300, 10_000, 60, 310_000)
        .aged(60, Some(40), &mut opened)
        .sample(60);
    let j = Joined::new(&fresh_sample);
    h_fresh.observe(&j);
    let fresh = detect::findings(&j, Some(&h_fresh), &c);
    assert!(fresh.iter().any(|f| f.kind == Kind::Idle), "{fresh:#?}");
    assert_eq!(judged, fresh);
}

/// A loop digests each new sample before the history sees it, and the history takes its counts
/// from the digest (`observe_digest`): after every sample, the findings must be those of a
/// history fed the joined samples, with sockets closing, opening, changing hands and leaking.
#[test]
fn a_history_fed_digests_judges_as_one_fed_joined_samples() {
    use shimcheck::detect::Digest;
    let c = cfg(600);
    let mut h_joined = History::new(c.window, MIN_RISES);
    let mut h_digest = History::new(c.window, MIN_RISES);
    let mut opened = HashMap::new();
    let mut prev = None;
    for (t, leak, churn) in [
        (0, 10, 0),
        (10, 25, 40),
        (20, 40, 80),
        (30, 55, 20),
        (40, 70, 60),
    ] {
        let s = Pop::new()
            .clients(100, 0, leak, QUIET)
            .clients(200, 5_000 + churn, 40, QUIET)
            .clients(300, 10_000, 60, 290_000)
            .with(
                20_000,
                TcpState::Established,
                "10.0.0.5:5000",
                "10.9.9.9:40000",
                900,
            )
            .with(20_001, TcpState::Listen, "0.0.0.0:5000", "0.0.0.0:0", 900)
            .with(
                20_002 + t,
                TcpState::CloseWait,
                "127.0.0.1:41000",
                REGISTRY,
                300,
            )
            .aged(t, prev, &mut opened)
            .sample(t);
        prev = Some(t);
        let j = Joined::new(&s);
        h_joined.observe(&j);
        let digest = Digest::new(&j);
        h_digest.observe_digest(&digest, &j, &KeptGroups::default(), None);
        assert_eq!(h_digest.len(), h_joined.len());
        let fresh = detect::findings(&j, Some(&h_joined), &c);
        assert_eq!(digest.findings(&s, Some(&h_digest), &c), fresh, "at {t} s");
        if t == 40 {
            assert!(fresh.iter().any(|f| f.kind == Kind::Growth), "{fresh:#?}");
        }
    }
}

// Every documented threshold (docs/detection.md, the consts of src/detect.rs and
// src/model.rs), just under and just over.

/// The growth findings of the last sample of `series`, watched with a 60 s window.
fn last_growth(series: Vec<(u64, Pop)>) -> Vec<Finding> {
    watch(series, &cfg(60)).pop().unwrap_or_default()
}

/// `app` holds 100 connections at the window's start, then keeps `kept` of them while new ones
/// take the count to 105, 110 and 115: a rise of 15 over 3 rises, all quiet.
fn keeping(kept: u64) -> Vec<(u64, Pop)> {
    (0..4u64)
        .map(|i| {
            let p = if i == 0 {
                Pop::new().clients(300, 0, 100, QUIET)
            } else {
                Pop::new().clients(300, 100 - kept, kept, QUIET).clients(
                    300,
                    1000,
                    100 + 5 * i - kept,
                    QUIET,
                )
            };
            (i * 5, p)
        })
        .collect()
}

#[test]
fn growth_needs_90_percent_of_the_sockets_at_the_windows_start_still_open() {
    let f = last_growth(keeping(90));
    assert_eq!(f.len(), 1, "kept 90 of 100: {f:#?}");
    assert!(matches!(f[0].detail, Detail::Growth { retained, .. } if retained == 0.9));
    assert!(
        f[0].message.contains("kept 90% of those it had"),
        "{}",
        f[0].message
    );
    let f = last_growth(keeping(89));
    assert!(f.is_empty(), "kept 89 of 100 (churn): {f:#?}");
}

/// `app`'s connection count at each sample, 5 s apart, all of them quiet.
fn counts(counts: &[u64]) -> Vec<(u64, Pop)> {
    counts
        .iter()
        .zip(0u64..)
        .map(|(&n, i)| (i * 5, Pop::new().clients(300, 0, n, QUIET)))
        .collect()
}

#[test]
fn growth_needs_three_rises_between_samples() {
    let f = last_growth(counts(&[10, 14, 18, 22]));
    assert_eq!(f.len(), 1, "3 rises: {f:#?}");
    assert!(last_growth(counts(&[10, 10, 16, 22])).is_empty(), "2 rises");
}

#[test]
fn growth_needs_a_rise_of_min_growth() {
    let f = last_growth(counts(&[10, 14, 17, 20]));
    assert_eq!(f.len(), 1, "a rise of 10: {f:#?}");
    assert_eq!((f[0].count, f[0].pid), (20, Some(300)));
    assert!(
        f[0].message
            .contains("went from 10 to 20 connections to 127.0.0.1:5000 in 15s"),
        "{}",
        f[0].message
    );
    assert!(
        last_growth(counts(&[10, 13, 16, 19])).is_empty(),
        "a rise of 9"
    );
}

#[test]
fn growth_of_a_thousand_connections_is_critical() {
    let f = last_growth(counts(&[990, 994, 997, 1000]));
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0].severity, Severity::Critical);
    let f = last_growth(counts(&[989, 993, 996, 999]));
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0].severity, Severity::Warning);
}

/// 10 connections at the start; 10 more after 5 s and 10 more after 10 s, both carrying data
/// 100 ms ago (active); after 15 s `quiet` new ones, first seen then (quiet).
fn active_then_quiet(quiet: u64) -> Vec<(u64, Pop)> {
    let base = || Pop::new().clients(300, 0, 10, QUIET);
    vec![
        (0, base()),
        (5, base().clients(300, 100, 10, 100)),
        (10, base().clients(300, 100, 20, 100)),
        (
            15,
            base()
                .clients(300, 100, 20, 100)
                .clients(300, 200, quiet, QUIET),
        ),
    ]
}

#[test]
fn growth_needs_min_growth_of_the_new_connections_quiet() {
    let f = last_growth(active_then_quiet(10));
    assert_eq!(f.len(), 1, "10 quiet: {f:#?}");
    assert!(
        matches!(
            f[0].detail,
            Detail::Growth {
                quiet: 10,
                unjudged: 0,
                ..
            }
        ),
        "{:?}",
        f[0].detail
    );
    assert!(
        f[0].message
            .contains("10 of the 30 opened since went quiet"),
        "{}",
        f[0].message
    );
    assert!(
        last_growth(active_then_quiet(9)).is_empty(),
        "9 quiet, 20 active"
    );
}

/// 10 connections at the start; after 10 s, 10 more whose data clocks stay at `idle_ms`; one
/// more new connection at 20 s and at 30 s. At 30 s the ten were watched for 20 s, longer than
/// the quiet time of a 60 s window (15 s): the quiet time alone decides.
fn quiet_after_a_quarter_window(idle_ms: u32) -> Vec<(u64, Pop)> {
    let base = |n: u64| {
        Pop::new()
            .clients(300, 0, 10, QUIET)
            .clients(300, 100, 10, idle_ms)
            .clients(300, 200, n, QUIET)
    };
    vec![
        (0, Pop::new().clients(300, 0, 10, QUIET)),
        (10, base(0)),
        (20, base(1)),
        (30, base(2)),
    ]
}

#[test]
fn a_connection_is_quiet_once_silent_for_a_quarter_of_the_window() {
    let f = last_growth(quiet_after_a_quarter_window(15_000));
    assert_eq!(f.len(), 1, "silent for 15 s: {f:#?}");
    assert!(matches!(f[0].detail, Detail::Growth { quiet: 12, .. }));
    let f = last_growth(quiet_after_a_quarter_window(14_999));
    assert!(f.is_empty(), "data 14.999 s ago is activity: {f:#?}");
}

fn idle_cfg() -> DetectConfig {
    DetectConfig {
        idle_after: Duration::from_secs(2),
        ..DetectConfig::default()
    }
}

fn idle_findings(s: &Sample) -> Vec<Finding> {
    detect::findings(&Joined::new(s), None, &idle_cfg())
}

#[test]
fn idle_needs_idle_min_count_sockets_each_silent_for_idle_after() {
    let f = idle_findings(&Pop::new().clients(300, 0, 50, 2_000).sample(0));
    assert_eq!(f.len(), 1, "50 silent for 2 s: {f:#?}");
    assert_eq!(
        (f[0].kind, f[0].count, f[0].severity),
        (Kind::Idle, 50, Severity::Warning)
    );
    assert!(matches!(
        f[0].detail,
        Detail::Idle {
            idle_s_min: 2,
            idle_s_median: 2
        }
    ));
    assert!(
        idle_findings(&Pop::new().clients(300, 0, 50, 1_999).sample(0)).is_empty(),
        "silent for 1.999 s"
    );
    assert!(
        idle_findings(&Pop::new().clients(300, 0, 49, 2_000).sample(0)).is_empty(),
        "49 sockets"
    );
    // Only the silent ones count, and the others do not hide them.
    let f = idle_findings(
        &Pop::new()
            .clients(300, 0, 50, 2_000)
            .clients(300, 100, 30, 1_999)
            .sample(0),
    );
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0].count, 50);
    // Nor do they make up for the silent ones missing: 49 silent among 79 is not enough.
    let f = idle_findings(
        &Pop::new()
            .clients(300, 0, 49, 2_000)
            .clients(300, 100, 30, 1_999)
            .sample(0),
    );
    assert!(f.is_empty(), "{f:#?}");
}

#[test]
fn idle_clocks_include_the_age_of_a_sample_brought_forward() {
    let mut s = Pop::new().clients(300, 0, 50, 1_500).sample(0);
    assert!(idle_findings(&s).is_empty());
    s.tcp_info_age_ms = 500;
    let f = idle_findings(&s);
    assert_eq!(f.len(), 1, "1.5 s at the dump, 2 s now: {f:#?}");
    assert!(matches!(f[0].detail, Detail::Idle { idle_s_min: 2, .. }));
}

#[test]
fn the_idle_median_is_the_middle_clock_and_the_minimum_the_freshest() {
    let f = idle_findings(
        &Pop::new()
            .clients(300, 0, 20, 10_000)
            .clients(300, 100, 21, 200_000)
            .clients(300, 200, 20, 9_000_000)
            .sample(0),
    );
    assert_eq!(f.len(), 1, "{f:#?}");
    assert!(
        matches!(
            f[0].detail,
            Detail::Idle {
                idle_s_min: 10,
                idle_s_median: 200
            }
        ),
        "{:?}",
        f[0].detail
    );
    assert!(
        f[0].message.contains(
            "61 connections to 127.0.0.1:5000 that carried no data for at least 10s (median 3m)"
        ),
        "{}",
        f[0].message
    );
}

#[test]
fn an_idle_pile_up_of_a_thousand_is_critical() {
    let f = idle_findings(&Pop::new().clients(300, 0, 1000, 2_000).sample(0));
    assert_eq!(f[0].severity, Severity::Critical);
    let f = idle_findings(&Pop::new().clients(300, 0, 999, 2_000).sample(0));
    assert_eq!(f[0].severity, Severity::Warning);
}

/// `n` CLOSE_WAIT sockets of `app` to one peer.
fn close_waits(n: u64) -> Sample {
    let mut p = Pop::new();
    for c in 0..n {
        p = p.with(
            c,
            TcpState::CloseWait,
            &format!("127.0.0.1:{}", 20000 + c),
            "127.0.0.1:7000",
            300,
        );
    }
    p.sample(0)
}

fn default_findings(s: &Sample) -> Vec<Finding> {
    detect::findings(&Joined::new(s), None, &DetectConfig::default())
}

/// The samples `at(n)` make no finding below `warn`, a warning from `warn` on, and a critical
/// finding from `critical` on.
fn warns_then_turns_critical(at: impl Fn(u64) -> Sample, warn: u64, critical: u64) {
    let below = default_findings(&at(warn - 1));
    assert!(below.is_empty(), "{}: {below:#?}", warn - 1);
    for (n, severity) in [
        (warn, Severity::Warning),
        (critical - 1, Severity::Warning),
        (critical, Severity::Critical),
    ] {
        assert_eq!(default_findings(&at(n))[0].severity, severity, "at {n}");
    }
}

#[test]
fn close_wait_needs_close_wait_min_sockets_and_ten_times_that_is_critical() {
    let f = default_findings(&close_waits(50));
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(
        (f[0].kind, f[0].count, f[0].severity),
        (Kind::CloseWait, 50, Severity::Warning)
    );
    warns_then_turns_critical(close_waits, 50, 500);
}

#[test]
fn close_wait_to_many_peers_names_none_and_counts_them_all() {
    let mut p = Pop::new();
    for c in 0..60u64 {
        p = p.with(
            c,
            TcpState::CloseWait,
            &format!("127.0.0.1:{}", 20000 + c),
            &format!("127.0.0.1:{}", 7000 + c % 2),
            300,
        );
    }
    let f = default_findings(&p.sample(0));
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!((f[0].count, f[0].remote.as_deref()), (60, None));
    assert!(
        f[0].message
            .starts_with("app(300) holds 60 CLOSE_WAIT sockets: their peers closed"),
        "{}",
        f[0].message
    );
}

/// `app`'s `n` connections to the registry, with an ephemeral range of 1,000 ports.
fn ports_used(n: u64) -> Sample {
    let mut p = Pop::new().clients(300, 0, n, 0);
    p.host.port_range = Some((32768, 33767));
    p.sample(0)
}

#[test]
fn port_exhaustion_starts_at_half_the_range_and_is_critical_at_90_percent() {
    let f = default_findings(&ports_used(500));
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(
        (f[0].kind, f[0].severity, f[0].pid, f[0].count),
        (Kind::PortExhaustion, Severity::Warning, Some(300), 500)
    );
    assert!(
        f[0].message.starts_with(
            "connections from 127.0.0.1 to 127.0.0.1:5000 use 500 of the 1000 ephemeral ports \
             (50%), most held by app(300)"
        ),
        "{}",
        f[0].message
    );
    warns_then_turns_critical(ports_used, 500, 900);
}

#[test]
fn a_servers_accepted_connections_use_no_ephemeral_port() {
    // A range of two ports: one client connection to a destination is half of it.
    let s = builders::sample()
        .sockets([
            sock(TcpState::Listen, "10.0.0.1:5000", "0.0.0.0:0", 1),
            sock(TcpState::Established, "10.0.0.1:5000", "10.0.0.9:40000", 2),
        ])
        .owners([(1, 900), (2, 900)])
        .process(process(900, "registry"))
        .port_range(40000, 40001)
        .build();
    let f = default_findings(&s);
    assert!(f.is_empty(), "{f:#?}");
    let s = builders::sample()
        .socket(sock(
            TcpState::Established,
            "10.0.0.1:40000",
            "10.0.0.9:5000",
            2,
        ))
        .owner(2, 300)
        .process(process(300, "app"))
        .port_range(40000, 40001)
        .build();
    let f = default_findings(&s);
    assert_eq!(f.len(), 1, "{f:#?}");
    assert!(matches!(
        f[0].detail,
        Detail::PortExhaustion { used: 1, range: 2 }
    ));
}

#[test]
fn port_exhaustion_names_the_process_holding_most_of_the_ports() {
    let mut p = Pop::new().clients(300, 0, 300, 0).clients(100, 300, 250, 0);
    p.host.port_range = Some((32768, 33767));
    let f = default_findings(&p.sample(0));
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!((f[0].pid, f[0].count), (Some(300), 550));
    // Without a visible holder the finding says so.
    let s = builders::sample()
        .sockets((0..500u64).map(|c| {
            sock(
                TcpState::Established,
                &format!("127.0.0.1:{}", 20000 + c),
                REGISTRY,
                c + 1,
            )
        }))
        .port_range(32768, 33767)
        .build();
    let f = default_findings(&s);
    assert_eq!((f.len(), f[0].pid), (1, None), "{f:#?}");
    assert!(
        f[0].message.contains("held by no visible process"),
        "{}",
        f[0].message
    );
}

/// A process with `open` of its 1,000 allowed files.
fn fds(open: u64) -> Sample {
    builders::sample()
        .process(process(300, "app"))
        .fds(300, open, Some(1000))
        .build()
}

#[test]
fn fd_limit_starts_at_80_percent_and_is_critical_at_95() {
    let f = default_findings(&fds(800));
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(
        (f[0].kind, f[0].severity, f[0].count),
        (Kind::FdLimit, Severity::Warning, 800)
    );
    assert!(
        f[0].message
            .starts_with("app(300) has 800 of its 1000 allowed open files (80%)"),
        "{}",
        f[0].message
    );
    warns_then_turns_critical(fds, 800, 950);
}

// The server-side view: a server whose clients are on other hosts is judged per client address
// (`Target::Clients`), a registry serving many leaking nodes.

/// The registry (900) listens on every address at :5000; the hosts at 10.0.0.102 and
/// 10.0.0.103 are connected to it at 10.0.0.101:5000, each connection with its data clock.
fn registry_serving(clients: &[(&str, u64, u32)]) -> Pop {
    let mut p = Pop::new().with(1, TcpState::Listen, "0.0.0.0:5000", "0.0.0.0:0", 900);
    let mut cookie = 10;
    for &(host, n, idle_ms) in clients {
        for c in 0..n {
            p = p
                .with(
                    cookie,
                    TcpState::Established,
                    "10.0.0.101:5000",
                    &format!("{host}:{}", 40000 + c),
                    900,
                )
                .idle_last(idle_ms);
            cookie += 1;
        }
    }
    p
}

#[test]
fn a_server_with_an_idle_pile_up_from_one_client_host_is_flagged_per_client_address() {
    let s = registry_serving(&[("10.0.0.102", 60, 600_000), ("10.0.0.103", 60, 100)]).sample(0);
    let f = default_findings(&s);
    assert_eq!(f.len(), 1, "only the leaking host: {f:#?}");
    let f = &f[0];
    assert_eq!((f.kind, f.pid, f.count), (Kind::Idle, Some(900), 60));
    assert_eq!(f.remote, None, "the clients use many ports");
    assert_eq!(f.service.as_deref(), Some("10.0.0.101:5000"));
    assert!(
        f.message.contains(
            "registry(900) holds 60 connections from clients at 10.0.0.102 on 10.0.0.101:5000"
        ),
        "{}",
        f.message
    );
}

#[test]
fn a_server_whose_connections_from_one_client_host_grow_is_flagged_per_client_address() {
    let series: Vec<(u64, Pop)> = (0..8u64)
        .map(|i| {
            let mut p = registry_serving(&[("10.0.0.103", 30, 100)]);
            for c in 0..2 * i + 2 {
                p = p.with(
                    1000 + c,
                    TcpState::Established,
                    "10.0.0.101:5000",
                    &format!("10.0.0.102:{}", 50000 + c),
                    900,
                );
            }
            (i * 5, p)
        })
        .collect();
    let f = last_growth(series);
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!((f[0].pid, f[0].count), (Some(900), 16));
    assert_eq!(f[0].remote, None);
    assert_eq!(f[0].service.as_deref(), Some("10.0.0.101:5000"));
    assert!(
        f[0].message
            .contains("from clients at 10.0.0.102 on 10.0.0.101:5000"),
        "{}",
        f[0].message
    );
}

/// `n` idle connections of `app` to the registry, in namespace `netns`, as a sample of a
/// node where shimcheck runs in the host namespace and `lab` is another.
fn idle_in(netns: &[u64]) -> Sample {
    let sockets = netns.iter().zip(0u64..).flat_map(|(&ns, k)| {
        (0..50u64).map(move |c| {
            sock(
                TcpState::Established,
                &format!("127.0.0.1:{}", 20000 + c),
                REGISTRY,
                k * 100 + c + 1,
            )
            .netns(ns)
            .idle(600_000)
        })
    });
    let owners: Vec<(u64, u32)> = (0..netns.len() as u64)
        .flat_map(|k| (0..50u64).map(move |c| (k * 100 + c + 1, 300)))
        .collect();
    builders::sample()
        .host_netns(builders::HOST_NS)
        .netns_name(77, "lab")
        .sockets(sockets)
        .owners(owners)
        .process(process(300, "app"))
        .build()
}

#[test]
fn a_finding_names_the_network_namespace_only_when_it_is_not_shimchecks_own() {
    let f = default_findings(&idle_in(&[builders::HOST_NS]));
    assert_eq!(f.len(), 1, "{f:#?}");
    assert!(
        !f[0].message.contains("network namespace"),
        "{}",
        f[0].message
    );
    assert_eq!(
        f[0].netns.as_ref().map(|n| (n.inode, n.name.as_deref())),
        Some((builders::HOST_NS, Some("host")))
    );
    let f = default_findings(&idle_in(&[77]));
    assert_eq!(f.len(), 1, "{f:#?}");
    assert!(
        f[0].message
            .contains("50 connections to 127.0.0.1:5000 in network namespace lab"),
        "{}",
        f[0].message
    );
    let f = default_findings(&idle_in(&[78]));
    assert!(
        f[0].message.contains("in network namespace net:[78]"),
        "an unnamed namespace: {}",
        f[0].message
    );
}

#[test]
fn close_wait_names_its_namespace_when_it_has_one() {
    let in_ns = |spaces: &[u64]| {
        let sockets = spaces.iter().zip(0u64..).flat_map(|(&ns, k)| {
            (0..30u64).map(move |c| {
                sock(
                    TcpState::CloseWait,
                    &format!("127.0.0.1:{}", 20000 + c),
                    "127.0.0.1:7000",
                    k * 100 + c + 1,
                )
                .netns(ns)
            })
        });
        let owners: Vec<(u64, u32)> = (0..spaces.len() as u64)
            .flat_map(|k| (0..30u64).map(move |c| (k * 100 + c + 1, 300)))
            .collect();
        builders::sample()
            .host_netns(builders::HOST_NS)
            .netns_name(77, "lab")
            .sockets(sockets)
            .owners(owners)
            .process(process(300, "app"))
            .build()
    };
    let f = default_findings(&in_ns(&[77, 77]));
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(
        f[0].netns.as_ref().map(|n| (n.inode, n.name.as_deref())),
        Some((77, Some("lab")))
    );
    let f = default_findings(&in_ns(&[77, builders::HOST_NS]));
    assert_eq!((f.len(), f[0].count), (1, 60), "{f:#?}");
    assert_eq!(f[0].netns, None, "two namespaces: none named");
}

/// The idle finding's message for 50 connections silent for `secs`.
fn idle_message(secs: u32) -> String {
    let f = idle_findings(&Pop::new().clients(300, 0, 50, secs * 1000).sample(0));
    f[0].message.clone()
}

#[test]
fn durations_read_in_seconds_below_2_minutes_minutes_below_2_hours_then_hours() {
    for (secs, words) in [
        (119, "at least 119s"),
        (120, "at least 2m"),
        (7199, "at least 119m"),
        (7200, "at least 2h"),
    ] {
        let m = idle_message(secs);
        assert!(m.contains(words), "{secs} s: {m}");
    }
}

#[test]
fn a_history_holds_its_samples_from_the_first() {
    let mut h = History::new(Duration::from_secs(60), MIN_RISES);
    assert!(h.is_empty());
    assert_eq!(h.len(), 0);
    let s = Pop::new().clients(300, 0, 5, 0).sample(0);
    h.observe(&Joined::new(&s));
    assert!(!h.is_empty());
    assert_eq!(h.len(), 1);
    h.observe_same(s.taken_at + Duration::from_secs(5));
    assert_eq!(h.len(), 2);
}

#[test]
fn growth_counts_connections_without_tcp_info_beside_quiet_ones() {
    // Each sample adds 2 quiet connections with tcp_info and 2 without (a dump that lost it).
    let mut h = History::new(Duration::from_secs(60), MIN_RISES);
    let mut last = Vec::new();
    for i in 0..4u64 {
        let n = 4 * i + 4;
        let sockets = (0..n).map(|c| {
            let s = sock(
                TcpState::Established,
                &format!("127.0.0.1:{}", 20000 + c),
                REGISTRY,
                c + 1,
            );
            if c % 2 == 0 { s.idle(600_000) } else { s }
        });
        let s = builders::sample()
            .at(1_800_000_000 + i * 5)
            .sockets(sockets)
            .owners((0..n).map(|c| (c + 1, 300)))
            .process(process(300, "app"))
            .build();
        let j = Joined::new(&s);
        h.observe(&j);
        last = h.growth(&j, &cfg(60));
    }
    assert_eq!(last.len(), 1, "{last:#?}");
    assert!(
        matches!(
            last[0].detail,
            Detail::Growth {
                quiet: 6,
                unjudged: 6,
                ..
            }
        ),
        "{:?}",
        last[0].detail
    );
}

#[test]
fn against_a_baseline_connections_opened_since_that_carry_data_are_a_pool_not_a_leak() {
    // When they were opened is unknown: the quiet time (a quarter of the hour since the
    // snapshot, at most a quarter of the window) alone decides.
    let judge = |idle_ms: u32| {
        let before = Pop::new().clients(300, 0, 100, 1_000).sample(0);
        let after = Pop::new()
            .clients(300, 0, 100, 1_000)
            .clients(300, 1000, 80, idle_ms)
            .sample(3600);
        let mut h = History::against_baseline();
        h.observe(&Joined::new(&before));
        let j = Joined::new(&after);
        h.observe(&j);
        h.growth(&j, &cfg(3600))
    };
    assert!(judge(1_000).is_empty(), "data a second ago: active");
    assert!(
        judge(899_999).is_empty(),
        "data just under 15 minutes ago: active"
    );
    let f = judge(900_000);
    assert_eq!(f.len(), 1, "silent for 15 minutes: quiet");
    assert!(matches!(f[0].detail, Detail::Growth { quiet: 80, .. }));
}

/// A loop whose collector aged the clocks of sockets it did not look at (`collect::events`)
/// makes a pool under load look quiet: `clocks_wanted` names exactly the sockets whose clocks
/// the growth judgement reads (the pool's, opened within the window), and with those read
/// again the pool is not flagged.
#[test]
fn the_clocks_a_growth_judgement_reads_are_named_so_a_loop_can_read_them_again() {
    use shimcheck::detect::Digest;
    let c = cfg(10);
    let mut h = History::new(c.window, MIN_RISES);
    let mut opened = HashMap::new();
    let mut prev = None;
    let mut last = None;
    // The pool (300) ramps up by one connection a second, every one carrying data each
    // second; the registry's own 5 sockets (900) never change.
    for t in 0..=20u64 {
        let s = Pop::new()
            .clients(300, 0, t + 1, 400)
            .clients(900, 5000, 5, QUIET)
            .aged(t, prev, &mut opened)
            .sample(t);
        prev = Some(t);
        h.observe(&Joined::new(&s));
        last = Some(s);
    }
    let mut sample = last.unwrap();
    let digest = Digest::new(&Joined::new(&sample));
    assert!(digest.findings(&sample, Some(&h), &c).is_empty());

    // The same sockets with their clocks aged 9 s instead of read: the pool looks quiet.
    for s in &mut sample.sockets {
        s.tcp_info = s.tcp_info.map(|mut t| {
            t.age(9000);
            t
        });
    }
    let aged = digest.findings(&sample, Some(&h), &c);
    assert!(aged.iter().any(|f| f.pid == Some(300)), "{aged:#?}");

    // The wanted sockets: the pool's opened within the window (cookies 11..=20: seen after
    // the window's first sample at t=10), nothing else.
    let wanted = h.clocks_wanted(&digest, &c);
    let mut cookies: Vec<u64> = wanted
        .iter()
        .map(|&i| shimcheck::model::Socket::cookie(&sample.sockets[i as usize]).unwrap())
        .collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (11..=20).collect::<Vec<u64>>());
    for &i in &wanted {
        let s = &mut sample.sockets[i as usize];
        s.tcp_info = s.tcp_info.map(|mut t| {
            t.last_data_sent_ms = 400;
            t.last_data_recv_ms = 400;
            t
        });
    }
    assert!(digest.findings(&sample, Some(&h), &c).is_empty());
}

/// Without a cookie (the /proc/net fallback) a socket is known by its 4-tuple, which a new
/// connection can take again: a tuple gone from one sample and back in a later one is a new
/// connection, first seen when it came back, not when the old one was.
#[test]
fn a_tuple_that_left_and_came_back_is_first_seen_when_it_came_back() {
    use shimcheck::detect::Digest;
    let c = cfg(10);
    let mut h = History::new(c.window, MIN_RISES);
    let mut last = None;
    // A leak: one more quiet connection a second. The connection on port 20003 closes at
    // t=11 and its tuple is taken again at t=12, after the window's start (t=10 at the end).
    for t in 0..=20u64 {
        let sockets = (0..=t).filter(|&n| !(n == 3 && t == 11)).map(|n| {
            let mut s = sock(
                TcpState::Established,
                &format!("127.0.0.1:{}", 20000 + n),
                REGISTRY,
                n + 1,
            );
            s.set_cookie(None);
            s.tcp_info = Some(TcpInfo {
                last_data_sent_ms: 600_000,
                last_data_recv_ms: 600_000,
                ..TcpInfo::default()
            });
            s
        });
        let s = builders::sample()
            .at(1_800_000_000 + t)
            .sockets(sockets)
            .owners((0..=t).map(|n| (n + 1, 300)))
            .process(process(300, "app"))
            .build();
        let j = Joined::new(&s);
        h.observe_digest(&Digest::new(&j), &j, &KeptGroups::default(), None);
        drop(j);
        last = Some(s);
    }
    let sample = last.unwrap();
    let digest = Digest::new(&Joined::new(&sample));
    let mut young: Vec<u16> = h
        .clocks_wanted(&digest, &c)
        .iter()
        .map(|&i| sample.sockets[i as usize].local().port() - 20000)
        .collect();
    young.sort_unstable();
    // Opened after t=10: 11..=20, and 3 again.
    let mut expected: Vec<u16> = (11..=20).collect();
    expected.insert(0, 3);
    assert_eq!(young, expected);
}
