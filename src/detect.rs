//! Stage 4b, detect: joined samples → findings, what an SRE would conclude from watching
//! `netstat -na | grep 5000 | wc -l` for half an hour, in one look where the kernel's clocks
//! allow it (idle pile-ups, CLOSE_WAIT, port and fd exhaustion) and over a window of samples
//! where only time tells (growth).
//!
//! Input: `Joined` samples, each with its own `taken_at`, and a `DetectConfig`. Output:
//! `Finding`s. Pure: no clock is read here; a sample's timestamp is the only time.
//!
//! A finding is about the client end: when both ends of the connections are on this node the
//! server's sockets are the mirror of the client's and are named in the client's message, not
//! reported again. Server sockets whose clients are elsewhere are grouped by client address.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use rustc_hash::{FxHashMap, FxHashSet};
use serde::Serialize;

use crate::aggregate::{KeptGroups, Mark};
use crate::collect::events::Edits;
use crate::culprits;
use crate::join::{Joined, Tally};
use crate::keyed::{Keyed, Lists, NONE};
use crate::model::{NetnsRef, Sample, Socket, TcpState};

/// Thresholds, as the `--min-growth`, `--window`, `--idle-*` and `--close-wait-min` options
/// set them.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectConfig {
    pub min_growth: usize,
    pub window: Duration,
    pub idle_min_count: usize,
    pub idle_after: Duration,
    pub close_wait_min: usize,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            min_growth: 10,
            window: Duration::from_secs(300),
            idle_min_count: 50,
            idle_after: Duration::from_secs(300),
            close_wait_min: 50,
        }
    }
}

/// Sockets a process must retain of those it had at the window's start for growth to count
/// as a leak: a leak keeps its sockets, a busy client churns them.
pub const MIN_RETAINED: f64 = 0.9;
/// Sample-to-sample increases a growth must be spread over in watch mode, so a pool that
/// opens its connections in one burst and then holds them is not taken for a leak.
pub const MIN_RISES: usize = 3;
/// A grown socket counts as active (a pool growing under load, not a leak) when it carried
/// data after shimcheck first saw it and within the last `window / QUIET_DIVISOR`: a leaked
/// connection goes quiet after its first exchanges and stays so. With the 10 s window of a
/// terminal session that is 2.5 s; with `serve`'s 1 h window, 15 minutes.
pub const QUIET_DIVISOR: u32 = 4;
/// Share of the ephemeral port range one (source, destination) may use before it is flagged.
pub const PORT_RANGE_SHARE: f64 = 0.5;
/// Share of RLIMIT_NOFILE a process may hold before it is flagged (defined with `FdUse`).
pub use crate::model::FD_LIMIT_SHARE;

/// What to do about an idle pile-up of an unknown client.
const IDLE_FIX: &str = "find why the client keeps connections it no longer uses (a new HTTP \
                        client per request is the usual cause); restarting it frees them for \
                        a while";
/// What to do about CLOSE_WAIT sockets of an unknown program.
const CLOSE_WAIT_FIX: &str = "fix the code path that drops connections without closing them; \
                              restarting the process frees the sockets for a while";
/// What to do when one destination uses up the ephemeral ports.
const PORTS_FIX: &str = "stop the process that piles up connections to this destination; \
                         widening net.ipv4.ip_local_port_range only buys time";
/// What to do about a process near its fd limit.
const FD_FIX: &str = "find what the process leaks (shimcheck ports --pid PID); raising \
                      LimitNOFILE only buys time";

/// `Critical` when `critical` holds, else `Warning`.
fn severity(critical: bool) -> Severity {
    if critical {
        Severity::Critical
    } else {
        Severity::Warning
    }
}

/// What kind of trouble a finding reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Growth,
    Idle,
    CloseWait,
    PortExhaustion,
    FdLimit,
}

/// How urgent a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Critical,
}

/// The fields particular to each kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Detail {
    Growth {
        rate_per_min: f64,
        retained: f64,
        /// Of the connections opened within the window: how many went quiet (a leak's
        /// signature), and how many activity could not be judged for (no tcp_info).
        quiet: usize,
        unjudged: usize,
    },
    Idle {
        idle_s_min: u64,
        idle_s_median: u64,
    },
    CloseWait {},
    PortExhaustion {
        used: usize,
        range: usize,
    },
    FdLimit {
        open: u64,
        limit: u64,
    },
}

/// One conclusion, with what to do about it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub kind: Kind,
    pub severity: Severity,
    /// The process the finding is about; null when no visible process holds the sockets.
    pub pid: Option<u32>,
    pub comm: String,
    /// `addr:port` of the other end, or null when the sockets go to many places.
    pub remote: Option<String>,
    /// For a server whose clients are on other hosts: its local listening `addr:port` (the
    /// clients' address is in the message). Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub count: usize,
    /// One sentence a person can act on.
    pub message: String,
    pub remediation: Option<String>,
    /// The network namespace of the sockets; null for a process-wide finding (fd-limit).
    pub netns: Option<NetnsRef>,
    #[serde(flatten)]
    pub detail: Detail,
}

/// Where a process's connections go: one remote endpoint (the client side), or, for a server
/// whose clients are on other hosts, one client address on one local service endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Remote(SocketAddr),
    Clients { local: SocketAddr, from: IpAddr },
}

/// A process, the network namespace of its sockets, and where its connections go: the unit
/// growth and idle findings are about.
pub type PairKey = (u32, u64, Target);

/// The pair keys of socket `i`: one per holder, none for a server end whose client is on
/// this node (the client's finding covers it) or for a socket not ESTABLISHED.
fn pair_keys(j: &Joined<'_>, i: usize, out: &mut Vec<PairKey>) {
    out.clear();
    let s = j.socket(i);
    if s.state != TcpState::Established {
        return;
    }
    let target = if j.listens(i) {
        if j.peer(i).is_some() {
            return;
        }
        Target::Clients {
            local: s.local(),
            from: s.remote().ip(),
        }
    } else {
        Target::Remote(s.remote())
    };
    out.extend(j.owners(i).map(|pid| (pid, s.netns, target)));
}

