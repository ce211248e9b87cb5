//! Stage 1, collector, every network namespace (`--all-netns`): find the distinct namespaces
//! through /proc/*/ns/net (and `ip netns` mounts in /run/netns), enter each on a worker thread
//! (`setns` is per thread) and dump there; tag every socket with its namespace inode.
//!
//! `AllNetns` is the `SocketSource` for `--all-netns`. Input: a procfs root and a `StateSet`.
//! Output: a `Dump` of tagged sockets, the namespaces dumped, and warnings for namespaces that
//! could not be looked at or entered.
//!
//! In a loop, each namespace's sockets are kept between samples: by state-change events where
//! BPF may be loaded (`events::Kept`: a namespace where nothing changed is not entered at all,
//! one where something did is entered for lookups of what changed), else by its counters
//! (`counters::LastDump`: a namespace whose counters did not move is not dumped again).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use rustix::fs::{Mode, OFlags};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use rustc_hash::FxHashMap;

use super::counters::{Counters, LastDump};
use super::events::{Drain, Edits, Kept, Pending};
use super::netlink::{NetlinkSource, THREAD_NET};
use super::{CollectError, Dump, SocketSource};
use crate::bpf::events::StateChanges;
use crate::model::{Socket, StateSet, Warning};

/// Where `ip netns add NAME` mounts its namespaces.
pub const IP_NETNS_DIR: &str = "/run/netns";

/// A namespace to dump, and a file that enters it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub inode: u64,
    pub path: PathBuf,
    /// A process living in it (none for an `ip netns` mount nobody uses), for naming by pod.
    pub pid: Option<u32>,
}

/// The network namespace inode behind a `ns/net` link or an `ip netns` mount.
pub fn inode_of(path: &Path) -> Option<u64> {
    rustix::fs::stat(path).ok().map(|st| st.st_ino)
}

/// The namespace this process runs in.
pub fn own(proc_root: &Path) -> Option<u64> {
    inode_of(&proc_root.join("self/ns/net"))
}

/// Every distinct namespace: one entry per inode, entered through the first process found in
/// it, or through its `ip netns` mount. Also returns how many processes' namespaces could not
/// be looked at (permission denied: not root).
pub fn discover(proc_root: &Path, pids: &[u32], ip_netns_dir: &Path) -> (Vec<Target>, usize) {
    let mut seen: BTreeMap<u64, Target> = BTreeMap::new();
    let mut denied = 0;
    for &pid in pids {
        let path = proc_root.join(format!("{pid}/ns/net"));
        match rustix::fs::stat(&path) {
            Ok(st) => {
                seen.entry(st.st_ino).or_insert(Target {
                    inode: st.st_ino,
                    path,
                    pid: Some(pid),
                });
            }
            Err(rustix::io::Errno::ACCESS | rustix::io::Errno::PERM) => denied += 1,
            // Exited since the listing: its namespace, if still used, has other processes.
            Err(_) => {}
        }
    }
    for (inode, name) in ip_netns(ip_netns_dir) {
        seen.entry(inode).or_insert(Target {
            inode,
            path: ip_netns_dir.join(name),
            pid: None,
        });
    }
    (seen.into_values().collect(), denied)
}

/// `ip netns` names by namespace inode.
pub fn ip_netns(dir: &Path) -> BTreeMap<u64, String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            Some((
                inode_of(&e.path())?,
                e.file_name().to_string_lossy().into_owned(),
            ))
        })
        .collect()
}

/// Every network namespace on the node, as one `SocketSource`.
pub struct AllNetns {
    /// A socket in shimcheck's own namespace, which needs no `setns`.
    own: NetlinkSource,
    proc_root: PathBuf,
    ip_netns_dir: PathBuf,
    threads: usize,
    /// Loops: what each namespace keeps between samples, by inode.
    last: Option<FxHashMap<u64, Slot>>,
    /// Loops where BPF may be loaded: the state changes of every namespace...
    changes: Option<StateChanges>,
    /// ... those drained by `still` and not yet applied, and the states of the last sweep.
    held: Drain,
    swept: Option<StateSet>,
    /// The namespace whose table lent its sockets to the last sample, and how many: the
    /// sample's first ones (`recycle` gives them back).
    lent: Option<(u64, usize)>,
}

/// What a loop keeps of one namespace between samples: its table kept by events, or (without
/// them) its last dump and counters.
#[derive(Debug)]
struct Slot {
    kept: Kept,
    last: LastDump,
    /// Kept by events: the namespace's counters as read at its last look, and where they are
    /// read (`None`: shimcheck's own namespace, through this thread).
    seen: Option<Counters>,
    via: Option<Target>,
}

