//! Stage 4 in a loop, the grouping kept: a loop's groups are those of its last sample,
//! brought up to date where something changed, instead of grouped again from every socket.
//!
//! Input: a `Joined` sample whose sockets an event-kept table lent, with the table's `Edits`
//! (the places it wrote since its last lend). Output: the `Report` and `GroupCounts` that
//! `aggregate_with_counts` gives for the same sample, equal field for field.
//!
//! A socket's groups, and what it adds to their counts, depend on the socket itself, its
//! holders, the holders of its other end, and (folded `--by port`) whether it listens. Each
//! socket's groups are kept, with the holders and peers they were counted with. A new sample
//! is compared with those: the places the table wrote and the sockets whose holders, peer or
//! peer's holders changed are taken out of their groups and put into their new ones. Nothing
//! else can have changed: a listener opening or closing makes a new table.
//!
//! Grouped from scratch instead: without edits (no events, or a dump), for another query, a
//! table other than the last one's, `--by pod` and `--process` (a process's place or name can
//! change with no socket changing), and past `KEPT_GROUPS` groups. Pure: no I/O, no clock.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use rustc_hash::FxHashMap;

use super::{
    Acc, Counted, GroupBy, GroupCounts, KeyParts, LazyGroups, Member, Places, Query, RawKey,
    Report, StateCounts, Totals, group, make_group, report_of, socket_keys,
};
use crate::collect::events::Edits;
use crate::join::{Joined, NO_PEER, held};
use crate::model::TcpState;

/// Groups kept at most. Each holds its counts and two tallies of holders (about 200 bytes):
/// `--by pair` on a server is a group per client, and past this many the loop groups from
/// scratch, which holds 24 bytes a socket instead.
const KEPT_GROUPS: usize = 1 << 16;

/// `Base::first` of a socket the query leaves out.
const LEFT_OUT: u32 = u32::MAX;
/// `Kept::next` of the last group of a hash.
const NO_GROUP: u32 = u32::MAX;

/// The hash `Groups::at` files a packed key under.
fn hash_of(key: (u64, u64, u16)) -> u64 {
    use std::hash::BuildHasher;
    rustc_hash::FxBuildHasher.hash_one(key)
}

/// A report of kept groups: the table that lent the sockets, and the report's number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    table: u64,
    report: u64,
}

/// The groups a loop keeps from one sample to the next.
#[derive(Default)]
pub struct KeptGroups {
    base: Option<Base>,
    /// A table whose sockets made more than `KEPT_GROUPS` groups: its samples are grouped
    /// from scratch, without trying again, until a dump makes a new table.
    crowded: Option<u64>,
    /// How the last report was made: by taking out and putting back the sockets at these
    /// places (sorted), or (`None`) from scratch.
    patched: Option<Vec<u32>>,
    /// Reports made so far.
    reports: u64,
}

/// The last sample's groups, and what each of its sockets was counted with.
struct Base {
    query: Query,
    /// The table that lent the sockets, its lend, and how many of the sample's it lent.
    table: u64,
    lend: u64,
    lent: usize,
    keys: KeyParts,
    places: Places,
    groups: Groups,
    /// Per socket: its first group, or `LEFT_OUT`.
    first: Vec<u32>,
    /// Per socket counted: its state (kernel number, low 4 bits) and how it counted in the
    /// totals (`Counted`, above them).
    info: Vec<u8>,
    /// The other groups of a socket several processes share (`--by process`, `--by pair`).
    more: FxHashMap<u32, Vec<u32>>,
    /// The holders and peers the sockets were counted with: copies, refilled in place, so that
    /// the kept peer match is not made to copy its own to patch it (it patches in place when
    /// nothing else holds it).
    one: Vec<u32>,
    shared: FxHashMap<u32, Vec<u32>>,
    peer: Vec<u32>,
    totals: Totals,
    /// Sockets counted `Counted::Hidden`.
    hidden: usize,
}

