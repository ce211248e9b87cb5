//! Stage 4, aggregate: joined sockets → the groups of a report, like
//! `netstat -anp | grep ESTABLISHED | awk '{print $4}' | sort | uniq -c | sort -n`.
//!
//! Input: a `Joined` sample and a `Query` (group-by key, filters, top N). Output: a `Report`,
//! the serde model the renderers print (its JSON is the documented schema, docs/json.md).
//! Pure: no I/O, no clock.

use std::net::{IpAddr, SocketAddr};

use rustc_hash::FxHashMap;
use serde::{Serialize, Serializer};

use crate::cgroup::PodRef;
use crate::detect::Finding;
use crate::join::{Joined, Numbers, Tally};
use crate::model::{Attribution, NetnsRef, Place, Sample, StateSet, TcpState, Warning};

mod kept;
pub use kept::{KeptGroups, Mark};

/// The JSON schema version this module writes.
pub const SCHEMA_VERSION: u32 = 1;

/// What the groups are keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// Local address:port, netstat's `$4` column.
    Port,
    /// Owning process.
    Process,
    /// Remote address:port.
    Peer,
    /// Owning process → remote address:port.
    Pair,
    /// Pod of the owning process; host processes by systemd unit.
    Pod,
}

/// Which sockets to show and how to group them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub group_by: GroupBy,
    pub states: StateSet,
    /// Local or remote port.
    pub port: Option<u16>,
    pub pid: Option<u32>,
    /// Exact `comm` of an owner.
    pub process: Option<String>,
    /// Keep the largest N groups; `None` or `Some(0)` keeps all.
    pub top: Option<usize>,
    /// `--by port`: the client ends on ephemeral (not listening) local ports become one group
    /// per (local address, holder, remote endpoint) instead of a group per port.
    pub fold: bool,
}

/// A process and how many of the group's sockets it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OwnerCount {
    pub pid: u32,
    pub comm: String,
    pub count: usize,
    /// Its systemd unit, container id and pod; null where not applicable.
    pub unit: Option<String>,
    pub container_id: Option<String>,
    pub pod: Option<PodRef>,
}

/// The fields that identify a group; which ones depends on `GroupBy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum GroupKey {
    Port {
        local_addr: String,
        local_port: u16,
        /// A listener accepts on this endpoint: these are the server ends.
        listening: bool,
    },
    /// Client ends from one local address to one remote endpoint, each on an ephemeral port
    /// of its own (`--fold`): one port per socket, so `count` ports.
    Folded {
        local_addr: String,
        remote_addr: String,
        remote_port: u16,
    },
    Process {
        pid: Option<u32>,
        comm: Option<String>,
        cmdline: Option<String>,
    },
    Peer {
        remote_addr: String,
        remote_port: u16,
    },
    Pair {
        pid: Option<u32>,
        comm: Option<String>,
        cmdline: Option<String>,
        remote_addr: String,
        remote_port: u16,
    },
    Place {
        pod: Option<PodRef>,
        unit: Option<String>,
    },
}

/// Socket counts per state, written as a JSON object in kernel state order. 32-bit: a group
/// is never 4 billion sockets, and `--by pair` on a busy server has a group per client port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateCounts([u32; 11]);

impl StateCounts {
    fn add(&mut self, st: TcpState) {
        self.0[usize::from(st.kernel_number() - 1)] += 1;
    }

    fn remove(&mut self, st: TcpState) {
        self.0[usize::from(st.kernel_number() - 1)] -= 1;
    }

    /// `n` sockets in state `st`, however many there were.
    fn set(&mut self, st: TcpState, n: u32) {
        self.0[usize::from(st.kernel_number() - 1)] = n;
    }

    /// Non-zero counts in kernel order.
    pub fn iter(&self) -> impl Iterator<Item = (TcpState, usize)> + '_ {
        TcpState::ALL
            .into_iter()
            .zip(self.0.map(|n| n as usize))
            .filter(|&(_, n)| n > 0)
    }
}

