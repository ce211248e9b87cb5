//! The table as a person sees it, snapshotted at a fixed width (insta), from synthetic samples.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use shimcheck::aggregate::{GroupBy, Query};
use shimcheck::detect::{self, DetectConfig};
use shimcheck::join::Joined;
use shimcheck::model::{OwnerIndex, Process, Sample, Socket, StateSet, TcpInfo, TcpState};
use shimcheck::render;

/// The leak case in small: registry 2811 on :5000 with 60 idle connections from
/// image-cri-shim 4242, kubelet 700 talking to the apiserver, and a process named with an
/// escape sequence holding two CLOSE_WAIT sockets.
fn sample() -> Sample {
    let mut sockets = Vec::new();
    let mut pairs = Vec::new();
    let mut add = |state: TcpState, local: String, remote: &str, pid: u32, idle_ms: u32| {
        let inode = sockets.len() as u64 + 1;
        sockets.push(Socket {
            state,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            inode,
            cookie: Some(inode),
            uid: 0,
            recv_q: 0,
            send_q: 0,
            tcp_info: Some(TcpInfo {
                last_data_sent_ms: idle_ms,
                last_data_recv_ms: idle_ms,
                ..TcpInfo::default()
            }),
            netns: 0,
            cgroup_id: None,
        });
        pairs.push((inode, pid));
    };
    add(
        TcpState::Listen,
        "0.0.0.0:5000".into(),
        "0.0.0.0:0",
        2811,
        0,
    );
    add(TcpState::Listen, "[::]:6443".into(), "[::]:0", 900, 0);
    for i in 0..60 {
        let port = 41000 + i;
        add(
            TcpState::Established,
            format!("10.0.0.101:{port}"),
            "10.0.0.101:5000",
            4242,
            400_000,
        );
        add(
            TcpState::Established,
            "10.0.0.101:5000".into(),
            &format!("10.0.0.101:{port}"),
            2811,
            400_000,
        );
    }
    for i in 0..3 {
        add(
            TcpState::Established,
            format!("[::1]:{}", 50000 + i),
            "[::1]:6443",
            700,
            10,
        );
        add(
            TcpState::Established,
            "[::1]:6443".into(),
            &format!("[::1]:{}", 50000 + i),
            900,
            10,
        );
    }
    add(
        TcpState::CloseWait,
        "127.0.0.1:33000".into(),
        "127.0.0.1:7000",
        666,
        0,
    );
    add(
        TcpState::CloseWait,
        "127.0.0.1:33001".into(),
        "127.0.0.1:7000",
        666,
        0,
    );
    let names = [
        (2811, "registry"),
        (4242, "image-cri-shim"),
        (700, "kubelet"),
        (900, "kube-apiserver"),
        (666, "evil\u{1b}[31m"),
    ];
    let processes: HashMap<u32, Process> = names
        .iter()
        .map(|&(pid, comm)| {
            (
                pid,
                Process {
                    pid,
                    comm: comm.into(),
                    cmdline: format!("/usr/bin/{comm} --v=2"),
                    uid: Some(0),
                    unit: None,
                    container_id: None,
                    pod: None,
                },
            )
        })
        .collect();
    Sample {
        taken_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000),
        hostname: "master1".into(),
        sockets,
        owners: OwnerIndex::from_pairs(pairs, processes),
        scan: Default::default(),
        host: Default::default(),
        warnings: vec![],
        own_netns: 0,
        netns_names: Default::default(),
        cgroup_places: Default::default(),
    }
}

fn table(by: GroupBy, states: &[TcpState], top: Option<usize>) -> String {
    let s = sample();
    let q = Query {
        group_by: by,
        states: states.iter().copied().collect::<StateSet>(),
        port: None,
        pid: None,
        process: None,
        top,
    };
    let j = Joined::new(&s);
    let mut report = shimcheck::aggregate::aggregate(&j, &q);
    report.findings = detect::findings(&j, None, &DetectConfig::default());
    let mut out = Vec::new();
    render::table::render(&report, &mut out, Some(110)).unwrap();
    assert!(!out.contains(&0x1b), "a raw ESC reached the table");
    String::from_utf8(out).unwrap()
}

#[test]
fn by_port_marks_servers_names_both_ends_and_lists_findings() {
    insta::assert_snapshot!(table(GroupBy::Port, &[TcpState::Established], Some(4)));
}

#[test]
fn by_pair_with_several_states() {
    insta::assert_snapshot!(table(
        GroupBy::Pair,
        &[TcpState::Established, TcpState::CloseWait],
        Some(6)
    ));
}

#[test]
fn by_process_escapes_hostile_names() {
    let t = table(GroupBy::Process, &[TcpState::CloseWait], None);
    assert!(t.contains("evil\\x1b[31m(666)"), "{t}");
    insta::assert_snapshot!(t);
}

#[test]
fn an_empty_report_says_so() {
    insta::assert_snapshot!(table(GroupBy::Peer, &[TcpState::SynSent], None));
}
