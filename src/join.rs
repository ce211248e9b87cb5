//! Stage 3, process join, pure half: each socket's owners, its same-host peer, and whether its
//! local endpoint is a listening (server) port.
//!
//! Input: a `Sample` (every socket dumped, LISTEN included). Output: `Joined`, which answers
//! per socket index: who holds it (`owners`), which socket in the dump is its other end when
//! both ends live on this node (`peer`, the image-cri-shim → registry :5000 case), and
//! `listening`. No I/O.

use rustc_hash::{FxHashMap, FxHashSet};
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::model::{OwnerIndex, Sample, Socket, TcpState};

mod kept;
pub use kept::KeptTopology;

/// Who is connected to whom on this node, from the sockets alone (no owners needed, so the
/// collector computes it while the /proc scan is still running).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    /// Per socket, the index of its other end, or `NO_PEER`.
    peer: Arc<Vec<u32>>,
    /// (namespace, address as `Socket::local_mapped` gives it, port).
    listeners: FxHashSet<(u64, u128, u16)>,
    /// Per socket, one bit: a listener accepts on its local endpoint (`Joined::listens`), found
    /// once for the stages that each ask it of every socket.
    listens: Arc<Vec<u64>>,
    /// The sockets with an inode as `(inode, index)`, sorted, where a loop asked for them
    /// (`with_inode_order`): its owner cache and the join both walk the sockets in inode
    /// order, and one sort serves both. Empty otherwise: a one-shot run sorts in the join and
    /// drops the order at once, which a million sockets' memory peak needs.
    by_inode: Arc<Vec<(u64, u32)>>,
}

/// A connection's endpoints as one exact 122-bit key: every network namespace and every IPv6
/// address the dump holds gets a small number the first time it is seen; an IPv4 address
/// (or its IPv6-mapped form, so a v4 client of a dual-stack server and the server's `::ffff:`
/// view of it compare equal) is its own 32 bits, told apart from a numbered one by a bit, so
/// most ends need no lookup at all. Loopback in two namespaces is two places. A match then
/// needs no look back at the sockets: the key is the tuple.
/// (It replaced 64-bit fingerprints confirmed against the sockets: those confirmations, one
/// random read of a socket record each, were most of the peer match's cost at 120,000 sockets.)
#[derive(Default)]
struct Numbering {
    netns: Numbers<u64>,
    addrs: Numbers<u128>,
}

/// Bits of each part of a key: namespace, then (IPv6 flag, address, port) of each end.
const NETNS_BITS: u32 = 24;
const ADDR_BITS: u32 = 32;
const END_BITS: u32 = 1 + ADDR_BITS + 16;
/// The flag of an end whose address is a numbered IPv6 one.
const NUMBERED: u128 = 1 << (ADDR_BITS + 16);
const _: () = assert!(NETNS_BITS + 2 * END_BITS <= 128);

/// Values numbered 0, 1, 2 ... in the order first seen, and back: the peer match's and the
/// grouping's way to pack endpoints into small fixed-size keys.
pub(crate) struct Numbers<T> {
    ids: FxHashMap<T, u32>,
    list: Vec<T>,
    /// The two values numbered last, most recent first: a node's sockets share a few addresses
    /// and namespaces, and a socket asks for two in turn (its two ends), so most numbers are
    /// found here without hashing.
    recent: [Option<(T, u32)>; 2],
}

impl<T> Default for Numbers<T> {
    fn default() -> Self {
        Numbers {
            ids: FxHashMap::default(),
            list: Vec::new(),
            recent: [None, None],
        }
    }
}

impl<T: Clone + Eq + std::hash::Hash> Numbers<T> {
    /// The number of `v`, given it the first time it is seen.
    pub(crate) fn number(&mut self, v: T) -> u32 {
        match &self.recent {
            [Some((r, id)), _] if *r == v => return *id,
            [_, Some((r, id))] if *r == v => {
                let id = *id;
                self.recent.swap(0, 1);
                return id;
            }
            _ => {}
        }
        let id = match self.ids.get(&v) {
            Some(&id) => id,
            None => {
                let id = self.list.len() as u32;
                self.list.push(v.clone());
                self.ids.insert(v.clone(), id);
                id
            }
        };
        self.recent[1] = self.recent[0].take();
        self.recent[0] = Some((v, id));
        id
    }