impl Serialize for StateCounts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter().map(|(st, n)| (st.name(), n)))
    }
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    /// `10.0.0.101:5000`, `[::1]:8443`, `registry(2811)`, `registry(2811) -> 10.0.0.101:5000`.
    pub key: String,
    #[serde(flatten)]
    pub what: GroupKey,
    /// Sockets in the group, each counted once.
    pub count: usize,
    pub states: StateCounts,
    /// Holders of the group's sockets; empty for unattributed sockets.
    pub processes: Vec<OwnerCount>,
    /// Holders of the other ends, where those are on this node.
    pub peer_processes: Vec<OwnerCount>,
    /// The network namespace of a port, peer or pair group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<NetnsRef>,
    /// Change since the previous sample (`--watch`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<i64>,
    /// Change since the first sample (`--watch`) or the baseline (`--baseline`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta_total: Option<i64>,
    /// `--watch` on a terminal: the group's size over the last samples, as a sparkline. Not
    /// part of the JSON document (JSON Lines carry every sample's count already).
    #[serde(skip)]
    pub trend: Option<String>,
    #[serde(skip)]
    raw: RawKey,
}

/// Socket totals over the filtered set, each socket once however many processes share it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub sockets: usize,
    pub attributed: usize,
    pub unattributed: usize,
}

/// A whole `shimcheck ports` answer. Its groups are a `Vec<Group>`, or `LazyGroups`, which
/// spells each group out only as it is written (`aggregate_streamed`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report<G = Vec<Group>> {
    pub schema_version: u32,
    pub taken_at: String,
    pub hostname: String,
    pub group_by: GroupBy,
    pub states: Vec<TcpState>,
    pub totals: Totals,
    /// Number of groups before `--top` cut the list.
    pub total_groups: usize,
    /// `--watch`: the sample's number, from 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample: Option<u64>,
    /// `--watch`: seconds since the first sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
    /// `--baseline`: when the baseline snapshot was taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_taken_at: Option<String>,
    pub groups: G,
    /// What the detector concluded (filled in by the caller; `aggregate` leaves it empty).
    pub findings: Vec<Finding>,
    pub warnings: Vec<Warning>,
    /// How socket owners were found: `bpf` or `procfs`.
    pub attribution: Attribution,
}

#[derive(Default, Clone)]
struct Acc {
    count: u32,
    states: StateCounts,
}

/// A group's identity before it is spelled out; its order (addresses numerically, then
/// ports) breaks ties between groups of the same size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum RawKey {
    /// An index into the pods and units seen (`--by pod`); `None`: unattributed.
    Place(Option<u32>),
    Port(u64, SocketAddr),
    /// Holder (the lowest pid), namespace, local address, remote endpoint.
    Fold(Option<u32>, u64, IpAddr, SocketAddr),
    Process(Option<u32>),
    Peer(u64, SocketAddr),
    Pair(Option<u32>, u64, SocketAddr),
}

/// Every group's size, including those `--top` left out: what later samples compare with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupCounts(FxHashMap<RawKey, usize>);

/// Filters, groups and sorts (largest group first, then by address, port or pid). Only the
/// groups that survive `top` are spelled out: `--by port` on a busy node has a group per
/// client port.
pub fn aggregate(joined: &Joined<'_>, query: &Query) -> Report {
    let (report, _) = group(joined, query, false);
    report.with_groups(LazyGroups::into_vec)
}

/// `aggregate`, plus the size of every group for `annotate_deltas`.
pub fn aggregate_with_counts(joined: &Joined<'_>, query: &Query) -> (Report, GroupCounts) {
    let (report, counts) = group(joined, query, true);
    (
        report.with_groups(LazyGroups::into_vec),
        counts.unwrap_or_default(),
    )
}

/// `aggregate` for writing once: each group is spelled out (names, command lines, holders)
/// as it is serialized and dropped right after, so a report of half a million groups (`--by
/// pair` at a million sockets) costs the memory of one group, not of all of them.
pub fn aggregate_streamed<'a>(joined: &'a Joined<'a>, query: &Query) -> Report<LazyGroups<'a>> {
    group(joined, query, false).0
}

/// The groups of a report, ranked, each spelled out when it is needed.
pub struct LazyGroups<'a> {
    joined: &'a Joined<'a>,
    places: Places,
    keys: KeyParts,
    ranked: Ranked,
}

