//! `shimcheck::ports_report` on hand-built samples: group keys, counts, sorting, listening
//! ports, owners and same-host peers, filters, `--top`, warnings and the JSON contract.

use serde_json::{Value, json};
use shimcheck::aggregate::{GroupBy, GroupKey, OwnerCount, Query, Report};
use shimcheck::model::{OwnerIndex, Sample, ScanStats, Socket, TcpState, Warning};

use crate::support::builders::{self, HOST_NS, SocketWith, process, query, sock, texts};

use TcpState::{CloseWait, Established, Listen, TimeWait};

const REGISTRY: u32 = 2811;
const SHIM: u32 = 2_811_249;
const KUBELET: u32 = 700;
const APISERVER: u32 = 900;
const SSHD: u32 = 12;
const SSHD_CHILD: u32 = 13;
const CONTAINERD: u32 = 500;

/// A sample taken at a fixed time (2026-11-25T09:46:40Z) on `master1`, in the host's namespace.
fn sample(sockets: Vec<Socket>, pairs: Vec<(u64, u32)>, procs: &[(u32, &str)]) -> Sample {
    builders::sample()
        .at(1_795_600_000)
        .host_netns(HOST_NS)
        .sockets(sockets)
        .owners(pairs)
        .processes(procs.iter().map(|&(pid, comm)| process(pid, comm)))
        .build()
}

/// A master node in small:
/// - registry (2811) listens on 0.0.0.0:5000; image-cri-shim (2811249) holds 3 connections to
///   it over 10.0.0.101, the registry the 3 other ends; a fourth connection on :5000 comes from
///   another node and has no visible holder; one more is in TIME_WAIT (inode 0);
/// - kube-apiserver (900) listens on [::]:6443; kubelet (700) holds 2 connections over ::1;
/// - kubelet also listens on 127.0.0.1:10248 only;
/// - sshd (12) listens on 0.0.0.0:22 and shares its one connection with its child (13);
/// - containerd (500) holds a CLOSE_WAIT socket whose peer is gone.
fn node() -> Sample {
    let mut sockets = vec![
        sock(Listen, "0.0.0.0:5000", "0.0.0.0:0", 1),
        sock(Listen, "[::]:6443", "[::]:0", 2),
        sock(Listen, "127.0.0.1:10248", "0.0.0.0:0", 3),
        sock(Listen, "0.0.0.0:22", "0.0.0.0:0", 4),
    ];
    let mut pairs = vec![(1, REGISTRY), (2, APISERVER), (3, KUBELET), (4, SSHD)];
    for i in 0..3u64 {
        let client = format!("10.0.0.101:{}", 40001 + i);
        sockets.push(sock(Established, &client, "10.0.0.101:5000", 10 + i));
        sockets.push(sock(Established, "10.0.0.101:5000", &client, 20 + i));
        pairs.extend([(10 + i, SHIM), (20 + i, REGISTRY)]);
    }
    for i in 0..2u64 {
        let client = format!("[::1]:{}", 50001 + i);
        sockets.push(sock(Established, &client, "[::1]:6443", 30 + i));
        sockets.push(sock(Established, "[::1]:6443", &client, 40 + i));
        pairs.extend([(30 + i, KUBELET), (40 + i, APISERVER)]);
    }
    sockets.extend([
        sock(Established, "10.0.0.101:22", "192.168.1.5:51000", 50),
        sock(Established, "10.0.0.101:5000", "10.0.0.7:45000", 60),
        sock(TimeWait, "10.0.0.101:5000", "10.0.0.101:39999", 0),
        sock(CloseWait, "127.0.0.1:33000", "127.0.0.1:7000", 70),
    ]);
    pairs.extend([(50, SSHD), (50, SSHD_CHILD), (70, CONTAINERD)]);
    sample(
        sockets,
        pairs,
        &[
            (REGISTRY, "registry"),
            (SHIM, "image-cri-shim"),
            (KUBELET, "kubelet"),
            (APISERVER, "kube-apiserver"),
            (SSHD, "sshd"),
            (SSHD_CHILD, "sshd"),
            (CONTAINERD, "containerd"),
        ],
    )
}

/// A group as the tests compare it: its key and count.
type Row<'a> = (&'a str, usize);

/// `(key, count)` of every group, in report order.
fn keys(r: &Report) -> Vec<Row<'_>> {
    r.groups.iter().map(|g| (g.key.as_str(), g.count)).collect()
}

/// `(comm, pid, count)` of each owner, in report order.
fn who(list: &[OwnerCount]) -> Vec<(&str, u32, usize)> {
    list.iter()
        .map(|o| (o.comm.as_str(), o.pid, o.count))
        .collect()
}

fn group<'r>(r: &'r Report, key: &str) -> &'r shimcheck::aggregate::Group {
    r.groups
        .iter()
        .find(|g| g.key == key)
        .unwrap_or_else(|| panic!("no group {key} in {:?}", keys(r)))
}

fn states(g: &shimcheck::aggregate::Group) -> Vec<(TcpState, usize)> {
    g.states.iter().collect()
}

fn totals(r: &Report) -> (usize, usize, usize) {
    (r.totals.sockets, r.totals.attributed, r.totals.unattributed)
}

