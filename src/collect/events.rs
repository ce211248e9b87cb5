//! Stage 1, collector, for loops (`--watch`, `serve`): a socket table kept by the kernel's
//! state-change events, so that a later sample costs what changed, not what exists.
//!
//! Input: the state changes since the last sample (`bpf::events`) and, for each socket that
//! changed, the kernel's answer to an exact lookup (`NetlinkSource::lookup`: its inode,
//! tcp_info and cgroup now). Output: the same `Vec<Socket>` a dump of the same states gives.
//!
//! How: the first sample dumps, and the table remembers every socket by cookie. Each later
//! sample drains the changes, keeps the latest per cookie, and for each one either drops the
//! socket (it entered a state not shown, or closed) or looks it up and puts what the kernel
//! says in its place. A socket waiting in a listener's accept queue has no inode until the
//! application accepts it, and accepting is no state change: such sockets are looked up again
//! every sample. Every other socket's tcp_info clocks are moved on by the time since the last
//! sample, as if it carried no data since (no event says it did).
//!
//! What falls back to a whole dump: the first sample; a change of states asked for; states the
//! events cannot follow (`follows`: TIME_WAIT and FIN_WAIT2 live on in mini-sockets, SYN_RECV
//! and SYN_SENT have no complete 4-tuple at their change); a listener opening or closing (a
//! lookup by 4-tuple cannot tell listeners sharing a port apart); a change lost to a full ring
//! buffer; and, to keep the table honest about what no event reports (tcp_info clocks of
//! connections that carried data), every `RESYNC_EVERY` updates and `RESYNC_AFTER`.

use std::path::Path;
use std::time::Instant;

use rustc_hash::FxHashMap;

use super::counters::{Counters, RESYNC_AFTER, RESYNC_EVERY, Stillness, ms_since};
use super::netlink::{Exact, NetlinkSource, THREAD_NET};
use super::{CollectError, Dump, SocketSource};
use crate::bpf::events::{StateChange, StateChanges};
use crate::model::{Socket, StateSet, TcpInfo, TcpState};

/// The states whose sockets the events follow exactly: every way into and out of them is a
/// change of a full socket with its 4-tuple complete.
const FOLLOWED: [TcpState; 6] = [
    TcpState::Established,
    TcpState::FinWait1,
    TcpState::CloseWait,
    TcpState::LastAck,
    TcpState::Listen,
    TcpState::Closing,
];

/// A lookup costs about as much as this many sockets of a dump: 3.5 µs a lookup (two system
/// calls) against 1.27 µs a socket dumped and decoded, measured here at 120,000 sockets. With
/// more changes than sockets / this, a dump is cheaper.
const LOOKUPS_PER_DUMP: usize = 3;
/// ... but this many lookups (about a millisecond) are always cheap enough.
const MIN_LOOKUPS: usize = 256;

/// Lookups a sample makes, at most, of sockets waiting in an accept queue.
pub const WAITING_LOOKUPS: usize = 256;

/// True when `s` waits in a listener's accept queue: accepted by the kernel, not yet by the
/// application, so no inode until `accept`, which no event reports. (An orphan, closed by its
/// application, is in no such state.)
fn waits(s: &Socket) -> bool {
    s.inode == 0 && matches!(s.state, TcpState::Established | TcpState::CloseWait)
}

/// True when a table of `states` can be kept by events.
pub fn follows(states: StateSet) -> bool {
    states.iter().all(|s| FOLLOWED.contains(&s))
}

/// The changes drained since the last update, the latest per socket.
#[derive(Debug, Default)]
pub struct Pending {
    latest: FxHashMap<u64, StateChange>,
    /// A listener opened or closed.
    listeners: bool,
}

impl Pending {
    /// Takes one change, in the order the kernel made them.
    pub fn add(&mut self, c: StateChange) {
        let listen = TcpState::Listen.kernel_number();
        if c.new == listen || c.old == listen {
            self.listeners = true;
        }
        self.latest.insert(c.cookie, c);
    }

    /// No change at all.
    pub fn is_empty(&self) -> bool {
        self.latest.is_empty() && !self.listeners
    }

    /// Takes the changes of `other`, which came after these.
    fn merge(&mut self, other: Pending) {
        self.latest.extend(other.latest);
        self.listeners |= other.listeners;
    }
}

