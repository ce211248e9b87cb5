//! Stage 5 (metrics), the socket counts kept: what `shimcheck_connections`,
//! `shimcheck_idle_connections`, `shimcheck_sockets`, `shimcheck_unattributed_sockets` and
//! `shimcheck_ephemeral_ports_used` read of a sample's sockets, counted by small keys.
//!
//! Input: a `Joined` sample, and, in a loop, the places of the sockets its kept groups took out
//! and put back (`KeptGroups::changes`) with the table's clock aging (`Edits::aged_ms`).
//! Output: the counts `families_of` spells as series. Pure.
//!
//! Each socket's part of the counts is kept by its place in the sample, so a later sample is
//! counted by taking out the old part of each changed place and putting in the new one, as
//! the groups are. A connection's data-idle clock moves on with every sample: the clocks not
//! yet idle long enough are kept against the table's aging, and cross into the idle count as
//! it grows. Counted from scratch instead: the first sample, a dump (a new table), a sample
//! whose groups were made anew, another `--idle-after`.

use std::net::{IpAddr, SocketAddr};

use crate::aggregate::{KeptGroups, Mark};
use crate::collect::events::Edits;
use crate::detect::DetectConfig;
use crate::join::Joined;
use crate::keyed::{Keyed, NONE};
use crate::model::TcpState;

use super::EPHEMERAL_TUPLES;

/// A connection as `shimcheck_connections` counts it: namespace, lowest-pid holder, service
/// endpoint, server side, state.
pub(super) type ConnectionKey = (u64, Option<u32>, SocketAddr, bool, TcpState);
/// A connection as `shimcheck_idle_connections` counts it.
pub(super) type IdleKey = (u64, Option<u32>, SocketAddr);
/// A (namespace, source address, destination) tuple of client ends.
pub(super) type Tuple = (u64, IpAddr, SocketAddr);

/// `Place::flags`: counted idle in its series' `Idle::already`.
const IDLE: u8 = 1;
/// `Place::flags`: no visible process holds it.
const UNATTRIBUTED: u8 = 2;
/// `Place::flags`: an ESTABLISHED or CLOSE_WAIT connection: `Place::entry` is its series.
const CONNECTION: u8 = 4;
/// How far the clocks may age past the counts' `base` before they are counted anew: a
/// waiting clock is kept in 32 bits as its value less that aging.
const AGING_KEPT: u64 = 1 << 30;

/// `x` as a signed number of milliseconds, at most `i64::MAX`.
fn signed(x: u64) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

/// The sockets of one (namespace, state) and how many of them have no visible holder.
#[derive(Debug, Clone, Copy, Default)]
struct Total {
    n: u32,
    unattributed: u32,
}

/// One connection series: its count and its idle series.
#[derive(Debug, Clone, Copy)]
struct Series {
    n: u32,
    idle: u32,
}

impl Default for Series {
    fn default() -> Self {
        Series { n: 0, idle: NONE }
    }
}

/// The ESTABLISHED connections of one idle series: how many are idle long enough, and the
/// others, whose clocks age with the table, each as (clock less the table's aging since the
/// counts' `base` when counted, place).
#[derive(Debug, Clone, Default)]
struct Idle {
    /// Connection series counting into this one.
    series: u32,
    already: u32,
    waiting: Vec<(i32, u32)>,
    /// No waiting clock is above this (kept as `waiting`'s): a look at the clocks past
    /// `--idle-after` is needed only once it is.
    top: i32,
}

/// The local ports of one tuple's client ends, sorted, and how many differ: two ends can
/// share one, seen from two namespaces. Two bytes a client end.
#[derive(Debug, Clone, Default)]
struct Ports {
    ports: Vec<u16>,
    distinct: u32,
}

impl Ports {
    fn add(&mut self, port: u16) {
        let at = self.ports.partition_point(|&p| p < port);
        if self.ports.get(at) != Some(&port) {
            self.distinct += 1;
        }
        self.ports.insert(at, port);
    }