    /// The value numbered `id`.
    pub(crate) fn get(&self, id: u32) -> Option<&T> {
        self.list.get(id as usize)
    }
}

/// Counts per key (a pid, a destination), where keys come in runs: a group's or a pair's
/// sockets are mostly held by one process, a process's connections to one place sit side by
/// side, so the run is counted on its own and the map touched once a run instead of once a
/// socket.
pub(crate) struct Tally<K = u32> {
    counts: FxHashMap<K, usize>,
    run: Option<(K, usize)>,
}

impl<K> Default for Tally<K> {
    fn default() -> Self {
        Tally {
            counts: FxHashMap::default(),
            run: None,
        }
    }
}

impl<K: Copy + Eq + std::hash::Hash> Tally<K> {
    pub(crate) fn add(&mut self, key: K) {
        match &mut self.run {
            Some((k, n)) if *k == key => *n += 1,
            run => {
                if let Some((k, n)) = run.replace((key, 1)) {
                    *self.counts.entry(k).or_default() += n;
                }
            }
        }
    }

    /// The run counted into the map.
    fn settle(&mut self) {
        if let Some((k, n)) = self.run.take() {
            *self.counts.entry(k).or_default() += n;
        }
    }

    /// Every key and its count, in no particular order.
    pub(crate) fn into_counts(mut self) -> FxHashMap<K, usize> {
        self.settle();
        self.counts
    }
}

impl Numbering {
    /// `v`'s number when it fits in `bits`.
    fn fitting<T: Clone + Eq + std::hash::Hash>(
        numbers: &mut Numbers<T>,
        v: T,
        bits: u32,
    ) -> Option<u128> {
        let n = u128::from(numbers.number(v));
        (n < 1 << bits).then_some(n)
    }

    fn end(&mut self, (ip, port): (u128, u16)) -> Option<u128> {
        let port = u128::from(port);
        if ip >> ADDR_BITS == 0xffff {
            return Some((ip & u128::from(u32::MAX)) << 16 | port);
        }
        let n = Numbering::fitting(&mut self.addrs, ip, ADDR_BITS)?;
        Some(NUMBERED | n << 16 | port)
    }

    /// `(namespace, local end, remote end)` packed; `None` past 2^24 namespaces or 2^32 IPv6
    /// addresses, which no node holds.
    fn key(&mut self, s: &Socket) -> Option<u128> {
        let ns = Numbering::fitting(&mut self.netns, s.netns, NETNS_BITS)?;
        let (local, remote) = (self.end(s.local_mapped())?, self.end(s.remote_mapped())?);
        Some(ns << (2 * END_BITS) | local << END_BITS | remote)
    }
}

/// The key of the same connection seen from its other end.
fn reversed(key: u128) -> u128 {
    let end = (1u128 << END_BITS) - 1;
    let (ns, local, remote) = (key >> (2 * END_BITS), key >> END_BITS & end, key & end);
    ns << (2 * END_BITS) | remote << END_BITS | local
}

/// A connection end in the peer match: its key folded to the smaller of the tuple and its
/// reverse (`canon`, as two halves), which side of that it is, and its socket's index. 24
/// bytes, sorted in place: a hash map from key to index held 64 bytes a socket at a million.
#[derive(Clone, Copy)]
struct End {
    hi: u64,
    lo: u64,
    at: u32,
    /// True when the socket's own key is the reverse of `canon`.
    reverse: bool,
}

/// `Topology::peer`'s "no peer".
pub(crate) const NO_PEER: u32 = u32::MAX;

impl Topology {
    /// Matches every socket with its reverse 4-tuple and collects the listening endpoints.
    /// Both ends of a connection fold to the same `canon`, so after a sort they sit side by
    /// side; where a dump under churn holds the same tuple twice, the later socket is the one
    /// matched, and a self-connect (its tuple its own reverse) has none.
    pub fn new(sockets: &[Socket]) -> Topology {
        Topology::build(sockets, false)
    }

