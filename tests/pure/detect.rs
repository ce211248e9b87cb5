//! Detector tests on synthetic sample series: time is data, every sample carries its own
//! timestamp and no clock is read.

use std::collections::HashMap;
use std::time::Duration;

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
