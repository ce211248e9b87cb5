//! The process join on fake /proc trees (`fixtures/proc/`, described in its README): which
//! process holds which socket, what could not be read, and how that shows in a report. No
//! root, no live kernel.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use shimcheck::aggregate::{GroupBy, GroupKey, OwnerCount, Report};
use shimcheck::model::{Process, Sample, ScanStats, Socket, TcpState};
use shimcheck::procs::{FdScan, ProcScanner};

use crate::support::builders::{self, ProcessWith, SocketWith, process, query, texts};

fn root(tree: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/proc")
        .join(tree)
}

fn scanner(tree: &str) -> ProcScanner {
    ProcScanner::new(&root(tree))
}

/// The owner of `<root>/<pid>`: what a fake tree reports as the process's uid.
fn uid_of(tree: &str, pid: u32) -> u32 {
    std::fs::metadata(root(tree).join(pid.to_string()))
        .unwrap()
        .uid()
}

fn sorted_pairs(scan: &FdScan) -> Vec<(u64, u32)> {
    let mut v = scan.pairs.clone();
    v.sort_unstable();
    v
}

fn fd_use(scan: &FdScan) -> BTreeMap<u32, (u64, Option<u64>)> {
    scan.fds
        .iter()
        .map(|(p, f)| (*p, (f.open, f.limit)))
        .collect()
}

fn sorted_pids(tree: &str) -> Vec<u32> {
    let mut pids = scanner(tree).pids().unwrap();
    pids.sort_unstable();
    pids
}

fn described(index: &shimcheck::model::OwnerIndex) -> Vec<u32> {
    let mut pids: Vec<u32> = index.processes.keys().copied().collect();
    pids.sort_unstable();
    pids
}

fn host_process(tree: &str, pid: u32, comm: &str, cmdline: &str, unit: Option<&str>) -> Process {
    let p = process(pid, comm)
        .cmdline(cmdline)
        .uid(Some(uid_of(tree, pid)));
    match unit {
        Some(unit) => p.unit(unit),
        None => p,
    }
}

const REGISTRY_CMDLINE: &str = "registry serve /etc/docker/registry/config.yml";
const SHIM_CMDLINE: &str = "/usr/bin/image-cri-shim -f /etc/image-cri-shim.yaml";
const EVIL: &str = "evil\u{1b}[31m";

#[test]
fn only_numeric_root_entries_are_processes() {
    // The trees really do have the entries that must be skipped.
    let shared = root("shared");
    assert!(shared.join("self").symlink_metadata().unwrap().is_symlink());
    assert!(shared.join("net").is_dir() && shared.join("sys").is_dir());
    assert_eq!(sorted_pids("shared"), [2811, 2812, 4242, 4243]);
    assert_eq!(sorted_pids("vanished"), [5000, 5001, 5002]);
    assert_eq!(sorted_pids("unreadable"), [6000, 6001]);
}

#[test]
fn shared_tree_yields_every_socket_fd_and_nothing_else() {
    let s = scanner("shared");
    for threads in [1, 2, 8] {
        let scan = s.socket_fds(threads, false).unwrap();
        // Raw pairs, one per fd: 2001 is on fds 3 and 9 of 4242; 1001 is in 2811 and 2812.
        // The pipe and /dev/null links give none.
        assert_eq!(
            sorted_pairs(&scan),
            [
                (1000, 2811),
                (1001, 2811),
                (1001, 2812),
                (1002, 2811),
                (1003, 2811),
                (2001, 4242),
                (2001, 4242),
                (2002, 4242),
                (2003, 4242),
                (3001, 4243),
            ],
            "{threads} threads"
        );
        assert_eq!(
            scan.stats,
            ScanStats {
                scanned: 4,
                ..ScanStats::default()
            },
            "{threads} threads"
        );
        assert_eq!(
            fd_use(&scan),
            BTreeMap::from([
                (2811, (7, Some(1024))),
                (2812, (2, Some(1024))),
                (4242, (5, Some(16))),
                (4243, (1, Some(1024))),
            ]),
            "{threads} threads"
        );
    }
    assert_eq!(s.port_range(), Some((32768, 60999)));
}