/// The groups kept, in order, as the pass over the sockets left them.
enum Ranked {
    /// Every (group key, socket) membership, sorted by key: a group is a run of them; and the
    /// runs of the groups kept, `(start, len)` in `members`.
    Members {
        members: Vec<Member>,
        kept: Vec<(u32, u32)>,
    },
    /// Few groups: each counted as the pass met its sockets (`Summing`).
    Summed(Vec<Summed>),
}

impl LazyGroups<'_> {
    /// Every group, spelled out.
    pub fn into_vec(self) -> Vec<Group> {
        (0..self.len()).map(|k| self.spell(k)).collect()
    }

    fn len(&self) -> usize {
        match &self.ranked {
            Ranked::Members { kept, .. } => kept.len(),
            Ranked::Summed(groups) => groups.len(),
        }
    }

    /// The `k`th group kept: its counts and holders, read off its sockets or as summed.
    fn spell(&self, k: usize) -> Group {
        let (members, kept) = match &self.ranked {
            Ranked::Members { members, kept } => (members, kept),
            Ranked::Summed(groups) => {
                let g = &groups[k];
                return make_group(
                    self.joined,
                    &self.places,
                    self.keys.raw(&g.first),
                    g.acc.clone(),
                    g.own.clone(),
                    g.peer.clone(),
                );
            }
        };
        let (start, len) = kept[k];
        let run = &members[start as usize..(start + len) as usize];
        let mut acc = Acc::default();
        // A group's sockets have few holders between them.
        let mut own = Tally::default();
        let mut peer = Tally::default();
        for m in run {
            let i = m.at as usize;
            acc.count += 1;
            acc.states.add(m.state);
            self.joined.owners(i).for_each(|pid| own.add(pid));
            if let Some(j) = self.joined.peer(i) {
                self.joined.owners(j).for_each(|pid| peer.add(pid));
            }
        }
        make_group(
            self.joined,
            &self.places,
            self.keys.raw(&run[0]),
            acc,
            own.into_counts().into_iter().collect(),
            peer.into_counts().into_iter().collect(),
        )
    }
}

impl Serialize for LazyGroups<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.len()))?;
        for k in 0..self.len() {
            seq.serialize_element(&self.spell(k))?;
        }
        seq.end()
    }
}

/// One socket's place in one group: the group's key packed in 146 bits and the socket's index.
/// 24 bytes, whatever the key: `--by pair` at a million sockets is a million groups, which a
/// map from `RawKey` to running counts held at 150 bytes and more each.
#[derive(Clone, Copy)]
struct Member {
    /// Kind (3 bits), holder (33 bits: 0 for none, else pid or place + 1), namespace number.
    a: u64,
    /// Local address number (folded groups), endpoint address number.
    b: u64,
    port: u16,
    /// The socket's state, here so that counting a group's states reads no socket.
    state: TcpState,
    at: u32,
}

// The state fits in what was padding: a member is still 24 bytes.
const _: () = assert!(std::mem::size_of::<Member>() == 24);

/// The namespaces and addresses seen, numbered, so that a key packs into a `Member` and
/// unpacks back into a `RawKey`.
#[derive(Default)]
struct KeyParts {
    netns: Numbers<u64>,
    addrs: Numbers<IpAddr>,
}

const NS_BITS: u32 = 28;

impl KeyParts {
    fn pack(&mut self, key: RawKey, state: TcpState, at: u32) -> Member {
        let holder = |h: Option<u32>| h.map_or(0, |h| u64::from(h) + 1);
        let (kind, holder, ns, local, remote) = match key {
            RawKey::Place(p) => (0, holder(p), None, None, None),
            RawKey::Port(ns, a) => (1, 0, Some(ns), None, Some(a)),
            RawKey::Fold(h, ns, ip, a) => (2, holder(h), Some(ns), Some(ip), Some(a)),
            RawKey::Process(h) => (3, holder(h), None, None, None),
            RawKey::Peer(ns, a) => (4, 0, Some(ns), None, Some(a)),
            RawKey::Pair(h, ns, a) => (5, holder(h), Some(ns), None, Some(a)),
        };
        let ns = ns.map_or(0, |ns| u64::from(self.netns.number(ns)));
        let local = local.map_or(0, |ip| u64::from(self.addrs.number(ip)));
        let (addr, port) =
            remote.map_or((0, 0), |a| (u64::from(self.addrs.number(a.ip())), a.port()));
        debug_assert!(ns < 1 << NS_BITS, "2^28 namespaces");
        Member {
            a: kind << 61 | holder << NS_BITS | ns,
            b: local << 32 | addr,
            port,
            state,
            at,
        }
    }