impl Default for Slot {
    /// A table that lends its sockets (`Kept::lending`): the largest namespace's become the
    /// sample's without a copy; the others are copied after them and given back at once.
    fn default() -> Slot {
        Slot {
            kept: Kept::lending(),
            last: LastDump::default(),
            seen: None,
            via: None,
        }
    }
}

impl Slot {
    /// True when the namespace's counters are those of its last look: no segment moved, no
    /// connection opened, nothing hashed or unhashed (`counters`): its sockets, tcp_info
    /// clocks included, are the last look's, older by the time since.
    fn unmoved(&self, proc_root: &Path) -> bool {
        let now = match &self.via {
            None => Counters::read(Path::new(THREAD_NET)),
            Some(t) => counters_via_pid(proc_root, t),
        };
        now.is_some() && now == self.seen
    }
}

impl AllNetns {
    /// Dumps the namespaces of the processes under `proc_root` and those `ip netns` names,
    /// on up to `threads` worker threads; `own` is a sock_diag socket of this namespace. With
    /// `reuse` (loops), a namespace whose counters did not move is answered from its last dump.
    pub fn new(own: NetlinkSource, proc_root: &Path, threads: usize, reuse: bool) -> AllNetns {
        let last = reuse.then(FxHashMap::default);
        AllNetns {
            own,
            proc_root: proc_root.to_path_buf(),
            ip_netns_dir: PathBuf::from(IP_NETNS_DIR),
            threads,
            last,
            changes: None,
            held: Drain::default(),
            swept: None,
            lent: None,
        }
    }

    /// How the last sample got namespace `inode`'s sockets, kept by events: `Some(lookups)`
    /// from its changes (0: nothing changed there, and it was not entered), `None` by a dump
    /// or not at all.
    pub fn last_lookups(&self, inode: u64) -> Option<usize> {
        self.changes.as_ref()?;
        self.last.as_ref()?.get(&inode)?.kept.last_lookups()
    }

    /// A loop's: each namespace's sockets kept by `changes` (loaded for every namespace).
    pub fn with_events(mut self, changes: StateChanges) -> AllNetns {
        self.last.get_or_insert_with(FxHashMap::default);
        self.changes = Some(changes);
        self
    }
}