#[test]
fn the_index_describes_only_the_holders_of_wanted_sockets() {
    let s = scanner("shared");
    let scan = s.socket_fds(1, false).unwrap();
    let index = s.index(
        scan.pairs.clone(),
        [1001, 2002, 9999, 0].into_iter(),
        std::iter::empty(),
    );
    // Deduplicated: the socket 4242 holds on two fds is one pair.
    assert_eq!(
        index.pairs(),
        [
            (1000, 2811),
            (1001, 2811),
            (1001, 2812),
            (1002, 2811),
            (1003, 2811),
            (2001, 4242),
            (2002, 4242),
            (2003, 4242),
            (3001, 4243),
        ]
    );
    assert_eq!(index.owners(1001), [(1001, 2811), (1001, 2812)]);
    assert_eq!(index.owners(2001), [(2001, 4242)]);
    assert!(index.owners(9999).is_empty());
    assert!(index.owners(0).is_empty());
    // 4243 holds only 3001, which nobody asked about: not described.
    assert_eq!(described(&index), [2811, 2812, 4242]);
    assert_eq!(
        index.processes[&2811],
        host_process(
            "shared",
            2811,
            "registry",
            REGISTRY_CMDLINE,
            Some("registry.service")
        )
    );
    assert_eq!(
        index.processes[&2812],
        host_process(
            "shared",
            2812,
            "registry",
            REGISTRY_CMDLINE,
            Some("registry.service")
        )
    );
    assert_eq!(
        index.processes[&4242],
        host_process(
            "shared",
            4242,
            "image-cri-shim",
            SHIM_CMDLINE,
            Some("image-cri-shim.service")
        )
    );

    // An extra pid is described although it holds no wanted socket. Its comm and cmdline
    // come back byte for byte (the ESC is the renderer's to escape); an argument that is not
    // UTF-8 is kept, its bad byte replaced, rather than losing the whole command line.
    let index = s.index(scan.pairs, [2003].into_iter(), [4243].into_iter());
    assert_eq!(described(&index), [4242, 4243]);
    let evil = &index.processes[&4243];
    assert_eq!(
        (
            evil.comm.as_str(),
            evil.cmdline.as_str(),
            evil.uid,
            evil.place.unit.as_deref(),
            evil.container_id.as_deref(),
        ),
        (
            EVIL,
            "evil\u{1b}[31m --config /etc/evil\u{fffd}\u{1b}[0m.yml",
            Some(uid_of("shared", 4243)),
            None,
            Some("a1".repeat(32).as_str()),
        )
    );
}

#[test]
fn a_process_that_vanished_mid_scan_is_counted_not_fatal() {
    let s = scanner("vanished");
    let scan = s.socket_fds(1, false).unwrap();
    // 5000 has no fd directory: vanished. 5001 lost only its stat: its fds still count.
    assert_eq!(sorted_pairs(&scan), [(4001, 5001), (4002, 5002)]);
    assert_eq!(
        scan.stats,
        ScanStats {
            scanned: 2,
            vanished: 1,
            ..ScanStats::default()
        }
    );
    assert_eq!(
        fd_use(&scan),
        BTreeMap::from([(5001, (1, Some(1024))), (5002, (1, Some(1024)))])
    );

    let index = s.index(
        scan.pairs.clone(),
        [4001, 4002].into_iter(),
        std::iter::empty(),
    );
    assert_eq!(described(&index), [5001, 5002]);
    assert_eq!(
        index.processes[&5001],
        Process::unknown(5001),
        "exited before it could be described: its socket keeps the owner `?`"
    );
    assert_eq!(index.processes[&5001].comm, "?");
    assert_eq!(
        index.processes[&5002],
        host_process(
            "vanished",
            5002,
            "alive",
            "alive --config /etc/alive.yml",
            None
        )
    );

    let index = s.index(scan.pairs, [4002].into_iter(), std::iter::empty());
    assert_eq!(described(&index), [5002]);
}

#[test]
fn an_unreadable_fd_table_is_counted_and_named() {
    let tree = root("unreadable");
    assert!(tree.join("6000/fd").is_file(), "the fixture's fd is a file");
    let expected = ScanStats {
        scanned: 1,
        unreadable: 1,
        first_unreadable: Some(format!(
            "{}/6000/fd: {}",
            tree.display(),
            std::io::Error::from_raw_os_error(20)
        )),
        ..ScanStats::default()
    };
    for threads in [1, 4] {
        let scan = scanner("unreadable").socket_fds(threads, false).unwrap();
        assert_eq!(scan.pairs, [(5001, 6001)]);
        assert_eq!(scan.stats, expected, "{threads} threads");
        assert_eq!(fd_use(&scan), BTreeMap::from([(6001, (1, Some(1024)))]));
    }
    assert!(
        expected
            .first_unreadable
            .unwrap()
            .ends_with("/fixtures/proc/unreadable/6000/fd: Not a directory (os error 20)")
    );
}

#[test]
fn a_missing_proc_root_is_an_error() {
    let s = ProcScanner::new(Path::new("/nonexistent/proc"));
    assert!(s.socket_fds(1, false).is_err());
    assert!(s.pids().is_err());
}