    fn raw(&self, m: &Member) -> RawKey {
        let holder = ((m.a >> NS_BITS) & ((1 << 33) - 1)) as u32;
        let holder = holder.checked_sub(1);
        // Every number in a member was handed out by `pack`: the lookups cannot miss.
        let ns = self
            .netns
            .get((m.a & ((1 << NS_BITS) - 1)) as u32)
            .copied()
            .unwrap_or(0);
        let addr = |id: u64| {
            self.addrs
                .get(id as u32)
                .copied()
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
        };
        let local = || addr(m.b >> 32);
        let remote = || SocketAddr::new(addr(m.b & u64::from(u32::MAX)), m.port);
        match m.a >> 61 {
            0 => RawKey::Place(holder),
            1 => RawKey::Port(ns, remote()),
            2 => RawKey::Fold(holder, ns, local(), remote()),
            3 => RawKey::Process(holder),
            4 => RawKey::Peer(ns, remote()),
            _ => RawKey::Pair(holder, ns, remote()),
        }
    }
}

impl<G> Report<G> {
    /// The same report with its groups turned into `H`.
    pub fn with_groups<H>(self, f: impl FnOnce(G) -> H) -> Report<H> {
        Report {
            schema_version: self.schema_version,
            taken_at: self.taken_at,
            hostname: self.hostname,
            group_by: self.group_by,
            states: self.states,
            totals: self.totals,
            total_groups: self.total_groups,
            sample: self.sample,
            elapsed_s: self.elapsed_s,
            baseline_taken_at: self.baseline_taken_at,
            groups: f(self.groups),
            findings: self.findings,
            warnings: self.warnings,
            attribution: self.attribution,
        }
    }
}

/// Groups the sockets; with `counts`, also keeps every group's size (a map as large as the
/// groups, which `--by pair` on a busy server makes one per client port).
fn group<'a>(
    joined: &'a Joined<'a>,
    query: &Query,
    counts: bool,
) -> (Report<LazyGroups<'a>>, Option<GroupCounts>) {
    let sample = joined.sample;
    let mut keys = KeyParts::default();
    let mut places = Places::default();
    // Few groups (`--by port` folded, peer, process, pod, as a node usually has them): each
    // counted as the pass meets its sockets.
    let mut summing = Summing::default();
    let pass = memberships(joined, query, &mut keys, &mut places, |m, owners| {
        summing.add(joined, m, owners)
    });
    let (totals, hidden_owner, total_groups, ranked, all_counts) = match pass {
        Some((totals, hidden)) => {
            let (total, ranked, all) = summing.rank(&keys, query.top, counts);
            (totals, hidden, total, ranked, all)
        }
        // More: every membership kept, then sorted by key, which holds 24 bytes a socket
        // where a group's counts and holders held far more.
        None => {
            drop(summing);
            (keys, places) = (KeyParts::default(), Places::default());
            // One member a socket, mostly: room for them at once, where growing by doubling
            // copied them all over again and held both copies at its peak. (Pages not
            // written, where a filter keeps few sockets, cost no memory.)
            let mut members: Vec<Member> = Vec::with_capacity(sample.sockets.len());
            let (totals, hidden) = memberships(joined, query, &mut keys, &mut places, |m, _| {
                members.push(m);
                true
            })
            .unwrap_or_default();
            let (total, ranked, all) = rank_members(members, &keys, query.top, counts);
            (totals, hidden, total, ranked, all)
        }
    };
    let groups = LazyGroups {
        joined,
        places,
        keys,
        ranked,
    };
    let report = report_of(sample, query, totals, total_groups, hidden_owner, groups);
    (report, all_counts)
}

/// The report of a sample whose groups are `groups`, of `total_groups` before `--top`.
fn report_of<G>(
    sample: &Sample,
    query: &Query,
    totals: Totals,
    total_groups: usize,
    hidden_owner: bool,
    groups: G,
) -> Report<G> {
    Report {
        schema_version: SCHEMA_VERSION,
        taken_at: rfc3339(sample.taken_at),
        hostname: sample.hostname.clone(),
        group_by: query.group_by,
        states: query.states.iter().collect(),
        totals,
        total_groups,
        sample: None,
        elapsed_s: None,
        baseline_taken_at: None,
        groups,
        findings: Vec::new(),
        warnings: warnings(sample, hidden_owner),
        attribution: sample.scan.attribution,
    }
}