    fn remove(&mut self, port: u16) {
        let at = self.ports.partition_point(|&p| p < port);
        if self.ports.get(at) != Some(&port) {
            return;
        }
        self.ports.remove(at);
        if self.ports.get(at) != Some(&port) {
            self.distinct -= 1;
        }
    }
}

/// What one socket added to the counts, in 16 bytes: a sample has one per socket.
#[derive(Debug, Clone, Copy)]
struct Place {
    /// Its connection series (`CONNECTION`), else its (namespace, state) total.
    entry: u32,
    /// A client end's tuple, and its local port.
    tuple: u32,
    /// Its index in its idle series' `waiting`.
    waiting: u32,
    port: u16,
    flags: u8,
}

const EMPTY: Place = Place {
    entry: NONE,
    tuple: NONE,
    waiting: NONE,
    port: 0,
    flags: 0,
};

const _: () = assert!(std::mem::size_of::<Place>() == 16);

/// What the metrics read of a sample's sockets, counted by small keys: no label is spelled
/// for a socket, only for each series after. `serve` keeps it from one sample to the next
/// (`update`); where nothing moved but time, none of it changes but which connections have
/// been idle long enough, and the clocks kept here answer that (`idle_now`).
#[derive(Debug, Clone, Default)]
pub struct SocketCounts {
    totals: Keyed<(u64, TcpState), Total>,
    series: Keyed<ConnectionKey, Series>,
    idle: Keyed<IdleKey, Idle>,
    /// Each tuple's local ports.
    tuples: Keyed<Tuple, Ports>,
    places: Vec<Place>,
    /// `--idle-after` in milliseconds.
    idle_after: u64,
    /// The aging of the table the clocks came from (`Edits::aged_ms`) when they were first
    /// counted, and as of the last sample.
    base: u64,
    aged: u64,
    /// The groups' report the counts were brought up to alongside.
    made_with: Option<Mark>,
    /// The last `update` patched the counts before it, rather than counted anew.
    patched: bool,
}

impl SocketCounts {
    /// Every socket of `j` counted.
    pub fn new(j: &Joined<'_>, cfg: &DetectConfig) -> SocketCounts {
        SocketCounts::aged(j, cfg, 0)
    }

    /// `new`, of sockets whose clocks a table moved on by `aged` ms since it was made.
    fn aged(j: &Joined<'_>, cfg: &DetectConfig, aged: u64) -> SocketCounts {
        let n = j.sample.sockets.len();
        let mut counts = SocketCounts {
            idle_after: u64::try_from(cfg.idle_after.as_millis()).unwrap_or(u64::MAX),
            places: vec![EMPTY; n],
            base: aged,
            aged,
            ..SocketCounts::default()
        };
        for i in 0..n {
            counts.put(j, i);
        }
        counts
    }

    /// The counts of `j`, a loop's new sample: `last` (the counts of its last one) brought up
    /// to date where the groups' report of `j`, just made, changed (`groups`), when `last`
    /// was brought up to the report before and the table that lent `j` (`edits`) is the
    /// same; counted from scratch otherwise.
    pub fn update(
        last: Option<SocketCounts>,
        j: &Joined<'_>,
        cfg: &DetectConfig,
        groups: &KeptGroups,
        edits: Option<&Edits>,
    ) -> SocketCounts {
        let idle_after = u64::try_from(cfg.idle_after.as_millis()).unwrap_or(u64::MAX);
        let patchable = |c: &SocketCounts| {
            c.idle_after == idle_after
                && edits.is_some_and(|e| e.aged_ms.saturating_sub(c.base) < AGING_KEPT)
        };
        let mut counts = match last.filter(patchable).and_then(|c| {
            let changed = groups.changes_since(c.made_with, edits)?;
            Some((c, changed, edits?))
        }) {
            Some((mut c, changed, edits)) => {
                c.patch(j, changed, edits.aged_ms);
                c.patched = true;
                c
            }
            None => SocketCounts::aged(j, cfg, edits.map_or(0, |e| e.aged_ms)),
        };
        counts.made_with = groups.mark(edits);
        counts
    }

