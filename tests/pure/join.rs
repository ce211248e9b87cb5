//! Stage 3 on built samples: which sockets are the two ends of one connection on this node,
//! and which local endpoints a listener serves.

use shimcheck::join::{Joined, Topology};
use shimcheck::model::{Sample, Socket, TcpState};

use crate::support::builders::{self, SocketWith, sock};

use TcpState::{Established, Listen};

fn sample(sockets: Vec<Socket>) -> Sample {
    builders::sample().sockets(sockets).build()
}

#[test]
fn both_ends_on_this_node_are_peers() {
    let s = sample(vec![
        sock(Listen, "0.0.0.0:5000", "0.0.0.0:0", 1),
        sock(Established, "127.0.0.1:5000", "127.0.0.1:40000", 2),
        sock(Established, "127.0.0.1:40000", "127.0.0.1:5000", 3),
        sock(Established, "127.0.0.1:40001", "10.9.9.9:443", 4),
    ]);
    let j = Joined::new(&s);
    assert_eq!(j.peer(0), None);
    assert_eq!(j.peer(1), Some(2));
    assert_eq!(j.peer(2), Some(1));
    assert_eq!(j.peer(3), None);
    assert!(j.listening(0, "127.0.0.1:5000".parse().unwrap()));
    assert!(!j.listening(0, "127.0.0.1:40000".parse().unwrap()));
    assert!(
        !j.listening(7, "127.0.0.1:5000".parse().unwrap()),
        "another namespace"
    );
}

#[test]
fn a_v4_client_of_a_dual_stack_server_finds_its_peer() {
    let s = sample(vec![
        sock(Listen, "[::]:8443", "[::]:0", 1),
        sock(
            Established,
            "[::ffff:127.0.0.1]:8443",
            "[::ffff:127.0.0.1]:41000",
            2,
        ),
        sock(Established, "127.0.0.1:41000", "127.0.0.1:8443", 3),
    ]);
    let j = Joined::new(&s);
    assert_eq!(j.peer(1), Some(2));
    assert_eq!(j.peer(2), Some(1));
    assert!(j.listening(0, "127.0.0.1:8443".parse().unwrap()));
}

#[test]
fn loopback_in_two_namespaces_is_two_places() {
    let a = sock(Established, "127.0.0.1:5000", "127.0.0.1:40000", 1).netns(10);
    let b = sock(Established, "127.0.0.1:40000", "127.0.0.1:5000", 2).netns(20);
    let s = sample(vec![a, b]);
    let j = Joined::new(&s);
    assert_eq!((j.peer(0), j.peer(1)), (None, None));
}

#[test]
fn a_socket_connected_to_itself_is_not_its_own_peer() {
    let s = sample(vec![sock(
        Established,
        "127.0.0.1:40000",
        "127.0.0.1:40000",
        1,
    )]);
    assert_eq!(Joined::new(&s).peer(0), None);
}

#[test]
fn ends_on_the_same_ports_at_other_addresses_are_not_peers() {
    let s = sample(vec![
        // A server end whose client is on another host ...
        sock(Established, "127.0.0.1:5000", "127.0.0.1:40000", 1),
        // ... and a connection between two other hosts' addresses on the same ports.
        sock(Established, "10.0.0.5:40000", "10.0.0.6:5000", 2),
        sock(Established, "10.0.0.6:5001", "10.0.0.7:40001", 3),
        sock(Established, "10.0.0.7:40001", "10.0.0.6:5001", 4),
    ]);
    let j = Joined::new(&s);
    assert_eq!((j.peer(0), j.peer(1)), (None, None));
    assert_eq!((j.peer(2), j.peer(3)), (Some(3), Some(2)));
}

#[test]
fn the_same_ports_in_many_namespaces_pair_only_within_one() {
    // In namespace 10 the server ends of 8 clients; the clients themselves, on the same ports,
    // in namespace 10 and in 7 others.
    let mut sockets = Vec::new();
    for k in 0..8u16 {
        sockets.push(
            sock(
                Established,
                "127.0.0.1:5000",
                &format!("127.0.0.1:{}", 40000 + k),
                1,
            )
            .netns(10),
        );
    }
    for ns in 0..8u64 {
        for k in 0..8u16 {
            sockets.push(
                sock(
                    Established,
                    &format!("127.0.0.1:{}", 40000 + k),
                    "127.0.0.1:5000",
                    1,
                )
                .netns(10 + ns),
            );
        }
    }
    let s = sample(sockets);
    let j = Joined::new(&s);
    for k in 0..8 {
        assert_eq!(j.peer(k), Some(8 + k), "server end {k}");
        assert_eq!(
            j.peer(8 + k),
            Some(k),
            "client {k} in the server's namespace"
        );
    }
    for i in 16..s.sockets.len() {
        assert_eq!(j.peer(i), None, "client {i} in another namespace");
    }
}

#[test]
fn a_listener_on_one_address_serves_that_address_only() {
    let s = sample(vec![
        sock(Listen, "10.0.0.1:5000", "0.0.0.0:0", 1),
        sock(Listen, "[::1]:6443", "[::]:0", 2),
    ]);
    let j = Joined::new(&s);
    assert!(j.listening(0, "10.0.0.1:5000".parse().unwrap()));
    assert!(!j.listening(0, "10.0.0.2:5000".parse().unwrap()));
    assert!(j.listening(0, "[::1]:6443".parse().unwrap()));
    assert!(!j.listening(0, "127.0.0.1:6443".parse().unwrap()));
    assert!(!j.listening(0, "10.0.0.1:5001".parse().unwrap()));
}

#[test]
fn a_loops_inode_order_joins_the_same_holders_as_a_sort_of_its_own() {
    // Inodes out of socket order, and one socket with none (waiting to be accepted).
    let s = builders::sample()
        .sockets([
            sock(Listen, "127.0.0.1:5000", "0.0.0.0:0", 30),
            sock(Established, "127.0.0.1:5000", "127.0.0.1:40000", 12),
            sock(Established, "127.0.0.1:40000", "127.0.0.1:5000", 11),
            sock(Established, "127.0.0.1:40001", "127.0.0.1:5000", 40),
            sock(Established, "127.0.0.1:5000", "127.0.0.1:40001", 0),
        ])
        .owners([(30, 1), (12, 1), (11, 2), (40, 2), (40, 3)])
        .build();
    let topology = Topology::with_inode_order(&s.sockets);
    assert_eq!(topology.inodes().collect::<Vec<_>>(), [11, 12, 30, 40]);
    let ordered = Joined::with_topology_of(&s, &topology);
    let sorted_here = Joined::new(&s);
    for i in 0..s.sockets.len() {
        let ours: Vec<u32> = ordered.owners(i).collect();
        assert_eq!(
            ours,
            sorted_here.owners(i).collect::<Vec<_>>(),
            "socket {i}"
        );
    }
    assert_eq!(ordered.owners(3).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(ordered.owners(4).count(), 0);
    assert_eq!(ordered.peer(3), Some(4));
}