impl SocketSource for AllNetns {
    fn name(&self) -> &'static str {
        "sock_diag in every network namespace"
    }

    fn fresh_clocks(&mut self, sockets: &mut [Socket], which: &[u32]) -> usize {
        let Some(slots) = self.last.as_mut().filter(|_| self.changes.is_some()) else {
            return 0;
        };
        // The wanted sockets of each namespace, and those namespaces' sockets alone.
        let mut by_netns: FxHashMap<u64, Vec<u32>> = FxHashMap::default();
        for &i in which {
            if let Some(s) = sockets.get(i as usize) {
                by_netns.entry(s.netns).or_default().push(i);
            }
        }
        let mut read = 0;
        for (netns, wanted) in by_netns {
            let Some(slot) = slots.get_mut(&netns) else {
                continue;
            };
            // Shimcheck's own namespace (no target to enter): through its own socket.
            let Some(target) = slot.via.clone() else {
                read += slot.kept.fresh_clocks(&mut self.own, sockets, &wanted);
                continue;
            };
            // Another namespace: looked up from a thread that enters it, and ends.
            read += std::thread::scope(|s| {
                s.spawn(|| {
                    enter(&target).ok()?;
                    let mut netlink = NetlinkSource::open().ok()?;
                    Some(slot.kept.fresh_clocks(&mut netlink, sockets, &wanted))
                })
                .join()
                .ok()
                .flatten()
                .unwrap_or(0)
            });
        }
        read
    }

    /// Kept by events: true when no socket changed state in any namespace since the last
    /// sweep of `states`, no namespace's counters moved, none waits to be accepted and no
    /// namespace is due a resync. (A namespace that appeared holds no socket yet, or its
    /// sockets' changes would say so.)
    fn still(&mut self, states: StateSet) -> bool {
        let (Some(changes), Some(last)) = (self.changes.as_mut(), self.last.as_mut()) else {
            return false;
        };
        let drain = Drain::from(changes);
        let moved = drain.moved();
        self.held.merge(drain);
        let now = Instant::now();
        // The changes say no socket opened, closed or changed state; the counters, that no
        // data moved either (else the clocks of the last sample would not hold).
        let proc_root = &self.proc_root;
        let still = self.swept == Some(states)
            && !moved
            && last
                .values_mut()
                .all(|slot| slot.kept.quiet(states, now) && slot.unmoved(proc_root));
        if still {
            // Each such sample counts toward a resync: what no event reports (the tcp_info
            // clocks of connections that carried data) is refreshed after as many as updates.
            last.values_mut().for_each(|slot| slot.kept.looked());
        }
        still
    }

    fn sockets(&mut self, states: StateSet) -> Result<Vec<Socket>, CollectError> {
        self.dump(states).map(|d| d.sockets)
    }

    fn recycle(&mut self, mut sockets: Vec<Socket>) {
        if let (Some((inode, len)), Some(slots)) = (self.lent.take(), self.last.as_mut())
            && let Some(slot) = slots.get_mut(&inode)
        {
            sockets.truncate(len);
            slot.kept.give_back(sockets);
        }
    }

    fn dump(&mut self, states: StateSet) -> Result<Dump, CollectError> {
        let pids = list_pids(&self.proc_root);
        let (targets, denied) = discover(&self.proc_root, &pids, &self.ip_netns_dir);
        let own_inode = own(&self.proc_root).unwrap_or(0);
        let mut last = self.last.take();
        // Before any dump starts: what changes after stays in the ring for the next sweep.
        let drain = self.changes.as_mut().map(|c| {
            let mut drain = std::mem::take(&mut self.held);
            drain.merge(Drain::from(c));
            drain
        });
        self.swept = Some(states);
        let sweep = Sweep {
            proc_root: &self.proc_root,
            states,
            reuse: last.is_some(),
            drain: drain.as_ref(),
        };
        let Swept {
            sockets,
            lent,
            edits,
            mut warnings,
        } = sweep.run(
            &mut self.own,
            &targets,
            own_inode,
            last.as_mut(),
            self.threads,
        );
        self.last = last;
        self.lent = lent;
        if denied > 0 {
            warnings.push(Warning::NetnsHidden {
                processes: denied,
                lacking: crate::privilege::lacking(crate::privilege::SEE_NETNS),
            });
        }
        Ok(Dump {
            sockets,
            namespaces: targets,
            warnings,
            edits,
        })
    }
}

/// The numeric entries of a procfs root; none when it cannot be listed (the owner scan, which
/// reads the same directory, reports that).
fn list_pids(proc_root: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// What a sweep found: every namespace's sockets, the namespace whose table lent the first
/// of them and how many, what changed in those (`Dump::edits`), and the warnings.
struct Swept {
    sockets: Vec<Socket>,
    lent: Option<(u64, usize)>,
    edits: Option<Edits>,
    warnings: Vec<Warning>,
}

/// One look at every namespace.
struct Sweep<'a> {
    proc_root: &'a Path,
    states: StateSet,
    /// Keep each namespace's dump for the next sweep.
    reuse: bool,
    /// Keep each namespace's table by these changes instead.
    drain: Option<&'a Drain>,
}