/// Why an update could not be made from the changes: the caller dumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redump {
    /// A listener opened or closed.
    Listener,
    /// A socket in a shown state has no local port yet.
    NoPort,
}

/// Every socket of the shown states, by cookie.
#[derive(Debug)]
pub struct Table {
    sockets: Vec<Socket>,
    at: FxHashMap<u64, u32>,
    states: StateSet,
    /// The sockets are lent to a sample (`lend`), this many of them.
    lent: Option<usize>,
    /// Some socket waits to be accepted (`waiting`), as of the last dump or update: known
    /// while the sockets are lent, when the table cannot look.
    any_waiting: bool,
    /// The cookie of the last socket waiting to be accepted that was looked up, when not
    /// all of them could be: the next sample goes on from there.
    waiting_after: u64,
    /// This table among all the tables made (`Edits::table`).
    id: u64,
    /// What was written where since the sockets were last lent (none before the first lend).
    since_lend: Option<Since>,
    /// The clocks' aging since the table was made (`Edits::aged_ms`).
    aged_ms: u64,
}

/// What a lending table's sockets are, against those of its last lend: what a loop's peer match
/// patches its last result by (`join::KeptTopology`), instead of matching every socket again.
#[derive(Debug, Clone)]
pub struct Edits {
    /// The table (a dump makes a new one).
    pub table: u64,
    /// This lend, counted from the table's first (0).
    pub lend: u64,
    /// Its sockets now: the first this many of the sample's.
    pub len: usize,
    /// How far the table has moved its sockets' clocks on since it was made (`Table::age`),
    /// in milliseconds: a clock kept from an earlier lend is that much older now.
    pub aged_ms: u64,
    /// What changed since its last lend; `None` at its first.
    pub since: Option<Since>,
}

/// The places of a table's sockets written since its last lend.
#[derive(Debug, Clone, Default)]
pub struct Since {
    /// That lend's number (`Edits::lend`): a patch must start from the match of that one.
    pub lend: u64,
    /// The number of sockets at that lend.
    pub len: usize,
    /// Each place written since, with what it held at the lend (`None`: past the end then).
    pub before: FxHashMap<u32, Option<Socket>>,
}