#[test]
fn by_port_keys_counts_and_order_are_netstats() {
    let r = shimcheck::ports_report(&node(), &query(GroupBy::Port, &[Established]));
    // Largest first; ties by address numerically, then port (22 < 40001), IPv4 before IPv6.
    assert_eq!(
        keys(&r),
        [
            ("10.0.0.101:5000", 4),
            ("[::1]:6443", 2),
            ("10.0.0.101:22", 1),
            ("10.0.0.101:40001", 1),
            ("10.0.0.101:40002", 1),
            ("10.0.0.101:40003", 1),
            ("[::1]:50001", 1),
            ("[::1]:50002", 1),
        ]
    );
    assert_eq!(r.total_groups, 8);
    assert_eq!(totals(&r), (12, 11, 1));
    assert_eq!(r.group_by, GroupBy::Port);
    assert_eq!(r.states, [Established]);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert!(r.findings.is_empty());

    let registry = group(&r, "10.0.0.101:5000");
    assert_eq!(
        registry.what,
        GroupKey::Port {
            local_addr: "10.0.0.101".into(),
            local_port: 5000,
            listening: true,
        }
    );
    assert_eq!(states(registry), [(Established, 4)]);
    // The connection from another node has no visible holder: counted, held by nobody.
    assert_eq!(who(&registry.processes), [("registry", REGISTRY, 3)]);
    assert_eq!(who(&registry.peer_processes), [("image-cri-shim", SHIM, 3)]);

    let api = group(&r, "[::1]:6443");
    assert_eq!(
        api.what,
        GroupKey::Port {
            local_addr: "::1".into(),
            local_port: 6443,
            listening: true,
        }
    );
    assert_eq!(who(&api.processes), [("kube-apiserver", APISERVER, 2)]);
    assert_eq!(who(&api.peer_processes), [("kubelet", KUBELET, 2)]);

    // One socket, two holders (fork): each holds it; nobody on this node holds the other end.
    let ssh = group(&r, "10.0.0.101:22");
    assert_eq!(
        who(&ssh.processes),
        [("sshd", SSHD, 1), ("sshd", SSHD_CHILD, 1)]
    );
    assert!(ssh.peer_processes.is_empty());

    let client = group(&r, "10.0.0.101:40002");
    assert_eq!(
        client.what,
        GroupKey::Port {
            local_addr: "10.0.0.101".into(),
            local_port: 40002,
            listening: false,
        }
    );
    assert_eq!(who(&client.processes), [("image-cri-shim", SHIM, 1)]);
    assert_eq!(who(&client.peer_processes), [("registry", REGISTRY, 1)]);
}

#[test]
fn a_group_of_only_unattributed_sockets_keeps_its_place_with_no_holders() {
    let s = sample(
        vec![
            sock(Established, "10.0.0.101:5000", "10.0.0.7:45000", 60),
            sock(Established, "10.0.0.101:5000", "10.0.0.8:45000", 61),
            sock(TimeWait, "10.0.0.101:5000", "10.0.0.9:45000", 0),
            sock(Established, "10.0.0.101:22", "10.0.0.9:50000", 62),
        ],
        vec![(62, SSHD)],
        &[(SSHD, "sshd")],
    );
    let r = shimcheck::ports_report(&s, &query(GroupBy::Port, &[Established, TimeWait]));
    assert_eq!(keys(&r), [("10.0.0.101:5000", 3), ("10.0.0.101:22", 1)]);
    let g = group(&r, "10.0.0.101:5000");
    assert!(g.processes.is_empty() && g.peer_processes.is_empty());
    assert_eq!(states(g), [(Established, 2), (TimeWait, 1)]);
    assert_eq!(totals(&r), (4, 1, 3));
}

#[test]
fn listening_is_a_listener_on_the_address_or_on_a_wildcard_with_that_port() {
    let s = sample(
        vec![
            sock(Listen, "0.0.0.0:5000", "0.0.0.0:0", 1),
            sock(Listen, "[::]:6443", "[::]:0", 2),
            sock(Listen, "127.0.0.1:10248", "0.0.0.0:0", 3),
            // Accepted on the wildcard listener.
            sock(Established, "10.0.0.101:5000", "10.0.0.9:1", 10),
            // A v4 client of the dual-stack listener, as the server sees it and as plain v4.
            sock(
                Established,
                "[::ffff:127.0.0.1]:6443",
                "[::ffff:127.0.0.1]:2",
                11,
            ),
            sock(Established, "[fe80::1]:6443", "[fe80::2]:3", 12),
            // Only 127.0.0.1 listens on 10248.
            sock(Established, "127.0.0.1:10248", "127.0.0.1:4", 13),
            sock(Established, "10.0.0.101:10248", "10.0.0.9:5", 14),
            // A client port nobody listens on.
            sock(Established, "10.0.0.101:40000", "10.0.0.9:443", 15),
        ],
        vec![],
        &[],
    );
    let r = shimcheck::ports_report(&s, &query(GroupBy::Port, &[Established]));
    let listening: Vec<(&str, bool, &str)> = r
        .groups
        .iter()
        .map(|g| match &g.what {
            GroupKey::Port {
                listening,
                local_addr,
                ..
            } => (g.key.as_str(), *listening, local_addr.as_str()),
            other => panic!("not a port group: {other:?}"),
        })
        .collect();
    assert_eq!(
        listening,
        [
            ("10.0.0.101:5000", true, "10.0.0.101"),
            ("10.0.0.101:10248", false, "10.0.0.101"),
            ("10.0.0.101:40000", false, "10.0.0.101"),
            ("127.0.0.1:10248", true, "127.0.0.1"),
            ("[::ffff:127.0.0.1]:6443", true, "::ffff:127.0.0.1"),
            ("[fe80::1]:6443", true, "fe80::1"),
        ]
    );
    // LISTEN sockets were in the sample all along, but only `--state listen` shows them.
    assert!(
        r.groups
            .iter()
            .all(|g| g.states.iter().all(|(st, _)| st == Established))
    );
    let with_listen = shimcheck::ports_report(&s, &query(GroupBy::Port, &[Listen]));
    assert_eq!(
        keys(&with_listen),
        [
            ("0.0.0.0:5000", 1),
            ("127.0.0.1:10248", 1),
            ("[::]:6443", 1)
        ]
    );
    assert!(with_listen.groups.iter().all(|g| matches!(
        g.what,
        GroupKey::Port {
            listening: true,
            ..
        }
    )));
}