/// The groups, each where it was first put; a slot emptied is taken by the next new group.
#[derive(Default)]
struct Groups {
    /// Each key's group by the key's hash, the groups of one hash chained (`Kept::next`):
    /// 16 bytes a group where the key itself took 32.
    at: FxHashMap<u64, u32>,
    live: usize,
    list: Vec<Kept>,
    free: Vec<u32>,
    /// The live groups in report order (largest first, then by key), once `rank` made it: a
    /// report then reads its top ones off, where ranking them all again would cost as much
    /// as the groups (tens of thousands for a server's `--by pair`).
    ranked: BTreeSet<(Reverse<u32>, RawKey, u32)>,
    ranking: bool,
}

impl KeptGroups {
    /// How the last report was made: `Some(n)` from the report before, `n` sockets taken
    /// out of their groups and put back; `None` from scratch.
    pub fn last_patched(&self) -> Option<usize> {
        self.patched.as_ref().map(Vec::len)
    }

    /// The last report, as what else a loop keeps by socket remembers it was brought up to
    /// alongside (with `edits`, those of the sample reported).
    pub fn mark(&self, edits: Option<&Edits>) -> Option<Mark> {
        edits.map(|e| Mark {
            table: e.table,
            report: self.reports,
        })
    }

    /// The places of the sockets the last report (of a sample lent with `edits`) took out of
    /// their groups and put back, when it was patched from the report marked `last`: nothing
    /// else about a socket can have changed since, but its clocks (`Edits::aged_ms`). What the
    /// loop's counts kept by socket are patched by (`render::metrics::SocketCounts`,
    /// `detect::History`); `None` when they must be made anew.
    pub fn changes_since(&self, last: Option<Mark>, edits: Option<&Edits>) -> Option<&[u32]> {
        let follows = last
            .zip(self.mark(edits))
            .is_some_and(|(last, now)| last.table == now.table && last.report + 1 == now.report);
        self.patched.as_deref().filter(|_| follows)
    }

    /// The report of `joined` for `query` (sockets lent by the table `edits` speaks for, if
    /// any), and, with `counts`, every group's size: what `aggregate_with_counts` gives.
    pub fn report(
        &mut self,
        joined: &Joined<'_>,
        query: &Query,
        edits: Option<&Edits>,
        counts: bool,
    ) -> (Report, Option<GroupCounts>) {
        self.reports += 1;
        let keepable = query.group_by != GroupBy::Pod && query.process.is_none();
        let edits = edits.filter(|e| keepable && self.crowded != Some(e.table));
        let Some(edits) = edits else {
            (self.base, self.patched) = (None, None);
            return from_scratch(joined, query, counts);
        };
        self.patched = self
            .base
            .as_mut()
            .and_then(|b| b.patch(joined, query, edits));
        if self.patched.is_none() {
            self.base = Base::new(joined, query, edits);
        }
        match &self.base {
            Some(base) => base.report(joined, query, counts),
            None => {
                self.crowded = Some(edits.table);
                from_scratch(joined, query, counts)
            }
        }
    }
}

/// The report grouped from scratch, and every group's size only when asked for (`serve`
/// never is: its groups can be one per client).
fn from_scratch(joined: &Joined<'_>, query: &Query, counts: bool) -> (Report, Option<GroupCounts>) {
    let (report, all) = group(joined, query, counts);
    (report.with_groups(LazyGroups::into_vec), all)
}

impl Base {
    /// Every socket of `joined` grouped; `None` past `KEPT_GROUPS` groups.
    fn new(joined: &Joined<'_>, query: &Query, edits: &Edits) -> Option<Base> {
        let n = joined.sample.sockets.len();
        let parts = joined.parts();
        let mut base = Base {
            query: query.clone(),
            table: edits.table,
            lend: edits.lend,
            lent: edits.len,
            keys: KeyParts::default(),
            places: Places::default(),
            groups: Groups::default(),
            first: vec![LEFT_OUT; n],
            info: vec![0; n],
            more: FxHashMap::default(),
            one: parts.one.to_vec(),
            shared: parts.shared.clone(),
            peer: parts.peer.to_vec(),
            totals: Totals::default(),
            hidden: 0,
        };
        let mut owners = Vec::new();
        for i in 0..n {
            if !base.put(joined, i, &mut owners) {
                return None;
            }
        }
        base.groups.rank(&base.keys);
        Some(base)
    }