/// Tables made so far, to tell them apart.
static TABLES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Table {
    /// The table of a whole dump of `states`; the sockets back when one has no stable
    /// cookie (a kernel before 4.1): such a table cannot be kept by events.
    pub fn new(sockets: Vec<Socket>, states: StateSet) -> Result<Table, Vec<Socket>> {
        let mut at = FxHashMap::with_capacity_and_hasher(sockets.len(), Default::default());
        let mut any_waiting = false;
        for (i, s) in sockets.iter().enumerate() {
            match (s.cookie(), u32::try_from(i)) {
                (Some(cookie), Ok(i)) => at.insert(cookie, i),
                _ => return Err(sockets),
            };
            any_waiting |= waits(s);
        }
        Ok(Table {
            sockets,
            at,
            states,
            lent: None,
            any_waiting,
            waiting_after: 0,
            id: TABLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            since_lend: None,
            aged_ms: 0,
        })
    }

    /// The sockets, for a sample to hold until it gives them back (`give_back`): no copy. Until
    /// then the table cannot be updated.
    /// (They come with what changed since the last lend.)
    pub fn lend(&mut self) -> (Vec<Socket>, Edits) {
        let sockets = std::mem::take(&mut self.sockets);
        self.lent = Some(sockets.len());
        let lend = self.since_lend.as_ref().map_or(0, |s| s.lend + 1);
        let since = self.since_lend.replace(Since {
            lend,
            len: sockets.len(),
            before: FxHashMap::default(),
        });
        let edits = Edits {
            table: self.id,
            lend,
            len: sockets.len(),
            aged_ms: self.aged_ms,
            since,
        };
        (sockets, edits)
    }

    /// Notes what place `i` holds before it is written, the first time since the last lend.
    fn touch(&mut self, i: usize) {
        if let (Some(since), Ok(at)) = (self.since_lend.as_mut(), u32::try_from(i)) {
            let sockets = &self.sockets;
            since
                .before
                .entry(at)
                .or_insert_with(|| sockets.get(i).cloned());
        }
    }

    /// Takes back the sockets `lend` gave, as the sample holds them (its clocks maybe read
    /// again, its namespace tagged); false, and the table unusable, if they are not those.
    pub fn give_back(&mut self, sockets: Vec<Socket>) -> bool {
        let same = self.lent == Some(sockets.len())
            && [sockets.first(), sockets.last()]
                .into_iter()
                .flatten()
                .enumerate()
                .all(|(end, s)| {
                    let i = if end == 0 { 0 } else { sockets.len() - 1 };
                    s.cookie()
                        .and_then(|c| self.at.get(&c))
                        .is_some_and(|&at| at as usize == i)
                });
        if same {
            self.sockets = sockets;
            self.lent = None;
        }
        same
    }

    pub fn states(&self) -> StateSet {
        self.states
    }

    pub fn sockets(&self) -> &[Socket] {
        &self.sockets
    }

    /// Moves every socket's clocks on by `ms`.
    pub fn age(&mut self, ms: u32) {
        self.aged_ms += u64::from(ms);
        self.sockets.iter_mut().for_each(|s| s.age(ms));
    }

    /// Brings the table up to date with `pending`, asking `lookup` about each socket that
    /// changed and about each one still waiting to be accepted; returns the lookups made, or
    /// why a dump is needed instead (the table is then left as it was or partly updated: the
    /// caller replaces it).
    pub fn apply(
        &mut self,
        pending: &Pending,
        lookup: &mut dyn FnMut(&Exact) -> Result<Option<Socket>, CollectError>,
    ) -> Result<Result<usize, Redump>, CollectError> {
        if pending.listeners {
            return Ok(Err(Redump::Listener));
        }
        let mut lookups = 0;
        for (&cookie, c) in &pending.latest {
            let shown = TcpState::from_kernel(c.new).is_some_and(|s| self.states.contains(s));
            if !shown {
                self.remove(cookie);
                continue;
            }
            if c.local.port() == 0 {
                return Ok(Err(Redump::NoPort));
            }
            lookups += 1;
            let exact = Exact {
                local: c.local,
                remote: c.remote,
                cookie,
                bound_dev_if: c.bound_dev_if,
            };
            match lookup(&exact)? {
                Some(s) if s.cookie() == Some(cookie) && self.states.contains(s.state) => {
                    self.put(cookie, s)
                }
                _ => self.remove(cookie),
            }
        }
        // At most `WAITING_LOOKUPS` a sample, in turn by cookie, after the last one asked
        // about: a listener that stopped accepting, with thousands in its queue, costs no more.
        let mut waiting: Vec<(u64, u32)> = self
            .waiting()
            .filter_map(|i| Some((self.sockets[i as usize].cookie()?, i)))
            .collect();
        // Those looked up just now may have been accepted since: still counted until the next
        // update, which at worst takes a sample that could have been skipped.
        self.any_waiting = !waiting.is_empty();
        waiting.retain(|(c, _)| !pending.latest.contains_key(c));
        waiting.sort_unstable();
        let from = waiting.partition_point(|&(c, _)| c <= self.waiting_after);
        waiting.rotate_left(from);
        waiting.truncate(WAITING_LOOKUPS);
        self.waiting_after = match waiting.last() {
            Some(&(c, _)) if waiting.len() == WAITING_LOOKUPS => c,
            _ => 0,
        };
        for (_, i) in waiting {
            // A socket bound to a device is not found, and stays as it was (its close is an
            // event of its own).
            let Some(exact) = Exact::of(&self.sockets[i as usize]) else {
                continue;
            };
            lookups += 1;
            if let Some(found) = lookup(&exact)?
                && found.cookie() == Some(exact.cookie)
                && self.states.contains(found.state)
            {
                self.touch(i as usize);
                self.sockets[i as usize] = found;
            }
        }
        Ok(Ok(lookups))
    }

    /// Where the sockets that wait to be accepted (`waits`) are.
    fn waiting(&self) -> impl Iterator<Item = u32> + '_ {
        self.sockets
            .iter()
            .enumerate()
            .filter(|(_, s)| waits(s))
            .map(|(i, _)| i as u32)
    }

    /// Replaces the tcp_info of the socket `cookie`, if the table has it (and has not lent
    /// it: the sample holding it has the new clocks then).
    fn set_clocks(&mut self, cookie: u64, info: Option<TcpInfo>) {
        if let Some(s) = self
            .at
            .get(&cookie)
            .and_then(|&i| self.sockets.get_mut(i as usize))
        {
            s.tcp_info = info;
        }
    }

    fn put(&mut self, cookie: u64, s: Socket) {
        match self.at.get(&cookie) {
            Some(&i) => {
                self.touch(i as usize);
                self.sockets[i as usize] = s;
            }
            None => {
                self.touch(self.sockets.len());
                self.at.insert(cookie, self.sockets.len() as u32);
                self.sockets.push(s);
            }
        }
    }

    fn remove(&mut self, cookie: u64) {
        let Some(i) = self.at.remove(&cookie) else {
            return;
        };
        // The last socket moves into the hole: both places are written.
        self.touch(i as usize);
        self.touch(self.sockets.len().saturating_sub(1));
        self.sockets.swap_remove(i as usize);
        if let Some(moved) = self.sockets.get(i as usize).and_then(Socket::cookie) {
            self.at.insert(moved, i);
        }
    }
}