/// A socket's identity across samples: its cookie, or (from /proc/net, which has none) its
/// 4-tuple folded into a number.
fn identity(s: &Socket) -> u64 {
    s.cookie().unwrap_or_else(|| {
        use std::hash::{Hash, Hasher};
        let mut h = rustc_hash::FxHasher::default();
        (s.local(), s.remote()).hash(&mut h);
        h.finish()
    })
}

fn comm_of(sample: &Sample, pid: u32) -> String {
    sample
        .owners
        .processes
        .get(&pid)
        .map_or_else(|| "?".to_string(), |p| p.comm.clone())
}

/// ", the other ends are held by registry(2811) on this node" when the pair's peers are here.
fn mirror_note(j: &Joined<'_>, sockets: impl Iterator<Item = usize>) -> String {
    let mut peers = Tally::default();
    for i in sockets {
        if let Some(p) = j.peer(i) {
            j.owners(p).for_each(|pid| peers.add(pid));
        }
    }
    let peers = peers.into_counts();
    let Some((&pid, _)) = peers
        .iter()
        .max_by_key(|&(pid, n)| (*n, std::cmp::Reverse(*pid)))
    else {
        return String::new();
    };
    format!(
        "; the other ends are held by {}({pid}) on this node",
        comm_of(j.sample, pid)
    )
}

/// The `remote` field and the words for where the connections go, naming the network
/// namespace when it is not shimcheck's own.
fn describe_target(sample: &Sample, netns: u64, t: &Target) -> (Option<String>, String) {
    let (remote, words) = match t {
        Target::Remote(r) => (Some(r.to_string()), format!("to {r}")),
        Target::Clients { local, from } => (None, format!("from clients at {from} on {local}")),
    };
    if netns == 0 || netns == sample.own_netns {
        return (remote, words);
    }
    let ns = sample.netns_ref(netns);
    let name = ns.name.unwrap_or_else(|| format!("net:[{netns}]"));
    (remote, format!("{words} in network namespace {name}"))
}

/// The local service endpoint of a target that is a server's remote clients.
fn service_of(t: &Target) -> Option<String> {
    match t {
        Target::Remote(_) => None,
        Target::Clients { local, .. } => Some(local.to_string()),
    }
}

/// Attaches a known culprit's diagnosis: the message names the bug, the remediation is the
/// culprit's, and the finding is critical.
fn finish(mut f: Finding, generic_fix: Option<&str>) -> Finding {
    match culprits::lookup(&f.comm) {
        Some(c) => {
            f.message = format!("{}: {}.", f.message, c.bug);
            f.remediation = Some(c.remediation.to_string());
            f.severity = Severity::Critical;
        }
        None => {
            f.message.push('.');
            f.remediation = generic_fix.map(str::to_string);
        }
    }
    f
}

/// A member's clock when the kernel gave none (the /proc/net fallback).
const NO_CLOCK: i64 = i64::MIN;

/// What the detector needs of one sample's sockets: each (process, namespace, destination)
/// pair with its members, their data-idle clocks and the note naming the other ends'
/// holders; each process's CLOSE_WAIT sockets; the client ends per destination and the port
/// findings, which only the sockets decide. Judging it again at a later time, as a loop does
/// when its collector saw nothing move, costs a look per pair instead of a pass over every
/// socket: the clocks all moved on by the sample's `tcp_info_age_ms`.
///
/// A loop keeps it from one sample to the next (`update`): each socket's memberships are kept
/// by its place, so a new sample takes out and puts back only the sockets at the places its
/// kept groups changed (`KeptGroups::changes_since`), and makes anew the notes and facts of
/// the pairs and processes they were in. The clocks age with the table: they are kept less
/// its aging (`Edits::aged_ms`) as of when they were read.
#[derive(Debug, Default)]
pub struct Digest {
    /// Each pair's sockets, with their clocks as kept (`NO_CLOCK` where there is none).
    pairs: Lists<PairKey, i64>,
    /// ", the other ends are held by ..." or nothing, by pair (list slot).
    mirrors: FxHashMap<u32, String>,
    /// Each process's CLOSE_WAIT sockets, and what they make, by list slot. Few sockets are
    /// in CLOSE_WAIT: no room is kept for them by place.
    close_wait: Lists<u32, ()>,
    close_wait_facts: FxHashMap<u32, CloseWaitFacts>,
    /// Client ends (not on a listening port) by destination, and each socket's, by place.
    dests: Keyed<Dest, usize>,
    dest_of: Vec<u32>,
    ports: Vec<Finding>,
    /// The table's clock aging (`Edits::aged_ms`) as of the last sample.
    aged: u64,
    made_with: Option<Mark>,
    /// The last `update` patched the digest before it, rather than made it anew.
    patched: bool,
}

/// The pairs and processes whose sockets changed, whose notes and facts are made anew.
#[derive(Default)]
struct Touched {
    pairs: Vec<u32>,
    close_wait: Vec<u32>,
}

impl Digest {
    /// Every socket of `j` digested.
    /// Nothing is kept by place: a one-shot run never patches it, and a million sockets would
    /// hold 12 MB more.
    pub fn new(j: &Joined<'_>) -> Digest {
        let mut d = Digest::default();
        d.add_all(j);
        d
    }

    /// A loop's digest of `j`, whose clocks a table moved on by `aged` ms since it was made:
    /// each socket's memberships kept by its place, to be patched.
    fn aged(j: &Joined<'_>, aged: u64) -> Digest {
        let n = j.sample.sockets.len();
        let mut d = Digest {
            pairs: Lists::by_place(n),
            close_wait: Lists::by_map(),
            dest_of: vec![NONE; n],
            aged,
            ..Digest::default()
        };
        d.add_all(j);
        d
    }

    /// Puts in every socket of `j`.
    fn add_all(&mut self, j: &Joined<'_>) {
        let n = j.sample.sockets.len();
        let mut touched = Touched::default();
        let mut keys = Vec::new();
        for i in 0..n {
            self.put(j, i, &mut keys, &mut touched);
        }
        self.finish(j, touched);
    }