    /// Brings the groups up to `joined`, whose sockets the table lent with `edits`; returns
    /// the places of the sockets taken out and put back, or `None` when the groups cannot be
    /// brought up to date (another query or table, edits not counted from the last lend, too
    /// many groups): then they must be made anew.
    fn patch(&mut self, joined: &Joined<'_>, query: &Query, edits: &Edits) -> Option<Vec<u32>> {
        let since = edits.since.as_ref()?;
        if self.query != *query
            || self.table != edits.table
            || since.lend != self.lend
            || since.len != self.lent
        {
            return None;
        }
        let n = joined.sample.sockets.len();
        let n32 = u32::try_from(n).ok()?;
        let dirty = self.dirty(joined, since.before.keys().copied(), edits.len, n32);
        let old = self.first.len();
        for &i in dirty.iter().filter(|&&i| (i as usize) < old) {
            self.take(i as usize);
        }
        let parts = joined.parts();
        self.one.clear();
        self.one.extend_from_slice(parts.one);
        self.shared.clone_from(parts.shared);
        self.peer.clear();
        self.peer.extend_from_slice(parts.peer);
        self.first.resize(n, LEFT_OUT);
        self.info.resize(n, 0);
        let mut owners = Vec::new();
        for &i in dirty.iter().filter(|&&i| i < n32) {
            if !self.put(joined, i as usize, &mut owners) {
                return None;
            }
        }
        (self.lend, self.lent) = (edits.lend, edits.len);
        Some(dirty)
    }

    /// The sockets, old or new, whose groups or counts may differ between the last sample
    /// and `joined` (`n` sockets, the first `lent` lent by the table), sorted: the places
    /// `written`, every place past the table's shorter lend (the other namespaces' sockets,
    /// copied anew every sample), and those whose holders, peer or peer's holders changed.
    /// (Whether a socket listens, which decides a folded `--by port` group, changes only when
    /// a listener opens or closes; the table is then dumped anew, `Redump::Listener`, and a
    /// new table is grouped from scratch.)
    fn dirty(
        &self,
        joined: &Joined<'_>,
        written: impl Iterator<Item = u32>,
        lent: usize,
        n: u32,
    ) -> Vec<u32> {
        let parts = joined.parts();
        let old = self.first.len() as u32;
        let common = old.min(n) as usize;
        let mut dirty: Vec<u32> = written.collect();
        let from = self.lent.min(lent).min(common) as u32;
        dirty.extend(from..old.max(n));
        // Holders: a socket's own count, and its peer's count of holders.
        let mut moved = vec![0u64; common.div_ceil(64)];
        let mut any_moved = false;
        let mut holder_moved = |i: usize, dirty: &mut Vec<u32>| {
            moved[i / 64] |= 1 << (i % 64);
            any_moved = true;
            dirty.push(i as u32);
        };
        for i in changed(&self.one[..common], &parts.one[..common]) {
            holder_moved(i, &mut dirty);
        }
        for (&i, pids) in parts.shared {
            if (i as usize) < common && self.shared.get(&i).is_some_and(|was| was != pids) {
                holder_moved(i as usize, &mut dirty);
            }
        }
        // Peers: where one changed, a block of equal ones at a time; where a holder changed,
        // one pass over all of them (a socket's other end is found only this way: several
        // ends of one tuple can have the same peer).
        let (was, now) = (&self.peer[..common], &parts.peer[..common]);
        if any_moved {
            for (i, (&was, &now)) in was.iter().zip(now).enumerate() {
                let j = now as usize;
                if was != now || (j < common && moved[j / 64] >> (j % 64) & 1 != 0) {
                    dirty.push(i as u32);
                }
            }
        } else {
            dirty.extend(changed(was, now).map(|i| i as u32));
        }
        dirty.sort_unstable();
        dirty.dedup();
        dirty
    }

    /// Takes socket `i` of the last sample out of its groups and the totals.
    fn take(&mut self, i: usize) {
        let g = std::mem::replace(&mut self.first[i], LEFT_OUT);
        if g == LEFT_OUT {
            return;
        }
        let info = self.info[i];
        let counted = match info >> 4 {
            1 => Counted::Attributed,
            2 => Counted::Unattributed,
            _ => Counted::Hidden,
        };
        counted.count(&mut self.totals, false);
        if counted == Counted::Hidden {
            self.hidden -= 1;
        }
        let Some(state) = TcpState::from_kernel(info & 0xf) else {
            return;
        };
        let owners = held(&self.one, &self.shared, i);
        let peer_owners = match self.peer.get(i) {
            Some(&j) if j != NO_PEER => held(&self.one, &self.shared, j as usize),
            _ => &[],
        };
        let more = self.more.remove(&(i as u32)).unwrap_or_default();
        for g in std::iter::once(g).chain(more) {
            self.groups.take(g, &self.keys, state, owners, peer_owners);
        }
    }