/// The pass over the sockets: the group keys of each socket the query keeps, packed and given
/// to `add` with the socket's holders; `add` stops the pass by returning false (then `None`).
/// Returns the totals, and whether a socket with an inode had no holder the scan could see.
fn memberships(
    joined: &Joined<'_>,
    query: &Query,
    keys: &mut KeyParts,
    places: &mut Places,
    mut add: impl FnMut(Member, &[u32]) -> bool,
) -> Option<(Totals, bool)> {
    let mut totals = Totals::default();
    let mut owners: Vec<u32> = Vec::new();
    let mut hidden_owner = false;
    for (i, s) in joined.sample.sockets.iter().enumerate() {
        let Ok(at) = u32::try_from(i) else {
            break;
        };
        let mut more = true;
        let counted = socket_keys(joined, query, i, &mut owners, places, |key, owners| {
            more = more && add(keys.pack(key, s.state, at), owners);
        });
        let Some(counted) = counted else {
            continue;
        };
        counted.count(&mut totals, true);
        hidden_owner |= counted == Counted::Hidden;
        if !more {
            return None;
        }
    }
    Some((totals, hidden_owner))
}

/// How a socket the query keeps counts in the totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    Attributed,
    /// No holder, and no inode either (a connection not accepted yet).
    Unattributed,
    /// No holder the scan could see, though it has an inode.
    Hidden,
}

impl Counted {
    /// Adds the socket to `totals`, or takes it out.
    fn count(self, totals: &mut Totals, add: bool) {
        let one = |n: &mut usize| *n = if add { *n + 1 } else { *n - 1 };
        one(&mut totals.sockets);
        match self {
            Counted::Attributed => one(&mut totals.attributed),
            Counted::Unattributed | Counted::Hidden => one(&mut totals.unattributed),
        }
    }
}

/// Socket `i`'s groups: `None` when the query leaves it out; else each of its group keys is
/// given to `put` with the socket's holders (which `owners` is left holding).
fn socket_keys(
    joined: &Joined<'_>,
    query: &Query,
    i: usize,
    owners: &mut Vec<u32>,
    places: &mut Places,
    mut put: impl FnMut(RawKey, &[u32]),
) -> Option<Counted> {
    let sample = joined.sample;
    let s = joined.socket(i);
    if !query.states.contains(s.state) {
        return None;
    }
    let (local, remote) = (s.local(), s.remote());
    if query
        .port
        .is_some_and(|p| local.port() != p && remote.port() != p)
    {
        return None;
    }
    owners.clear();
    owners.extend(joined.owners(i));
    if query.pid.is_some_and(|pid| !owners.contains(&pid)) {
        return None;
    }
    if let Some(name) = &query.process {
        let comm_of = |pid: &u32| sample.owners.processes.get(pid).map(|p| p.comm.as_str());
        if !owners.iter().any(|pid| comm_of(pid) == Some(name.as_str())) {
            return None;
        }
    }
    let owners: &[u32] = owners;
    let mut put = |key: RawKey| put(key, owners);
    match query.group_by {
        // A client end on an ephemeral port: one per socket, so folded by where it goes.
        GroupBy::Port if query.fold && !joined.listens(i) => put(RawKey::Fold(
            owners.first().copied(),
            s.netns,
            local.ip(),
            remote,
        )),
        GroupBy::Port => put(RawKey::Port(s.netns, local)),
        GroupBy::Peer => put(RawKey::Peer(s.netns, remote)),
        GroupBy::Process if owners.is_empty() => put(RawKey::Process(None)),
        GroupBy::Pair if owners.is_empty() => put(RawKey::Pair(None, s.netns, remote)),
        // A socket shared by several processes belongs to each of their groups.
        GroupBy::Process => owners.iter().for_each(|&p| put(RawKey::Process(Some(p)))),
        GroupBy::Pair => owners
            .iter()
            .for_each(|&p| put(RawKey::Pair(Some(p), s.netns, remote))),
        // No visible holder: the cgroup that created the socket may still name it.
        GroupBy::Pod if owners.is_empty() => {
            match s.cgroup_id().and_then(|id| sample.cgroup_places.get(&id)) {
                Some(place) => put(RawKey::Place(Some(places.number(place.clone())))),
                None => put(RawKey::Place(None)),
            }
        }
        GroupBy::Pod => {
            // Once per place, however many of its processes share the socket.
            let mut ids: Vec<u32> = owners
                .iter()
                .map(|&p| places.number(place_of(sample, p)))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            ids.into_iter().for_each(|id| put(RawKey::Place(Some(id))));
        }
    }
    Some(match (owners.is_empty(), s.inode) {
        (false, _) => Counted::Attributed,
        (true, 0) => Counted::Unattributed,
        (true, _) => Counted::Hidden,
    })
}