    /// The digest of `j`, a loop's new sample: `last` (the digest of its last one) brought up
    /// to date at the places the groups' report of `j`, just made, changed (`groups`), when
    /// that report was patched from the one `last` was made alongside; made anew otherwise.
    /// `edits` are those of the table that lent `j`'s sockets.
    pub fn update(
        last: Option<Digest>,
        j: &Joined<'_>,
        groups: &KeptGroups,
        edits: Option<&Edits>,
    ) -> Digest {
        let patchable = last.filter(|d| d.pairs.kept()).and_then(|d| {
            let changed = groups.changes_since(d.made_with, edits)?;
            Some((d, changed, edits?))
        });
        let mut digest = match patchable {
            Some((mut d, changed, edits)) => {
                d.patch(j, changed, edits.aged_ms);
                d.patched = true;
                d
            }
            None => Digest::aged(j, edits.map_or(0, |e| e.aged_ms)),
        };
        digest.made_with = groups.mark(edits);
        digest
    }

    /// Whether the last `update` patched the digest before it (true) or made it anew.
    pub fn patched(&self) -> bool {
        self.patched
    }

    /// Digests again the sockets at `places` of `j`, whose clocks were read anew since
    /// (`Sampler::fresh_clocks`); a digest not kept by place is made anew.
    pub fn recount(&mut self, j: &Joined<'_>, places: &[u32]) {
        if !self.pairs.kept() {
            *self = Digest::new(j);
            return;
        }
        let mut touched = Touched::default();
        let mut keys = Vec::new();
        let n = self.dest_of.len();
        for &i in places.iter().filter(|&&i| (i as usize) < n) {
            self.take(i, &mut touched);
            self.put(j, i as usize, &mut keys, &mut touched);
        }
        self.finish(j, touched);
    }

    /// Takes out the sockets at `changed` (sorted), old and new places alike, and puts in
    /// those of `j`, whose unchanged sockets' clocks moved on to the table's aging `aged`.
    fn patch(&mut self, j: &Joined<'_>, changed: &[u32], aged: u64) {
        let n = j.sample.sockets.len();
        let mut touched = Touched::default();
        let old = self.dest_of.len();
        for &i in changed.iter().filter(|&&i| (i as usize) < old) {
            self.take(i, &mut touched);
        }
        self.pairs.resize(n);
        self.dest_of.resize(n, NONE);
        self.aged = aged;
        let mut keys = Vec::new();
        for &i in changed.iter().filter(|&&i| (i as usize) < n) {
            self.put(j, i as usize, &mut keys, &mut touched);
        }
        self.finish(j, touched);
    }

    /// Adds socket `i` of `j`.
    fn put(&mut self, j: &Joined<'_>, i: usize, keys: &mut Vec<PairKey>, touched: &mut Touched) {
        let s = j.socket(i);
        let Ok(place) = u32::try_from(i) else {
            return;
        };
        if s.state == TcpState::CloseWait {
            for pid in j.owners(i) {
                touched.close_wait.push(self.close_wait.add(place, pid, ()));
            }
        }
        if s.state != TcpState::Listen && !j.listens(i) {
            let slot = self.dests.slot(dest(s));
            if let Some(n) = self.dests.get_mut(slot) {
                *n += 1;
            }
            if let Some(at) = self.dest_of.get_mut(i) {
                *at = slot;
            }
        }
        pair_keys(j, i, keys);
        if keys.is_empty() {
            return;
        }
        let aging = self.aging();
        let clock = s
            .tcp_info
            .map_or(NO_CLOCK, |t| i64::from(t.data_idle_ms()) - aging);
        for k in keys.iter() {
            touched.pairs.push(self.pairs.add(place, *k, clock));
        }
    }

    /// Takes out the socket at place `i`.
    fn take(&mut self, i: u32, touched: &mut Touched) {
        let mirrors = &mut self.mirrors;
        self.pairs.remove(i, &mut |slot, gone| match gone {
            true => drop(mirrors.remove(&slot)),
            false => touched.pairs.push(slot),
        });
        let facts = &mut self.close_wait_facts;
        self.close_wait.remove(i, &mut |slot, gone| match gone {
            true => drop(facts.remove(&slot)),
            false => touched.close_wait.push(slot),
        });
        let Some(slot) = self.dest_of.get_mut(i as usize) else {
            return;
        };
        let slot = std::mem::replace(slot, NONE);
        if let Some(n) = self.dests.get_mut(slot) {
            *n -= 1;
            if *n == 0 {
                self.dests.free(slot);
            }
        }
    }

    /// Makes anew the notes of the pairs and the facts of the processes `touched`, and the
    /// port findings.
    fn finish(&mut self, j: &Joined<'_>, mut touched: Touched) {
        touched.pairs.sort_unstable();
        touched.pairs.dedup();
        for slot in touched.pairs {
            if let Some((_, list)) = self.pairs.at(slot) {
                let note = mirror_note(j, list.places.iter().map(|&i| i as usize));
                self.mirrors.insert(slot, note);
            }
        }
        touched.close_wait.sort_unstable();
        touched.close_wait.dedup();
        for slot in touched.close_wait {
            if let Some(&(pid, ref list)) = self.close_wait.at(slot)
                && let Some(facts) = close_wait_facts(j.sample, pid, &list.places)
            {
                self.close_wait_facts.insert(slot, facts);
            }
        }
        self.ports = port_exhaustion(j, self.dests.iter().map(|(_, &(d, n))| (d, n)));
    }

    /// How far the table aged the clocks (a sum of the milliseconds between samples: far from
    /// `i64::MAX`).
    fn aging(&self) -> i64 {
        i64::try_from(self.aged).unwrap_or(i64::MAX)
    }

    /// A member's clock as kept, as the sample's sockets give it now.
    fn clock_now(&self, kept: i64) -> Option<u64> {
        (kept != NO_CLOCK).then(|| {
            let now = kept.saturating_add(self.aging());
            // The table's clocks stop at the kernel's 32 bits.
            u64::try_from(now).unwrap_or(0).min(u64::from(u32::MAX))
        })
    }

    /// The members of `key`'s pair, by place, and its note.
    fn pair(&self, key: &PairKey) -> Option<(&[u32], &str)> {
        let slot = self.pairs.slot_of(key)?;
        let (_, list) = self.pairs.at(slot)?;
        let note = self.mirrors.get(&slot).map_or("", String::as_str);
        Some((&list.places, note))
    }

