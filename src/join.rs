//! Stage 3, process join, pure half: each socket's owners, its same-host peer, and whether its
//! local endpoint is a listening (server) port.
//!
//! Input: a `Sample` (every socket dumped, LISTEN included). Output: `Joined`, which answers
//! per socket index: who holds it (`owners`), which socket in the dump is its other end when
//! both ends live on this node (`peer`, the image-cri-shim → registry :5000 case), and
//! `listening`. No I/O.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::model::{Sample, Socket, TcpState};

/// A sample with its sockets cross-referenced.
pub struct Joined<'a> {
    pub sample: &'a Sample,
    peer: Vec<Option<usize>>,
    listeners: HashSet<(IpAddr, u16)>,
}

impl<'a> Joined<'a> {
    /// Matches every socket with its reverse 4-tuple and collects the listening endpoints.
    pub fn new(sample: &'a Sample) -> Joined<'a> {
        let sockets = &sample.sockets;
        let mut by_tuple: HashMap<(SocketAddr, SocketAddr), usize> =
            HashMap::with_capacity(sockets.len());
        let mut listeners = HashSet::new();
        for (i, s) in sockets.iter().enumerate() {
            if s.state == TcpState::Listen {
                listeners.insert((canonical(s.local).ip(), s.local.port()));
            } else {
                by_tuple.insert((canonical(s.local), canonical(s.remote)), i);
            }
        }
        let peer = sockets
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if s.state == TcpState::Listen {
                    return None;
                }
                by_tuple
                    .get(&(canonical(s.remote), canonical(s.local)))
                    .copied()
                    .filter(|&j| j != i)
            })
            .collect();
        Joined {
            sample,
            peer,
            listeners,
        }
    }

    /// The socket at index `i`.
    pub fn socket(&self, i: usize) -> &'a Socket {
        &self.sample.sockets[i]
    }

    /// Pids holding socket `i`, ascending.
    pub fn owners(&self, i: usize) -> impl Iterator<Item = u32> + 'a {
        let inode = self.sample.sockets[i].inode;
        self.sample.owners.owners(inode).iter().map(|&(_, pid)| pid)
    }

    /// The index of the socket at the other end, when it is on this node too.
    pub fn peer(&self, i: usize) -> Option<usize> {
        self.peer[i]
    }

    /// True when a listener accepts on this endpoint: a specific address or a wildcard one.
    pub fn listening(&self, local: SocketAddr) -> bool {
        let local = canonical(local);
        let port = local.port();
        self.listeners.contains(&(local.ip(), port))
            || self
                .listeners
                .contains(&(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
            || self
                .listeners
                .contains(&(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port))
    }
}

/// `::ffff:10.0.0.1` (a v4 client on a dual-stack listener) → `10.0.0.1`, so both ends of a
/// connection name each other the same way.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::OwnerIndex;
    use std::time::SystemTime;

    pub(crate) fn sock(state: TcpState, local: &str, remote: &str, inode: u64) -> Socket {
        Socket {
            state,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            inode,
            cookie: Some(inode),
            uid: 0,
            recv_q: 0,
            send_q: 0,
            tcp_info: None,
        }
    }

    fn sample(sockets: Vec<Socket>) -> Sample {
        Sample {
            taken_at: SystemTime::UNIX_EPOCH,
            hostname: "t".into(),
            sockets,
            owners: OwnerIndex::default(),
            scan: Default::default(),
            warnings: vec![],
        }
    }

    #[test]
    fn both_ends_on_this_node_are_peers() {
        let s = sample(vec![
            sock(TcpState::Listen, "0.0.0.0:5000", "0.0.0.0:0", 1),
            sock(
                TcpState::Established,
                "127.0.0.1:5000",
                "127.0.0.1:40000",
                2,
            ),
            sock(
                TcpState::Established,
                "127.0.0.1:40000",
                "127.0.0.1:5000",
                3,
            ),
            sock(TcpState::Established, "127.0.0.1:40001", "10.9.9.9:443", 4),
        ]);
        let j = Joined::new(&s);
        assert_eq!(j.peer(0), None);
        assert_eq!(j.peer(1), Some(2));
        assert_eq!(j.peer(2), Some(1));
        assert_eq!(j.peer(3), None);
        assert!(j.listening("127.0.0.1:5000".parse().unwrap()));
        assert!(!j.listening("127.0.0.1:40000".parse().unwrap()));
    }

    #[test]
    fn a_v4_client_of_a_dual_stack_server_finds_its_peer() {
        let s = sample(vec![
            sock(TcpState::Listen, "[::]:8443", "[::]:0", 1),
            sock(
                TcpState::Established,
                "[::ffff:127.0.0.1]:8443",
                "[::ffff:127.0.0.1]:41000",
                2,
            ),
            sock(
                TcpState::Established,
                "127.0.0.1:41000",
                "127.0.0.1:8443",
                3,
            ),
        ]);
        let j = Joined::new(&s);
        assert_eq!(j.peer(1), Some(2));
        assert_eq!(j.peer(2), Some(1));
        assert!(j.listening("127.0.0.1:8443".parse().unwrap()));
    }

    #[test]
    fn a_socket_connected_to_itself_is_not_its_own_peer() {
        let s = sample(vec![sock(
            TcpState::Established,
            "127.0.0.1:40000",
            "127.0.0.1:40000",
            1,
        )]);
        assert_eq!(Joined::new(&s).peer(0), None);
    }
}