/// Groups counted in the pass itself, up to this many; past it the pass starts again and
/// keeps every membership (`Ranked::Members`). Counting a group as its sockets are met saves
/// the sort of every membership and a second pass over them, but holds its counts and
/// holders, which `--by pair` or an unfolded `--by port` make a group per client port.
const SUMMED_GROUPS: usize = 1 << 12;

/// Groups as the pass counts them, found by their packed key.
#[derive(Default)]
struct Summing {
    at: FxHashMap<(u64, u64, u16), u32>,
    groups: Vec<Counting>,
    /// The last key met and its group: a process's connections to one place come in runs.
    last: Option<((u64, u64, u16), u32)>,
}

/// A group being counted: its first membership (its key), its counts, its holders and those
/// of its sockets' other ends.
struct Counting {
    first: Member,
    acc: Acc,
    own: Tally,
    peer: Tally,
}

/// A group counted, ranked and kept.
struct Summed {
    first: Member,
    acc: Acc,
    own: Vec<(u32, usize)>,
    peer: Vec<(u32, usize)>,
}

impl Summing {
    /// Counts membership `m`, of a socket held by `owners`; false when it would be a group
    /// past `SUMMED_GROUPS`.
    fn add(&mut self, joined: &Joined<'_>, m: Member, owners: &[u32]) -> bool {
        let key = (m.a, m.b, m.port);
        let g = match self.last {
            Some((k, g)) if k == key => g,
            _ => match self.at.get(&key) {
                Some(&g) => g,
                None if self.groups.len() >= SUMMED_GROUPS => return false,
                None => {
                    let g = self.groups.len() as u32;
                    self.groups.push(Counting {
                        first: m,
                        acc: Acc::default(),
                        own: Tally::default(),
                        peer: Tally::default(),
                    });
                    self.at.insert(key, g);
                    g
                }
            },
        };
        self.last = Some((key, g));
        let c = &mut self.groups[g as usize];
        c.acc.count += 1;
        c.acc.states.add(m.state);
        owners.iter().for_each(|&pid| c.own.add(pid));
        if let Some(j) = joined.peer(m.at as usize) {
            joined.owners(j).for_each(|pid| c.peer.add(pid));
        }
        true
    }

    /// The number of groups, the `top` of them in order (largest first, then by key), and,
    /// with `counts`, every group's size.
    fn rank(
        self,
        keys: &KeyParts,
        top: Option<usize>,
        counts: bool,
    ) -> (usize, Ranked, Option<GroupCounts>) {
        let mut groups = self.groups;
        let all = counts.then(|| {
            GroupCounts(
                groups
                    .iter()
                    .map(|g| (keys.raw(&g.first), g.acc.count as usize))
                    .collect(),
            )
        });
        let total = groups.len();
        let order = |x: &Counting, y: &Counting| {
            (y.acc.count.cmp(&x.acc.count))
                .then_with(|| keys.raw(&x.first).cmp(&keys.raw(&y.first)))
        };
        if let Some(top) = top.filter(|&t| t > 0 && t < groups.len()) {
            groups.select_nth_unstable_by(top, order);
            groups.truncate(top);
        }
        groups.sort_unstable_by(order);
        let kept = groups
            .into_iter()
            .map(|c| Summed {
                first: c.first,
                acc: c.acc,
                own: c.own.into_counts().into_iter().collect(),
                peer: c.peer.into_counts().into_iter().collect(),
            })
            .collect();
        (total, Ranked::Summed(kept), all)
    }
}

