//! Stage 3, process join, pure half, for loops: the peer match kept from one sample to the
//! next, so that a later sample matches what changed, not every socket again.
//!
//! Input: a sample's sockets, the first of which are a lending table's own, and what was
//! written in those since its last sample (`collect::events::Edits`). Output: the `Topology`
//! a match from scratch gives (the tests hold it to that), made by patching the last one at
//! the places written, and by matching from scratch only the sockets after the table's (the
//! other namespaces of `--all-netns`, whose peers are never in the table's namespace).

use std::sync::Arc;

use rustc_hash::FxHashSet;

use super::{
    Matched, NO_PEER, Numbering, Topology, end_of, fill_listens, match_all, match_run, same_canon,
};
use crate::collect::events::{Edits, Since};
use crate::model::{Socket, TcpState};

/// A loop's peer match, kept between its samples.
#[derive(Default)]
pub struct KeptTopology {
    base: Option<Base>,
    /// The last match was patched from the one before, not made from scratch.
    patched: bool,
}

/// The match of one table's sockets.
struct Base {
    /// The table (`Edits::table`), the lend matched last and its number of sockets.
    table: u64,
    lend: u64,
    len: usize,
    /// Numbers handed out stay those of the sockets matched: an end is found again by its key.
    numbering: Numbering,
    matched: Matched,
}

/// `End::at` of an end taken out.
const GONE: u32 = u32::MAX;

impl KeptTopology {
    /// Whether the last match was patched from the one before (true) or made from scratch.
    pub fn last_patched(&self) -> bool {
        self.patched
    }

    /// The topology of `sockets`, whose first `edits.len` are a table's: patched where the
    /// edits say the table's sockets were written since the last call, if that call matched
    /// the same table; matched from scratch otherwise (and always without `edits`).
    pub fn topology(&mut self, sockets: &[Socket], edits: Option<&Edits>) -> Topology {
        self.patched = false;
        let Some(edits) = edits.filter(|e| e.len <= sockets.len()) else {
            self.base = None;
            return Topology::with_inode_order(sockets);
        };
        let (own, rest) = sockets.split_at(edits.len);
        let patched = match (self.base.as_mut(), &edits.since) {
            (Some(b), Some(since))
                if (b.table, b.lend, b.len) == (edits.table, since.lend, since.len) =>
            {
                b.patch(own, since)
            }
            _ => false,
        };
        self.patched = patched;
        let base = match self.base.as_mut() {
            Some(b) if patched => b,
            _ => self.base.insert(Base::new(edits.table, own)),
        };
        // Patched or new, the match is now that of this lend.
        base.lend = edits.lend;
        base.with_rest(rest)
    }
}

impl Base {
    fn new(table: u64, sockets: &[Socket]) -> Base {
        let mut numbering = Numbering::default();
        let matched = match_all(sockets, &mut numbering, true);
        Base {
            table,
            lend: 0,
            len: sockets.len(),
            numbering,
            matched,
        }
    }

