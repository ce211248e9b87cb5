//! The process join on fake /proc trees (`fixtures/proc/`): which process holds which socket,
//! what could not be read, and how that shows in a report. No root, no live kernel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use shimcheck::aggregate::{GroupBy, Query};
use shimcheck::model::{HostFacts, Sample, ScanStats, Socket, StateSet, TcpState};
use shimcheck::procs::ProcScanner;

fn root(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/proc")
        .join(name)
}

fn sorted(mut v: Vec<(u64, u32)>) -> Vec<(u64, u32)> {
    v.sort_unstable();
    v
}

#[test]
fn shared_sockets_list_every_holder_and_a_dup_counts_once() {
    let scanner = ProcScanner::new(&root("shared"));
    let scan = scanner.socket_fds(2).unwrap();
    assert_eq!(
        sorted(scan.pairs.clone()),
        [
            (1001, 2811),
            (1001, 2812),
            (1002, 2811),
            (1003, 2811),
            (2001, 4242),
            (2001, 4242),
            (2002, 4242),
            (3001, 4243)
        ]
    );
    assert_eq!(
        scan.stats,
        ScanStats {
            scanned: 4,
            ..ScanStats::default()
        }
    );
    let fds: BTreeMap<u32, (u64, Option<u64>)> = scan
        .fds
        .iter()
        .map(|(p, f)| (*p, (f.open, f.limit)))
        .collect();
    assert_eq!(fds[&2811], (5, Some(1024)));
    assert_eq!(fds[&4242], (4, Some(4)));
    assert_eq!(scanner.port_range(), Some((32768, 60999)));

    let index = scanner.index(
        scan.pairs,
        [1001, 2001, 3001].into_iter(),
        std::iter::empty(),
    );
    let holders = |inode| {
        index
            .owners(inode)
            .iter()
            .map(|&(_, p)| p)
            .collect::<Vec<_>>()
    };
    assert_eq!(holders(1001), [2811, 2812]);
    assert_eq!(
        holders(2001),
        [4242],
        "the same socket on fds 3 and 9 is one holder"
    );
    // Only the holders of the wanted sockets are described.
    let mut described: Vec<u32> = index.processes.keys().copied().collect();
    described.sort_unstable();
    assert_eq!(described, [2811, 2812, 4242, 4243]);
    let shim = &index.processes[&4242];
    assert_eq!(
        (shim.comm.as_str(), shim.cmdline.as_str()),
        (
            "image-cri-shim",
            "image-cri-shim --config /etc/image-cri-shim.yml"
        )
    );
    assert_eq!(
        index.processes[&4243].comm, "evil\u{1b}[31m",
        "kept as it is; escaping is the renderer's job"
    );
    let uid = std::fs::metadata(root("shared").join("4242"))
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    assert_eq!(shim.uid, Some(uid));
}

#[test]
fn a_process_that_vanished_mid_scan_is_counted_not_fatal() {
    let scanner = ProcScanner::new(&root("vanished"));
    let scan = scanner.socket_fds(1).unwrap();
    assert_eq!(sorted(scan.pairs.clone()), [(4001, 5001), (4002, 5002)]);
    assert_eq!(
        scan.stats,
        ScanStats {
            scanned: 2,
            vanished: 1,
            ..ScanStats::default()
        }
    );
    let index = scanner.index(scan.pairs, [4001, 4002].into_iter(), std::iter::empty());
    assert_eq!(
        index.processes[&5001].comm, "?",
        "exited before it could be described"
    );
    assert_eq!(index.processes[&5002].comm, "alive");
}

#[test]
fn an_unreadable_fd_table_is_counted_and_named() {
    let scanner = ProcScanner::new(&root("unreadable"));
    let scan = scanner.socket_fds(1).unwrap();
    assert_eq!(scan.pairs, [(5001, 6001)]);
    assert_eq!((scan.stats.scanned, scan.stats.unreadable), (1, 1));
    let msg = scan.stats.first_unreadable.clone().unwrap();
    assert!(
        msg.contains("unreadable/6000/fd") && msg.contains("Not a directory"),
        "{msg}"
    );
}

#[test]
fn a_missing_proc_root_is_an_error() {
    assert!(
        ProcScanner::new(Path::new("/nonexistent/proc"))
            .socket_fds(1)
            .is_err()
    );
}

fn sock(state: TcpState, local: &str, remote: &str, inode: u64) -> Socket {
    Socket {
        state,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        inode,
        cookie: Some(inode + 100_000),
        uid: 0,
        recv_q: 0,
        send_q: 0,
        tcp_info: None,
        netns: 0,
        cgroup_id: None,
    }
}