/// A socket of the dump that goes with a fake tree; its cookie is not its inode, so that a
/// join by the wrong one finds nobody.
fn sock(state: TcpState, local: &str, remote: &str, inode: u64) -> Socket {
    builders::sock(state, local, remote, inode).cookie(inode + 100_000)
}

/// The dump that goes with the shared tree: the registry (2811, its forked child 2812 sharing
/// the accepted socket 1001) listens on :5000 and serves image-cri-shim (4242).
fn registry_sockets() -> Vec<Socket> {
    use TcpState::{Established, Listen, TimeWait};
    vec![
        sock(Listen, "0.0.0.0:5000", "0.0.0.0:0", 1000),
        sock(Established, "127.0.0.1:5000", "127.0.0.1:40001", 1001),
        sock(Established, "127.0.0.1:5000", "127.0.0.1:40002", 1002),
        sock(Established, "127.0.0.1:5000", "127.0.0.1:40003", 1003),
        sock(Established, "127.0.0.1:40001", "127.0.0.1:5000", 2001),
        sock(Established, "127.0.0.1:40002", "127.0.0.1:5000", 2002),
        sock(Established, "127.0.0.1:40003", "127.0.0.1:5000", 2003),
        // No inode: nobody can be found holding it.
        sock(TimeWait, "127.0.0.1:40000", "127.0.0.1:5000", 0),
        sock(Established, "10.0.0.5:41000", "10.96.0.1:443", 3001),
        // An inode no process in the tree holds.
        sock(Established, "127.0.0.1:40009", "127.0.0.1:6443", 8888),
    ]
}

/// A sample as the sampler builds one: the dump, the tree's owners, its scan stats.
fn sample(tree: &str, sockets: Vec<Socket>) -> Sample {
    let s = scanner(tree);
    let scan = s.socket_fds(2, false).unwrap();
    let owners = s.index(
        scan.pairs,
        sockets.iter().map(|s| s.inode),
        std::iter::empty(),
    );
    builders::sample()
        .sockets(sockets)
        .owner_index(owners)
        .scan(scan.stats)
        .build()
}

type Holders = Vec<(u32, String, usize)>;

fn holders(list: &[OwnerCount]) -> Holders {
    list.iter()
        .map(|o| (o.pid, o.comm.clone(), o.count))
        .collect()
}

fn h(list: &[(u32, &str, usize)]) -> Holders {
    list.iter()
        .map(|&(p, c, n)| (p, c.to_string(), n))
        .collect()
}

/// `--by port` rows: key, count, listening, holders, holders of the other ends.
fn port_rows(r: &Report) -> Vec<(String, usize, bool, Holders, Holders)> {
    r.groups
        .iter()
        .map(|g| {
            let GroupKey::Port { listening, .. } = g.what else {
                panic!("not a port group: {g:?}")
            };
            (
                g.key.clone(),
                g.count,
                listening,
                holders(&g.processes),
                holders(&g.peer_processes),
            )
        })
        .collect()
}

fn key_rows(r: &Report) -> Vec<(String, usize, Holders, Holders)> {
    r.groups
        .iter()
        .map(|g| {
            (
                g.key.clone(),
                g.count,
                holders(&g.processes),
                holders(&g.peer_processes),
            )
        })
        .collect()
}

fn row(
    key: &str,
    count: usize,
    listening: bool,
    own: &[(u32, &str, usize)],
    peers: &[(u32, &str, usize)],
) -> (String, usize, bool, Holders, Holders) {
    (key.to_string(), count, listening, h(own), h(peers))
}

fn krow(
    key: &str,
    count: usize,
    own: &[(u32, &str, usize)],
    peers: &[(u32, &str, usize)],
) -> (String, usize, Holders, Holders) {
    (key.to_string(), count, h(own), h(peers))
}