#[test]
fn by_process_counts_a_shared_socket_in_each_holders_group_and_once_in_totals() {
    let r = shimcheck::ports_report(&node(), &query(GroupBy::Process, &[Established]));
    assert_eq!(
        keys(&r),
        [
            ("registry(2811)", 3),
            ("image-cri-shim(2811249)", 3),
            ("kubelet(700)", 2),
            ("kube-apiserver(900)", 2),
            ("(unattributed)", 1),
            ("sshd(12)", 1),
            ("sshd(13)", 1),
        ]
    );
    let sum: usize = r.groups.iter().map(|g| g.count).sum();
    assert_eq!(sum, 13, "the sshd socket is in two groups");
    assert_eq!(totals(&r), (12, 11, 1), "and in the totals once");

    let shim = group(&r, "image-cri-shim(2811249)");
    assert_eq!(
        shim.what,
        GroupKey::Process {
            pid: Some(SHIM),
            comm: Some("image-cri-shim".into()),
            cmdline: Some("/usr/bin/image-cri-shim --v=2".into()),
        }
    );
    assert_eq!(who(&shim.processes), [("image-cri-shim", SHIM, 3)]);
    assert_eq!(who(&shim.peer_processes), [("registry", REGISTRY, 3)]);

    let nobody = group(&r, "(unattributed)");
    assert_eq!(
        nobody.what,
        GroupKey::Process {
            pid: None,
            comm: None,
            cmdline: None,
        }
    );
    assert!(nobody.processes.is_empty());

    // The shared socket's group names everyone holding it.
    let child = group(&r, "sshd(13)");
    assert_eq!(
        who(&child.processes),
        [("sshd", SSHD, 1), ("sshd", SSHD_CHILD, 1)]
    );
}

#[test]
fn by_peer_keys_by_the_remote_end() {
    let r = shimcheck::ports_report(&node(), &query(GroupBy::Peer, &[Established]));
    // Ties by address numerically: 10.0.0.7 before 10.0.0.101.
    assert_eq!(
        keys(&r),
        [
            ("10.0.0.101:5000", 3),
            ("[::1]:6443", 2),
            ("10.0.0.7:45000", 1),
            ("10.0.0.101:40001", 1),
            ("10.0.0.101:40002", 1),
            ("10.0.0.101:40003", 1),
            ("192.168.1.5:51000", 1),
            ("[::1]:50001", 1),
            ("[::1]:50002", 1),
        ]
    );
    let registry = group(&r, "10.0.0.101:5000");
    assert_eq!(
        registry.what,
        GroupKey::Peer {
            remote_addr: "10.0.0.101".into(),
            remote_port: 5000,
        }
    );
    assert_eq!(who(&registry.processes), [("image-cri-shim", SHIM, 3)]);
    assert_eq!(who(&registry.peer_processes), [("registry", REGISTRY, 3)]);
    assert_eq!(
        group(&r, "[::1]:6443").what,
        GroupKey::Peer {
            remote_addr: "::1".into(),
            remote_port: 6443,
        }
    );
    assert!(group(&r, "10.0.0.7:45000").processes.is_empty());
    assert_eq!(totals(&r), (12, 11, 1));
}

#[test]
fn by_pair_keys_by_holder_and_remote_end() {
    let r = shimcheck::ports_report(&node(), &query(GroupBy::Pair, &[Established]));
    assert_eq!(
        keys(&r),
        [
            ("image-cri-shim(2811249) -> 10.0.0.101:5000", 3),
            ("kubelet(700) -> [::1]:6443", 2),
            ("(unattributed) -> 10.0.0.7:45000", 1),
            ("sshd(12) -> 192.168.1.5:51000", 1),
            ("sshd(13) -> 192.168.1.5:51000", 1),
            ("kube-apiserver(900) -> [::1]:50001", 1),
            ("kube-apiserver(900) -> [::1]:50002", 1),
            ("registry(2811) -> 10.0.0.101:40001", 1),
            ("registry(2811) -> 10.0.0.101:40002", 1),
            ("registry(2811) -> 10.0.0.101:40003", 1),
        ]
    );
    assert_eq!(totals(&r), (12, 11, 1));
    let kubelet = group(&r, "kubelet(700) -> [::1]:6443");
    assert_eq!(
        kubelet.what,
        GroupKey::Pair {
            pid: Some(KUBELET),
            comm: Some("kubelet".into()),
            cmdline: Some("/usr/bin/kubelet --v=2".into()),
            remote_addr: "::1".into(),
            remote_port: 6443,
        }
    );
    assert_eq!(
        who(&kubelet.peer_processes),
        [("kube-apiserver", APISERVER, 2)]
    );
    assert_eq!(
        group(&r, "(unattributed) -> 10.0.0.7:45000").what,
        GroupKey::Pair {
            pid: None,
            comm: None,
            cmdline: None,
            remote_addr: "10.0.0.7".into(),
            remote_port: 45000,
        }
    );
}

#[test]
fn a_holder_the_scan_could_not_describe_is_named_question_mark() {
    let s = sample(
        vec![sock(Established, "10.0.0.101:40000", "10.0.0.9:443", 10)],
        vec![(10, 4321)],
        &[],
    );
    let r = shimcheck::ports_report(&s, &query(GroupBy::Process, &[Established]));
    assert_eq!(keys(&r), [("?(4321)", 1)]);
    assert_eq!(who(&r.groups[0].processes), [("?", 4321, 1)]);
    assert_eq!(totals(&r), (1, 1, 0));
}

