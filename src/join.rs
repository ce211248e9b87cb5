//! Stage 3, process join, pure half: each socket's owners, its same-host peer, and whether its
//! local endpoint is a listening (server) port.
//!
//! Input: a `Sample` (every socket dumped, LISTEN included). Output: `Joined`, which answers
//! per socket index: who holds it (`owners`), which socket in the dump is its other end when
//! both ends live on this node (`peer`, the image-cri-shim → registry :5000 case), and
//! `listening`. No I/O.

use rustc_hash::{FxHashMap, FxHashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::model::{OwnerIndex, Sample, Socket, TcpState};

/// Who is connected to whom on this node, from the sockets alone (no owners needed, so the
/// collector computes it while the /proc scan is still running).
#[derive(Debug, Clone, Default)]
pub struct Topology {
    peer: Vec<Option<u32>>,
    listeners: FxHashSet<(u64, IpAddr, u16)>,
}

/// An endpoint as numbers: its network namespace (loopback in two namespaces is two places),
/// and IPv4 as its IPv6-mapped form, so a v4 client of a dual-stack server and the server's
/// `::ffff:` view of it compare equal.
type Endpoint = (u64, u128, u16);

fn endpoint(netns: u64, addr: SocketAddr) -> Endpoint {
    let ip = match addr.ip().to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    (netns, u128::from(ip), addr.port())
}

/// A connection's two endpoints, the key of the peer match.
type Tuple = (Endpoint, Endpoint);

/// 64 bits standing for a tuple: the peer map holds 12 bytes a socket instead of the 64-byte
/// tuple (90 MB at a million sockets), and a match is confirmed against the sockets.
fn fingerprint(t: &Tuple) -> u64 {
    use std::hash::BuildHasher;
    rustc_hash::FxBuildHasher.hash_one(t)
}

fn tuple(s: &Socket) -> Tuple {
    (endpoint(s.netns, s.local), endpoint(s.netns, s.remote))
}

impl Topology {
    /// Matches every socket with its reverse 4-tuple and collects the listening endpoints.
    pub fn new(sockets: &[Socket]) -> Topology {
        Topology::matched_by(sockets, fingerprint)
    }

    /// `new`, with the tuples' fingerprints given by `fingerprint`.
    fn matched_by(sockets: &[Socket], fingerprint: fn(&Tuple) -> u64) -> Topology {
        let mut by_print: FxHashMap<u64, u32> =
            FxHashMap::with_capacity_and_hasher(sockets.len(), Default::default());
        // Tuples whose fingerprint another tuple already holds: next to never.
        let mut collided: FxHashMap<Tuple, u32> = FxHashMap::default();
        let mut listeners = FxHashSet::default();
        for (i, s) in sockets.iter().enumerate() {
            if s.state == TcpState::Listen {
                listeners.insert((s.netns, s.local.ip().to_canonical(), s.local.port()));
                continue;
            }
            let Ok(i) = u32::try_from(i) else { continue };
            let t = tuple(s);
            match by_print.entry(fingerprint(&t)) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(i);
                }
                // The same tuple again (a dump under churn): the later socket wins, as it
                // does for a tuple seen once.
                std::collections::hash_map::Entry::Occupied(mut e)
                    if tuple(&sockets[*e.get() as usize]) == t =>
                {
                    e.insert(i);
                }
                std::collections::hash_map::Entry::Occupied(_) => {
                    collided.insert(t, i);
                }
            }
        }
        let find = |t: &Tuple| {
            let primary = by_print
                .get(&fingerprint(t))
                .copied()
                .filter(|&j| tuple(&sockets[j as usize]) == *t);
            primary.or_else(|| collided.get(t).copied())
        };
        let peer = sockets
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if s.state == TcpState::Listen {
                    return None;
                }
                let (local, remote) = tuple(s);
                find(&(remote, local)).filter(|&j| j as usize != i)
            })
            .collect();
        Topology { peer, listeners }
    }
}

/// A sample with its sockets cross-referenced.
pub struct Joined<'a> {
    pub sample: &'a Sample,
    topology: Topology,
    /// Per socket, its run `(start, len)` in the owner index's sorted pairs.
    owner_runs: Vec<(u32, u32)>,
}

