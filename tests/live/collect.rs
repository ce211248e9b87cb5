//! The collector on a live kernel, in a namespace each test makes: the one-walk compat dump
//! against the two per-family dumps, and a loop's "unchanged" against what really moved (a
//! connection opened, data sent, a FIN received).
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use serde_json::json;
use shimcheck::collect::SocketSource;
use shimcheck::collect::counters::RESYNC_EVERY;
use shimcheck::collect::netlink::NetlinkSource;
use shimcheck::model::{Socket, StateSet, TcpState};

use crate::support::{Population, in_netns};

fn key(
    s: &Socket,
) -> (
    Option<u64>,
    TcpState,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    (s.cookie(), s.state, s.local(), s.remote())
}

fn sorted(
    sockets: &[Socket],
) -> Vec<(
    Option<u64>,
    TcpState,
    std::net::SocketAddr,
    std::net::SocketAddr,
)> {
    let mut v: Vec<_> = sockets.iter().map(key).collect();
    v.sort();
    v
}

#[test]
fn one_walk_finds_what_the_two_per_family_dumps_find() {
    skip_unless_live!();
    let pop = Population::start(&json!({
        "servers": [{"name": "registry", "addr": "127.0.0.1", "port": 5000},
                    {"name": "apiserver", "addr": "::1", "port": 6443}],
        "clients": [{"name": "image-cri-shim", "connect": "127.0.0.1:5000", "count": 40},
                    {"name": "kubelet", "connect": "[::1]:6443", "count": 20}]
    }));
    let (both, per_family) = in_netns(pop.ns_pid, || {
        let mut nl = NetlinkSource::open().unwrap();
        let both = nl.sockets(StateSet::all()).unwrap();
        let per_family = nl.sockets_per_family(StateSet::all(), 0).unwrap();
        (both, per_family)
    });
    // 60 connections (both ends) and two listeners.
    assert_eq!(both.len(), 122, "{:?}", sorted(&both));
    assert_eq!(sorted(&both), sorted(&per_family));
    assert_eq!(both.iter().filter(|s| s.local().is_ipv6()).count(), 41);
}

/// The states a loop dumps.
fn loop_states() -> StateSet {
    [TcpState::Established, TcpState::CloseWait, TcpState::Listen]
        .into_iter()
        .collect()
}

/// A loop's look through its source, after loopback settled: `None` when the source says
/// nothing moved, else a new dump.
fn look(nl: &mut NetlinkSource) -> Option<Vec<Socket>> {
    std::thread::sleep(Duration::from_millis(100));
    (!nl.still(loop_states())).then(|| nl.sockets(loop_states()).unwrap())
}

#[test]
fn nothing_moved_until_a_segment_moves() {
    skip_unless_live!();
    let pop = Population::start(&json!({
        "servers": [{"name": "registry", "addr": "127.0.0.1", "port": 5000}],
        "clients": [{"name": "image-cri-shim", "connect": "127.0.0.1:5000", "count": 10}]
    }));
    in_netns(pop.ns_pid, || {
        let mut nl = NetlinkSource::open().unwrap().reusing_unchanged_dumps();
        let first = look(&mut nl).expect("the first look dumps");
        assert_eq!(first.len(), 21);
        assert_eq!(look(&mut nl), None, "nothing moved");

        // A connection opened: a dump, with its two ends and its listener.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let opened = look(&mut nl).expect("a connection opened");
        assert_eq!(opened.len(), 24);
        assert_eq!(look(&mut nl), None);

        // Data sent on it: the clocks the detector reads were reset, so a dump.
        client.write_all(b"GET /v2/ HTTP/1.1\r\n\r\n").unwrap();
        let sent = look(&mut nl).expect("data sent");
        let port = client.local_addr().unwrap().port();
        let mine = sent
            .iter()
            .find(|s| s.local().port() == port)
            .and_then(|s| s.tcp_info)
            .unwrap();
        assert!(mine.last_data_sent_ms < 1000, "{mine:?}");

        // The server reads the request and closes its end: the client's goes to CLOSE_WAIT,
        // which only a dump shows. (Closing with the request unread would send a reset.)
        let mut request = [0u8; 21];
        server.read_exact(&mut request).unwrap();
        server.shutdown(Shutdown::Both).unwrap();
        drop(server);
        let closed = look(&mut nl).expect("a FIN received");
        assert!(
            closed
                .iter()
                .any(|s| s.local().port() == port && s.state == TcpState::CloseWait)
        );

        // Other states asked for: a dump; then none while the counters stand still (the resync
        // comes after RESYNC_EVERY samples and a minute: `counters` unit tests).
        let established: StateSet = [TcpState::Established].into_iter().collect();
        let dumped: Vec<u32> = (0..=RESYNC_EVERY)
            .filter(|_| !nl.still(established) && nl.sockets(established).is_ok())
            .collect();
        assert_eq!(dumped, [0], "a dump for the new states only");
        drop(client);
    });
}