#[test]
fn filters_keep_only_the_sockets_asked_for() {
    struct Case {
        name: &'static str,
        by: GroupBy,
        states: &'static [TcpState],
        port: Option<u16>,
        pid: Option<u32>,
        process: Option<&'static str>,
        groups: &'static [(&'static str, usize)],
        totals: (usize, usize, usize),
    }
    let base = Case {
        name: "",
        by: GroupBy::Port,
        states: &[Established],
        port: None,
        pid: None,
        process: None,
        groups: &[],
        totals: (0, 0, 0),
    };
    let cases = [
        Case {
            name: "several states; listen and the others left out",
            states: &[Established, TimeWait, CloseWait],
            groups: &[
                ("10.0.0.101:5000", 5),
                ("[::1]:6443", 2),
                ("10.0.0.101:22", 1),
                ("10.0.0.101:40001", 1),
                ("10.0.0.101:40002", 1),
                ("10.0.0.101:40003", 1),
                ("127.0.0.1:33000", 1),
                ("[::1]:50001", 1),
                ("[::1]:50002", 1),
            ],
            totals: (14, 12, 2),
            ..base
        },
        Case {
            name: "close-wait only",
            states: &[CloseWait],
            groups: &[("127.0.0.1:33000", 1)],
            totals: (1, 1, 0),
            ..base
        },
        Case {
            name: "listen only",
            states: &[Listen],
            groups: &[
                ("0.0.0.0:22", 1),
                ("0.0.0.0:5000", 1),
                ("127.0.0.1:10248", 1),
                ("[::]:6443", 1),
            ],
            totals: (4, 4, 0),
            ..base
        },
        Case {
            name: "port 5000 matches the local port and the remote port",
            port: Some(5000),
            groups: &[
                ("10.0.0.101:5000", 4),
                ("10.0.0.101:40001", 1),
                ("10.0.0.101:40002", 1),
                ("10.0.0.101:40003", 1),
            ],
            totals: (7, 6, 1),
            ..base
        },
        Case {
            name: "port 5000 by peer",
            by: GroupBy::Peer,
            port: Some(5000),
            groups: &[
                ("10.0.0.101:5000", 3),
                ("10.0.0.7:45000", 1),
                ("10.0.0.101:40001", 1),
                ("10.0.0.101:40002", 1),
                ("10.0.0.101:40003", 1),
            ],
            totals: (7, 6, 1),
            ..base
        },
        Case {
            name: "a port nobody uses",
            port: Some(9),
            groups: &[],
            totals: (0, 0, 0),
            ..base
        },
        Case {
            name: "pid",
            pid: Some(SHIM),
            groups: &[
                ("10.0.0.101:40001", 1),
                ("10.0.0.101:40002", 1),
                ("10.0.0.101:40003", 1),
            ],
            totals: (3, 3, 0),
            ..base
        },
        Case {
            name: "pid of a child sharing its parent's socket",
            pid: Some(SSHD_CHILD),
            groups: &[("10.0.0.101:22", 1)],
            totals: (1, 1, 0),
            ..base
        },
        Case {
            name: "pid and port together",
            pid: Some(REGISTRY),
            port: Some(40002),
            groups: &[("10.0.0.101:5000", 1)],
            totals: (1, 1, 0),
            ..base
        },
        Case {
            name: "process by exact comm",
            process: Some("kubelet"),
            groups: &[("[::1]:50001", 1), ("[::1]:50002", 1)],
            totals: (2, 2, 0),
            ..base
        },
        Case {
            name: "process names are not prefixes",
            process: Some("kube"),
            groups: &[],
            totals: (0, 0, 0),
            ..base
        },
        Case {
            name: "process by pair",
            by: GroupBy::Pair,
            process: Some("registry"),
            groups: &[
                ("registry(2811) -> 10.0.0.101:40001", 1),
                ("registry(2811) -> 10.0.0.101:40002", 1),
                ("registry(2811) -> 10.0.0.101:40003", 1),
            ],
            totals: (3, 3, 0),
            ..base
        },
    ];
    for c in cases {
        let q = Query {
            port: c.port,
            pid: c.pid,
            process: c.process.map(String::from),
            ..query(c.by, c.states)
        };
        let r = shimcheck::ports_report(&node(), &q);
        assert_eq!(keys(&r), c.groups, "{}", c.name);
        assert_eq!(r.total_groups, c.groups.len(), "{}", c.name);
        assert_eq!(totals(&r), c.totals, "{}", c.name);
        assert_eq!(r.states, c.states, "{}", c.name);
    }
}

/// `node()` plus 5,000 connections each from a process of its own to a place of its own:
/// 5,000 more groups by pair or by peer, past what the grouping counts in its pass (4,096), so
/// that it sorts every membership instead.
fn node_with_many_places() -> Sample {
    let mut s = node();
    let mut pairs = s.owners.pairs().to_vec();
    let mut processes = std::mem::take(&mut s.owners.processes);
    for i in 0..5000u32 {
        let inode = 100_000 + u64::from(i);
        let remote = format!("10.9.{}.{}:{}", i / 250, i % 250, 1000 + i % 7);
        s.sockets
            .push(sock(Established, "10.0.0.101:41000", &remote, inode));
        let pid = 10_000 + i;
        pairs.push((inode, pid));
        processes.insert(pid, process(pid, "worker"));
    }
    s.owners = OwnerIndex::from_pairs(pairs, processes);
    s
}

#[test]
fn a_group_is_the_same_counted_in_the_pass_or_sorted_out_of_its_sockets() {
    let (few, many) = (node(), node_with_many_places());
    for by in [
        GroupBy::Pair,
        GroupBy::Peer,
        GroupBy::Process,
        GroupBy::Port,
    ] {
        let q = query(by, &[Established, CloseWait]);
        let (a, b) = (
            shimcheck::ports_report(&few, &q),
            shimcheck::ports_report(&many, &q),
        );
        assert_eq!(b.totals.sockets, a.totals.sockets + 5000, "{by:?}");
        if matches!(by, GroupBy::Pair | GroupBy::Peer) {
            assert!(b.total_groups > 5000, "{by:?}: {}", b.total_groups);
        }
        for g in &a.groups {
            let other = b.groups.iter().find(|o| o.key == g.key);
            assert_eq!(other, Some(g), "{by:?}");
        }
    }
}