/// `Summing::rank` of every membership kept: sorted by key, a group is a run of them.
fn rank_members(
    mut members: Vec<Member>,
    keys: &KeyParts,
    top: Option<usize>,
    counts: bool,
) -> (usize, Ranked, Option<GroupCounts>) {
    // Within a group, sockets in dump order, as they were pushed: the sort keeps that order
    // (stably, or by index where a million members sort in place).
    if members.len() >= crate::join::IN_PLACE_FROM {
        members.sort_unstable_by_key(|m| (m.a, m.b, m.port, m.at));
    } else {
        members.sort_by_key(|m| (m.a, m.b, m.port));
    }
    let mut runs: Vec<(u32, u32)> = Vec::new();
    let mut start = 0;
    for same in members.chunk_by(|x, y| (x.a, x.b, x.port) == (y.a, y.b, y.port)) {
        runs.push((start, same.len() as u32));
        start += same.len() as u32;
    }
    let all = counts.then(|| {
        GroupCounts(
            runs.iter()
                .map(|&(start, len)| (keys.raw(&members[start as usize]), len as usize))
                .collect(),
        )
    });
    // Rank the groups (largest first, then by key) and keep the top ones.
    let total = runs.len();
    let raw = |run: &(u32, u32)| keys.raw(&members[run.0 as usize]);
    let order = |x: &(u32, u32), y: &(u32, u32)| y.1.cmp(&x.1).then_with(|| raw(x).cmp(&raw(y)));
    if let Some(top) = top.filter(|&t| t > 0 && t < runs.len()) {
        runs.select_nth_unstable_by(top, order);
        runs.truncate(top);
    }
    runs.sort_unstable_by(order);
    runs.shrink_to_fit();
    (
        total,
        Ranked::Members {
            members,
            kept: runs,
        },
        all,
    )
}

impl Report {
    /// Blanks the command lines of process and pair groups: they can carry passwords and
    /// tokens, and `serve` publishes reports to whoever may scrape it.
    pub fn drop_cmdlines(&mut self) {
        for g in &mut self.groups {
            if let GroupKey::Process { cmdline, .. } | GroupKey::Pair { cmdline, .. } = &mut g.what
            {
                *cmdline = None;
            }
        }
    }
}

/// Fills in `delta` (against `previous`) and `delta_total` (against `first`); a group absent
/// from an earlier sample had 0 sockets then.
pub fn annotate_deltas(report: &mut Report, previous: Option<&GroupCounts>, first: &GroupCounts) {
    let diff = |now: usize, then: Option<&usize>| now as i64 - then.copied().unwrap_or(0) as i64;
    for g in &mut report.groups {
        g.delta = previous.map(|p| diff(g.count, p.0.get(&g.raw)));
        g.delta_total = Some(diff(g.count, first.0.get(&g.raw)));
    }
}

/// `2026-11-25T10:00:00Z`: a sample's time as the JSON documents write it.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// The sample's own warnings, plus the /proc scan's where they can matter: a socket with an
/// inode and no owner may belong to a process the scan could not read.
fn warnings(sample: &Sample, hidden_owner: bool) -> Vec<Warning> {
    let mut w = sample.warnings.clone();
    let scan = &sample.scan;
    if hidden_owner && scan.denied > 0 {
        w.push(Warning::OwnersDenied {
            processes: scan.denied,
            lacking: scan.lacking.clone(),
        });
    }
    if let Some(hidepid) = scan.hidepid.as_ref().filter(|_| hidden_owner) {
        w.push(Warning::OwnersHidden {
            hidepid: hidepid.clone(),
        });
    }
    if hidden_owner && scan.unreadable > 0 {
        w.push(Warning::OwnersUnreadable {
            processes: scan.unreadable,
            first: scan
                .first_unreadable
                .clone()
                .unwrap_or_else(|| "unknown error".to_string()),
        });
    }
    w
}

/// Where a process runs, as `--by pod` groups it: its pod, else its unit, else nowhere known.
fn place_of(sample: &Sample, pid: u32) -> Place {
    match sample.owners.processes.get(&pid) {
        Some(p) if p.place.pod.is_some() => Place {
            pod: p.place.pod.clone(),
            unit: None,
        },
        Some(p) => Place {
            pod: None,
            unit: p.place.unit.clone(),
        },
        None => Place::default(),
    }
}