    /// Each pair and how many sockets it has.
    fn pair_counts(&self) -> impl Iterator<Item = (PairKey, u32)> + '_ {
        self.pairs
            .iter()
            .map(|(_, (key, list))| (*key, list.places.len() as u32))
    }

    /// Every finding for `sample` (the digest's, brought forward or not): growth from the
    /// history when there is one, then what the sample shows by itself, most severe first.
    pub fn findings(
        &self,
        sample: &Sample,
        history: Option<&History>,
        cfg: &DetectConfig,
    ) -> Vec<Finding> {
        let mut out = history
            .map(|h| h.judge(self, sample, cfg))
            .unwrap_or_default();
        out.extend(self.snapshot(sample, cfg));
        out.sort_by(|a, b| {
            b.severity
                .cmp(&a.severity)
                .then(a.kind.cmp(&b.kind))
                .then(b.count.cmp(&a.count))
                .then(a.pid.cmp(&b.pid))
        });
        out
    }

    /// Findings the sample shows by itself: idle pile-ups, CLOSE_WAIT, ephemeral ports and fd
    /// limits running out.
    fn snapshot(&self, sample: &Sample, cfg: &DetectConfig) -> Vec<Finding> {
        let mut out = Vec::new();
        // Idle: many connections from one process to one place, none carrying data for a
        // while. A member's clock now is its clock as dumped plus the sample's age.
        let idle_ms = u64::try_from(cfg.idle_after.as_millis()).unwrap_or(u64::MAX);
        let age = sample.tcp_info_age_ms;
        // In the pairs' order, so that findings equal in all they are sorted by keep it.
        let mut pairs: Vec<(PairKey, u32, &[i64])> = self
            .pairs
            .iter()
            .filter(|(_, (_, list))| list.places.len() >= cfg.idle_min_count.max(1))
            .map(|(slot, (key, list))| (*key, slot, &list.data[..]))
            .collect();
        pairs.sort_unstable_by_key(|p| p.0);
        for (key, slot, clocks) in pairs {
            let quiet = |ms: &u64| ms.saturating_add(age) >= idle_ms;
            let clocks = clocks.iter().filter_map(|&kept| self.clock_now(kept));
            // Counted first: most pairs have too few idle members to be looked at closer.
            let n = clocks.clone().filter(quiet).count();
            if n < cfg.idle_min_count || n == 0 {
                continue;
            }
            let mut idle: Vec<u64> = clocks.filter(quiet).collect();
            let (below, &mut median, _) = idle.select_nth_unstable(n / 2);
            let min = below.iter().copied().min().unwrap_or(median);
            let mirror = self.mirrors.get(&slot).map_or("", String::as_str);
            let (pid, netns, target) = key;
            let comm = comm_of(sample, pid);
            let (remote, where_) = describe_target(sample, netns, &target);
            let min_s = min.saturating_add(age) / 1000;
            let median_s = median.saturating_add(age) / 1000;
            out.push(finish(
                Finding {
                    kind: Kind::Idle,
                    severity: severity(idle.len() >= 1000),
                    pid: Some(pid),
                    message: format!(
                        "{comm}({pid}) holds {} connections {where_} that carried no data for \
                         at least {} (median {}){}",
                        idle.len(),
                        human(min_s),
                        human(median_s),
                        mirror
                    ),
                    comm,
                    remote,
                    service: service_of(&target),
                    count: idle.len(),
                    remediation: None,
                    netns: Some(sample.netns_ref(netns)),
                    detail: Detail::Idle {
                        idle_s_min: min_s,
                        idle_s_median: median_s,
                    },
                },
                Some(IDLE_FIX),
            ));
        }
        // One a process: `findings` sorts them by it.
        out.extend(
            self.close_wait_facts
                .values()
                .filter(|f| f.count >= cfg.close_wait_min)
                .map(|f| close_wait_finding(sample, f, cfg)),
        );
        out.extend(self.ports.iter().cloned());
        out.extend(fd_limits(sample));
        out
    }
}

/// Findings one sample shows by itself: idle pile-ups, CLOSE_WAIT, ephemeral ports and fd
/// limits running out.
pub fn snapshot_findings(j: &Joined<'_>, cfg: &DetectConfig) -> Vec<Finding> {
    Digest::new(j).snapshot(j.sample, cfg)
}

/// One process's CLOSE_WAIT sockets: how many, where to (when one place), in which namespace
/// (when one).
#[derive(Debug, Clone)]
struct CloseWaitFacts {
    pid: u32,
    count: usize,
    remote: Option<String>,
    netns: Option<NetnsRef>,
}

fn close_wait_facts(sample: &Sample, pid: u32, members: &[u32]) -> Option<CloseWaitFacts> {
    let sockets = &sample.sockets;
    let at = |i: &u32| sockets.get(*i as usize);
    // One remote (namespace) when every member's is the first's: no set of them.
    let first = at(members.first()?)?;
    let all = |same: &dyn Fn(&Socket) -> bool| members.iter().filter_map(at).all(same);
    Some(CloseWaitFacts {
        pid,
        count: members.len(),
        remote: all(&|s| s.remote() == first.remote()).then(|| first.remote().to_string()),
        netns: all(&|s| s.netns == first.netns).then(|| sample.netns_ref(first.netns)),
    })
}

/// CLOSE_WAIT: the peer hung up and the application never called close().
fn close_wait_finding(sample: &Sample, f: &CloseWaitFacts, cfg: &DetectConfig) -> Finding {
    let pid = f.pid;
    let comm = comm_of(sample, pid);
    finish(
        Finding {
            kind: Kind::CloseWait,
            severity: severity(f.count >= cfg.close_wait_min * 10),
            pid: Some(pid),
            message: format!(
                "{comm}({pid}) holds {} CLOSE_WAIT sockets{}: their peers closed and the \
                 application never called close()",
                f.count,
                f.remote
                    .as_deref()
                    .map(|r| format!(" to {r}"))
                    .unwrap_or_default()
            ),
            comm,
            remote: f.remote.clone(),
            service: None,
            count: f.count,
            remediation: None,
            netns: f.netns.clone(),
            detail: Detail::CloseWait {},
        },
        Some(CLOSE_WAIT_FIX),
    )
}