impl Sweep<'_> {
    /// The sockets of every target, tagged with their namespace's inode. Shimcheck's own
    /// namespace (`own_inode`) is dumped on the calling thread through `own_source`, without
    /// `setns` (any user may); every other one on fresh worker threads (`threads` of them,
    /// each entering namespace after namespace, then ending, so no thread is left in a
    /// foreign namespace). A namespace whose counters say it holds no TCP socket is not
    /// entered at all; with `last`, one whose counters did not move is answered from its last
    /// dump. A namespace that cannot be entered (not root, or gone) is counted in the returned
    /// warning and left out.
    ///
    /// Kept by events, the namespace with the most sockets lends its table's own (`Slot`):
    /// they come first, and that namespace and their number are returned, for `recycle`,
    /// with what changed in them since that table last lent them (`Dump::edits`).
    fn run(
        &self,
        own_source: &mut NetlinkSource,
        targets: &[Target],
        own_inode: u64,
        last: Option<&mut FxHashMap<u64, Slot>>,
        threads: usize,
    ) -> Swept {
        let failures: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());
        let fail = |inode: u64, e: String| {
            if let Ok(mut f) = failures.lock() {
                f.push((inode, e));
            }
        };
        // A table's sockets keep their tag from one sample to the next: only those new to it
        // are written.
        let tag = |mut sockets: Vec<Socket>, inode: u64| {
            sockets
                .iter_mut()
                .filter(|s| s.netns != inode)
                .for_each(|s| s.netns = inode);
            (inode, sockets)
        };
        let (own, others): (Vec<&Target>, Vec<&Target>) =
            targets.iter().partition(|t| t.inode == own_inode);
        // Each namespace's sockets, apart.
        let mut parts: Vec<(u64, Vec<Socket>)> = Vec::new();
        // Each namespace's last dump is taken out for whoever dumps it, and put back after; a
        // namespace gone since the last sweep is forgotten.
        let mut last = last;
        let mut kept = last
            .as_mut()
            .map(|l| std::mem::take(*l))
            .unwrap_or_default();
        let mut own_last = Vec::new();
        for t in own {
            // This thread is in shimcheck's own namespace: its counters are the thread's.
            let mut slot = kept.remove(&t.inode).unwrap_or_default();
            let counters = Counters::read(Path::new(THREAD_NET));
            let got = match self.drain {
                Some(drain) => {
                    slot.via = None;
                    self.kept_with(t, &mut slot, drain, counters, || Ok(own_source))
                }
                None => self.one_with(counters, &mut slot.last, || {
                    own_source.sockets(self.states).map_err(|e| e.to_string())
                }),
            };
            match got {
                Ok(sockets) => parts.push(tag(sockets, t.inode)),
                Err(e) => {
                    slot = Slot::default();
                    fail(t.inode, e);
                }
            }
            own_last.push((t.inode, slot));
        }
        let slots: Vec<Mutex<Slot>> = others
            .iter()
            .map(|t| Mutex::new(kept.remove(&t.inode).unwrap_or_default()))
            .collect();
        let next = AtomicUsize::new(0);
        let work = || {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let (Some(t), Some(slot)) = (others.get(i), slots.get(i)) else {
                    break;
                };
                let Ok(mut last) = slot.lock() else {
                    fail(
                        t.inode,
                        "a namespace's last dump was lost to a panic".into(),
                    );
                    continue;
                };
                let got = match self.drain {
                    Some(drain) => self.other_kept(t, &mut last, drain),
                    None => self.one(t, &mut last.last),
                };
                match got {
                    Ok(sockets) => out.push(tag(sockets, t.inode)),
                    Err(e) => {
                        *last = Slot::default();
                        fail(t.inode, e);
                    }
                }
            }
            out
        };
        let workers = threads.clamp(1, others.len().max(1));
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers).map(|_| s.spawn(work)).collect();
            for h in handles {
                // A worker that panicked lost its namespaces: say so rather than count less.
                match h.join() {
                    Ok(done) => parts.extend(done),
                    Err(_) => fail(0, "a namespace worker thread panicked".into()),
                }
            }
        });
        let mut slots: FxHashMap<u64, Slot> = others
            .iter()
            .zip(slots)
            .filter_map(|(t, slot)| Some((t.inode, slot.into_inner().ok()?)))
            .chain(own_last)
            .collect();
        // The largest namespace's sockets as they are, the others copied after them.
        let base = (0..parts.len()).max_by_key(|&i| parts[i].1.len());
        let (lent, mut all) = match base {
            Some(i) => {
                let (inode, sockets) = parts.swap_remove(i);
                (Some((inode, sockets.len())), sockets)
            }
            None => (None, Vec::new()),
        };
        let edits = lent
            .and_then(|(inode, _)| slots.get_mut(&inode))
            .and_then(|slot| slot.kept.edits());
        all.reserve(parts.iter().map(|(_, p)| p.len()).sum());
        for (inode, sockets) in parts {
            all.extend_from_slice(&sockets);
            if let Some(slot) = slots.get_mut(&inode) {
                slot.kept.give_back(sockets);
                // Copied: nothing patches a match by them.
                drop(slot.kept.edits());
            }
        }
        if let Some(last) = last {
            *last = slots;
        }
        let failures = failures.into_inner().unwrap_or_default();
        let mut warnings = Vec::new();
        if let Some((inode, first)) = failures.first() {
            warnings.push(Warning::NetnsNotDumped {
                failed: failures.len(),
                total: targets.len(),
                first_inode: *inode,
                first_error: first.clone(),
                lacking: crate::privilege::lacking(crate::privilege::ENTER_NETNS),
            });
        }
        Swept {
            sockets: all,
            lent,
            edits,
            warnings,
        }
    }

    /// One namespace other than shimcheck's own kept by events, on a worker thread: entered
    /// only when something changed in it.
    fn other_kept(
        &self,
        t: &Target,
        slot: &mut Slot,
        drain: &Drain,
    ) -> Result<Vec<Socket>, String> {
        let counters = counters_via_pid(self.proc_root, t);
        slot.via = Some(t.clone());
        let mut source = None;
        self.kept_with(t, slot, drain, counters, || {
            enter(t)?;
            Ok(source.insert(NetlinkSource::open().map_err(|e| e.to_string())?))
        })
    }

    /// One namespace kept by events, its `counters` read just now: untouched where nothing
    /// changed in it, empty without a dump where its counters say it holds no TCP socket,
    /// else brought up to date through the sock_diag socket `netlink` gives (lookups of what
    /// changed, or a dump).
    fn kept_with<'n>(
        &self,
        t: &Target,
        slot: &mut Slot,
        drain: &Drain,
        counters: Option<Counters>,
        netlink: impl FnOnce() -> Result<&'n mut NetlinkSource, String>,
    ) -> Result<Vec<Socket>, String> {
        let now = Instant::now();
        let empty = counters.as_ref().is_some_and(|c| c.sockets() == 0);
        slot.seen = counters;
        let kept = &mut slot.kept;
        let pending = u32::try_from(t.inode)
            .ok()
            .and_then(|i| drain.by_netns.get(&i));
        if let Some(sockets) = kept.quietly(self.states, pending, drain.lost, now) {
            return Ok(sockets);
        }
        if empty {
            kept.dumped(Vec::new(), self.states, now);
            return Ok(Vec::new());
        }
        let none = Pending::default();
        kept.update(
            Some(netlink()?),
            self.states,
            pending.unwrap_or(&none),
            drain.lost,
            now,
        )
        .map_err(|e| e.to_string())
    }

    /// One namespace other than shimcheck's own, on a worker thread.
    fn one(&self, t: &Target, last: &mut LastDump) -> Result<Vec<Socket>, String> {
        let seen_from_pid = counters_via_pid(self.proc_root, t);
        let entered = seen_from_pid.is_none();
        let counters = match seen_from_pid {
            Some(c) => Some(c),
            None => {
                enter(t)?;
                Counters::read(Path::new(THREAD_NET))
            }
        };
        self.one_with(counters, last, || {
            if !entered {
                enter(t)?;
            }
            let mut source = NetlinkSource::open().map_err(|e| e.to_string())?;
            source.sockets(self.states).map_err(|e| e.to_string())
        })
    }

    /// One namespace, given its counters (read just now) and how to dump it.
    fn one_with(
        &self,
        counters: Option<Counters>,
        last: &mut LastDump,
        dump: impl FnOnce() -> Result<Vec<Socket>, String>,
    ) -> Result<Vec<Socket>, String> {
        let now = Instant::now();
        if let Some(c) = &counters
            && let Some(sockets) = self.without_dump(c, last, now)
        {
            return Ok(sockets);
        }
        let sockets = dump()?;
        match counters {
            Some(c) if self.reuse => last.keep(c, self.states, &sockets, Instant::now()),
            _ => last.forget(),
        }
        Ok(sockets)
    }

    /// The namespace's sockets without a dump: its last dump's when its counters did not
    /// move, none when it holds no TCP socket.
    fn without_dump(&self, c: &Counters, last: &mut LastDump, now: Instant) -> Option<Vec<Socket>> {
        if let Some(sockets) = last.reuse(c, self.states, now) {
            return Some(sockets);
        }
        if c.sockets() > 0 {
            return None;
        }
        if self.reuse {
            last.keep(c.clone(), self.states, &[], now);
        }
        Some(Vec::new())
    }
}

/// The counters of a namespace other than shimcheck's own, read through a process living in
/// it: no `setns` needed. The process must still be there (its pid not reused by one in
/// another namespace).
fn counters_via_pid(proc_root: &Path, t: &Target) -> Option<Counters> {
    t.pid.and_then(|pid| {
        let c = Counters::read(&proc_root.join(format!("{pid}/net")))?;
        let still = inode_of(&proc_root.join(format!("{pid}/ns/net")));
        (still == Some(t.inode)).then_some(c)
    })
}

/// Moves this (worker) thread into one namespace.
fn enter(t: &Target) -> Result<(), String> {
    let fd = rustix::fs::open(&t.path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| e.to_string())?;
    move_into_link_name_space(
        rustix::fd::AsFd::as_fd(&fd),
        Some(LinkNameSpaceType::Network),
    )
    .map_err(|e| format!("setns: {e}"))
}