/// The places seen, numbered so that group keys stay small and `Copy`.
type Places = Numbers<Place>;

fn make_group(
    joined: &Joined<'_>,
    places: &Places,
    key: RawKey,
    acc: Acc,
    owners: Vec<(u32, usize)>,
    peers: Vec<(u32, usize)>,
) -> Group {
    let procs = &joined.sample.owners.processes;
    let comm = |pid: u32| {
        procs
            .get(&pid)
            .map_or_else(|| "?".to_string(), |p| p.comm.clone())
    };
    let cmdline = |pid: u32| procs.get(&pid).map(|p| p.cmdline.clone());
    let counts = |m: Vec<(u32, usize)>| {
        let mut v: Vec<OwnerCount> = m
            .into_iter()
            .map(|(pid, count)| {
                let p = procs.get(&pid);
                OwnerCount {
                    pid,
                    comm: comm(pid),
                    count,
                    unit: p.and_then(|p| p.place.unit.clone()),
                    container_id: p.and_then(|p| p.container_id.clone()),
                    pod: p.and_then(|p| p.place.pod.clone()),
                }
            })
            .collect();
        v.sort_by(|a, b| b.count.cmp(&a.count).then(a.pid.cmp(&b.pid)));
        v
    };
    let proc_key = |pid: Option<u32>| match pid {
        Some(p) => format!("{}({p})", comm(p)),
        None => "(unattributed)".to_string(),
    };
    let sample = joined.sample;
    let netns = match key {
        RawKey::Port(ns, _)
        | RawKey::Fold(_, ns, _, _)
        | RawKey::Peer(ns, _)
        | RawKey::Pair(_, ns, _) => Some(sample.netns_ref(ns)),
        RawKey::Process(_) | RawKey::Place(_) => None,
    };
    let (key_text, what) = match key {
        RawKey::Port(ns, a) => (
            sample.endpoint_key(ns, &a),
            GroupKey::Port {
                local_addr: a.ip().to_string(),
                local_port: a.port(),
                listening: joined.listening(ns, a),
            },
        ),
        RawKey::Fold(_, ns, ip, remote) => {
            let local = match ip {
                IpAddr::V4(v4) => format!("{v4}:*"),
                IpAddr::V6(v6) => format!("[{v6}]:*"),
            };
            (
                format!("{local} -> {}", sample.endpoint_key(ns, &remote)),
                GroupKey::Folded {
                    local_addr: ip.to_string(),
                    remote_addr: remote.ip().to_string(),
                    remote_port: remote.port(),
                },
            )
        }
        RawKey::Peer(ns, a) => (
            sample.endpoint_key(ns, &a),
            GroupKey::Peer {
                remote_addr: a.ip().to_string(),
                remote_port: a.port(),
            },
        ),
        RawKey::Process(pid) => (
            proc_key(pid),
            GroupKey::Process {
                pid,
                comm: pid.map(comm),
                cmdline: pid.and_then(cmdline),
            },
        ),
        RawKey::Pair(pid, ns, a) => (
            format!("{} -> {}", proc_key(pid), sample.endpoint_key(ns, &a)),
            GroupKey::Pair {
                pid,
                comm: pid.map(comm),
                cmdline: pid.and_then(cmdline),
                remote_addr: a.ip().to_string(),
                remote_port: a.port(),
            },
        ),
        RawKey::Place(id) => {
            let Place { pod, unit } = id.and_then(|i| places.get(i)).cloned().unwrap_or_default();
            let key = match (&pod, &unit, id) {
                (Some(p), _, _) => format!("pod {}/{}", p.namespace, p.name),
                (None, Some(u), _) => format!("unit {u}"),
                (None, None, Some(_)) => "(no unit)".to_string(),
                (None, None, None) => "(unattributed)".to_string(),
            };
            (key, GroupKey::Place { pod, unit })
        }
    };
    Group {
        key: key_text,
        what,
        count: acc.count as usize,
        states: acc.states,
        processes: counts(owners),
        peer_processes: counts(peers),
        netns,
        delta: None,
        delta_total: None,
        trend: None,
        raw: key,
    }
}