impl<'a> Joined<'a> {
    /// Cross-references a sample from scratch.
    pub fn new(sample: &'a Sample) -> Joined<'a> {
        Joined::with_topology(sample, Topology::new(&sample.sockets))
    }

    /// Uses a topology computed earlier from the same sockets.
    pub fn with_topology(sample: &'a Sample, topology: Topology) -> Joined<'a> {
        Joined {
            sample,
            topology,
            owner_runs: owner_runs(&sample.sockets, &sample.owners),
        }
    }

    /// The socket at index `i`.
    pub fn socket(&self, i: usize) -> &'a Socket {
        &self.sample.sockets[i]
    }

    /// Pids holding socket `i`, ascending.
    pub fn owners(&self, i: usize) -> impl Iterator<Item = u32> + 'a {
        let (start, len) = self.owner_runs[i];
        let pairs = self.sample.owners.pairs();
        pairs[start as usize..(start + len) as usize]
            .iter()
            .map(|&(_, pid)| pid)
    }

    /// The index of the socket at the other end, when it is on this node too.
    pub fn peer(&self, i: usize) -> Option<usize> {
        self.topology
            .peer
            .get(i)
            .copied()
            .flatten()
            .map(|j| j as usize)
    }

    /// True when a listener in namespace `netns` accepts on this endpoint: a specific address
    /// or a wildcard one.
    pub fn listening(&self, netns: u64, local: SocketAddr) -> bool {
        let ip = local.ip().to_canonical();
        let port = local.port();
        let l = &self.topology.listeners;
        l.contains(&(netns, ip, port))
            || l.contains(&(netns, IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
            || l.contains(&(netns, IpAddr::V6(Ipv6Addr::UNSPECIFIED), port))
    }
}

/// Finds each socket's owners by walking the sockets in inode order alongside the sorted
/// `(inode, pid)` pairs (`OwnerIndex::walk_sorted`): one pass, no per-socket search through a
/// large table.
fn owner_runs(sockets: &[Socket], owners: &OwnerIndex) -> Vec<(u32, u32)> {
    let mut runs = vec![(0u32, 0u32); sockets.len()];
    let mut by_inode: Vec<(u64, usize)> = sockets
        .iter()
        .enumerate()
        .filter(|(_, s)| s.inode != 0)
        .map(|(i, s)| (s.inode, i))
        .collect();
    by_inode.sort_unstable();
    let inodes: Vec<u64> = by_inode.iter().map(|&(inode, _)| inode).collect();
    owners.walk_sorted(&inodes, |k, run| {
        if let (Ok(start), Ok(len)) = (u32::try_from(run.start), u32::try_from(run.len())) {
            runs[by_inode[k].1] = (start, len);
        }
    });
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Socket;

    fn sock(state: TcpState, local: &str, remote: &str) -> Socket {
        Socket {
            state,
            local: local.parse().unwrap_or_else(|_| unreachable!()),
            remote: remote.parse().unwrap_or_else(|_| unreachable!()),
            inode: 1,
            cookie: None,
            uid: 0,
            recv_q: 0,
            send_q: 0,
            tcp_info: None,
            netns: 7,
            cgroup_id: None,
        }
    }

    #[test]
    fn peers_match_when_every_fingerprint_collides() {
        use TcpState::*;
        let sockets = [
            sock(Listen, "127.0.0.1:5000", "0.0.0.0:0"),
            sock(Established, "127.0.0.1:5000", "127.0.0.1:40000"),
            sock(Established, "127.0.0.1:40000", "127.0.0.1:5000"),
            sock(
                Established,
                "[::ffff:127.0.0.1]:9000",
                "[::ffff:127.0.0.1]:41000",
            ),
            sock(Established, "127.0.0.1:41000", "127.0.0.1:9000"),
            sock(Established, "10.0.0.1:42000", "10.0.0.2:443"),
        ];
        let real = Topology::new(&sockets);
        let colliding = Topology::matched_by(&sockets, |_| 42);
        assert_eq!(real.peer, [None, Some(2), Some(1), Some(4), Some(3), None]);
        assert_eq!(colliding.peer, real.peer);
        assert_eq!(colliding.listeners, real.listeners);
    }
}
