//! The loop's event-kept socket table (`collect::events`) against a whole dump of the same
//! moment, live: connections opened, closed by either end, left in an accept queue and then
//! accepted, a listener opened; after each move, the table (updated from state changes and
//! lookups, no dump) must list exactly the sockets a dump lists, with the same states and
//! inodes. The same across namespaces (`--all-netns`), where a namespace in which nothing
//! changed is not even entered. Nothing else moves in the namespace between the two looks: every move is the
//! test's, and the population's own accepts are waited for first.

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use shimcheck::bpf::events::StateChanges;
use shimcheck::collect::SocketSource;
use shimcheck::collect::events::EventSource;
use shimcheck::collect::netlink::NetlinkSource;
use shimcheck::collect::netns::AllNetns;
use shimcheck::model::{Socket, StateSet, TcpState};

use crate::support::{Population, in_netns, wait_until};

type Row = (u64, TcpState, String, String, u64);

fn rows(sockets: &[Socket]) -> BTreeSet<Row> {
    sockets
        .iter()
        .map(|s| {
            (
                s.cookie().unwrap_or_default(),
                s.state,
                s.local().to_string(),
                s.remote().to_string(),
                s.inode,
            )
        })
        .collect()
}

#[test]
fn the_event_kept_table_equals_a_dump_after_every_move() {
    skip_unless_live!();
    let pop = Population::start(&json!({
        "servers": [{"name": "registry", "addr": "127.0.0.1", "port": 5000}],
        "clients": [{"name": "kubelet", "connect": "127.0.0.1:5000", "count": 20}]
    }));
    let states: StateSet = [TcpState::Listen, TcpState::Established, TcpState::CloseWait]
        .into_iter()
        .collect();
    in_netns(pop.ns_pid, || {
        let own =
            shimcheck::collect::netns::inode_of(std::path::Path::new("/proc/thread-self/ns/net"))
                .unwrap();
        let changes = match StateChanges::load(u32::try_from(own).ok()) {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "the state-change program must load under CI (root, 5.12+ with BTF): {e}"
                );
                eprintln!("skipped: BPF cannot be loaded here: {e}");
                return;
            }
        };
        let mut table = EventSource::new(NetlinkSource::open().unwrap(), changes);
        let mut full = NetlinkSource::open().unwrap();
        // The registry accepts on its own time: wait until it has, so that nothing moves
        // between the two looks.
        let settled = |full: &mut NetlinkSource| {
            wait_until("the registry to accept", Duration::from_secs(60), || {
                full.sockets(states).unwrap().iter().all(|s| {
                    !(s.inode == 0 && s.local().port() == 5000 && s.state == TcpState::Established)
                })
            })
        };
        let same = |table: &mut EventSource, full: &mut NetlinkSource, what: &str| {
            settled(full);
            let lent = table.sockets(states).unwrap();
            let kept = rows(&lent);
            let dumped = rows(&full.sockets(states).unwrap());
            assert_eq!(kept, dumped, "after {what}");
            // As a loop does when it drops the sample: the table's own sockets go back.
            table.recycle(lent);
            table.last_lookups()
        };
        assert_eq!(
            same(&mut table, &mut full, "the first look"),
            None,
            "a dump"
        );

        let mut opened: Vec<TcpStream> = (0..10)
            .map(|_| TcpStream::connect("127.0.0.1:5000").unwrap())
            .collect();
        let lookups = same(&mut table, &mut full, "10 connections opened");
        // Each connection's two ends changed state: 20 lookups, no dump.
        assert_eq!(lookups, Some(20));

        // This end closes 4 (FIN_WAIT1/2 here, CLOSE_WAIT at the registry's end).
        opened.drain(..4);
        assert!(same(&mut table, &mut full, "4 closed by the client").is_some());
        assert_eq!(same(&mut table, &mut full, "nothing"), Some(0));

        // A listener of this test's (a dump: listeners are not followed by lookups), then
        // connections it does not accept yet: no inode until it does.
        let listener = TcpListener::bind("127.0.0.1:6000").unwrap();
        assert_eq!(same(&mut table, &mut full, "a listener opened"), None);
        let waiting: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect("127.0.0.1:6000").unwrap())
            .collect();
        assert!(same(&mut table, &mut full, "3 waiting to be accepted").is_some());
        let (accepted, _) = listener.accept().unwrap();
        // No change of state, yet the table learns the accepted socket's inode.
        assert_eq!(same(&mut table, &mut full, "one accepted"), Some(3));
        assert_eq!(
            same(&mut table, &mut full, "nothing"),
            Some(2),
            "2 still wait"
        );

        // The accepting end closes first: CLOSE_WAIT at the connecting end.
        drop(accepted);
        assert!(same(&mut table, &mut full, "closed by the acceptor").is_some());
        drop(waiting);
        drop(opened);
        assert!(same(&mut table, &mut full, "everything of the test's closed").is_some());
        drop(listener);
        assert_eq!(same(&mut table, &mut full, "the listener closed"), None);
    });
}

/// The sockets of one namespace in a sweep of all of them.
fn of(sockets: &[Socket], netns: u64) -> BTreeSet<Row> {
    let mine: Vec<Socket> = sockets
        .iter()
        .filter(|s| s.netns == netns)
        .cloned()
        .collect();
    rows(&mine)
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
    let mut sweep = AllNetns::new(NetlinkSource::open().unwrap(), Path::new("/proc"), 2, true)
        .with_events(changes);
    let dump_in = |pop: &Population| {
        in_netns(pop.ns_pid, || {
            rows(&NetlinkSource::open().unwrap().sockets(states).unwrap())
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
        let lookups = (sweep.last_lookups(na), sweep.last_lookups(nb));
        // As a loop does: the largest namespace's table lent its own sockets to the sample.
        sweep.recycle(all);
        lookups
    };
    assert_eq!(look(&mut sweep, "the first sweep"), (None, None));
    assert_eq!(look(&mut sweep, "nothing"), (Some(0), Some(0)));
    // Nothing changed anywhere since: the loop may reuse its last sample whole.
    assert!(sweep.still(states));
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