#[test]
fn top_cuts_the_list_but_not_the_group_count() {
    let all = [
        ("10.0.0.101:5000", 4),
        ("[::1]:6443", 2),
        ("10.0.0.101:22", 1),
        ("10.0.0.101:40001", 1),
        ("10.0.0.101:40002", 1),
        ("10.0.0.101:40003", 1),
        ("[::1]:50001", 1),
        ("[::1]:50002", 1),
    ];
    let cases: [(Option<usize>, &[Row]); 6] = [
        (None, &all),
        (Some(0), &all),
        (Some(1), &all[..1]),
        // Cuts inside a run of ties: the smallest keys of the tie stay.
        (Some(4), &all[..4]),
        (Some(8), &all),
        (Some(100), &all),
    ];
    for (top, want) in cases {
        let q = Query {
            top,
            ..query(GroupBy::Port, &[Established])
        };
        let r = shimcheck::ports_report(&node(), &q);
        assert_eq!(keys(&r), want, "top {top:?}");
        assert_eq!(r.total_groups, 8, "top {top:?}");
        assert_eq!(
            totals(&r),
            (12, 11, 1),
            "top {top:?}: totals cover every group"
        );
    }
    // The groups kept still carry their holders.
    let q = Query {
        top: Some(1),
        ..query(GroupBy::Port, &[Established])
    };
    let r = shimcheck::ports_report(&node(), &q);
    assert_eq!(who(&r.groups[0].processes), [("registry", REGISTRY, 3)]);
    assert_eq!(
        who(&r.groups[0].peer_processes),
        [("image-cri-shim", SHIM, 3)]
    );
}

/// The case shimcheck was written for: image-cri-shim on the master leaked 9,009 keep-alive
/// connections into the registry on 10.0.0.101:5000, both ends on this node.
fn leak() -> Sample {
    const N: u64 = 9009;
    let mut sockets = vec![sock(Listen, "0.0.0.0:5000", "0.0.0.0:0", 1)];
    let mut pairs = vec![(1, REGISTRY)];
    for i in 0..N {
        let client = format!("10.0.0.101:{}", 32768 + i);
        let (c, s) = (100 + 2 * i, 101 + 2 * i);
        sockets.push(sock(Established, &client, "10.0.0.101:5000", c));
        sockets.push(sock(Established, "10.0.0.101:5000", &client, s));
        pairs.extend([(c, SHIM), (s, REGISTRY)]);
    }
    // Everything else on the node, for scale.
    sockets.push(sock(Established, "10.0.0.101:22", "192.168.1.5:51000", 50));
    pairs.push((50, SSHD));
    sample(
        sockets,
        pairs,
        &[
            (REGISTRY, "registry"),
            (SHIM, "image-cri-shim"),
            (SSHD, "sshd"),
        ],
    )
}

#[test]
fn the_leak_shows_as_one_big_server_group_and_one_big_pair() {
    let s = leak();
    let q = Query {
        top: Some(20),
        ..query(GroupBy::Port, &[Established])
    };
    let r = shimcheck::ports_report(&s, &q);
    assert_eq!(totals(&r), (18_019, 18_019, 0));
    assert_eq!(r.total_groups, 1 + 9009 + 1);
    assert_eq!(r.groups.len(), 20);
    let g = &r.groups[0];
    assert_eq!((g.key.as_str(), g.count), ("10.0.0.101:5000", 9009));
    assert_eq!(states(g), [(Established, 9009)]);
    assert!(matches!(
        g.what,
        GroupKey::Port {
            listening: true,
            ..
        }
    ));
    assert_eq!(who(&g.processes), [("registry", REGISTRY, 9009)]);
    assert_eq!(who(&g.peer_processes), [("image-cri-shim", SHIM, 9009)]);
    // Then the client ports, one each, in port order (22 sorts first among the ties).
    assert_eq!(
        keys(&r)[1..4],
        [
            ("10.0.0.101:22", 1),
            ("10.0.0.101:32768", 1),
            ("10.0.0.101:32769", 1)
        ]
    );

    let q = Query {
        top: Some(3),
        ..query(GroupBy::Pair, &[Established])
    };
    let r = shimcheck::ports_report(&s, &q);
    assert_eq!(
        keys(&r),
        [
            ("image-cri-shim(2811249) -> 10.0.0.101:5000", 9009),
            ("sshd(12) -> 192.168.1.5:51000", 1),
            ("registry(2811) -> 10.0.0.101:32768", 1),
        ]
    );
    assert_eq!(r.total_groups, 1 + 1 + 9009);
    assert_eq!(
        who(&r.groups[0].processes),
        [("image-cri-shim", SHIM, 9009)]
    );
    assert_eq!(
        who(&r.groups[0].peer_processes),
        [("registry", REGISTRY, 9009)]
    );

    let r = shimcheck::ports_report(&s, &query(GroupBy::Process, &[Established]));
    assert_eq!(
        keys(&r),
        [
            ("registry(2811)", 9009),
            ("image-cri-shim(2811249)", 9009),
            ("sshd(12)", 1)
        ]
    );
}

const DENIED_3: &str = "cannot read the open files of 3 processes (permission denied): the \
                        sockets they hold are counted as unattributed; shimcheck lacks \
                        CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE: run as root (sudo) or grant them \
                        to see every owner (docs/deploy.md)";

