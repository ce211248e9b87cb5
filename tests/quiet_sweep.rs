//! `--all-netns` loops kept by state changes (`collect::netns` with `collect::events`), live:
//! each namespace's table follows its own changes, a namespace where nothing changed is not
//! entered, and when nothing changed anywhere the loop may reuse its last sample whole
//! (`still`). That last answer is about the whole host (one ring of state changes serves every
//! namespace), so this test has a binary of its own: cargo runs test binaries one at a time,
//! and no other test's sockets move meanwhile. The sweep sees only the test's two namespaces
//! (a procfs root listing just their processes); the host's own connections, which no test
//! holds still, get a few looks to be quiet.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod support;

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use shimcheck::bpf::events::StateChanges;
use shimcheck::collect::SocketSource;
use shimcheck::collect::netlink::NetlinkSource;
use shimcheck::collect::netns::AllNetns;
use shimcheck::model::{Socket, StateSet, TcpState};
use support::{Population, SocketRow, in_netns, socket_rows, wait_until};

/// The sockets of one namespace in a sweep of all of them.
fn of(sockets: &[Socket], netns: u64) -> BTreeSet<SocketRow> {
    let mine: Vec<Socket> = sockets
        .iter()
        .filter(|s| s.netns == netns)
        .cloned()
        .collect();
    socket_rows(&mine)
}

/// A procfs root that lists only some processes (links to their `/proc` entries) and `self`;
/// removed on drop.
struct ProcOf(PathBuf);

impl ProcOf {
    fn new(pids: &[u32]) -> ProcOf {
        let dir = std::env::temp_dir().join(format!("shimcheck-proc-of-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        for pid in pids {
            symlink(format!("/proc/{pid}"), dir.join(pid.to_string())).unwrap();
        }
        symlink("/proc/self", dir.join("self")).unwrap();
        ProcOf(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ProcOf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_namespace_is_kept_by_its_own_changes_and_a_quiet_one_is_not_entered() {
    skip_unless_live!();
    let spec = json!({
        "servers": [{"name": "registry", "addr": "127.0.0.1", "port": 5000}],
        "clients": [{"name": "kubelet", "connect": "127.0.0.1:5000", "count": 5}]
    });
    let (a, b) = (Population::start(&spec), Population::start(&spec));
    let states: StateSet = [TcpState::Listen, TcpState::Established, TcpState::CloseWait]
        .into_iter()
        .collect();
    let changes = match StateChanges::load(None) {
        Ok(c) => c,
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "must load under CI: {e}");
            eprintln!("skipped: BPF cannot be loaded here: {e}");
            return;
        }
    };
    let proc = ProcOf::new(&[a.ns_pid, b.ns_pid]);
    let mut sweep =
        AllNetns::new(NetlinkSource::open().unwrap(), proc.path(), 2, true).with_events(changes);
    let dump_in = |pop: &Population| {
        in_netns(pop.ns_pid, || {
            socket_rows(&NetlinkSource::open().unwrap().sockets(states).unwrap())
        })
    };
    let settled = |pop: &Population| {
        wait_until("the registry to accept", Duration::from_secs(60), || {
            in_netns(pop.ns_pid, || {
                NetlinkSource::open()
                    .unwrap()
                    .sockets(states)
                    .unwrap()
                    .iter()
                    .all(|s| s.inode != 0)
            })
        })
    };
    let (na, nb) = (a.netns_inode(), b.netns_inode());
    let look = |sweep: &mut AllNetns, what: &str| {
        settled(&a);
        settled(&b);
        let all = sweep.sockets(states).unwrap();
        assert_eq!(of(&all, na), dump_in(&a), "{what}: namespace a");
        assert_eq!(of(&all, nb), dump_in(&b), "{what}: namespace b");
        assert_eq!(
            all.len(),
            dump_in(&a).len() + dump_in(&b).len(),
            "{what}: only the two namespaces are swept"
        );
        let lookups = (sweep.last_lookups(na), sweep.last_lookups(nb));
        // As a loop does: the largest namespace's table lent its own sockets to the sample.
        sweep.recycle(all);
        lookups
    };
    assert_eq!(look(&mut sweep, "the first sweep"), (None, None));
    assert_eq!(look(&mut sweep, "nothing"), (Some(0), Some(0)));
    // Nothing changed in either namespace since: the loop may reuse its last sample whole.
    // A state change anywhere on the host says otherwise until a sweep has read it, and the
    // host's own connections are not the test's to hold still: a few looks must find it still.
    let mut looks = 1;
    while !sweep.still(states) {
        assert!(looks < 20, "not still after {looks} looks at nothing");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(look(&mut sweep, "nothing"), (Some(0), Some(0)));
        looks += 1;
    }
    let opened: Vec<TcpStream> = in_netns(a.ns_pid, || {
        (0..6)
            .map(|_| TcpStream::connect("127.0.0.1:5000").unwrap())
            .collect()
    });
    settled(&a);
    // Something changed: not still; the changes it read are kept for the sweep.
    assert!(!sweep.still(states));
    assert_eq!(look(&mut sweep, "6 opened in a"), (Some(12), Some(0)));
    drop(opened);
    let (in_a, in_b) = look(&mut sweep, "6 closed in a");
    assert!(in_a.is_some_and(|n| n > 0), "{in_a:?}");
    assert_eq!(in_b, Some(0));
}