#[test]
fn by_port_counts_a_shared_socket_once_and_names_both_ends() {
    let sample = sample("shared", registry_sockets());
    let r = shimcheck::ports_report(&sample, &query(GroupBy::Port, &[TcpState::Established]));
    assert_eq!(
        port_rows(&r),
        [
            row(
                "127.0.0.1:5000",
                3,
                true,
                &[(2811, "registry", 3), (2812, "registry", 1)],
                &[(4242, "image-cri-shim", 3)]
            ),
            row("10.0.0.5:41000", 1, false, &[(4243, EVIL, 1)], &[]),
            row(
                "127.0.0.1:40001",
                1,
                false,
                &[(4242, "image-cri-shim", 1)],
                &[(2811, "registry", 1), (2812, "registry", 1)]
            ),
            row(
                "127.0.0.1:40002",
                1,
                false,
                &[(4242, "image-cri-shim", 1)],
                &[(2811, "registry", 1)]
            ),
            row(
                "127.0.0.1:40003",
                1,
                false,
                &[(4242, "image-cri-shim", 1)],
                &[(2811, "registry", 1)]
            ),
            row("127.0.0.1:40009", 1, false, &[], &[]),
        ]
    );
    // 1001 is held by two processes and still one socket; 8888 is nobody's.
    assert_eq!(
        (r.totals.sockets, r.totals.attributed, r.totals.unattributed),
        (8, 7, 1)
    );
    assert_eq!(r.total_groups, 6);
    let json = serde_json::to_value(&r.groups[0]).unwrap();
    assert_eq!(
        (
            &json["local_addr"],
            &json["local_port"],
            &json["listening"],
            &json["states"]
        ),
        (
            &serde_json::json!("127.0.0.1"),
            &serde_json::json!(5000),
            &serde_json::json!(true),
            &serde_json::json!({"established": 3})
        )
    );
    // An unattributed socket with an inode, but every fd table was read: nothing to warn of.
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn every_state_keeps_the_listener_and_unattributed_sockets_in_their_groups() {
    use TcpState::{Established, Listen, TimeWait};
    let sample = sample("shared", registry_sockets());
    let r = shimcheck::ports_report(
        &sample,
        &query(GroupBy::Port, &[Established, Listen, TimeWait]),
    );
    let rows = port_rows(&r);
    assert_eq!(
        rows[..4],
        [
            row(
                "127.0.0.1:5000",
                3,
                true,
                &[(2811, "registry", 3), (2812, "registry", 1)],
                &[(4242, "image-cri-shim", 3)]
            ),
            row("0.0.0.0:5000", 1, true, &[(2811, "registry", 1)], &[]),
            row("10.0.0.5:41000", 1, false, &[(4243, EVIL, 1)], &[]),
            row("127.0.0.1:40000", 1, false, &[], &[]),
        ]
    );
    let keys: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        keys[4..],
        [
            "127.0.0.1:40001",
            "127.0.0.1:40002",
            "127.0.0.1:40003",
            "127.0.0.1:40009"
        ]
    );
    assert_eq!(
        serde_json::to_value(&r.groups[3].states).unwrap(),
        serde_json::json!({"time-wait": 1})
    );
    assert_eq!(
        (r.totals.sockets, r.totals.attributed, r.totals.unattributed),
        (10, 8, 2)
    );
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn by_process_and_by_pair_list_a_shared_socket_under_each_holder() {
    let sample = sample("shared", registry_sockets());
    let est = [TcpState::Established];

    // 1001 appears under both registry processes; each group's `processes` lists every
    // holder of its sockets (docs/json.md), so 2812 shows in 2811's group and vice versa.
    let by_process = shimcheck::ports_report(&sample, &query(GroupBy::Process, &est));
    let evil_key = format!("{EVIL}(4243)");
    assert_eq!(
        key_rows(&by_process),
        [
            krow(
                "registry(2811)",
                3,
                &[(2811, "registry", 3), (2812, "registry", 1)],
                &[(4242, "image-cri-shim", 3)]
            ),
            krow(
                "image-cri-shim(4242)",
                3,
                &[(4242, "image-cri-shim", 3)],
                &[(2811, "registry", 3), (2812, "registry", 1)]
            ),
            krow("(unattributed)", 1, &[], &[]),
            krow(
                "registry(2812)",
                1,
                &[(2811, "registry", 1), (2812, "registry", 1)],
                &[(4242, "image-cri-shim", 1)]
            ),
            krow(&evil_key, 1, &[(4243, EVIL, 1)], &[]),
        ]
    );
    // Nine group memberships, eight sockets: 1001 is in both registry groups.
    assert_eq!(
        (
            by_process.totals.sockets,
            by_process.totals.attributed,
            by_process.totals.unattributed
        ),
        (8, 7, 1)
    );
    assert_eq!(
        by_process.groups[0].what,
        GroupKey::Process {
            pid: Some(2811),
            comm: Some("registry".into()),
            cmdline: Some(REGISTRY_CMDLINE.into()),
        }
    );

    let by_pair = shimcheck::ports_report(&sample, &query(GroupBy::Pair, &est));
    assert_eq!(
        key_rows(&by_pair),
        [
            krow(
                "image-cri-shim(4242) -> 127.0.0.1:5000",
                3,
                &[(4242, "image-cri-shim", 3)],
                &[(2811, "registry", 3), (2812, "registry", 1)]
            ),
            krow("(unattributed) -> 127.0.0.1:6443", 1, &[], &[]),
            krow(
                "registry(2811) -> 127.0.0.1:40001",
                1,
                &[(2811, "registry", 1), (2812, "registry", 1)],
                &[(4242, "image-cri-shim", 1)]
            ),
            krow(
                "registry(2811) -> 127.0.0.1:40002",
                1,
                &[(2811, "registry", 1)],
                &[(4242, "image-cri-shim", 1)]
            ),
            krow(
                "registry(2811) -> 127.0.0.1:40003",
                1,
                &[(2811, "registry", 1)],
                &[(4242, "image-cri-shim", 1)]
            ),
            krow(
                "registry(2812) -> 127.0.0.1:40001",
                1,
                &[(2811, "registry", 1), (2812, "registry", 1)],
                &[(4242, "image-cri-shim", 1)]
            ),
            krow(
                &format!("{evil_key} -> 10.96.0.1:443"),
                1,
                &[(4243, EVIL, 1)],
                &[]
            ),
        ]
    );
    assert_eq!(by_pair.totals.sockets, 8);

    // The hostile comm reaches the report as it is; the table escapes it.
    let mut out = Vec::new();
    shimcheck::render::table::render(&by_process, &mut out, None).unwrap();
    assert!(!out.contains(&0x1b), "{}", String::from_utf8_lossy(&out));
    assert!(String::from_utf8(out).unwrap().contains("registry(2812)"));
}

#[test]
fn an_unreadable_fd_table_warns_only_when_an_unattributed_socket_has_an_inode() {
    use TcpState::{Established, TimeWait};
    let held = sock(Established, "127.0.0.1:40100", "127.0.0.1:7000", 5001);
    let time_wait = sock(TimeWait, "127.0.0.1:40101", "127.0.0.1:7000", 0);
    // Perhaps 6000's: its fd table could not be read.
    let hidden = sock(Established, "127.0.0.1:40102", "127.0.0.1:7000", 5002);
    let both = [Established, TimeWait];

    let with_hidden = sample("unreadable", vec![held.clone(), time_wait.clone(), hidden]);
    let r = shimcheck::ports_report(&with_hidden, &query(GroupBy::Port, &both));
    assert_eq!(
        (r.totals.sockets, r.totals.attributed, r.totals.unattributed),
        (3, 1, 2)
    );
    assert_eq!(
        texts(&r.warnings),
        [format!(
            "cannot read the open files of 1 process ({}/6000/fd: {}): the sockets they hold \
             are counted as unattributed",
            root("unreadable").display(),
            std::io::Error::from_raw_os_error(20)
        )]
    );
    // The same sample shown without the socket that could be hidden: TIME_WAIT has no inode.
    let r = shimcheck::ports_report(&with_hidden, &query(GroupBy::Port, &[TimeWait]));
    assert_eq!(r.totals.unattributed, 1);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);

    // Every socket with an inode attributed: no warning, unreadable process or not.
    let all_held = sample("unreadable", vec![held, time_wait]);
    assert_eq!(all_held.scan.unreadable, 1);
    let r = shimcheck::ports_report(&all_held, &query(GroupBy::Port, &both));
    assert_eq!(
        (r.totals.sockets, r.totals.attributed, r.totals.unattributed),
        (2, 1, 1)
    );
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);

    // A vanished process took its sockets with it: nothing to warn of either.
    let vanished = sample(
        "vanished",
        vec![sock(Established, "127.0.0.1:40200", "127.0.0.1:7000", 4999)],
    );
    assert_eq!(vanished.scan.vanished, 1);
    let r = shimcheck::ports_report(&vanished, &query(GroupBy::Port, &both));
    assert_eq!(r.totals.unattributed, 1);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn kept_tables_list_every_fd_in_order_with_its_socket() {
    let s = scanner("shared");
    let scan = s.socket_fds(2, true).unwrap();
    let tables: BTreeMap<u32, Vec<(u32, u64)>> = scan.tables.into_iter().collect();
    // 4242 has a hole (fds 1, 2, 6-8) and the same socket on two fds; other files are 0.
    assert_eq!(
        tables[&4242],
        [(0, 0), (3, 2001), (4, 2002), (5, 2003), (9, 2001)]
    );
    assert_eq!(
        tables[&2811],
        [
            (0, 0),
            (1, 0),
            (2, 0),
            (3, 1000),
            (4, 1001),
            (5, 1002),
            (6, 1003)
        ]
    );
    assert_eq!(tables.len(), 4);
    assert!(s.socket_fds(1, false).unwrap().tables.is_empty());
}