    /// `new`, plus the sockets in inode order (`inodes`), for a loop: gathered in the same
    /// pass over the sockets.
    pub fn with_inode_order(sockets: &[Socket]) -> Topology {
        Topology::build(sockets, true)
    }

    fn build(sockets: &[Socket], inode_order: bool) -> Topology {
        let m = match_all(sockets, &mut Numbering::default(), inode_order);
        Topology {
            peer: m.peer,
            listeners: m.listeners,
            listens: m.listens,
            by_inode: m.by_inode,
        }
    }

    /// The sockets' inodes, ascending (repeated where a dump under churn holds an inode
    /// twice), when made `with_inode_order`; else none.
    pub fn inodes(&self) -> impl ExactSizeIterator<Item = u64> + '_ {
        self.by_inode.iter().map(|&(inode, _)| inode)
    }
}

/// What one pass over the sockets gathers for the peer match: the listening endpoints, their
/// ports (a bit each: most sockets are client ends on ports no listener has, told apart
/// without a lookup), every other socket's `End`, and (when asked) `(inode, index)` of the
/// sockets with an inode; the last two unsorted.
struct Gathered {
    listeners: FxHashSet<(u64, u128, u16)>,
    ports: Vec<u64>,
    ends: Vec<End>,
    by_inode: Vec<(u64, u32)>,
}

fn gather(sockets: &[Socket], numbering: &mut Numbering, inode_order: bool) -> Gathered {
    let mut g = Gathered {
        listeners: FxHashSet::default(),
        ports: vec![0u64; 1 << 10],
        ends: Vec::with_capacity(sockets.len()),
        by_inode: Vec::new(),
    };
    for (s, at) in sockets.iter().zip(0u32..) {
        if inode_order && s.inode != 0 {
            g.by_inode.push((s.inode, at));
        }
        if s.state == TcpState::Listen {
            let (ip, port) = s.local_mapped();
            g.listeners.insert((s.netns, ip, port));
            let (word, mask) = port_bit(port);
            g.ports[word] |= mask;
            continue;
        }
        if let Some(end) = end_of(numbering, s, at) {
            g.ends.push(end);
        }
    }
    g
}

/// The peer match from scratch, and what a loop keeps of it to patch it later (`kept`).
struct Matched {
    listeners: FxHashSet<(u64, u128, u16)>,
    ports: Vec<u64>,
    /// Every end but the listeners', sorted by canon.
    ends: Vec<End>,
    peer: Arc<Vec<u32>>,
    listens: Arc<Vec<u64>>,
    by_inode: Arc<Vec<(u64, u32)>>,
}

/// Matches every socket with its reverse 4-tuple (keys numbered by `numbering`) and finds
/// the ones a listener accepts on; with `inode_order`, the sockets in inode order too.
fn match_all(sockets: &[Socket], numbering: &mut Numbering, inode_order: bool) -> Matched {
    let Gathered {
        listeners,
        ports,
        mut ends,
        mut by_inode,
    } = gather(sockets, numbering, inode_order);
    sort_frugal(&mut ends, |e| (e.hi, e.lo), |e| (e.hi, e.lo, e.at));
    let mut peer = vec![NO_PEER; sockets.len()];
    for run in ends.chunk_by(same_canon) {
        match_run(run, &mut peer);
    }
    let mut listens = vec![0u64; sockets.len().div_ceil(64)];
    fill_listens(sockets, 0..sockets.len(), &listeners, &ports, &mut listens);
    sort_frugal(&mut by_inode, |&(inode, _)| inode, |&pair| pair);
    Matched {
        listeners,
        ports,
        ends,
        peer: Arc::new(peer),
        listens: Arc::new(listens),
        by_inode: Arc::new(by_inode),
    }
}

/// A listener port's word and bit in `Gathered::ports`.
fn port_bit(port: u16) -> (usize, u64) {
    (usize::from(port >> 6), 1u64 << (port & 63))
}

