//! The loop's event-kept socket table (`collect::events`) against a whole dump of the same
//! moment, live: connections opened, closed by either end, left in an accept queue and then
//! accepted, a listener opened; after each move, the table (updated from state changes and
//! lookups, no dump) must list exactly the sockets a dump lists, with the same states and
//! inodes. Nothing else moves in the namespace between the two looks: every move is the
//! test's, and the population's own accepts are waited for first. The same across namespaces
//! (`--all-netns`) is `tests/quiet_sweep.rs`: it needs a host where no other test moves.

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use serde_json::json;
use shimcheck::bpf::events::StateChanges;
use shimcheck::collect::SocketSource;
use shimcheck::collect::events::EventSource;
use shimcheck::collect::netlink::NetlinkSource;
use shimcheck::model::{StateSet, TcpState};

use crate::support::{Population, in_netns, socket_rows as rows, wait_until};

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
