//! Support for what a loop keeps by socket from one sample to the next (the detector's
//! digest, stage 4b, and the metrics' counts, stage 5): entries found by key and held in a
//! slab, each freed once nothing counts in it, and lists of sockets by key that a socket is
//! taken out of by its place. Pure data structures.

use std::hash::Hash;

use rustc_hash::FxHashMap;
use slab::Slab;

/// A slot, membership or place that points nowhere.
pub(crate) const NONE: u32 = u32::MAX;

/// Entries found by key and held in a slab, each freed (`free`) when nothing counts in it any
/// more: a long-running `serve` sees namespaces, processes and destinations come and go.
#[derive(Debug, Clone)]
pub(crate) struct Keyed<K, V> {
    at: FxHashMap<K, u32>,
    slab: Slab<(K, V)>,
}

impl<K, V> Default for Keyed<K, V> {
    fn default() -> Self {
        Keyed {
            at: FxHashMap::default(),
            slab: Slab::new(),
        }
    }
}

impl<K: Hash + Eq + Copy, V: Default> Keyed<K, V> {
    /// The slot of `key`, a new default entry if it has none.
    pub(crate) fn slot(&mut self, key: K) -> u32 {
        let Keyed { at, slab } = self;
        *at.entry(key)
            .or_insert_with(|| slab.insert((key, V::default())) as u32)
    }

    /// The slot of `key`, if it has an entry.
    pub(crate) fn find(&self, key: &K) -> Option<u32> {
        self.at.get(key).copied()
    }

    pub(crate) fn get(&self, slot: u32) -> Option<&(K, V)> {
        self.slab.get(slot as usize)
    }

    pub(crate) fn get_mut(&mut self, slot: u32) -> Option<&mut V> {
        self.slab.get_mut(slot as usize).map(|(_, v)| v)
    }

    pub(crate) fn free(&mut self, slot: u32) {
        if let Some((key, _)) = self.slab.try_remove(slot as usize) {
            self.at.remove(&key);
        }
    }

    /// Every entry, with its slot.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &(K, V))> {
        self.slab.iter().map(|(slot, e)| (slot as u32, e))
    }

    /// Every entry, with its slot, to change.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut (K, V))> {
        self.slab.iter_mut().map(|(slot, e)| (slot as u32, e))
    }
}

/// One list: its members' places, and a datum each.
#[derive(Debug, Clone)]
pub(crate) struct List<D> {
    pub(crate) places: Vec<u32>,
    pub(crate) data: Vec<D>,
}

impl<D> Default for List<D> {
    fn default() -> Self {
        List {
            places: Vec::new(),
            data: Vec::new(),
        }
    }
}

/// Sockets in lists by key, a socket in any number of them (one per holder). Kept by place
/// (`by_place`), each is taken out of all of its lists by its place: its first membership is
/// kept by place, 8 bytes a socket, the others (a socket several processes hold, or every
/// membership of lists that room was not made for) in a map. Lists made once and never
/// patched keep no membership.
#[derive(Debug, Clone)]
pub(crate) struct Lists<K, D> {
    lists: Keyed<K, List<D>>,
    kept: bool,
    /// First memberships are kept by place.
    room: bool,
    /// Per place: (list, index in it) of its first membership, or `(NONE, NONE)`.
    first: Vec<(u32, u32)>,
    more: FxHashMap<u32, Vec<(u32, u32)>>,
}

impl<K, D> Default for Lists<K, D> {
    fn default() -> Self {
        Lists {
            lists: Keyed::default(),
            kept: false,
            room: false,
            first: Vec::new(),
            more: FxHashMap::default(),
        }
    }
}

impl<K, D> Lists<K, D> {
    /// Lists whose sockets can be taken out by place, with room made for `n` places' first
    /// memberships.
    pub(crate) fn by_place(n: usize) -> Lists<K, D> {
        Lists {
            kept: true,
            room: true,
            first: vec![(NONE, NONE); n],
            ..Lists::default()
        }
    }

    /// Lists whose sockets can be taken out by place, every membership in a map: for lists
    /// few sockets are in.
    pub(crate) fn by_map() -> Lists<K, D> {
        Lists {
            kept: true,
            ..Lists::default()
        }
    }

    /// Whether the sockets can be taken out by place.
    pub(crate) fn kept(&self) -> bool {
        self.kept
    }
}

impl<K: Hash + Eq + Copy, D> Lists<K, D> {
    /// Room for sockets at places below `n` (in lists with room by place); those at `n` and
    /// above must have been taken out.
    pub(crate) fn resize(&mut self, n: usize) {
        if self.room {
            self.first.resize(n, (NONE, NONE));
        }
    }