#[test]
fn permission_warnings_only_when_an_unattributed_socket_could_be_theirs() {
    let with = |denied: usize, unreadable: usize, sockets: Vec<Socket>| {
        let mut s = sample(sockets, vec![(10, SSHD)], &[(SSHD, "sshd")]);
        s.scan = ScanStats {
            scanned: 40,
            denied,
            unreadable,
            first_unreadable: (unreadable > 0).then(|| "Input/output error".to_string()),
            lacking: vec!["CAP_DAC_READ_SEARCH".into(), "CAP_SYS_PTRACE".into()],
            ..ScanStats::default()
        };
        s
    };
    let attributed = || sock(Established, "10.0.0.101:22", "10.0.0.9:1", 10);
    let hidden = || sock(Established, "10.0.0.101:5000", "10.0.0.9:2", 11);
    let time_wait = || sock(TimeWait, "10.0.0.101:5000", "10.0.0.9:3", 0);
    let est = query(GroupBy::Port, &[Established]);
    let est_tw = query(GroupBy::Port, &[Established, TimeWait]);

    let r = shimcheck::ports_report(&with(3, 0, vec![attributed(), hidden()]), &est);
    assert_eq!(texts(&r.warnings), [DENIED_3]);

    // Only TIME_WAIT (inode 0, never anyone's fd) is unattributed: nothing to warn about.
    let r = shimcheck::ports_report(&with(3, 0, vec![attributed(), time_wait()]), &est_tw);
    assert_eq!(totals(&r), (2, 1, 1));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);

    // The socket that could be theirs is filtered out.
    let q = Query {
        port: Some(22),
        ..est.clone()
    };
    let r = shimcheck::ports_report(&with(3, 0, vec![attributed(), hidden()]), &q);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);

    // Everything attributed.
    let r = shimcheck::ports_report(&with(3, 0, vec![attributed()]), &est);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);

    // Nobody denied.
    let r = shimcheck::ports_report(&with(0, 0, vec![attributed(), hidden()]), &est);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);

    let mut one = with(1, 0, vec![hidden()]);
    one.scan.lacking = vec!["CAP_SYS_PTRACE".into()];
    let r = shimcheck::ports_report(&one, &est);
    assert_eq!(
        texts(&r.warnings),
        [
            "cannot read the open files of 1 process (permission denied): the sockets they hold \
             are counted as unattributed; shimcheck lacks CAP_SYS_PTRACE: run as root (sudo) or \
             grant it to see every owner (docs/deploy.md)"
        ]
    );

    // Refused although shimcheck held both: something else refuses, and root would not help.
    one.scan.lacking.clear();
    let r = shimcheck::ports_report(&one, &est);
    assert_eq!(
        texts(&r.warnings),
        [
            "cannot read the open files of 1 process (permission denied despite shimcheck's \
             capabilities): the sockets they hold are counted as unattributed; a security module \
             (AppArmor, SELinux, Yama) or a process holding capabilities shimcheck lacks refuses \
             it (docs/deploy.md)"
        ]
    );

    // hidepid=invisible hides processes without a denial: said when a socket could be theirs.
    let mut hiding = with(0, 0, vec![attributed(), hidden()]);
    hiding.scan.hidepid = Some("hidepid=invisible".into());
    let r = shimcheck::ports_report(&hiding, &est);
    assert_eq!(texts(&r.warnings).len(), 1, "{:?}", r.warnings);
    assert!(texts(&r.warnings)[0].contains("mounted with hidepid=invisible"));
    let r = shimcheck::ports_report(&hiding, &q);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);

    // Another error is a warning of its own, without the root advice.
    let r = shimcheck::ports_report(&with(3, 2, vec![hidden(), time_wait()]), &est_tw);
    assert_eq!(
        texts(&r.warnings),
        [
            DENIED_3,
            "cannot read the open files of 2 processes (Input/output error): the sockets they \
             hold are counted as unattributed",
        ]
    );
    assert_eq!(
        texts(&r.warnings)
            .iter()
            .filter(|w| w.contains("run as root"))
            .count(),
        1
    );

    // The sample's own warnings (a collector fallback ...) come first, as they are.
    let mut s = with(3, 0, vec![hidden()]);
    s.warnings = vec![Warning::Recorded(
        "sock_diag unavailable: read /proc/net/tcp instead".into(),
    )];
    let r = shimcheck::ports_report(&s, &est);
    assert_eq!(
        texts(&r.warnings),
        [
            "sock_diag unavailable: read /proc/net/tcp instead",
            DENIED_3
        ]
    );
}

/// A small report's JSON for each group-by, compared whole: names, types and nesting.
fn small() -> Sample {
    sample(
        vec![
            sock(Listen, "0.0.0.0:5000", "0.0.0.0:0", 1),
            sock(Established, "10.0.0.101:40001", "10.0.0.101:5000", 10),
            sock(Established, "10.0.0.101:5000", "10.0.0.101:40001", 11),
            sock(Established, "[::1]:8443", "[::1]:50000", 12),
        ],
        vec![(1, REGISTRY), (10, SHIM), (11, REGISTRY)],
        &[(REGISTRY, "registry"), (SHIM, "image-cri-shim")],
    )
}

fn json_of(by: GroupBy) -> Value {
    let q = Query {
        top: Some(2),
        ..query(by, &[Established])
    };
    serde_json::to_value(shimcheck::ports_report(&small(), &q)).unwrap()
}

fn owner(pid: u32, comm: &str, count: usize) -> Value {
    json!({"pid": pid, "comm": comm, "count": count, "unit": null, "container_id": null,
           "pod": null})
}

fn host() -> Value {
    json!({"inode": HOST_NS, "name": "host"})
}

fn document(group_by: &str, groups: Value) -> Value {
    json!({
        "schema_version": 1,
        "taken_at": "2026-11-25T09:46:40Z",
        "hostname": "master1",
        "group_by": group_by,
        "states": ["established"],
        "totals": {"sockets": 3, "attributed": 2, "unattributed": 1},
        "total_groups": 3,
        "groups": groups,
        "findings": [],
        "warnings": [],
        "attribution": "procfs",
    })
}