/// The local ports one (source address, destination) pair occupies, and who holds them.
#[derive(Default)]
struct DestUse {
    ports: FxHashSet<u16>,
    holders: FxHashMap<u32, usize>,
}

/// A connection's source address and destination, in its namespace: what a local port is
/// taken from.
type Dest = (u64, IpAddr, SocketAddr);

fn dest(s: &Socket) -> Dest {
    (s.netns, s.local().ip(), s.remote())
}

/// Connections from one source address to one destination using half the ephemeral range.
/// `dests` counts the client ends (those not on a listening port) per destination.
fn port_exhaustion(j: &Joined<'_>, dests: impl Iterator<Item = (Dest, usize)>) -> Vec<Finding> {
    let Some((lo, hi)) = j.sample.host.port_range else {
        return Vec::new();
    };
    let range = usize::from(hi.saturating_sub(lo)) + 1;
    let enough = PORT_RANGE_SHARE * range as f64;
    // A destination uses no more ports than it has sockets: only the destinations with enough
    // have their ports and holders looked at, in a second pass.
    let mut by_dest: FxHashMap<Dest, DestUse> = dests
        .filter(|&(_, n)| n as f64 >= enough)
        .map(|(d, _)| (d, DestUse::default()))
        .collect();
    if !by_dest.is_empty() {
        let client_ends = j
            .sample
            .sockets
            .iter()
            .enumerate()
            .filter(|&(i, s)| s.state != TcpState::Listen && !j.listens(i));
        for (i, s) in client_ends {
            if let Some(e) = by_dest.get_mut(&dest(s)) {
                e.ports.insert(s.local().port());
                for pid in j.owners(i) {
                    *e.holders.entry(pid).or_default() += 1;
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut dests: Vec<_> = by_dest.into_iter().collect();
    dests.sort_by_key(|(k, _)| *k);
    for ((netns, src, dst), DestUse { ports, holders }) in dests {
        let used = ports.len();
        if (used as f64) < PORT_RANGE_SHARE * range as f64 {
            continue;
        }
        let pid = holders
            .iter()
            .max_by_key(|&(pid, n)| (*n, std::cmp::Reverse(*pid)))
            .map(|(p, _)| *p);
        let (comm, held_by) = match pid {
            Some(pid) => {
                let comm = comm_of(j.sample, pid);
                let held_by = format!("most held by {comm}({pid})");
                (comm, held_by)
            }
            None => ("?".to_string(), "held by no visible process".to_string()),
        };
        let pct = used * 100 / range;
        out.push(finish(
            Finding {
                kind: Kind::PortExhaustion,
                severity: severity(used * 10 >= range * 9),
                pid,
                message: format!(
                    "connections from {src} to {dst} use {used} of the {range} ephemeral ports \
                     ({pct}%), {held_by}; new connections to {dst} will fail with \"cannot \
                     assign requested address\""
                ),
                comm,
                remote: Some(dst.to_string()),
                service: None,
                count: used,
                remediation: None,
                netns: Some(j.sample.netns_ref(netns)),
                detail: Detail::PortExhaustion { used, range },
            },
            Some(PORTS_FIX),
        ));
    }
    out
}

/// Processes holding most of their RLIMIT_NOFILE.
fn fd_limits(sample: &Sample) -> Vec<Finding> {
    let mut out = Vec::new();
    for (&pid, fds) in &sample.host.fds {
        let Some(limit) = fds.limit.filter(|_| fds.near_limit()) else {
            continue;
        };
        let comm = comm_of(sample, pid);
        out.push(finish(
            Finding {
                kind: Kind::FdLimit,
                severity: severity(fds.open * 100 >= limit * 95),
                pid: Some(pid),
                message: format!(
                    "{comm}({pid}) has {} of its {limit} allowed open files ({}%); it will soon \
                     fail with \"too many open files\"",
                    fds.open,
                    fds.open * 100 / limit
                ),
                comm,
                remote: None,
                service: None,
                count: fds.open as usize,
                remediation: None,
                netns: None,
                detail: Detail::FdLimit {
                    open: fds.open,
                    limit,
                },
            },
            Some(FD_FIX),
        ));
    }
    out
}

fn human(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

/// The window of samples growth is judged on. Memory stays bounded: per sample only the
/// count of each (process, destination) pair is kept, and per socket only when it was first
/// seen, for the sockets open now.
///
/// When a socket was first seen is kept by its place in the sample last observed. A loop
/// whose groups are kept (`KeptGroups`) brings it up to date at the places they changed;
/// otherwise it is carried over, by the sockets' identities, from the sample before.
#[derive(Debug, Clone)]
pub struct History {
    window: Duration,
    min_rises: usize,
    /// Against a baseline the sockets opened since were all first seen in the last sample, so
    /// their activity is judged by their quiet time alone.
    baseline: bool,
    samples: VecDeque<(SystemTime, FxHashMap<PairKey, u32>)>,
    /// Per socket of the sample last observed, by place: its identity (`identity`) and when
    /// it was first seen, in nanoseconds since the epoch; (0, 0) for a socket in no pair.
    seen: Vec<(u64, u64)>,
    /// The groups' report the places were brought up to alongside (`observe_digest`).
    made_with: Option<Mark>,
}

/// `t` in nanoseconds since the epoch, never 0 (`History::seen`'s "not seen").
fn nanos(t: SystemTime) -> u64 {
    let ns = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    ns.max(1)
}

impl History {
    /// A history judging growth over `window`, requiring the rise to be spread over at least
    /// `min_rises` sample-to-sample increases.
    pub fn new(window: Duration, min_rises: usize) -> History {
        History {
            window,
            min_rises,
            baseline: false,
            samples: VecDeque::new(),
            seen: Vec::new(),
            made_with: None,
        }
    }

    /// A history of two samples, a baseline snapshot and now: the baseline is the window's
    /// start however long ago, and one rise is enough.
    pub fn against_baseline() -> History {
        History {
            baseline: true,
            ..History::new(Duration::MAX, 1)
        }
    }

    /// Adds a sample (at its own `taken_at`) and forgets what fell out of the window.
    pub fn observe(&mut self, j: &Joined<'_>) {
        let mut counts: FxHashMap<PairKey, u32> = FxHashMap::default();
        let mut keys = Vec::new();
        for i in 0..j.sample.sockets.len() {
            pair_keys(j, i, &mut keys);
            for k in &keys {
                *counts.entry(*k).or_default() += 1;
            }
        }
        self.carry(j, None);
        self.made_with = None;
        self.push(j.sample.taken_at, counts);
    }

    /// `observe` for a sample already digested (a loop digests every new sample): the pairs'
    /// counts are the digest's, so no socket's pairs are worked out twice. `groups` made the
    /// loop's report of the sample, whose sockets were lent with `edits`: when it was patched
    /// from the report of the sample observed before, only the places it changed are looked
    /// at again.
    pub fn observe_digest(
        &mut self,
        digest: &Digest,
        j: &Joined<'_>,
        groups: &KeptGroups,
        edits: Option<&Edits>,
    ) {
        self.carry(j, groups.changes_since(self.made_with, edits));
        self.made_with = groups.mark(edits);
        let counts = digest.pair_counts().collect();
        self.push(j.sample.taken_at, counts);
    }

    /// Brings `seen` up to `j`: at the places `changed` (sorted), or at every place. A socket
    /// in a pair is first seen now unless it was at one of those places before (a table moves
    /// a socket when it takes one out); a socket in no pair is forgotten.
    fn carry(&mut self, j: &Joined<'_>, changed: Option<&[u32]>) {
        let n = j.sample.sockets.len();
        let now = nanos(j.sample.taken_at);
        let mut before: Vec<(u64, u64)> = match changed {
            Some(places) => places
                .iter()
                .filter_map(|&p| self.seen.get(p as usize).copied())
                .filter(|&(_, at)| at != 0)
                .collect(),
            None => std::mem::take(&mut self.seen)
                .into_iter()
                .filter(|&(_, at)| at != 0)
                .collect(),
        };
        crate::join::radix_sort_by_key(&mut before, |&(id, _)| id);
        self.seen.resize(n, (0, 0));
        self.seen.truncate(n);
        let mut keys = Vec::new();
        let mut fill = |seen: &mut [(u64, u64)], i: usize| {
            pair_keys(j, i, &mut keys);
            seen[i] = match keys.is_empty() {
                true => (0, 0),
                false => {
                    let id = identity(j.socket(i));
                    let at = before
                        .binary_search_by_key(&id, |&(id, _)| id)
                        .map_or(now, |k| before[k].1);
                    (id, at)
                }
            };
        };
        match changed {
            Some(places) => places
                .iter()
                .filter(|&&p| (p as usize) < n)
                .for_each(|&p| fill(&mut self.seen, p as usize)),
            None => (0..n).for_each(|i| fill(&mut self.seen, i)),
        }
    }

    /// When the socket at place `i` of the sample last observed was first seen; `None` for
    /// a socket in no (process, namespace, destination) pair.
    pub fn first_seen(&self, i: usize) -> Option<SystemTime> {
        self.seen
            .get(i)
            .filter(|&&(_, at)| at != 0)
            .map(|&(_, at)| SystemTime::UNIX_EPOCH + Duration::from_nanos(at))
    }

    /// Adds a sample whose sockets and owners are the last one's (a loop whose collector saw
    /// nothing move): the same counts, no socket first seen now.
    pub fn observe_same(&mut self, t: SystemTime) {
        if let Some((_, last)) = self.samples.back() {
            let counts = last.clone();
            self.push(t, counts);
        }
    }

    /// Appends a sample's counts and forgets what fell out of the window, keeping the newest
    /// sample at or before the window's start: it is the baseline.
    fn push(&mut self, t: SystemTime, counts: FxHashMap<PairKey, u32>) {
        self.samples.push_back((t, counts));
        let start = t.checked_sub(self.window).unwrap_or(SystemTime::UNIX_EPOCH);
        while self.samples.len() > 2 && self.samples[1].0 <= start {
            self.samples.pop_front();
        }
    }

    /// Number of samples held (bounded by the window).
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True before the first sample.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Growth findings for the newest sample, which must be the one last observed.
    pub fn growth(&self, j: &Joined<'_>, cfg: &DetectConfig) -> Vec<Finding> {
        self.judge(&Digest::new(j), j.sample, cfg)
    }

    /// The sockets whose tcp_info clocks decide the growth findings of the newest sample
    /// observed, by place, sorted: those opened within the window, of the pairs that rose
    /// enough, kept what they had and rose often enough (`rising`). A loop whose collector aged
    /// clocks instead of reading them (`collect::events`) reads these again before judging.
    pub fn clocks_wanted(&self, digest: &Digest, cfg: &DetectConfig) -> Vec<u32> {
        let mut wanted: Vec<u32> = self
            .rising(digest, cfg)
            .into_iter()
            .flat_map(|r| r.young)
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        wanted
    }

    /// The pairs that rose enough, kept what they had and rose often enough: everything a
    /// growth finding needs but the activity of the sockets opened since the window's start.
    fn rising<'d>(&'d self, digest: &'d Digest, cfg: &DetectConfig) -> Vec<Rising<'d>> {
        let (Some((t0, base)), Some((t1, now))) = (self.samples.front(), self.samples.back())
        else {
            return Vec::new();
        };
        if self.samples.len() < 2 {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut grown: Vec<(&PairKey, &u32)> = now.iter().collect();
        grown.sort();
        for (key, &count) in grown {
            let start = base.get(key).copied().unwrap_or(0);
            let rise = count.saturating_sub(start) as usize;
            if rise < cfg.min_growth {
                continue;
            }
            // The pair's sockets open now that were already open at the window's start, and
            // the ones opened since.
            let (members, mirror) = digest.pair(key).unwrap_or((&[], ""));
            let mut kept = 0u32;
            let mut young = Vec::new();
            for &i in members {
                let seen = self.first_seen(i as usize).unwrap_or(*t1);
                if seen <= *t0 {
                    kept += 1;
                } else {
                    young.push(i);
                }
            }
            let retained = if start == 0 {
                1.0
            } else {
                f64::from(kept) / f64::from(start)
            };
            if retained < MIN_RETAINED {
                continue;
            }
            let rises = self
                .samples
                .iter()
                .zip(self.samples.iter().skip(1))
                .filter(|(a, b)| {
                    b.1.get(key).copied().unwrap_or(0) > a.1.get(key).copied().unwrap_or(0)
                })
                .count();
            if rises < self.min_rises {
                continue;
            }
            out.push(Rising {
                key,
                start,
                count,
                retained,
                mirror,
                young,
            });
        }
        out
    }

    /// Growth findings for the newest sample observed, whose sockets `digest` describes. Only
    /// the pairs that rose enough are looked at socket by socket.
    fn judge(&self, digest: &Digest, sample: &Sample, cfg: &DetectConfig) -> Vec<Finding> {
        let (Some((t0, _)), Some((t1, _))) = (self.samples.front(), self.samples.back()) else {
            return Vec::new();
        };
        let elapsed = t1.duration_since(*t0).unwrap_or_default();
        let minutes = (elapsed.as_secs_f64() / 60.0).max(1.0 / 60.0);
        // Against a baseline the span is the time since the snapshot, however short.
        let quiet_after = if self.baseline {
            cfg.window.min(elapsed) / QUIET_DIVISOR
        } else {
            cfg.window / QUIET_DIVISOR
        };
        let mut out = Vec::new();
        for r in self.rising(digest, cfg) {
            let (key, start, count, retained, mirror) =
                (r.key, r.start, r.count, r.retained, r.mirror);
            let rise = count.saturating_sub(start) as usize;
            // How the ones opened since behave.
            let mut a = Activity::default();
            for &i in &r.young {
                let s = &sample.sockets[i as usize];
                let seen = self.first_seen(i as usize).unwrap_or(*t1);
                a.add(self.activity(sample.data_idle_ms(s), *t1, seen, quiet_after));
            }
            // A pool growing under load keeps using its new connections; a leak's go quiet.
            // Where the kernel gave no tcp_info (/proc/net/tcp), activity is not judged.
            if a.judged() > 0 && a.quiet + a.unjudged < cfg.min_growth {
                continue;
            }
            let (pid, netns, target) = *key;
            let comm = comm_of(sample, pid);
            let (remote, where_) = describe_target(sample, netns, &target);
            let rate = rise as f64 / minutes;
            let activity = if a.judged() == 0 {
                " (whether they carry data could not be judged: no tcp_info)".to_string()
            } else {
                format!(
                    "; {} of the {} opened since went quiet after their first exchanges",
                    a.quiet,
                    a.judged()
                )
            };
            out.push(finish(
                Finding {
                    kind: Kind::Growth,
                    severity: severity(count >= 1000),
                    pid: Some(pid),
                    message: format!(
                        "{comm}({pid}) went from {start} to {count} connections {where_} in {} \
                         ({rate:.1}/min) and kept {:.0}% of those it had{activity}{}",
                        human(elapsed.as_secs()),
                        retained * 100.0,
                        mirror
                    ),
                    comm,
                    remote,
                    service: service_of(&target),
                    count: count as usize,
                    remediation: None,
                    netns: Some(sample.netns_ref(netns)),
                    detail: Detail::Growth {
                        rate_per_min: (rate * 10.0).round() / 10.0,
                        retained: (retained * 1000.0).round() / 1000.0,
                        quiet: a.quiet,
                        unjudged: a.unjudged,
                    },
                },
                None,
            ));
        }
        out
    }
}

/// A pair that rose enough, kept what it had and rose often enough (`History::rising`).
struct Rising<'d> {
    key: &'d PairKey,
    start: u32,
    count: u32,
    retained: f64,
    mirror: &'d str,
    /// Its sockets opened since the window's start.
    young: Vec<u32>,
}

/// How one socket opened within the window behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Carried data recently, after shimcheck first saw it.
    Active,
    /// Silent since it was opened, or long enough: the leak's signature. A socket first seen
    /// in this very sample cannot have shown activity yet and counts here too, so a leak is
    /// flagged as soon as it has grown enough.
    Quiet,
    /// No tcp_info (the /proc/net/tcp fallback).
    Unjudged,
}

/// The sockets of one pair opened within the window, by `Use`.
#[derive(Debug, Clone, Copy, Default)]
struct Activity {
    active: usize,
    quiet: usize,
    unjudged: usize,
}

impl Activity {
    fn add(&mut self, u: Use) {
        match u {
            Use::Active => self.active += 1,
            Use::Quiet => self.quiet += 1,
            Use::Unjudged => self.unjudged += 1,
        }
    }

    fn judged(&self) -> usize {
        self.active + self.quiet
    }
}

impl History {
    /// Judges a socket opened within the window, at `now`, first seen at `seen`: active when
    /// its data clock (the smaller of last-sent and last-received) is younger than both its
    /// time under watch and `quiet_after`. Against a baseline, when it was opened is unknown:
    /// `quiet_after` (a quarter of the time since the snapshot, at most) alone decides.
    fn activity(
        &self,
        idle_ms: Option<u64>,
        now: SystemTime,
        seen: SystemTime,
        quiet_after: Duration,
    ) -> Use {
        let Some(idle_ms) = idle_ms else {
            return Use::Unjudged;
        };
        let idle = Duration::from_millis(idle_ms);
        let watched = now.duration_since(seen).unwrap_or_default();
        let bound = if self.baseline {
            quiet_after
        } else {
            watched.min(quiet_after)
        };
        if idle < bound {
            Use::Active
        } else {
            Use::Quiet
        }
    }
}

/// Every finding for the newest sample: growth from the history (when there is one) and what
/// the sample shows by itself, most severe first.
pub fn findings(j: &Joined<'_>, history: Option<&History>, cfg: &DetectConfig) -> Vec<Finding> {
    Digest::new(j).findings(j.sample, history, cfg)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::{OwnerIndex, TcpInfo};

    const LOOPBACK: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

    /// Connections of process 100 to 10.0.0.9:5000 in namespaces 1 and 2 (`per`), listed
    /// namespace 2 first; the first two of each in CLOSE_WAIT. Idle for an hour.
    fn sample(per: u64) -> Sample {
        let mut sockets = Vec::new();
        for (ns, at) in [(2u64, 0u64), (1, 1)] {
            for c in 0..per {
                let state = match c < 2 {
                    true => TcpState::CloseWait,
                    false => TcpState::Established,
                };
                let local = SocketAddr::from(([10, 0, 0, 1], 40_000 + c as u16));
                let mut s = Socket::new(state, local, "10.0.0.9:5000".parse().unwrap_or(local));
                (s.inode, s.netns) = (1 + at * per + c, ns);
                s.tcp_info = Some(TcpInfo {
                    last_data_sent_ms: 3_600_000,
                    last_data_recv_ms: 3_600_000,
                    ..TcpInfo::default()
                });
                sockets.push(s);
            }
        }
        let pairs = sockets.iter().map(|s| (s.inode, 100)).collect();
        let mut s = Sample::of(sockets, pairs);
        s.host.port_range = Some((40_000, 40_009));
        s
    }

    #[test]
    fn findings_equal_in_all_but_their_namespace_come_in_the_namespaces_order() {
        // Both pairs have as many idle connections: the finding of namespace 1 comes first,
        // though its sockets were listed last.
        let s = sample(6);
        let cfg = DetectConfig {
            idle_min_count: 2,
            ..DetectConfig::default()
        };
        let idle: Vec<Option<u64>> = findings(&Joined::new(&s), None, &cfg)
            .into_iter()
            .filter(|f| f.kind == Kind::Idle)
            .map(|f| f.netns.map(|n| n.inode))
            .collect();
        assert_eq!(idle, [Some(1), Some(2)]);
    }

    #[test]
    fn a_pair_that_loses_a_member_is_noted_anew() {
        // Process 100's four connections to 127.0.0.1:5000, whose server ends 200 and 201
        // hold two each: the note names 200 (the lower pid of a tie). One of 200's closes, its
        // places taken by another process's listener: 201 holds most of the other ends now.
        let end = |state, local: &str, remote: &str, inode| {
            let mut s = Socket::new(
                state,
                local.parse().unwrap_or(LOOPBACK),
                remote.parse().unwrap_or(LOOPBACK),
            );
            (s.inode, s.netns) = (inode, 1);
            s.tcp_info = Some(TcpInfo::default());
            s
        };
        let est = TcpState::Established;
        let mut sockets: Vec<Socket> = (0..4u64)
            .map(|c| {
                end(
                    est,
                    &format!("127.0.0.1:{}", 40_000 + c),
                    "127.0.0.1:5000",
                    10 + c,
                )
            })
            .collect();
        sockets.extend((0..4u64).map(|c| {
            end(
                est,
                "127.0.0.1:5000",
                &format!("127.0.0.1:{}", 40_000 + c),
                20 + c,
            )
        }));
        let mut pairs: Vec<(u64, u32)> = (10..14).map(|i| (i, 100)).collect();
        pairs.extend([(20, 200), (21, 201), (22, 200), (23, 201)]);
        let mut before = sample(0);
        (before.sockets, before.owners) = (
            sockets,
            OwnerIndex::from_pairs(pairs.clone(), HashMap::new()),
        );
        let mut after = before.clone();
        for place in [0, 4] {
            after.sockets[place] = end(
                TcpState::Listen,
                &format!("127.0.0.1:{}", 7000 + place),
                "0.0.0.0:0",
                30,
            );
        }
        pairs.push((30, 300));
        after.owners = OwnerIndex::from_pairs(pairs, HashMap::new());
        let cfg = DetectConfig {
            idle_after: Duration::ZERO,
            idle_min_count: 1,
            ..DetectConfig::default()
        };
        let mut d = Digest::aged(&Joined::new(&before), 0);
        let note = |d: &Digest, s: &Sample| {
            d.findings(s, None, &cfg)
                .into_iter()
                .map(|f| f.message)
                .collect::<Vec<_>>()
        };
        assert!(
            note(&d, &before)
                .iter()
                .any(|m| m.contains("held by ?(200)"))
        );
        d.patch(&Joined::new(&after), &[0, 4], 0);
        assert_eq!(
            note(&d, &after),
            note(&Digest::new(&Joined::new(&after)), &after)
        );
        assert!(
            note(&d, &after)
                .iter()
                .any(|m| m.contains("held by ?(201)"))
        );
    }

    #[test]
    fn a_one_shot_digest_asked_to_count_sockets_again_is_made_anew() {
        // It keeps nothing by place to take them out by: counted again, they would count twice.
        let mut s = sample(6);
        let mut d = Digest::new(&Joined::new(&s));
        for sock in &mut s.sockets[..3] {
            sock.tcp_info = Some(TcpInfo::default());
        }
        d.recount(&Joined::new(&s), &[0, 1, 2]);
        let cfg = DetectConfig {
            idle_min_count: 1,
            ..DetectConfig::default()
        };
        let fresh = Digest::new(&Joined::new(&s));
        assert_eq!(d.findings(&s, None, &cfg), fresh.findings(&s, None, &cfg));
    }

    #[test]
    fn a_digest_whose_sockets_all_went_holds_nothing() {
        // Pairs with notes, CLOSE_WAIT facts, destinations and a port finding, all gone with
        // the sockets: a long-running loop holds only what is there now.
        let s = sample(6);
        let mut d = Digest::aged(&Joined::new(&s), 0);
        assert!(d.pairs.iter().count() == 2 && d.mirrors.len() == 2);
        assert!(d.close_wait_facts.len() == 1 && d.dests.iter().count() == 2);
        assert_eq!(d.ports.len(), 2);
        let gone = Sample {
            sockets: Vec::new(),
            ..s.clone()
        };
        let all: Vec<u32> = (0..12).collect();
        d.patch(&Joined::new(&gone), &all, 0);
        assert_eq!(d.pairs.iter().count(), 0);
        assert!(d.mirrors.is_empty() && d.close_wait_facts.is_empty());
        assert_eq!(d.close_wait.iter().count(), 0);
        assert_eq!((d.dests.iter().count(), d.dest_of.len()), (0, 0));
        assert!(d.ports.is_empty());
    }
}