/// One namespace's table between samples: what the changes keep up to date, and when it was
/// last dumped whole.
#[derive(Debug, Default)]
pub struct Kept {
    table: Option<Table>,
    dumped_at: Option<Instant>,
    updated_at: Option<Instant>,
    /// Samples answered from the table since the last dump.
    looks: u32,
    /// The lookups the last sample made, `None` when it dumped.
    last: Option<usize>,
    /// Samples hold the table's own sockets (`Table::lend`) instead of a copy.
    lends: bool,
    /// What the last lend said of the sockets it lent, until taken (`edits`).
    edits: Option<Edits>,
}

impl Kept {
    /// What the sockets the last update or dump lent are against those of the table's lend
    /// before; `None` when it lent none (a copy, or no table).
    pub fn edits(&mut self) -> Option<Edits> {
        self.edits.take()
    }

    /// The sockets for a sample: lent, with their edits, or a copy.
    fn hand_out(lends: bool, t: &mut Table) -> (Vec<Socket>, Option<Edits>) {
        if lends {
            let (sockets, edits) = t.lend();
            (sockets, Some(edits))
        } else {
            (t.sockets().to_vec(), None)
        }
    }

    /// A table that lends its sockets to each sample instead of copying them: one copy of the
    /// sockets in memory, not two. The sample must give them back (`give_back`) before the
    /// next update, or that update dumps.
    pub fn lending() -> Kept {
        Kept {
            lends: true,
            ..Kept::default()
        }
    }

    /// Takes back the sockets the last sample held, if the table lent them (a table that
    /// copied them has nothing to take back).
    pub fn give_back(&mut self, sockets: Vec<Socket>) {
        if let Some(t) = self.table.as_mut().filter(|t| t.lent.is_some())
            && !t.give_back(sockets)
        {
            self.table = None;
        }
    }

    /// How the last sample was made: `Some(lookups)` from the changes, `None` by a dump.
    pub fn last_lookups(&self) -> Option<usize> {
        self.last
    }

    /// The table, if the changes can bring it up to `now`: there is one, of `states`, holding
    /// its sockets (none lent), no change was lost (`lost`) and no resync is due.
    fn usable(&mut self, states: StateSet, lost: bool, now: Instant) -> Option<&mut Table> {
        self.due(states, lost, now).filter(|t| t.lent.is_none())
    }

    /// `usable`, its sockets lent or not: whether the table holds as it is if nothing changed.
    fn due(&mut self, states: StateSet, lost: bool, now: Instant) -> Option<&mut Table> {
        let resync = self.looks + 1 >= RESYNC_EVERY
            && self
                .dumped_at
                .is_none_or(|at| now.saturating_duration_since(at) >= RESYNC_AFTER);
        if lost || resync || !follows(states) {
            return None;
        }
        self.table.as_mut().filter(|t| t.states() == states)
    }