#[test]
fn json_by_port_is_the_documented_contract() {
    assert_eq!(
        json_of(GroupBy::Port),
        document(
            "port",
            json!([
                {"key": "10.0.0.101:5000", "local_addr": "10.0.0.101", "local_port": 5000,
                 "listening": true, "count": 1, "states": {"established": 1},
                 "processes": [owner(REGISTRY, "registry", 1)],
                 "peer_processes": [owner(SHIM, "image-cri-shim", 1)],
                 "netns": host()},
                {"key": "10.0.0.101:40001", "local_addr": "10.0.0.101", "local_port": 40001,
                 "listening": false, "count": 1, "states": {"established": 1},
                 "processes": [owner(SHIM, "image-cri-shim", 1)],
                 "peer_processes": [owner(REGISTRY, "registry", 1)],
                 "netns": host()},
            ])
        )
    );
}

#[test]
fn json_by_process_has_null_identity_for_the_unattributed_group() {
    assert_eq!(
        json_of(GroupBy::Process),
        document(
            "process",
            json!([
                {"key": "(unattributed)", "pid": null, "comm": null, "cmdline": null,
                 "count": 1, "states": {"established": 1},
                 "processes": [], "peer_processes": []},
                {"key": "registry(2811)", "pid": REGISTRY, "comm": "registry",
                 "cmdline": "/usr/bin/registry --v=2",
                 "count": 1, "states": {"established": 1},
                 "processes": [owner(REGISTRY, "registry", 1)],
                 "peer_processes": [owner(SHIM, "image-cri-shim", 1)]},
            ])
        )
    );
}

#[test]
fn json_by_peer_has_the_remote_end() {
    assert_eq!(
        json_of(GroupBy::Peer),
        document(
            "peer",
            json!([
                {"key": "10.0.0.101:5000", "remote_addr": "10.0.0.101", "remote_port": 5000,
                 "count": 1, "states": {"established": 1},
                 "processes": [owner(SHIM, "image-cri-shim", 1)],
                 "peer_processes": [owner(REGISTRY, "registry", 1)],
                 "netns": host()},
                {"key": "10.0.0.101:40001", "remote_addr": "10.0.0.101", "remote_port": 40001,
                 "count": 1, "states": {"established": 1},
                 "processes": [owner(REGISTRY, "registry", 1)],
                 "peer_processes": [owner(SHIM, "image-cri-shim", 1)],
                 "netns": host()},
            ])
        )
    );
}

#[test]
fn json_by_pair_has_both() {
    assert_eq!(
        json_of(GroupBy::Pair),
        document(
            "pair",
            json!([
                {"key": "(unattributed) -> [::1]:50000", "pid": null, "comm": null,
                 "cmdline": null, "remote_addr": "::1", "remote_port": 50000,
                 "count": 1, "states": {"established": 1},
                 "processes": [], "peer_processes": [], "netns": host()},
                {"key": "registry(2811) -> 10.0.0.101:40001", "pid": REGISTRY,
                 "comm": "registry", "cmdline": "/usr/bin/registry --v=2",
                 "remote_addr": "10.0.0.101", "remote_port": 40001,
                 "count": 1, "states": {"established": 1},
                 "processes": [owner(REGISTRY, "registry", 1)],
                 "peer_processes": [owner(SHIM, "image-cri-shim", 1)],
                 "netns": host()},
            ])
        )
    );
}