    /// Puts the socket at `place` into the list of `key`, with `datum`; returns the list.
    pub(crate) fn add(&mut self, place: u32, key: K, datum: D) -> u32 {
        let slot = self.lists.slot(key);
        let Some(list) = self.lists.get_mut(slot) else {
            return slot;
        };
        let at = (slot, list.places.len() as u32);
        list.places.push(place);
        list.data.push(datum);
        if !self.kept {
            return slot;
        }
        match self.first.get_mut(place as usize) {
            Some(first) if first.0 == NONE => *first = at,
            _ => self.more.entry(place).or_default().push(at),
        }
        slot
    }

    /// Takes the socket at `place` out of every list it is in; `touched` gets each list, with
    /// whether it is gone.
    pub(crate) fn remove(&mut self, place: u32, touched: &mut impl FnMut(u32, bool)) {
        let first = self
            .first
            .get_mut(place as usize)
            .map(|f| std::mem::replace(f, (NONE, NONE)))
            .filter(|f| f.0 != NONE);
        let more = self.more.remove(&place).unwrap_or_default();
        for (slot, at) in first.into_iter().chain(more) {
            let Some(list) = self.lists.get_mut(slot) else {
                continue;
            };
            let at = at as usize;
            if at >= list.places.len() {
                continue;
            }
            list.places.swap_remove(at);
            list.data.swap_remove(at);
            let emptied = list.places.is_empty();
            if let Some(&moved) = list.places.get(at) {
                self.moved(moved, slot, at as u32);
            }
            if emptied {
                self.lists.free(slot);
            }
            touched(slot, emptied);
        }
    }

    /// Notes that the socket at `place` is now at index `at` of list `slot`.
    fn moved(&mut self, place: u32, slot: u32, at: u32) {
        match self.first.get_mut(place as usize) {
            Some(first) if first.0 == slot => first.1 = at,
            _ => {
                if let Some(m) = self
                    .more
                    .get_mut(&place)
                    .and_then(|more| more.iter_mut().find(|m| m.0 == slot))
                {
                    m.1 = at;
                }
            }
        }
    }

    /// The slot of `key`'s list.
    pub(crate) fn slot_of(&self, key: &K) -> Option<u32> {
        self.lists.find(key)
    }

    /// The list in `slot`, with its key.
    pub(crate) fn at(&self, slot: u32) -> Option<&(K, List<D>)> {
        self.lists.get(slot)
    }

    /// Every list, with its slot and key.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &(K, List<D>))> {
        self.lists.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_taken_out_of_lists_leave_every_other_member_findable() {
        // Sockets 0..40 in lists by place % 3, every fifth also in list 7 (a second holder).
        let mut lists: Lists<u32, u32> = Lists::by_place(40);
        for p in 0..40 {
            lists.add(p, p % 3, p * 10);
            if p % 5 == 0 {
                lists.add(p, 7, p * 10);
            }
        }
        // A socket's first membership is kept by place, a second one in the map; room is made
        // for places past the first 40.
        lists.resize(50);
        lists.add(45, 1, 450);
        assert_eq!(lists.more.len(), 8);
        lists.remove(45, &mut |_, _| ());
        let mut gone = Vec::new();
        for p in [0, 39, 3, 6, 5, 20, 1] {
            lists.remove(p, &mut |slot, emptied| gone.push((slot, emptied)));
        }
        assert!(gone.iter().all(|&(_, emptied)| !emptied));
        // Every member left is where its memberships say, with its own datum, and taking
        // each out again empties every list.
        let members = |lists: &Lists<u32, u32>, key: u32| {
            let list = lists.slot_of(&key).and_then(|slot| lists.at(slot));
            let mut m: Vec<u32> = list.map(|(_, l)| l.places.clone()).unwrap_or_default();
            m.sort_unstable();
            m
        };
        let left: Vec<u32> = (0..40)
            .filter(|p| ![0, 39, 3, 6, 5, 20, 1].contains(p))
            .collect();
        for key in 0..3 {
            let want: Vec<u32> = left.iter().copied().filter(|p| p % 3 == key).collect();
            assert_eq!(members(&lists, key), want);
        }
        let sevens: Vec<u32> = left.iter().copied().filter(|p| p % 5 == 0).collect();
        assert_eq!(members(&lists, 7), sevens);
        for (_, (_, list)) in lists.iter() {
            for (p, d) in list.places.iter().zip(&list.data) {
                assert_eq!(*d, p * 10);
            }
        }
        let mut emptied = 0;
        for &p in &left {
            lists.remove(p, &mut |_, gone| emptied += usize::from(gone));
        }
        assert_eq!(emptied, 4);
        assert_eq!(lists.iter().count(), 0);
    }
}