    /// Whether the last `update` patched the counts before it (true) or counted anew.
    pub fn patched(&self) -> bool {
        self.patched
    }

    /// Counts again the sockets at `places` of `j`, whose clocks were read anew since they were
    /// counted (`Sampler::fresh_clocks`).
    pub fn recount(&mut self, j: &Joined<'_>, places: &[u32]) {
        for &i in places {
            if (i as usize) < self.places.len() {
                self.take(i as usize);
                self.put(j, i as usize);
            }
        }
    }

    /// Takes out the sockets at `changed` (sorted), old and new places alike, and puts in
    /// those of `j`, whose unchanged sockets' clocks moved on to the table's aging `aged`.
    fn patch(&mut self, j: &Joined<'_>, changed: &[u32], aged: u64) {
        let n = j.sample.sockets.len();
        for &i in changed {
            if (i as usize) < self.places.len() {
                self.take(i as usize);
            }
        }
        self.places.resize(n, EMPTY);
        self.aged = aged;
        self.cross();
        for &i in changed {
            if (i as usize) < n {
                self.put(j, i as usize);
            }
        }
    }

    /// Adds socket `i` of `j`.
    fn put(&mut self, j: &Joined<'_>, i: usize) {
        let s = j.socket(i);
        let mut place = EMPTY;
        let total = self.totals.slot((s.netns, s.state));
        let counted = matches!(s.state, TcpState::Established | TcpState::CloseWait);
        let pid = j.owners(i).next();
        if let Some(t) = self.totals.get_mut(total) {
            t.n += 1;
            if counted && pid.is_none() {
                t.unattributed += 1;
                place.flags |= UNATTRIBUTED;
            }
        }
        place.entry = total;
        if counted {
            let server = j.listens(i);
            let endpoint = if server {
                s.local()
            } else {
                place.tuple = self.tuples.slot((s.netns, s.local().ip(), s.remote()));
                place.port = s.local().port();
                if let Some(ports) = self.tuples.get_mut(place.tuple) {
                    ports.add(place.port);
                }
                s.remote()
            };
            place.flags |= CONNECTION;
            place.entry = self.series.slot((s.netns, pid, endpoint, server, s.state));
            let at = match self.series.get_mut(place.entry) {
                Some(series) => {
                    series.n += 1;
                    if series.idle == NONE {
                        series.idle = self.idle.slot((s.netns, pid, endpoint));
                        if let Some(idle) = self.idle.get_mut(series.idle) {
                            idle.series += 1;
                        }
                    }
                    series.idle
                }
                None => NONE,
            };
            let clock = s.tcp_info.map(|t| u64::from(t.data_idle_ms()));
            let (idle_after, kept) = (self.idle_after, clock.map(|c| self.kept(c)));
            if let (TcpState::Established, Some(clock), Some(kept), Some(idle)) =
                (s.state, clock, kept, self.idle.get_mut(at))
            {
                if clock >= idle_after {
                    idle.already += 1;
                    place.flags |= IDLE;
                } else if s.has_clocks() {
                    place.waiting = idle.waiting.len() as u32;
                    idle.top = if idle.waiting.is_empty() {
                        kept
                    } else {
                        idle.top.max(kept)
                    };
                    idle.waiting.push((kept, i as u32));
                }
            }
        }
        self.places[i] = place;
    }