    /// Puts socket `i` of `joined` into its groups and the totals; false past `KEPT_GROUPS`
    /// groups.
    fn put(&mut self, joined: &Joined<'_>, i: usize, owners: &mut Vec<u32>) -> bool {
        let s = joined.socket(i);
        let at = i as u32;
        let (keys, groups) = (&mut self.keys, &mut self.groups);
        let mut slots: Vec<u32> = Vec::new();
        let mut room = true;
        let counted = socket_keys(
            joined,
            &self.query,
            i,
            owners,
            &mut self.places,
            |key, owners| match groups.put(keys.pack(key, s.state, at), key, owners, joined) {
                Some(g) => slots.push(g),
                None => room = false,
            },
        );
        let Some(counted) = counted else {
            return room;
        };
        counted.count(&mut self.totals, true);
        if counted == Counted::Hidden {
            self.hidden += 1;
        }
        let code = match counted {
            Counted::Attributed => 1,
            Counted::Unattributed => 2,
            Counted::Hidden => 3,
        };
        self.info[i] = code << 4 | s.state.kernel_number();
        if let Some((&g, rest)) = slots.split_first() {
            self.first[i] = g;
            if !rest.is_empty() {
                self.more.insert(at, rest.to_vec());
            }
        }
        room
    }

    /// The report of the groups kept, as `aggregate_with_counts` makes it of `joined`.
    fn report(
        &self,
        joined: &Joined<'_>,
        query: &Query,
        counts: bool,
    ) -> (Report, Option<GroupCounts>) {
        let ranked = &self.groups.ranked;
        let all = counts.then(|| {
            GroupCounts(
                ranked
                    .iter()
                    .map(|&(Reverse(n), raw, _)| (raw, n as usize))
                    .collect(),
            )
        });
        let top = query.top.filter(|&t| t > 0).unwrap_or(usize::MAX);
        let groups = ranked
            .iter()
            .take(top)
            .map(|&(_, raw, g)| {
                let c = &self.groups.list[g as usize];
                make_group(
                    joined,
                    &self.places,
                    raw,
                    c.acc(),
                    c.own.counts(),
                    c.peer.counts(),
                )
            })
            .collect();
        let report = report_of(
            joined.sample,
            query,
            self.totals,
            ranked.len(),
            self.hidden > 0,
            groups,
        );
        (report, all)
    }
}

impl Groups {
    /// Counts membership `m` (of group `raw`) of a socket held by `owners`; its group, or
    /// `None` when that would be a group past `KEPT_GROUPS`.
    fn put(&mut self, m: Member, raw: RawKey, owners: &[u32], joined: &Joined<'_>) -> Option<u32> {
        let key = (m.a, m.b, m.port);
        let g = match self.find(key) {
            Some(g) => g,
            None if self.live >= KEPT_GROUPS => return None,
            None => {
                let fresh = Kept {
                    a: m.a,
                    b: m.b,
                    port: m.port,
                    next: NO_GROUP,
                    count: 0,
                    states: States::default(),
                    own: Pids::default(),
                    peer: Pids::default(),
                };
                let g = match self.free.pop() {
                    Some(g) => {
                        self.list[g as usize] = fresh;
                        g
                    }
                    None => {
                        self.list.push(fresh);
                        (self.list.len() - 1) as u32
                    }
                };
                self.link(hash_of(key), g);
                g
            }
        };
        let c = &mut self.list[g as usize];
        c.count += 1;
        c.states.add(m.state);
        owners.iter().for_each(|&pid| c.own.add(pid));
        if let Some(j) = joined.peer(m.at as usize) {
            joined.owners(j).for_each(|pid| c.peer.add(pid));
        }
        let n = c.count;
        self.reranked(g, raw, n - 1, n);
        Some(g)
    }