#[test]
fn json_states_and_counts_follow_kernel_order() {
    let q = query(GroupBy::Port, &[Listen, CloseWait, TimeWait, Established]);
    let mut s = small();
    s.sockets.extend([
        sock(CloseWait, "10.0.0.101:5000", "10.0.0.9:1", 20).netns(HOST_NS),
        sock(TimeWait, "10.0.0.101:5000", "10.0.0.9:2", 0).netns(HOST_NS),
    ]);
    let r = shimcheck::ports_report(&s, &q);
    let text = serde_json::to_string(&r).unwrap();
    assert!(
        text.contains(r#""states":["established","time-wait","close-wait","listen"]"#),
        "{text}"
    );
    assert_eq!(r.groups[0].key, "10.0.0.101:5000");
    // serde_json's Value sorts keys; the text is what scripts read.
    let g = serde_json::to_string(&r.groups[0]).unwrap();
    assert!(
        g.contains(r#""states":{"established":1,"time-wait":1,"close-wait":1}"#),
        "{g}"
    );
}

/// `ports -o json` writes its groups as it spells them out; the document is the one the
/// materialized report gives, for every grouping, with and without `--top`.
#[test]
fn a_streamed_report_is_the_materialized_report() {
    use shimcheck::aggregate::{aggregate, aggregate_streamed};
    use shimcheck::join::Joined;
    let s = node();
    let joined = Joined::new(&s);
    for by in [
        GroupBy::Port,
        GroupBy::Process,
        GroupBy::Peer,
        GroupBy::Pair,
        GroupBy::Pod,
    ] {
        for top in [None, Some(2)] {
            let q = Query {
                top,
                ..query(by, &[Established, CloseWait, Listen, TimeWait])
            };
            let materialized = aggregate(&joined, &q);
            let streamed = aggregate_streamed(&joined, &q);
            assert!(!materialized.groups.is_empty());
            let mut a = Vec::new();
            let mut b = Vec::new();
            shimcheck::render::json::render(&materialized, &mut a).unwrap();
            shimcheck::render::json::render(&streamed, &mut b).unwrap();
            assert_eq!(
                String::from_utf8(a).unwrap(),
                String::from_utf8(b).unwrap(),
                "--by {by:?} --top {top:?}"
            );
        }
    }
}

/// `--fold` (the table's default): the client ends on ephemeral ports become one group per
/// (local address, holder, remote endpoint); server ports stay one group each; the totals and
/// every socket's count are the same as unfolded.
#[test]
fn ephemeral_client_ports_fold_into_one_row_per_destination() {
    let s = node();
    let joined = shimcheck::join::Joined::new(&s);
    let unfolded = shimcheck::aggregate::aggregate(&joined, &query(GroupBy::Port, &[Established]));
    let folded = shimcheck::aggregate::aggregate(
        &joined,
        &Query {
            fold: true,
            ..query(GroupBy::Port, &[Established])
        },
    );
    assert_eq!(folded.totals, unfolded.totals);
    let count = |r: &Report| r.groups.iter().map(|g| g.count).sum::<usize>();
    assert_eq!(count(&folded), count(&unfolded));
    let keys: std::collections::BTreeMap<&str, usize> = folded
        .groups
        .iter()
        .map(|g| (g.key.as_str(), g.count))
        .collect();
    // image-cri-shim's three client ports to the registry: one row.
    assert_eq!(keys["10.0.0.101:* -> 10.0.0.101:5000"], 3);
    assert_eq!(keys["[::1]:* -> [::1]:6443"], 2);
    // The server ends are listening ports: not folded.
    assert_eq!(
        keys["10.0.0.101:5000"], 4,
        "three from the shim, one from another node"
    );
    assert!(
        !keys.keys().any(|k| k.starts_with("10.0.0.101:4000")),
        "{keys:?}"
    );
    let g = folded
        .groups
        .iter()
        .find(|g| g.key == "10.0.0.101:* -> 10.0.0.101:5000")
        .unwrap();
    assert_eq!(g.processes[0].pid, SHIM);
    assert_eq!(g.peer_processes[0].pid, REGISTRY);
    let json = serde_json::to_value(g).unwrap();
    assert_eq!(json["local_addr"], "10.0.0.101");
    assert_eq!(json["remote_port"], 5000);
    assert!(json.get("local_port").is_none());
}

/// `serve` publishes reports to whoever may scrape it: command lines (passwords, tokens) are
/// blanked in process and pair groups, and nothing else changes.
#[test]
fn a_report_for_publishing_carries_no_command_lines() {
    for by in [GroupBy::Process, GroupBy::Pair] {
        let full = shimcheck::ports_report(&node(), &query(by, &[Established]));
        let cmdlines = |r: &Report| {
            r.groups
                .iter()
                .filter_map(|g| match &g.what {
                    GroupKey::Process { cmdline, .. } | GroupKey::Pair { cmdline, .. } => {
                        cmdline.clone()
                    }
                    _ => None,
                })
                .count()
        };
        assert!(
            cmdlines(&full) > 0,
            "--by {by:?}: the node has command lines"
        );
        let mut published = full.clone();
        published.drop_cmdlines();
        assert_eq!(cmdlines(&published), 0, "--by {by:?}");
        assert_eq!(keys(&published), keys(&full), "--by {by:?}");
    }
}

/// `--watch` and `--baseline`: each group's change since the previous sample (`delta`) and since
/// the first (`delta_total`), a group absent from an earlier sample counting 0 there, and no
/// `delta` without a previous sample.
#[test]
fn deltas_count_from_the_previous_and_the_first_sample() {
    use shimcheck::aggregate::{aggregate_with_counts, annotate_deltas};
    use shimcheck::join::Joined;
    // image-cri-shim's connections to the registry: 1, then 3, then 6; a CLOSE_WAIT socket
    // only in the last sample.
    let leak = |n: u64, close_wait: bool| {
        let mut sockets: Vec<Socket> = (0..n)
            .map(|i| {
                let client = format!("10.0.0.101:{}", 40001 + i);
                sock(Established, &client, "10.0.0.101:5000", 10 + i)
            })
            .collect();
        let mut pairs: Vec<(u64, u32)> = (0..n).map(|i| (10 + i, SHIM)).collect();
        if close_wait {
            sockets.push(sock(CloseWait, "127.0.0.1:33000", "127.0.0.1:7000", 70));
            pairs.push((70, CONTAINERD));
        }
        sample(
            sockets,
            pairs,
            &[(SHIM, "image-cri-shim"), (CONTAINERD, "containerd")],
        )
    };
    let q = query(GroupBy::Pair, &[Established, CloseWait]);
    let samples = [leak(1, false), leak(3, false), leak(6, true)];
    let counted: Vec<_> = samples
        .iter()
        .map(|s| aggregate_with_counts(&Joined::new(s), &q))
        .collect();
    let (first, second, third) = (&counted[0].1, &counted[1].1, &counted[2].1);
    let deltas = |r: &Report| -> Vec<(String, usize, Option<i64>, Option<i64>)> {
        r.groups
            .iter()
            .map(|g| (g.key.clone(), g.count, g.delta, g.delta_total))
            .collect()
    };
    let mut last = counted[2].0.clone();
    annotate_deltas(&mut last, Some(second), first);
    assert_eq!(
        deltas(&last),
        [
            (
                "image-cri-shim(2811249) -> 10.0.0.101:5000".to_string(),
                6,
                Some(3),
                Some(5)
            ),
            (
                "containerd(500) -> 127.0.0.1:7000".to_string(),
                1,
                Some(1),
                Some(1)
            ),
        ]
    );
    // Against a baseline there is no previous sample: only the total change.
    let mut against_baseline = counted[2].0.clone();
    annotate_deltas(&mut against_baseline, None, first);
    assert_eq!(
        deltas(&against_baseline)
            .iter()
            .map(|d| (d.2, d.3))
            .collect::<Vec<_>>(),
        [(None, Some(5)), (None, Some(1))]
    );
    // The same sample against itself: nothing changed.
    let mut same = counted[2].0.clone();
    annotate_deltas(&mut same, Some(third), third);
    assert!(
        same.groups
            .iter()
            .all(|g| g.delta == Some(0) && g.delta_total == Some(0))
    );
}