    /// Takes out what the socket at place `i` added.
    fn take(&mut self, i: usize) {
        let place = std::mem::replace(&mut self.places[i], EMPTY);
        if place.entry == NONE {
            return;
        }
        let (total, series) = match place.flags & CONNECTION {
            0 => (Some(place.entry), None),
            _ => {
                let key = self.series.get(place.entry).map(|(k, _)| (k.0, k.4));
                (key.and_then(|k| self.totals.find(&k)), Some(place.entry))
            }
        };
        if let Some(total) = total
            && let Some(t) = self.totals.get_mut(total)
        {
            t.n -= 1;
            if place.flags & UNATTRIBUTED != 0 {
                t.unattributed -= 1;
            }
            if t.n == 0 {
                self.totals.free(total);
            }
        }
        if let Some(ports) = self.tuples.get_mut(place.tuple) {
            ports.remove(place.port);
            if ports.ports.is_empty() {
                self.tuples.free(place.tuple);
            }
        }
        let Some(slot) = series else {
            return;
        };
        let Some(series) = self.series.get_mut(slot) else {
            return;
        };
        series.n -= 1;
        let (at, emptied) = (series.idle, series.n == 0);
        if emptied {
            self.series.free(slot);
        }
        let Some(idle) = self.idle.get_mut(at) else {
            return;
        };
        if place.flags & IDLE != 0 {
            idle.already -= 1;
        }
        if place.waiting != NONE {
            let w = place.waiting as usize;
            idle.waiting.swap_remove(w);
            if let Some(&(_, moved)) = idle.waiting.get(w) {
                self.places[moved as usize].waiting = w as u32;
            }
        }
        if emptied {
            idle.series -= 1;
            if idle.series == 0 {
                self.idle.free(at);
            }
        }
    }

    /// A clock not idle long enough, as kept: less the table's aging since `base`. An aging
    /// up to `AGING_KEPT` and a clock below `--idle-after` fit.
    fn kept(&self, clock: u64) -> i32 {
        let kept = signed(clock).saturating_sub(signed(self.aged.saturating_sub(self.base)));
        i32::try_from(kept).unwrap_or(i32::MIN)
    }

    /// The kept clocks at or above which a connection is idle long enough, `age_ms` after
    /// the last sample.
    fn from(&self, age_ms: u64) -> i32 {
        let from = signed(self.idle_after)
            .saturating_sub(signed(self.aged.saturating_sub(self.base)))
            .saturating_sub(signed(age_ms));
        i32::try_from(from).unwrap_or(if from < 0 { i32::MIN } else { i32::MAX })
    }

    /// Moves the waiting clocks that crossed `--idle-after` at the table's aging into their
    /// series' idle count: later looks need not go over them again.
    fn cross(&mut self) {
        let from = self.from(0);
        for (_, (_, idle)) in self.idle.iter_mut() {
            if idle.waiting.is_empty() || idle.top < from {
                continue;
            }
            let mut w = 0;
            while let Some(&(clock, place)) = idle.waiting.get(w) {
                if clock < from {
                    w += 1;
                    continue;
                }
                idle.waiting.swap_remove(w);
                idle.already += 1;
                let p = &mut self.places[place as usize];
                (p.flags, p.waiting) = (p.flags | IDLE, NONE);
                if let Some(&(_, moved)) = idle.waiting.get(w) {
                    self.places[moved as usize].waiting = w as u32;
                }
            }
            idle.top = idle
                .waiting
                .iter()
                .map(|&(c, _)| c)
                .max()
                .unwrap_or(i32::MIN);
        }
    }