    /// Brings the match to `sockets`, the table's now, from what `since` says was written;
    /// false (the match then unusable) where it cannot: a listener came or went (a table
    /// answers that with a dump), or an end is not where the match had it.
    fn patch(&mut self, sockets: &[Socket], since: &Since) -> bool {
        let len = sockets.len();
        let (mut gone, mut come) = (Vec::new(), Vec::new());
        let (mut inodes_gone, mut inodes_come) = (Vec::new(), Vec::new());
        let (mut listeners_gone, mut listeners_come) = (Vec::new(), Vec::new());
        let mut touched: Vec<usize> = Vec::with_capacity(since.before.len());
        for (&at, before) in &since.before {
            let now = sockets.get(at as usize);
            for (s, ends, inodes, listeners) in [
                (
                    before.as_ref(),
                    &mut gone,
                    &mut inodes_gone,
                    &mut listeners_gone,
                ),
                (now, &mut come, &mut inodes_come, &mut listeners_come),
            ] {
                let Some(s) = s else { continue };
                ends.extend(end_of(&mut self.numbering, s, at));
                if s.inode != 0 {
                    inodes.push((s.inode, at));
                }
                if s.state == TcpState::Listen {
                    listeners.push((s.netns, s.local_mapped()));
                }
            }
            if now.is_some() {
                touched.push(at as usize);
            }
        }
        // Listeners only move between places (the last socket into a hole): their set holds.
        listeners_gone.sort_unstable();
        listeners_come.sort_unstable();
        if listeners_gone != listeners_come {
            return false;
        }
        let m = &mut self.matched;
        for g in &gone {
            let from = m.ends.partition_point(|e| (e.hi, e.lo) < (g.hi, g.lo));
            let Some(e) = m.ends[from..]
                .iter_mut()
                .take_while(|e| same_canon(e, g))
                .find(|e| e.at == g.at)
            else {
                return false;
            };
            e.at = GONE;
        }
        if !gone.is_empty() {
            m.ends.retain(|e| e.at != GONE);
        }
        come.sort_unstable_by_key(|e| (e.hi, e.lo, e.at));
        merge_into(&mut m.ends, &come, |e| (e.hi, e.lo, e.at));
        // Every connection an end left or joined is matched again, whole.
        let mut canons: Vec<(u64, u64)> = gone.iter().chain(&come).map(|e| (e.hi, e.lo)).collect();
        canons.sort_unstable();
        canons.dedup();
        let peer = Arc::make_mut(&mut m.peer);
        peer.resize(len, NO_PEER);
        for &at in &touched {
            peer[at] = NO_PEER;
        }
        for canon in canons {
            let from = m.ends.partition_point(|e| (e.hi, e.lo) < canon);
            let to = from + m.ends[from..].partition_point(|e| (e.hi, e.lo) == canon);
            match_run(&m.ends[from..to], peer);
        }
        let by_inode = Arc::make_mut(&mut m.by_inode);
        let mut places = Vec::with_capacity(inodes_gone.len());
        for g in &inodes_gone {
            match by_inode.binary_search(g) {
                Ok(i) => places.push(i),
                Err(_) => return false,
            }
        }
        for i in places {
            by_inode[i].1 = GONE;
        }
        if !inodes_gone.is_empty() {
            by_inode.retain(|&(_, at)| at != GONE);
        }
        inodes_come.sort_unstable();
        merge_into(by_inode, &inodes_come, |&p| p);
        let listens = Arc::make_mut(&mut m.listens);
        listens.resize(len.div_ceil(64), 0);
        if let Some(w) = listens.last_mut().filter(|_| !len.is_multiple_of(64)) {
            *w &= (1u64 << (len % 64)) - 1;
        }
        fill_listens(sockets, touched, &m.listeners, &m.ports, listens);
        self.len = len;
        true
    }

    /// The topology of the table's sockets followed by `rest`, matched from scratch.
    fn with_rest(&self, rest: &[Socket]) -> Topology {
        let m = &self.matched;
        if rest.is_empty() {
            return Topology {
                peer: Arc::clone(&m.peer),
                listeners: m.listeners.clone(),
                listens: Arc::clone(&m.listens),
                by_inode: Arc::clone(&m.by_inode),
            };
        }
        let len = self.len;
        let after = Topology::with_inode_order(rest);
        let shift = |j: u32| {
            if j == NO_PEER {
                NO_PEER
            } else {
                j + len as u32
            }
        };
        let peer: Vec<u32> = m
            .peer
            .iter()
            .copied()
            .chain(after.peer.iter().map(|&j| shift(j)))
            .collect();
        let mut listens = m.listens.to_vec();
        listens.resize((len + rest.len()).div_ceil(64), 0);
        for k in 0..rest.len() {
            if after.listens[k / 64] >> (k % 64) & 1 != 0 {
                let i = len + k;
                listens[i / 64] |= 1 << (i % 64);
            }
        }
        let moved: Vec<(u64, u32)> = after
            .by_inode
            .iter()
            .map(|&(inode, at)| (inode, at + len as u32))
            .collect();
        let listeners: FxHashSet<_> = m.listeners.union(&after.listeners).copied().collect();
        let mut by_inode = m.by_inode.to_vec();
        merge_into(&mut by_inode, &moved, |&p| p);
        Topology {
            peer: Arc::new(peer),
            listeners,
            listens: Arc::new(listens),
            by_inode: Arc::new(by_inode),
        }
    }
}

/// Merges `b` into `a`, each sorted by `key` (of equal keys, `a`'s first), in place: from the
/// back, into room made at `a`'s end. A new list of `a`'s size each sample (millions of ends)
/// had every page of it faulted in and given back.
fn merge_into<T: Copy, K: Ord>(a: &mut Vec<T>, b: &[T], key: impl Fn(&T) -> K) {
    let mut i = a.len();
    a.extend_from_slice(b);
    for j in (0..b.len()).rev() {
        // Every element of `a` greater than `b[j]` goes after it.
        while i > 0 && key(&b[j]) < key(&a[i - 1]) {
            a[i + j] = a[i - 1];
            i -= 1;
        }
        a[i + j] = b[j];
    }
}