/// Socket `s`'s end in the peer match, at index `at`; none for a listener, or past the keys'
/// room (`Numbering::key`).
fn end_of(numbering: &mut Numbering, s: &Socket, at: u32) -> Option<End> {
    if s.state == TcpState::Listen {
        return None;
    }
    let key = numbering.key(s)?;
    let reverse = reversed(key) < key;
    let canon = if reverse { reversed(key) } else { key };
    Some(End {
        hi: (canon >> 64) as u64,
        lo: canon as u64,
        at,
        reverse,
    })
}

fn same_canon(a: &End, b: &End) -> bool {
    (a.hi, a.lo) == (b.hi, b.lo)
}

/// Gives the ends of one connection (`run`: the ends of one `canon`, side by side after the
/// sort) their peers in `peer`: where a dump under churn holds the same tuple twice, the later
/// socket is the one matched, and a self-connect (its tuple its own reverse) has none.
fn match_run(run: &[End], peer: &mut [u32]) {
    let last = |reverse: bool| {
        run.iter()
            .filter(|e| e.reverse == reverse)
            .map(|e| e.at)
            .max()
    };
    let (forward, backward) = (last(false), last(true));
    for e in run {
        // A self-connect's tuple is its own reverse: all its reports are forward ones, and no
        // backward one answers them.
        let other = if e.reverse { forward } else { backward };
        if let Some(slot) = peer.get_mut(e.at as usize) {
            *slot = other.unwrap_or(NO_PEER);
        }
    }
}

/// Sets in `listens` the bit of each socket of `which` that a listener accepts on, and clears
/// the others'.
fn fill_listens(
    sockets: &[Socket],
    which: impl IntoIterator<Item = usize>,
    listeners: &FxHashSet<(u64, u128, u16)>,
    ports: &[u64],
    listens: &mut [u64],
) {
    // The server ends of a busy port share their local endpoint: the last answer is kept
    // instead of asking the set up to three times a socket.
    let mut last: Option<((u64, u128, u16), bool)> = None;
    for i in which {
        let Some(s) = sockets.get(i) else { continue };
        let (ip, port) = s.local_mapped();
        let (word, mask) = port_bit(port);
        let at = (s.netns, ip, port);
        let yes = match last {
            _ if ports[word] & mask == 0 => false,
            Some((l, yes)) if l == at => yes,
            _ => {
                let yes = listening(listeners, s.netns, (ip, port));
                last = Some((at, yes));
                yes
            }
        };
        if let Some(w) = listens.get_mut(i / 64) {
            *w = if yes {
                *w | 1 << (i % 64)
            } else {
                *w & !(1 << (i % 64))
            };
        }
    }
}

/// The sockets with an inode as `(inode, index)`, sorted by inode (equal inodes by index).
fn by_inode(sockets: &[Socket]) -> Vec<(u64, u32)> {
    let mut by_inode: Vec<(u64, u32)> = sockets
        .iter()
        .zip(0u32..)
        .filter(|(s, _)| s.inode != 0)
        .map(|(s, i)| (s.inode, i))
        .collect();
    sort_frugal(&mut by_inode, |&(inode, _)| inode, |&pair| pair);
    by_inode
}

/// A sample with its sockets cross-referenced.
pub struct Joined<'a> {
    pub sample: &'a Sample,
    topology: Cow<'a, Topology>,
    /// Each socket's holders, socket by socket (`Holders`): read in socket order, as every
    /// stage after this one reads them, where a run in the owner index (in inode order) is a
    /// cache miss a socket.
    holders: Holders,
}

/// Who holds each socket, laid out for the common case: one process. Socket `i`'s holder is
/// `one[i]`, or nobody (`NOBODY`), or, for a socket several processes share (`SHARED`), the
/// pids `shared` gives. One 4-byte read a socket, where a start and an end into a list of
/// pids were two reads in different places (the grouping and the detector ask of every
/// socket, and of its peer).
struct Holders {
    one: Vec<u32>,
    shared: FxHashMap<u32, Vec<u32>>,
}