    /// Takes a socket in `state`, held by `owners`, its peer by `peer_owners`, out of group
    /// `g`; a group left empty is gone.
    fn take(
        &mut self,
        g: u32,
        keys: &KeyParts,
        state: TcpState,
        owners: &[u32],
        peer_owners: &[u32],
    ) {
        let Some(c) = self.list.get_mut(g as usize) else {
            return;
        };
        c.count -= 1;
        c.states.remove(state);
        owners.iter().for_each(|&pid| c.own.remove(pid));
        peer_owners.iter().for_each(|&pid| c.peer.remove(pid));
        let n = c.count;
        let (key, raw) = (c.key(), keys.raw(&c.member()));
        if n == 0 {
            self.unlink(hash_of(key), g);
            self.free.push(g);
        }
        self.reranked(g, raw, n + 1, n);
    }

    /// The group of packed key `key`.
    fn find(&self, key: (u64, u64, u16)) -> Option<u32> {
        self.find_at(hash_of(key), key)
    }

    /// `find`, the key's hash being `h`.
    fn find_at(&self, h: u64, key: (u64, u64, u16)) -> Option<u32> {
        let mut g = *self.at.get(&h)?;
        while let Some(c) = self.list.get(g as usize) {
            if c.key() == key {
                return Some(g);
            }
            g = c.next;
        }
        None
    }

    /// Makes group `g` the one `find` gives for its key, whose hash is `h`.
    fn link(&mut self, h: u64, g: u32) {
        let next = self.at.insert(h, g).unwrap_or(NO_GROUP);
        self.list[g as usize].next = next;
        self.live += 1;
    }

    /// Takes group `g`, whose key's hash is `h`, out of `find`'s reach.
    fn unlink(&mut self, h: u64, g: u32) {
        let next = self.list[g as usize].next;
        if self.at.get(&h) == Some(&g) {
            if next == NO_GROUP {
                self.at.remove(&h);
            } else {
                self.at.insert(h, next);
            }
        } else if let Some(&head) = self.at.get(&h) {
            // Another key of the same hash came after it: g is further down the chain.
            let mut p = head;
            while let Some(c) = self.list.get(p as usize) {
                if c.next == g {
                    self.list[p as usize].next = next;
                    break;
                }
                p = c.next;
            }
        }
        self.live -= 1;
    }

    /// Group `g` (of key `raw`), of `was` sockets, now of `now`, in the ranking (once made).
    fn reranked(&mut self, g: u32, raw: RawKey, was: u32, now: u32) {
        if !self.ranking {
            return;
        }
        if was > 0 {
            self.ranked.remove(&(Reverse(was), raw, g));
        }
        if now > 0 {
            self.ranked.insert((Reverse(now), raw, g));
        }
    }

    /// Ranks the groups made so far; from here on each change keeps the ranking.
    fn rank(&mut self, keys: &KeyParts) {
        self.ranked = (0..self.list.len() as u32)
            .filter_map(|g| {
                let c = &self.list[g as usize];
                (c.count > 0).then(|| (Reverse(c.count), keys.raw(&c.member()), g))
            })
            .collect();
        self.ranking = true;
    }
}

/// A kept group: its first membership (its key), its counts, its holders and those of its
/// sockets' other ends. 80 bytes: the groups of a server's `--by pair`, one per client, are
/// tens of thousands.
struct Kept {
    /// Its key, packed as its memberships are (`Member`).
    a: u64,
    b: u64,
    port: u16,
    /// The next group whose key has the same hash (`Groups::at`), or `NO_GROUP`.
    next: u32,
    count: u32,
    states: States,
    own: Pids,
    peer: Pids,
}

const _: () = assert!(std::mem::size_of::<Kept>() <= 80);

impl Kept {
    fn key(&self) -> (u64, u64, u16) {
        (self.a, self.b, self.port)
    }

    /// A membership of it, for `KeyParts::raw`.
    fn member(&self) -> Member {
        Member {
            a: self.a,
            b: self.b,
            port: self.port,
            state: TcpState::Established,
            at: 0,
        }
    }

    /// Its counts as the report spells them.
    fn acc(&self) -> Acc {
        let mut states = StateCounts::default();
        match &self.states {
            States::None => {}
            States::One(st, n) => states.set(*st, *n),
            States::Many(all) => states = (**all).clone(),
        }
        Acc {
            count: self.count,
            states,
        }
    }
}