    /// The table brought to `now` without asking the kernel anything, where nothing changed in
    /// the namespace (`pending` empty or none) and no socket waits to be accepted; `None` where
    /// the kernel must be asked (`update`).
    pub fn quietly(
        &mut self,
        states: StateSet,
        pending: Option<&Pending>,
        lost: bool,
        now: Instant,
    ) -> Option<Vec<Socket>> {
        if pending.is_some_and(|p| !p.is_empty()) || lost || !self.quiet(states, now) {
            return None;
        }
        self.update(None, states, &Pending::default(), lost, now)
            .ok()
    }

    /// Reads again, through `netlink` (a sock_diag socket of the namespace), the tcp_info
    /// clocks of the sockets at `which` of `sockets` (a sample's, of this namespace), into
    /// the sample and the table; nothing when the last sample dumped (its clocks are all
    /// read). Returns how many it read. A socket gone since, or not found (bound to a
    /// device), keeps its clocks: its own change is on its way.
    pub fn fresh_clocks(
        &mut self,
        netlink: &mut NetlinkSource,
        sockets: &mut [Socket],
        which: &[u32],
    ) -> usize {
        let Some(table) = self.table.as_mut().filter(|_| self.last.is_some()) else {
            return 0;
        };
        let mut read = 0;
        for &i in which {
            let Some(s) = sockets.get_mut(i as usize) else {
                continue;
            };
            let Some(exact) = Exact::of(s) else { continue };
            if let Ok(Some(found)) = netlink.lookup(&exact)
                && found.cookie() == Some(exact.cookie)
            {
                s.tcp_info = found.tcp_info;
                table.set_clocks(exact.cookie, found.tcp_info);
                read += 1;
            }
        }
        read
    }

    /// Counts a sample answered from the table as it was (the source saw nothing move).
    pub fn looked(&mut self) {
        self.looks += 1;
    }

    /// True when, if nothing changed in the namespace, its table holds at `now` as it is:
    /// there is one, of `states`, no resync is due and no socket waits to be accepted.
    pub fn quiet(&mut self, states: StateSet, now: Instant) -> bool {
        self.due(states, false, now).is_some_and(|t| !t.any_waiting)
    }

    /// The table brought up to `now` from `pending` (this namespace's changes) and lookups
    /// through `netlink` (a sock_diag socket in the namespace) where it can be, else by a dump
    /// through it. Without `netlink`, only an update that needs no lookup can be made.
    pub fn update(
        &mut self,
        netlink: Option<&mut NetlinkSource>,
        states: StateSet,
        pending: &Pending,
        lost: bool,
        now: Instant,
    ) -> Result<Vec<Socket>, CollectError> {
        let since = self.updated_at;
        let lends = self.lends;
        self.edits = None;
        let mut netlink = netlink;
        if let Some(t) = self.usable(states, lost, now)
            // So many changes that a dump costs less than their lookups.
            && pending.latest.len() <= (t.sockets.len() / LOOKUPS_PER_DUMP).max(MIN_LOOKUPS)
        {
            // The sockets as they were at the last update, brought forward to now; those that
            // changed are then replaced by what the kernel says of them now.
            t.age(since.map_or(0, |at| ms_since(at, now)));
            let applied = t.apply(pending, &mut |exact| match netlink.as_deref_mut() {
                Some(n) => n.lookup(exact),
                None => Err(CollectError::Kernel(std::io::Error::other(
                    "a lookup without a sock_diag socket",
                ))),
            });
            // A lookup that failed (not one that found nothing) is no reason to fail the
            // sample: the dump below says what is there, or why it cannot.
            if let Ok(Ok(lookups)) = applied {
                let (sockets, edits) = Kept::hand_out(lends, t);
                self.edits = edits;
                self.last = Some(lookups);
                self.looks += 1;
                self.updated_at = Some(now);
                return Ok(sockets);
            }
        }
        let Some(netlink) = netlink else {
            return Err(CollectError::Kernel(std::io::Error::other(
                "a dump without a sock_diag socket",
            )));
        };
        let sockets = netlink.sockets(states)?;
        Ok(self.dumped(sockets, states, now))
    }