/// The holders of socket `i` in a `Holders` laid out as `one` and `shared`.
pub(crate) fn held<'h>(
    one: &'h [u32],
    shared: &'h FxHashMap<u32, Vec<u32>>,
    i: usize,
) -> &'h [u32] {
    match one.get(i) {
        None | Some(&NOBODY) => &[],
        Some(&SHARED) => shared.get(&(i as u32)).map_or(&[][..], Vec::as_slice),
        Some(one) => std::slice::from_ref(one),
    }
}

/// A joined sample's holders and peers, as `Joined::parts` lends them.
pub(crate) struct JoinedParts<'j> {
    pub one: &'j [u32],
    pub shared: &'j FxHashMap<u32, Vec<u32>>,
    pub peer: &'j [u32],
}

/// `Holders::one` of a socket no process holds (pid 0 is no process).
const NOBODY: u32 = 0;
/// `Holders::one` of a socket held by several processes (pids stay below 2^22).
const SHARED: u32 = u32::MAX;

impl<'a> Joined<'a> {
    /// Cross-references a sample from scratch.
    pub fn new(sample: &'a Sample) -> Joined<'a> {
        Joined::with_topology(sample, Topology::new(&sample.sockets))
    }

    /// Uses a topology computed earlier from the same sockets.
    pub fn with_topology(sample: &'a Sample, topology: Topology) -> Joined<'a> {
        Joined::from_parts(sample, Cow::Owned(topology))
    }

    /// `with_topology` with a topology a loop keeps for its next look: not copied.
    pub fn with_topology_of(sample: &'a Sample, topology: &'a Topology) -> Joined<'a> {
        Joined::from_parts(sample, Cow::Borrowed(topology))
    }

    fn from_parts(sample: &'a Sample, topology: Cow<'a, Topology>) -> Joined<'a> {
        let holders = holders(&sample.sockets, &sample.owners, &topology.by_inode);
        Joined {
            sample,
            topology,
            holders,
        }
    }

    /// The socket at index `i`.
    pub fn socket(&self, i: usize) -> &'a Socket {
        &self.sample.sockets[i]
    }

    /// Pids holding socket `i`, ascending.
    pub fn owners(&self, i: usize) -> impl Iterator<Item = u32> + '_ {
        held(&self.holders.one, &self.holders.shared, i)
            .iter()
            .copied()
    }

    /// Every socket's holder as `Holders` keeps them (`held` reads one), and the peers of the
    /// topology: what a loop's kept grouping compares with the last sample's to find the
    /// sockets whose groups may have changed.
    pub(crate) fn parts(&self) -> JoinedParts<'_> {
        JoinedParts {
            one: &self.holders.one,
            shared: &self.holders.shared,
            peer: &self.topology.peer,
        }
    }

    /// The index of the socket at the other end, when it is on this node too.
    pub fn peer(&self, i: usize) -> Option<usize> {
        self.topology
            .peer
            .get(i)
            .filter(|&&j| j != NO_PEER)
            .map(|&j| j as usize)
    }

    /// True when a listener in namespace `netns` accepts on this endpoint: a specific address
    /// or a wildcard one.
    pub fn listening(&self, netns: u64, local: SocketAddr) -> bool {
        let ip = match local.ip().to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        listening(
            &self.topology.listeners,
            netns,
            (u128::from(ip), local.port()),
        )
    }

    /// True when a listener accepts on socket `i`'s local endpoint: `listening` of its own
    /// namespace and endpoint, found with the topology.
    pub fn listens(&self, i: usize) -> bool {
        self.topology
            .listens
            .get(i / 64)
            .is_some_and(|bits| bits >> (i % 64) & 1 != 0)
    }
}

/// True when one of `listeners` in namespace `netns` accepts on this endpoint: a specific
/// address or a wildcard one.
fn listening(listeners: &FxHashSet<(u64, u128, u16)>, netns: u64, (ip, port): (u128, u16)) -> bool {
    const ANY_V4: u128 = 0xffff << 32;
    const ANY_V6: u128 = 0;
    listeners.contains(&(netns, ip, port))
        || listeners.contains(&(netns, ANY_V4, port))
        || listeners.contains(&(netns, ANY_V6, port))
}