    /// Sockets by (namespace, state), and how many of them no visible process holds.
    pub(super) fn totals(&self) -> impl Iterator<Item = ((u64, TcpState), u32, u32)> + '_ {
        self.totals
            .iter()
            .map(|(_, &(key, t))| (key, t.n, t.unattributed))
    }

    /// Each connection series and its count.
    pub(super) fn connections(&self) -> impl Iterator<Item = (&ConnectionKey, u32)> {
        self.series.iter().map(|(_, (key, s))| (key, s.n))
    }

    /// Each idle series with its count, the clocks `age_ms` older than counted.
    pub(super) fn idle_now(&self, age_ms: u64) -> impl Iterator<Item = (&IdleKey, u32)> {
        let from = self.from(age_ms);
        self.idle.iter().filter_map(move |(_, (key, idle))| {
            let crossed = if idle.waiting.is_empty() || idle.top < from {
                0
            } else {
                idle.waiting.iter().filter(|&&(c, _)| c >= from).count() as u32
            };
            let n = idle.already + crossed;
            (n > 0).then_some((key, n))
        })
    }

    /// The `EPHEMERAL_TUPLES` tuples using the most local ports, and how many.
    pub(super) fn busiest(&self) -> Vec<(Tuple, usize)> {
        let mut used: Vec<(Tuple, usize)> = self
            .tuples
            .iter()
            .map(|(_, (tuple, ports))| (*tuple, ports.distinct as usize))
            .collect();
        used.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        used.truncate(EPHEMERAL_TUPLES);
        used
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{Sample, Socket, TcpInfo};

    /// Ten connections of process 100 from 10.0.0.1 to 10.0.0.9:5000, silent for 50 s.
    fn sample() -> Sample {
        let sockets: Vec<Socket> = (0..10u16)
            .map(|c| {
                let local = SocketAddr::from(([10, 0, 0, 1], 40_000 + c));
                let remote = SocketAddr::from(([10, 0, 0, 9], 5000));
                let mut s = Socket::new(TcpState::Established, local, remote);
                (s.inode, s.netns) = (1 + u64::from(c), 1);
                s.tcp_info = Some(TcpInfo {
                    last_data_sent_ms: 50_000,
                    last_data_recv_ms: 50_000,
                    ..TcpInfo::default()
                });
                s
            })
            .collect();
        let pairs = (1..=10).map(|inode| (inode, 100)).collect();
        Sample::of(sockets, pairs)
    }

    fn idle(c: &SocketCounts, age: u64) -> u32 {
        c.idle_now(age).map(|(_, n)| n).sum()
    }

    #[test]
    fn clocks_that_crossed_idle_after_leave_the_waiting_list_at_the_next_sample() {
        // All ten wait at --idle-after 60 s. 10 s later (the table aged, no socket changed)
        // all are idle, counted so with no look at the clocks.
        let s = sample();
        let j = Joined::new(&s);
        let cfg = DetectConfig {
            idle_after: Duration::from_secs(60),
            ..DetectConfig::default()
        };
        let mut counts = SocketCounts::aged(&j, &cfg, 5_000);
        let waiting = |c: &SocketCounts| {
            c.idle
                .iter()
                .map(|(_, (_, i))| i.waiting.len())
                .sum::<usize>()
        };
        assert_eq!(
            (idle(&counts, 0), idle(&counts, 10_000), waiting(&counts)),
            (0, 10, 10)
        );
        counts.patch(&j, &[], 15_000);
        assert_eq!((idle(&counts, 0), waiting(&counts)), (10, 0));
    }

    #[test]
    fn an_idle_after_past_what_32_bits_of_milliseconds_hold_is_never_reached() {
        // 30 days: more milliseconds than a kept clock holds. Silent for 50 s is not idle,
        // now or a day later.
        let s = sample();
        let cfg = DetectConfig {
            idle_after: Duration::from_secs(30 * 86_400),
            ..DetectConfig::default()
        };
        let counts = SocketCounts::new(&Joined::new(&s), &cfg);
        assert_eq!((idle(&counts, 0), idle(&counts, 86_400_000)), (0, 0));
    }

    #[test]
    fn counts_whose_sockets_all_went_hold_nothing() {
        // A long-running serve sees namespaces, processes and destinations come and go: what
        // it counted of them goes with them.
        let s = sample();
        let cfg = DetectConfig::default();
        let mut counts = SocketCounts::new(&Joined::new(&s), &cfg);
        let gone = Sample::of(Vec::new(), Vec::new());
        counts.patch(&Joined::new(&gone), &(0..10).collect::<Vec<u32>>(), 0);
        assert_eq!(counts.places.len(), 0);
        assert_eq!(
            counts.totals.iter().count() + counts.series.iter().count(),
            0
        );
        assert_eq!(counts.idle.iter().count() + counts.tuples.iter().count(), 0);
    }
}
