//! Stage 3 on built samples: which sockets are the two ends of one connection on this node,
//! and which local endpoints a listener serves.

use shimcheck::join::Joined;
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