/// Sockets per state, as a kept group counts them: most groups have one state.
#[derive(Default)]
enum States {
    #[default]
    None,
    One(TcpState, u32),
    Many(Box<StateCounts>),
}

impl States {
    fn add(&mut self, st: TcpState) {
        match self {
            States::None => *self = States::One(st, 1),
            States::One(s, n) if *s == st => *n += 1,
            States::One(s, n) => {
                let mut all = StateCounts::default();
                all.set(*s, *n);
                all.add(st);
                *self = States::Many(Box::new(all));
            }
            States::Many(all) => all.add(st),
        }
    }

    fn remove(&mut self, st: TcpState) {
        match self {
            States::One(s, 1) if *s == st => *self = States::None,
            States::One(s, n) if *s == st => *n -= 1,
            States::Many(all) => all.remove(st),
            _ => {}
        }
    }
}

/// Sockets per pid, as a kept group counts its holders: most groups have one (a server's
/// `--by pair` is a group per client), which takes no map; 16 bytes where a map took 32 and
/// its table more.
#[derive(Default)]
enum Pids {
    #[default]
    None,
    One(u32, u32),
    Many(Box<FxHashMap<u32, u32>>),
}

impl Pids {
    fn add(&mut self, pid: u32) {
        match self {
            Pids::None => *self = Pids::One(pid, 1),
            Pids::One(p, n) if *p == pid => *n += 1,
            Pids::One(p, n) => {
                *self = Pids::Many(Box::new(FxHashMap::from_iter([(*p, *n), (pid, 1)])));
            }
            Pids::Many(m) => *m.entry(pid).or_default() += 1,
        }
    }

    fn remove(&mut self, pid: u32) {
        match self {
            Pids::One(p, 1) if *p == pid => *self = Pids::None,
            Pids::One(p, n) if *p == pid => *n -= 1,
            Pids::Many(m) => {
                if let Some(n) = m.get_mut(&pid) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(&pid);
                    }
                }
            }
            _ => {}
        }
    }

    /// Every pid and its count, in no particular order.
    fn counts(&self) -> Vec<(u32, usize)> {
        match self {
            Pids::None => Vec::new(),
            Pids::One(p, n) => vec![(*p, *n as usize)],
            Pids::Many(m) => m.iter().map(|(&p, &n)| (p, n as usize)).collect(),
        }
    }
}

/// The indices where `a` and `b` (of one length) differ, found a block of equal elements at a
/// time: two samples' holders differ in a few places among a million.
fn changed<'v>(a: &'v [u32], b: &'v [u32]) -> impl Iterator<Item = usize> + 'v {
    const BLOCK: usize = 64;
    a.chunks(BLOCK)
        .zip(b.chunks(BLOCK))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .flat_map(|(k, (x, y))| {
            x.iter()
                .zip(y.iter())
                .enumerate()
                .filter(|(_, (p, q))| p != q)
                .map(move |(i, _)| k * BLOCK + i)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(port: u16) -> Kept {
        Kept {
            a: 1,
            b: 2,
            port,
            next: NO_GROUP,
            count: 1,
            states: States::default(),
            own: Pids::default(),
            peer: Pids::default(),
        }
    }

    #[test]
    fn groups_whose_keys_share_a_hash_are_each_found_until_taken_out() {
        let mut groups = Groups {
            list: vec![group(1), group(2), group(3)],
            ..Groups::default()
        };
        // Three keys filed under one hash, as two keys whose hashes collide are.
        let h = 7;
        (0..3).for_each(|g| groups.link(h, g));
        let found = |groups: &Groups| {
            (1..=3)
                .map(|p| groups.find_at(h, (1, 2, p)))
                .collect::<Vec<_>>()
        };
        assert_eq!(found(&groups), [Some(0), Some(1), Some(2)]);
        groups.unlink(h, 1);
        assert_eq!(found(&groups), [Some(0), None, Some(2)]);
        groups.unlink(h, 2);
        assert_eq!(found(&groups), [Some(0), None, None]);
        groups.unlink(h, 0);
        assert_eq!(found(&groups), [None, None, None]);
        assert!(groups.at.is_empty());
        assert_eq!(groups.live, 0);
    }
}