/// Each socket's holders (`Holders`): found by walking the sockets in inode order (`sorted`,
/// the topology's, or sorted here when it has none) alongside the sorted `(inode, pid)` pairs
/// (`OwnerIndex::walk_sorted`), one pass with no per-socket search through a large table.
fn holders(sockets: &[Socket], owners: &OwnerIndex, sorted: &[(u64, u32)]) -> Holders {
    let mut held = Holders {
        one: vec![NOBODY; sockets.len()],
        shared: FxHashMap::default(),
    };
    let mine;
    let by_inode = if sorted.is_empty() {
        mine = by_inode(sockets);
        &mine
    } else {
        sorted
    };
    let pairs = owners.pairs();
    owners.walk_sorted(by_inode.iter().map(|&(inode, _)| inode), |k, run| {
        let at = by_inode[k].1;
        let (Some(one), Some(run)) = (held.one.get_mut(at as usize), pairs.get(run)) else {
            return;
        };
        match run {
            [] => {}
            [(_, pid)] if *pid != NOBODY && *pid != SHARED => *one = *pid,
            many => {
                *one = SHARED;
                held.shared
                    .insert(at, many.iter().map(|&(_, pid)| pid).collect());
            }
        }
    });
    held
}

/// From this many elements up, a sort is made in place (`sort_unstable` on a key that tells
/// every element apart, so the order is the stable sort's): a radix or a stable sort holds a
/// second copy of its input, 48 MB for the peer match's ends at a million sockets, and a
/// million sockets must fit in 160 MiB.
pub(crate) const IN_PLACE_FROM: usize = 1 << 19;

/// `radix_sort_by_key(v, key)`, or, from `IN_PLACE_FROM` elements, `v` sorted in place by
/// `unique`: `key` followed by what tells equal keys apart in `v`'s order (an index).
pub(crate) fn sort_frugal<T: Copy, K: radsort::Key + Ord, U: Ord>(
    v: &mut [T],
    key: impl FnMut(&T) -> K,
    unique: impl FnMut(&T) -> U,
) {
    if v.len() >= IN_PLACE_FROM {
        v.sort_unstable_by_key(unique);
    } else {
        radix_sort_by_key(v, key);
    }
}