    /// Starts the table over from a whole dump of `states` made at `now`; the sockets for the
    /// sample (lent, or a copy).
    pub fn dumped(&mut self, sockets: Vec<Socket>, states: StateSet, now: Instant) -> Vec<Socket> {
        let (table, sockets) = match Table::new(sockets, states) {
            Ok(mut t) if follows(states) => {
                let (sockets, edits) = Kept::hand_out(self.lends, &mut t);
                self.edits = edits;
                (Some(t), sockets)
            }
            Ok(t) => {
                self.edits = None;
                (None, t.sockets)
            }
            Err(sockets) => {
                self.edits = None;
                (None, sockets)
            }
        };
        self.table = table;
        self.dumped_at = Some(now);
        self.updated_at = Some(now);
        self.looks = 0;
        self.last = None;
        sockets
    }
}

/// The changes of one drain, split by namespace.
#[derive(Debug, Default)]
pub struct Drain {
    pub by_netns: FxHashMap<u32, Pending>,
    /// Changes were lost (the ring was full) or could not be read: no table holds.
    pub lost: bool,
}

impl Drain {
    /// True when something changed, or may have (changes were lost).
    pub fn moved(&self) -> bool {
        self.lost || self.by_netns.values().any(|p| !p.is_empty())
    }

    /// Takes the changes of `later`, drained after these.
    pub fn merge(&mut self, later: Drain) {
        for (netns, p) in later.by_netns {
            self.by_netns.entry(netns).or_default().merge(p);
        }
        self.lost |= later.lost;
    }

    /// Everything the ring holds now.
    pub fn from(changes: &mut StateChanges) -> Drain {
        let mut drain = Drain::default();
        let by_netns = &mut drain.by_netns;
        let read = changes.drain(|c| by_netns.entry(c.netns).or_default().add(c));
        drain.lost = read.map_or(true, |d| d.lost > 0);
        drain
    }
}

/// sock_diag kept up to date by state-change events (one namespace: shimcheck's own).
pub struct EventSource {
    netlink: NetlinkSource,
    changes: StateChanges,
    kept: Kept,
    /// Whether the last sample still holds, by this namespace's counters.
    still: Stillness,
}

impl EventSource {
    /// Over `netlink`, with the changes of `changes` (loaded for the namespace `netlink`
    /// dumps: every change drained is taken as one of its).
    pub fn new(netlink: NetlinkSource, changes: StateChanges) -> EventSource {
        EventSource {
            netlink,
            changes,
            kept: Kept::lending(),
            still: Stillness::default(),
        }
    }

    /// How the last sample was made: `Some(lookups)` from the changes, `None` by a dump.
    pub fn last_lookups(&self) -> Option<usize> {
        self.kept.last_lookups()
    }

    /// The table brought up to `now`: by the changes where it can be, by a dump where not.
    /// Changes drained before a dump starts are in it; those after stay in the ring.
    fn update(&mut self, states: StateSet) -> Result<Vec<Socket>, CollectError> {
        let counters = Counters::read(Path::new(THREAD_NET));
        let now = Instant::now();
        let drain = Drain::from(&mut self.changes);
        let mut pending = Pending::default();
        for p in drain.by_netns.into_values() {
            pending.merge(p);
        }
        let sockets =
            self.kept
                .update(Some(&mut self.netlink), states, &pending, drain.lost, now)?;
        match counters {
            Some(c) => self.still.dumped(c, states, now),
            None => self.still.forget(),
        }
        Ok(sockets)
    }
}

impl SocketSource for EventSource {
    fn name(&self) -> &'static str {
        "sock_diag"
    }

    fn fresh_clocks(&mut self, sockets: &mut [Socket], which: &[u32]) -> usize {
        self.kept.fresh_clocks(&mut self.netlink, sockets, which)
    }

    fn recycle(&mut self, sockets: Vec<Socket>) {
        self.kept.give_back(sockets);
    }

    fn sockets(&mut self, states: StateSet) -> Result<Vec<Socket>, CollectError> {
        self.update(states)
    }

    fn dump(&mut self, states: StateSet) -> Result<Dump, CollectError> {
        Ok(Dump {
            sockets: self.update(states)?,
            edits: self.kept.edits(),
            ..Dump::default()
        })
    }

    fn still(&mut self, states: StateSet) -> bool {
        Counters::read(Path::new(THREAD_NET))
            .is_some_and(|c| self.still.still(&c, states, Instant::now()))
    }
}