/// The shared tree joined with a socket dump: the registry (2811, and its child 2812 sharing
/// the listener's accepted socket 1001) serves image-cri-shim (4242) on :5000.
fn joined_sample(tree: &str) -> Sample {
    let scanner = ProcScanner::new(&root(tree));
    let sockets = vec![
        sock(TcpState::Listen, "0.0.0.0:5000", "0.0.0.0:0", 1003),
        sock(
            TcpState::Established,
            "127.0.0.1:5000",
            "127.0.0.1:40001",
            1001,
        ),
        sock(
            TcpState::Established,
            "127.0.0.1:5000",
            "127.0.0.1:40002",
            1002,
        ),
        sock(
            TcpState::Established,
            "127.0.0.1:40001",
            "127.0.0.1:5000",
            2001,
        ),
        sock(
            TcpState::Established,
            "127.0.0.1:40002",
            "127.0.0.1:5000",
            2002,
        ),
        sock(TcpState::TimeWait, "127.0.0.1:40000", "127.0.0.1:5000", 0),
        sock(
            TcpState::Established,
            "127.0.0.1:40003",
            "127.0.0.1:6443",
            9999,
        ),
        sock(
            TcpState::Established,
            "127.0.0.1:40004",
            "127.0.0.1:7000",
            6001,
        ),
    ];
    let scan = scanner.socket_fds(1).unwrap();
    let owners = scanner.index(
        scan.pairs,
        sockets.iter().map(|s| s.inode),
        std::iter::empty(),
    );
    Sample {
        taken_at: SystemTime::UNIX_EPOCH,
        hostname: "master1".into(),
        sockets,
        owners,
        scan: scan.stats,
        host: HostFacts::default(),
        warnings: vec![],
        own_netns: 0,
        netns_names: Default::default(),
        cgroup_places: Default::default(),
    }
}

fn query(by: GroupBy, states: &[TcpState]) -> Query {
    Query {
        group_by: by,
        states: states.iter().copied().collect::<StateSet>(),
        port: None,
        pid: None,
        process: None,
        top: None,
    }
}

#[test]
fn a_report_counts_a_shared_socket_once_and_names_both_ends() {
    let sample = joined_sample("shared");
    let r = shimcheck::ports_report(&sample, &query(GroupBy::Port, &[TcpState::Established]));
    // 1001, 1002, 2001, 2002 attributed; 9999 and 6001 held by nobody this tree shows.
    assert_eq!(
        (r.totals.sockets, r.totals.attributed, r.totals.unattributed),
        (6, 4, 2)
    );
    let g = &r.groups[0];
    assert_eq!((g.key.as_str(), g.count), ("127.0.0.1:5000", 2));
    let holders: HashMap<u32, usize> = g.processes.iter().map(|o| (o.pid, o.count)).collect();
    assert_eq!(holders, HashMap::from([(2811, 2), (2812, 1)]));
    assert_eq!(g.peer_processes.len(), 1);
    assert_eq!(
        (g.peer_processes[0].comm.as_str(), g.peer_processes[0].count),
        ("image-cri-shim", 2)
    );
    let json = serde_json::to_value(g).unwrap();
    assert_eq!(json["listening"], true);
    let orphan = r
        .groups
        .iter()
        .find(|g| g.key == "127.0.0.1:40003")
        .unwrap();
    assert!(
        orphan.processes.is_empty(),
        "unattributed sockets stay in their group"
    );
    // An unattributed socket with an inode, and nothing unreadable: no warning.
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);

    let by_process =
        shimcheck::ports_report(&sample, &query(GroupBy::Process, &[TcpState::Established]));
    let counts: BTreeMap<&str, usize> = by_process
        .groups
        .iter()
        .map(|g| (g.key.as_str(), g.count))
        .collect();
    assert_eq!(
        counts,
        BTreeMap::from([
            ("registry(2811)", 2),
            ("registry(2812)", 1),
            ("image-cri-shim(4242)", 2),
            ("(unattributed)", 2)
        ])
    );
    assert_eq!(
        by_process.totals.sockets, 6,
        "1001 is shared by two processes, still one socket"
    );
}

#[test]
fn unreadable_processes_warn_only_when_a_socket_may_be_theirs() {
    let sample = joined_sample("unreadable");
    let established =
        shimcheck::ports_report(&sample, &query(GroupBy::Port, &[TcpState::Established]));
    assert_eq!(established.warnings.len(), 1, "{:?}", established.warnings);
    assert!(established.warnings[0].contains("cannot read the open files of 1 process"));
    // TIME_WAIT sockets have no inode: nobody could be hiding them.
    let time_wait = shimcheck::ports_report(&sample, &query(GroupBy::Port, &[TcpState::TimeWait]));
    assert_eq!(time_wait.totals.unattributed, 1);
    assert!(time_wait.warnings.is_empty(), "{:?}", time_wait.warnings);
}