/// Sorts `v` by `key`, stably, by radix (`radsort`: a byte at a time from the lowest, skipping
/// the bytes all keys share): socket inodes, handed out in sequence, differ in their low three
/// or four bytes, so 120,000 of them take three or four linear passes, where a comparison sort
/// makes some seventeen comparisons an element.
pub(crate) fn radix_sort_by_key<T: Copy, K: radsort::Key + Ord>(
    v: &mut [T],
    key: impl FnMut(&T) -> K,
) {
    // A short list (a pair's few idle clocks) is sorted sooner than counted.
    if v.len() <= 256 {
        v.sort_by_key(key);
    } else {
        radsort::sort_by_key(v, key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Socket;

    fn sock(state: TcpState, local: &str, remote: &str) -> Socket {
        let mut s = Socket::new(
            state,
            local.parse().unwrap_or_else(|_| unreachable!()),
            remote.parse().unwrap_or_else(|_| unreachable!()),
        );
        s.inode = 1;
        s.netns = 7;
        s
    }

    fn peers(t: &Topology) -> Vec<Option<u32>> {
        t.peer
            .iter()
            .map(|&j| (j != NO_PEER).then_some(j))
            .collect()
    }

    #[test]
    fn peers_match_across_address_families_and_namespaces_and_a_self_connect_has_none() {
        use TcpState::*;
        let mut sockets = vec![
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
            // Connected to itself: its reverse tuple is its own.
            sock(Established, "127.0.0.1:43000", "127.0.0.1:43000"),
            // The same connection's other end, in another namespace: not a peer.
            sock(Established, "127.0.0.1:40000", "127.0.0.1:5000"),
        ];
        sockets[7].netns = 8;
        let t = Topology::new(&sockets);
        assert_eq!(
            peers(&t),
            [None, Some(2), Some(1), Some(4), Some(3), None, None, None]
        );
        assert_eq!(t.listeners.len(), 1);
    }

    #[test]
    fn a_tuple_reported_twice_matches_its_later_report() {
        use TcpState::*;
        let sockets = [
            sock(Established, "127.0.0.1:5000", "127.0.0.1:40000"),
            sock(Established, "127.0.0.1:40000", "127.0.0.1:5000"),
            sock(Established, "127.0.0.1:5000", "127.0.0.1:40000"),
        ];
        assert_eq!(peers(&Topology::new(&sockets)), [Some(1), Some(2), Some(1)]);
    }

    #[test]
    fn a_self_connect_reported_twice_has_no_peer() {
        use TcpState::*;
        let sockets = [
            sock(Established, "127.0.0.1:43000", "127.0.0.1:43000"),
            sock(Established, "127.0.0.1:5000", "127.0.0.1:40000"),
            sock(Established, "127.0.0.1:43000", "127.0.0.1:43000"),
            sock(Established, "127.0.0.1:40000", "127.0.0.1:5000"),
        ];
        assert_eq!(
            peers(&Topology::new(&sockets)),
            [None, Some(3), None, Some(1)]
        );
    }

    #[test]
    fn the_radix_sort_sorts_stably() {
        let mut v: Vec<(u64, u32)> = (0..5000u32)
            .map(|i| (u64::from(i.wrapping_mul(2_654_435_761) % 1000) << 20 | 7, i))
            .collect();
        let mut expected = v.clone();
        expected.sort_by_key(|&(k, _)| k);
        radix_sort_by_key(&mut v, |&(k, _)| k);
        assert_eq!(v, expected);
        // Keys that differ in every byte.
        let mut wide: Vec<u64> = (0..3000u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let mut expected = wide.clone();
        expected.sort_unstable();
        radix_sort_by_key(&mut wide, |&k| k);
        assert_eq!(wide, expected);
        let mut one = vec![(3u64, 0u32)];
        radix_sort_by_key(&mut one, |&(k, _)| k);
        assert_eq!(one, [(3, 0)]);
    }

    #[test]
    fn numbers_and_tallies_are_what_they_were_without_their_shortcuts() {
        let mut n: Numbers<u64> = Numbers::default();
        let ids: Vec<u32> = [5, 9, 5, 7, 9, 5, 5, 11, 7]
            .into_iter()
            .map(|v| n.number(v))
            .collect();
        assert_eq!(ids, [0, 1, 0, 2, 1, 0, 0, 3, 2]);
        assert_eq!(n.get(2), Some(&7));
        assert_eq!(n.get(4), None);
        let mut t = Tally::default();
        [1, 1, 2, 1, 3, 3, 2].into_iter().for_each(|k| t.add(k));
        let mut counts: Vec<(u32, usize)> = t.into_counts().into_iter().collect();
        counts.sort_unstable();
        assert_eq!(counts, [(1, 3), (2, 2), (3, 2)]);
        assert!(Tally::<u32>::default().into_counts().is_empty());
    }

    #[test]
    fn an_ipv6_address_numbered_n_is_not_the_ipv4_address_n() {
        let mut n = Numbering::default();
        // `::2` is the first IPv6 address met: number 0, as 0.0.0.0 would be as IPv4.
        let v6 = n.key(&sock(TcpState::Established, "[::2]:80", "[::2]:5000"));
        let v4 = n.key(&sock(TcpState::Established, "0.0.0.0:80", "0.0.0.0:5000"));
        let mapped = n.key(&sock(
            TcpState::Established,
            "[::ffff:0.0.0.0]:80",
            "0.0.0.0:5000",
        ));
        assert!(v6.is_some() && v4.is_some());
        assert_ne!(v6, v4);
        assert_eq!(v4, mapped, "a v4 end and its IPv6-mapped form are one end");
    }

    #[test]
    fn a_key_reversed_twice_is_itself() {
        let mut n = Numbering::default();
        let s = sock(TcpState::Established, "[::1]:8443", "[::1]:50000");
        let key = n.key(&s).unwrap_or_default();
        assert_ne!(reversed(key), key);
        assert_eq!(reversed(reversed(key)), key);
    }
}
