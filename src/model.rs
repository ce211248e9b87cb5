//! Stage 0, the vocabulary: what the collector produces (`Socket`), what the /proc scan
//! produces (`Process`, `Place`, `FdUse`), what one look at the node holds (`Sample`), what
//! an operator must be told to trust it (`Warning`), and the TCP state names every later stage
//! speaks.
//!
//! Nothing here touches the OS; every type is plain data.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU64;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize, Serializer};

use crate::cgroup::PodRef;

/// A TCP state, numbered as the kernel numbers them (`include/net/tcp_states.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
}

impl TcpState {
    /// Every state, in kernel order.
    pub const ALL: [TcpState; 11] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
    ];

    /// The kernel's number for the state (`TCP_ESTABLISHED` = 1 ...).
    pub fn kernel_number(self) -> u8 {
        match self {
            TcpState::Established => 1,
            TcpState::SynSent => 2,
            TcpState::SynRecv => 3,
            TcpState::FinWait1 => 4,
            TcpState::FinWait2 => 5,
            TcpState::TimeWait => 6,
            TcpState::Close => 7,
            TcpState::CloseWait => 8,
            TcpState::LastAck => 9,
            TcpState::Listen => 10,
            TcpState::Closing => 11,
        }
    }

    /// Maps the kernel's number back; `TCP_NEW_SYN_RECV` (12, a request socket) is
    /// reported as `syn-recv`, as `ss` does.
    pub fn from_kernel(n: u8) -> Option<TcpState> {
        match n {
            12 => Some(TcpState::SynRecv),
            n => TcpState::ALL.into_iter().find(|s| s.kernel_number() == n),
        }
    }

    /// The name `ss` uses for the state (`established`, `close-wait` ...).
    pub fn name(self) -> &'static str {
        match self {
            TcpState::Established => "established",
            TcpState::SynSent => "syn-sent",
            TcpState::SynRecv => "syn-recv",
            TcpState::FinWait1 => "fin-wait-1",
            TcpState::FinWait2 => "fin-wait-2",
            TcpState::TimeWait => "time-wait",
            TcpState::Close => "close",
            TcpState::CloseWait => "close-wait",
            TcpState::LastAck => "last-ack",
            TcpState::Listen => "listen",
            TcpState::Closing => "closing",
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TcpState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TcpState::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| format!("unknown TCP state '{s}'"))
    }
}

impl<'de> Deserialize<'de> for TcpState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for TcpState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// A set of TCP states, as the kernel's `idiag_states` bitmask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateSet(u32);

impl StateSet {
    /// The empty set.
    pub const fn empty() -> StateSet {
        StateSet(0)
    }

    /// Every state `ss state all` shows.
    pub fn all() -> StateSet {
        TcpState::ALL.into_iter().collect()
    }

    /// Adds one state.
    pub fn insert(&mut self, st: TcpState) {
        self.0 |= 1 << st.kernel_number();
    }

    /// True when `st` is in the set.
    pub fn contains(self, st: TcpState) -> bool {
        self.0 & (1 << st.kernel_number()) != 0
    }

    /// The union of two sets.
    pub fn union(self, other: StateSet) -> StateSet {
        StateSet(self.0 | other.0)
    }

    /// The bitmask to put in `idiag_states`: `syn-recv` also asks for `TCP_NEW_SYN_RECV`.
    pub fn kernel_mask(self) -> u32 {
        if self.contains(TcpState::SynRecv) {
            self.0 | 1 << 12
        } else {
            self.0
        }
    }

    /// The states in kernel order.
    pub fn iter(self) -> impl Iterator<Item = TcpState> {
        TcpState::ALL.into_iter().filter(move |s| self.contains(*s))
    }
}

impl FromIterator<TcpState> for StateSet {
    fn from_iter<I: IntoIterator<Item = TcpState>>(iter: I) -> Self {
        let mut set = StateSet::empty();
        for st in iter {
            set.insert(st);
        }
        set
    }
}

/// The part of `struct tcp_info` shimcheck reads: the idle clocks, which every kernel sends.
///
/// (The byte counters of Linux 4.1+ were read too until nothing used them: a million sockets
/// held 16 bytes each for no report.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TcpInfo {
    /// Milliseconds since data was last sent (`tcpi_last_data_sent`).
    pub last_data_sent_ms: u32,
    /// Milliseconds since data was last received (`tcpi_last_data_recv`).
    pub last_data_recv_ms: u32,
    /// Milliseconds since an ACK was last received (`tcpi_last_ack_recv`).
    pub last_ack_recv_ms: u32,
}

impl TcpInfo {
    /// How long the connection has carried no data either way: keepalives refresh only
    /// `last_ack_recv`, so data-idle is the smaller of the two data clocks.
    pub fn data_idle_ms(&self) -> u32 {
        self.last_data_sent_ms.min(self.last_data_recv_ms)
    }

    /// The same connection `ms` milliseconds later, with nothing sent or received since.
    pub fn age(&mut self, ms: u32) {
        self.last_data_sent_ms = self.last_data_sent_ms.saturating_add(ms);
        self.last_data_recv_ms = self.last_data_recv_ms.saturating_add(ms);
        self.last_ack_recv_ms = self.last_ack_recv_ms.saturating_add(ms);
    }
}

/// One TCP socket, as one line of `ss -tan` shows it, in 88 bytes: a sample holds one per
/// socket on the node, a million of them on a big proxy. Addresses are kept as 16 bytes and a
/// family bit rather than as `SocketAddr` (32 bytes each), and the optional ids as `NonZeroU64`
/// (neither the kernel's cookie nor a cgroup id is ever 0); `local()`, `remote()`, `cookie()`
/// and `cgroup_id()` hand them back in their usual types. Snapshots write the usual types too
/// (`SocketRecord`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "SocketRecord", from = "SocketRecord")]
pub struct Socket {
    /// The socket inode, the key of the /proc join; 0 for TIME_WAIT, SYN_RECV and orphans.
    pub inode: u64,
    /// The inode of the network namespace the socket lives in (0: not recorded).
    pub netns: u64,
    cookie: Option<NonZeroU64>,
    cgroup_id: Option<NonZeroU64>,
    /// `None` when the kernel sent no tcp_info (the /proc/net fallback, or TIME_WAIT).
    pub tcp_info: Option<TcpInfo>,
    local_ip: [u8; 16],
    remote_ip: [u8; 16],
    local_port: u16,
    remote_port: u16,
    pub state: TcpState,
    /// Bit 0: the local address is IPv6; bit 1: the remote one is.
    v6: u8,
}

impl Socket {
    /// A socket in `state` between `local` and `remote`, with inode 0 and nothing else known.
    pub fn new(state: TcpState, local: SocketAddr, remote: SocketAddr) -> Socket {
        let mut s = Socket {
            inode: 0,
            netns: 0,
            cookie: None,
            cgroup_id: None,
            tcp_info: None,
            local_ip: [0; 16],
            remote_ip: [0; 16],
            local_port: 0,
            remote_port: 0,
            state,
            v6: 0,
        };
        s.set_local(local);
        s.set_remote(remote);
        s
    }

    /// The local endpoint.
    pub fn local(&self) -> SocketAddr {
        endpoint(&self.local_ip, self.local_port, self.v6 & 1 != 0)
    }

    /// The remote endpoint.
    pub fn remote(&self) -> SocketAddr {
        endpoint(&self.remote_ip, self.remote_port, self.v6 & 2 != 0)
    }

    /// The local address as one number, IPv4 in its IPv6-mapped form (so a v4 client and a
    /// dual-stack server's `::ffff:` view of it are the same number), and the local port:
    /// what the peer match keys on, read without building a `SocketAddr`.
    pub(crate) fn local_mapped(&self) -> (u128, u16) {
        (mapped(&self.local_ip, self.v6 & 1 != 0), self.local_port)
    }

    /// `local_mapped` of the remote end.
    pub(crate) fn remote_mapped(&self) -> (u128, u16) {
        (mapped(&self.remote_ip, self.v6 & 2 != 0), self.remote_port)
    }

    /// Moves the local endpoint.
    pub fn set_local(&mut self, addr: SocketAddr) {
        let (ip, v6) = packed(addr.ip());
        (self.local_ip, self.local_port) = (ip, addr.port());
        self.v6 = self.v6 & !1 | u8::from(v6);
    }

    /// Moves the remote endpoint.
    pub fn set_remote(&mut self, addr: SocketAddr) {
        let (ip, v6) = packed(addr.ip());
        (self.remote_ip, self.remote_port) = (ip, addr.port());
        self.v6 = self.v6 & !2 | u8::from(v6) << 1;
    }

    /// The kernel's stable socket id (`idiag_cookie`); `None` from the /proc/net fallback and
    /// where the kernel's cookie names nothing stable (before Linux 4.1: `decode::stable_cookie`).
    pub fn cookie(&self) -> Option<u64> {
        self.cookie.map(NonZeroU64::get)
    }

    /// Sets the cookie; 0 is no cookie.
    pub fn set_cookie(&mut self, cookie: Option<u64>) {
        self.cookie = cookie.and_then(NonZeroU64::new);
    }

    /// The cgroup-v2 id of the cgroup that created the socket (`INET_DIAG_CGROUP_ID`).
    pub fn cgroup_id(&self) -> Option<u64> {
        self.cgroup_id.map(NonZeroU64::get)
    }

    /// Sets the cgroup id; 0 names no cgroup.
    pub fn set_cgroup_id(&mut self, id: Option<u64>) {
        self.cgroup_id = id.and_then(NonZeroU64::new);
    }

    /// True when its tcp_info clocks run: the kernel reports 0 for a listener's.
    pub fn has_clocks(&self) -> bool {
        self.state != TcpState::Listen
    }

    /// The same socket `ms` milliseconds later, nothing sent or received since.
    pub fn age(&mut self, ms: u32) {
        if self.has_clocks()
            && let Some(info) = self.tcp_info.as_mut()
        {
            info.age(ms);
        }
    }
}

/// An address as 16 bytes (IPv4 in the first 4) and whether it is IPv6.
fn packed(ip: IpAddr) -> ([u8; 16], bool) {
    match ip {
        IpAddr::V4(v4) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&v4.octets());
            (b, false)
        }
        IpAddr::V6(v6) => (v6.octets(), true),
    }
}

/// A packed address as an IPv6 number; IPv4 as `::ffff:a.b.c.d`, which an IPv6 socket's
/// mapped address already is.
fn mapped(ip: &[u8; 16], v6: bool) -> u128 {
    if v6 {
        u128::from_be_bytes(*ip)
    } else {
        0xffff << 32 | u128::from(u32::from_be_bytes([ip[0], ip[1], ip[2], ip[3]]))
    }
}

fn endpoint(ip: &[u8; 16], port: u16, v6: bool) -> SocketAddr {
    let ip = if v6 {
        IpAddr::V6(Ipv6Addr::from(*ip))
    } else {
        IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]))
    };
    SocketAddr::new(ip, port)
}

/// A `Socket` as snapshots write it (docs/snapshot.md): endpoints and ids in their usual
/// types. Members older snapshots carry that shimcheck no longer reads (`uid`, `recv_q`,
/// `send_q`, the byte counters) are ignored.
#[derive(Serialize, Deserialize)]
struct SocketRecord {
    state: TcpState,
    local: SocketAddr,
    remote: SocketAddr,
    inode: u64,
    cookie: Option<u64>,
    tcp_info: Option<TcpInfo>,
    #[serde(default)]
    netns: u64,
    #[serde(default)]
    cgroup_id: Option<u64>,
}

impl From<Socket> for SocketRecord {
    fn from(s: Socket) -> SocketRecord {
        SocketRecord {
            state: s.state,
            local: s.local(),
            remote: s.remote(),
            inode: s.inode,
            cookie: s.cookie(),
            tcp_info: s.tcp_info,
            netns: s.netns,
            cgroup_id: s.cgroup_id(),
        }
    }
}

impl From<SocketRecord> for Socket {
    fn from(r: SocketRecord) -> Socket {
        let mut s = Socket::new(r.state, r.local, r.remote);
        s.inode = r.inode;
        s.set_cookie(r.cookie);
        s.tcp_info = r.tcp_info;
        s.netns = r.netns;
        s.set_cgroup_id(r.cgroup_id);
        s
    }
}

/// A network namespace as reports name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetnsRef {
    /// The namespace's inode, as `ls -L -i /proc/PID/ns/net` shows it.
    pub inode: u64,
    /// `host`, an `ip netns` name, or a pod's `namespace/name`; null when unknown.
    pub name: Option<String>,
}

/// A process that holds at least one of the sockets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    /// `/proc/PID/comm`: chosen by the process itself, so untrusted.
    pub comm: String,
    /// `/proc/PID/cmdline`, arguments joined by spaces; untrusted too.
    pub cmdline: String,
    pub uid: Option<u32>,
    /// Where it runs: its pod, or its systemd unit (`image-cri-shim.service`).
    #[serde(flatten)]
    pub place: Place,
    /// The container id of a container process.
    #[serde(default)]
    pub container_id: Option<String>,
}

impl Process {
    /// A process known only by its pid (it exited before it could be described).
    pub fn unknown(pid: u32) -> Process {
        Process {
            pid,
            comm: "?".into(),
            cmdline: String::new(),
            uid: None,
            place: Place::default(),
            container_id: None,
        }
    }
}

/// Socket inode → pids, plus the details of the pids that own a socket of interest.
#[derive(Debug, Clone, Default)]
pub struct OwnerIndex {
    /// Sorted, deduplicated `(inode, pid)`: a socket inherited across fork has one pair per
    /// process; a process holding the same socket on two fds has one pair. Shared with the
    /// owner cache that found them (`procs::OwnerCache`): a loop's sample holds no copy.
    pairs: Arc<Vec<(u64, u32)>>,
    pub processes: HashMap<u32, Process>,
}

impl OwnerIndex {
    /// Builds an index from `(inode, pid)` pairs in any order.
    pub fn from_pairs(mut pairs: Vec<(u64, u32)>, processes: HashMap<u32, Process>) -> OwnerIndex {
        pairs.sort_unstable();
        pairs.dedup();
        OwnerIndex::shared(Arc::new(pairs), processes)
    }

    /// An index of `pairs` already sorted and deduplicated, shared with their keeper.
    pub fn shared(pairs: Arc<Vec<(u64, u32)>>, processes: HashMap<u32, Process>) -> OwnerIndex {
        OwnerIndex { pairs, processes }
    }

    /// The pids holding socket `inode`, ascending; empty for inode 0 (TIME_WAIT, orphans).
    pub fn owners(&self, inode: u64) -> &[(u64, u32)] {
        if inode == 0 {
            return &[];
        }
        let start = self.pairs.partition_point(|&(i, _)| i < inode);
        let end = start + self.pairs[start..].partition_point(|&(i, _)| i == inode);
        &self.pairs[start..end]
    }

    /// The raw pairs (for snapshots and tests).
    pub fn pairs(&self) -> &[(u64, u32)] {
        &self.pairs
    }

    /// Calls `f(i, run)` for each of `inodes` (ascending) with the range of its `(inode, pid)`
    /// pairs in `pairs()`, empty when no process holds it: one pass alongside the pairs, where
    /// a search per inode costs a cache miss per step at a million sockets.
    pub fn walk_sorted(
        &self,
        inodes: impl IntoIterator<Item = u64>,
        mut f: impl FnMut(usize, std::ops::Range<usize>),
    ) {
        let mut p = 0;
        for (i, inode) in inodes.into_iter().enumerate() {
            while p < self.pairs.len() && self.pairs[p].0 < inode {
                p += 1;
            }
            let len = self.pairs[p..]
                .iter()
                .take_while(|&&(pi, _)| pi == inode && inode != 0)
                .count();
            f(i, p..p + len);
        }
    }
}

/// The pairs of a scan, sorted, with no process described yet: the one-shot sampler sorts them
/// on the scan's thread while the dump is still running.
impl From<Vec<(u64, u32)>> for OwnerIndex {
    fn from(pairs: Vec<(u64, u32)>) -> OwnerIndex {
        OwnerIndex::from_pairs(pairs, HashMap::new())
    }
}

/// What the scan could not see.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanStats {
    /// Processes whose fd table was listed.
    pub scanned: usize,
    /// Processes whose fd table this user may not read (EACCES/EPERM): their sockets end up
    /// unattributed.
    pub denied: usize,
    /// Processes that exited between being listed and being read.
    pub vanished: usize,
    /// Processes whose fd table failed for another reason; the first error, for the message.
    pub unreadable: usize,
    pub first_unreadable: Option<String>,
    /// The capabilities reading every owner needs that shimcheck lacked (`CAP_SYS_PTRACE`),
    /// for the warning about denied processes.
    #[serde(default)]
    pub lacking: Vec<String>,
    /// The procfs's `hidepid=` mode when it hid other users' processes from the scan: they
    /// are neither listed nor counted as denied.
    #[serde(default)]
    pub hidepid: Option<String>,
    /// How the fd tables were read.
    #[serde(default)]
    pub attribution: Attribution,
}

/// Where socket owners came from: the fd tables read through `/proc/PID/fd`, or walked in the
/// kernel by the BPF iterator (`bpf`). The answer is the same; the cost is not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attribution {
    #[default]
    Procfs,
    Bpf,
}

impl ScanStats {
    /// Adds another scanner thread's counts.
    pub fn merge(&mut self, other: ScanStats) {
        self.scanned += other.scanned;
        self.denied += other.denied;
        self.vanished += other.vanished;
        self.unreadable += other.unreadable;
        if self.first_unreadable.is_none() {
            self.first_unreadable = other.first_unreadable;
        }
        if self.lacking.is_empty() {
            self.lacking = other.lacking;
        }
        if self.hidepid.is_none() {
            self.hidepid = other.hidepid;
        }
    }
}

/// Share of RLIMIT_NOFILE a process may hold before it is flagged.
pub const FD_LIMIT_SHARE: f64 = 0.8;
/// Share of RLIMIT_NOFILE from which a process is described (named) in a sample: findings
/// and `serve`'s fd metrics name the processes at half their limit or more.
pub const FD_NAMED_SHARE: f64 = 0.5;

/// A process's open files against its limit, for the fd-limit finding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdUse {
    pub open: u64,
    /// The RLIMIT_NOFILE soft limit; `None` when unlimited or unreadable.
    pub limit: Option<u64>,
}

impl FdUse {
    /// True when the process holds at least `share` of a (finite, non-zero) limit.
    pub fn at_least(&self, share: f64) -> bool {
        self.limit
            .is_some_and(|l| l > 0 && self.open as f64 >= share * l as f64)
    }

    /// True at `FD_LIMIT_SHARE` of the limit or more: the fd-limit finding's rule.
    pub fn near_limit(&self) -> bool {
        self.at_least(FD_LIMIT_SHARE)
    }
}

/// Facts about the node the detector needs besides its sockets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// `net.ipv4.ip_local_port_range` of this network namespace.
    pub port_range: Option<(u16, u16)>,
    /// Open files per process, for every process the scan could read.
    pub fds: BTreeMap<u32, FdUse>,
}

/// One look at the node: its sockets, who holds them, and what could not be seen.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the dump was taken; the only clock the pure stages ever see.
    pub taken_at: SystemTime,
    pub hostname: String,
    pub sockets: Vec<Socket>,
    pub owners: OwnerIndex,
    /// What the /proc scan could not read.
    pub scan: ScanStats,
    pub host: HostFacts,
    /// Things the operator must know to trust the numbers (a collector fallback ...).
    pub warnings: Vec<Warning>,
    /// The namespace shimcheck ran in: its sockets' keys need no namespace suffix.
    pub own_netns: u64,
    /// Names of the namespaces seen, by inode.
    pub netns_names: BTreeMap<u64, String>,
    /// Where the cgroups of sockets no visible process holds put them (pod or unit), by
    /// cgroup id: how those sockets are still named.
    pub cgroup_places: BTreeMap<u64, Place>,
    /// How much older than dumped every socket's tcp_info clocks are: a loop's sample whose
    /// sockets did not change keeps the last dump's, and nothing was sent or received since
    /// (`collect::counters`), so each clock is older by exactly the time between the two.
    pub tcp_info_age_ms: u64,
}

/// What moved in a loop's sample whose sockets did not (`sample::Look::Same`): the time, the
/// processes' open files, and, when a holder exited, the owners.
#[derive(Debug, Clone)]
pub struct Moved {
    pub taken_at: SystemTime,
    pub fds: BTreeMap<u32, FdUse>,
    pub scan: ScanStats,
    pub warnings: Vec<Warning>,
    /// The owners, when a process that held some of the sockets has exited since.
    pub owners: Option<OwnerIndex>,
}

/// Where a process (or the cgroup that created a socket) lives, the way operators name it: its
/// pod, or for a host process its systemd unit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Place {
    /// The pod of a container process, named from the kubelet's log directories.
    #[serde(default)]
    pub pod: Option<PodRef>,
    /// The systemd unit of a host process (`image-cri-shim.service`).
    #[serde(default)]
    pub unit: Option<String>,
}

/// Something the operator must know to trust the numbers. `Display` is the sentence, the same
/// on stderr (`shimcheck: warning: ...`, escaped by `render::print_warnings`) and in JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warning {
    /// sock_diag could not be opened: sockets come from `/proc/net/tcp{,6}`.
    CollectorFallback {
        error: String,
        proc_root: String,
        /// `--all-netns` was asked for: only shimcheck's own namespace is counted.
        all_netns: bool,
    },
    /// Processes whose network namespace could not be looked at; `lacking` names the
    /// capabilities that would allow it, empty when shimcheck held them.
    NetnsHidden {
        processes: usize,
        lacking: Vec<String>,
    },
    /// Namespaces that could not be entered or dumped.
    NetnsNotDumped {
        failed: usize,
        total: usize,
        first_inode: u64,
        first_error: String,
        lacking: Vec<String>,
    },
    /// Processes whose fd table may not be read: their sockets are unattributed.
    OwnersDenied {
        processes: usize,
        lacking: Vec<String>,
    },
    /// The procfs hides other users' processes (`hidepid=invisible`): sockets they hold are
    /// unattributed, and no process was counted as denied.
    OwnersHidden { hidepid: String },
    /// The BPF fd walk could be used here but failed to load: owners come from /proc.
    BpfFallback { error: String },
    /// Processes whose fd table failed for another reason.
    OwnersUnreadable { processes: usize, first: String },
    /// A warning read back from a snapshot, as it was worded when the snapshot was taken.
    Recorded(String),
}

fn processes(n: usize) -> String {
    if n == 1 {
        "1 process".to_string()
    } else {
        format!("{n} processes")
    }
}

/// Why access was refused: for want of capabilities, or despite holding them.
fn denied(lacking: &[String]) -> &'static str {
    if lacking.is_empty() {
        "permission denied despite shimcheck's capabilities"
    } else {
        "permission denied"
    }
}

/// What to do about a refusal: grant what is lacking, or look at what refuses it anyway.
fn remedy(lacking: &[String], to: &str) -> String {
    if lacking.is_empty() {
        "a security module (AppArmor, SELinux, Yama) or a process holding capabilities \
         shimcheck lacks refuses it (docs/deploy.md)"
            .to_string()
    } else {
        let them = if lacking.len() == 1 { "it" } else { "them" };
        format!(
            "shimcheck lacks {}: run as root (sudo) or grant {them} to {to} (docs/deploy.md)",
            crate::privilege::listed(lacking)
        )
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::CollectorFallback {
                error,
                proc_root,
                all_netns,
            } => {
                write!(
                    f,
                    "{error}; falling back to {proc_root}/net/tcp and tcp6: slower, no socket \
                     cookies or idle times, and states are filtered after reading"
                )?;
                if *all_netns {
                    f.write_str(
                        "; --all-netns needs sock_diag: only shimcheck's own network namespace \
                         is counted",
                    )?;
                }
                Ok(())
            }
            Warning::NetnsHidden {
                processes: n,
                lacking,
            } => write!(
                f,
                "cannot see which network namespace {} {} in ({}): namespaces only they use \
                 are not counted; {}",
                processes(*n),
                if *n == 1 { "is" } else { "are" },
                denied(lacking),
                remedy(lacking, "see every namespace"),
            ),
            Warning::NetnsNotDumped {
                failed,
                total,
                first_inode,
                first_error,
                lacking,
            } => write!(
                f,
                "cannot dump {failed} of {total} network namespaces (first: \
                 net:[{first_inode}]: {first_error}): their sockets are not counted; {}",
                remedy(lacking, "see every namespace")
            ),
            Warning::OwnersDenied {
                processes: n,
                lacking,
            } => write!(
                f,
                "cannot read the open files of {} ({}): the sockets they hold are counted as \
                 unattributed; {}",
                processes(*n),
                denied(lacking),
                remedy(lacking, "see every owner"),
            ),
            Warning::OwnersHidden { hidepid } => write!(
                f,
                "the procfs scanned for owners is mounted with {hidepid}, which hides other users' processes \
                 from shimcheck: the sockets they hold are counted as unattributed; grant \
                 CAP_SYS_PTRACE, run as root (sudo), or run shimcheck in the mount's gid= group"
            ),
            Warning::OwnersUnreadable {
                processes: n,
                first,
            } => write!(
                f,
                "cannot read the open files of {} ({first}): the sockets they hold are counted \
                 as unattributed",
                processes(*n)
            ),
            Warning::BpfFallback { error } => write!(
                f,
                "cannot load the BPF fd walk ({error}): socket owners come from /proc, which \
                 is slower; --no-bpf skips the attempt"
            ),
            Warning::Recorded(text) => f.write_str(text),
        }
    }
}

impl Serialize for Warning {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Sample {
    /// How long socket `s` has carried no data, as of `taken_at`; `None` without tcp_info.
    pub fn data_idle_ms(&self, s: &Socket) -> Option<u64> {
        let age = if s.has_clocks() {
            self.tcp_info_age_ms
        } else {
            0
        };
        s.tcp_info
            .map(|t| u64::from(t.data_idle_ms()).saturating_add(age))
    }

    /// Brings a loop's last sample to the moment of `moved`: same sockets, clocks older by the
    /// time since. Returns true when the owners changed (a holder exited).
    pub fn apply(&mut self, moved: Moved) -> bool {
        let since = moved
            .taken_at
            .duration_since(self.taken_at)
            .unwrap_or_default();
        self.tcp_info_age_ms = self
            .tcp_info_age_ms
            .saturating_add(u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
        self.taken_at = moved.taken_at;
        self.host.fds = moved.fds;
        self.scan = moved.scan;
        self.warnings = moved.warnings;
        match moved.owners {
            Some(owners) => {
                self.owners = owners;
                true
            }
            None => false,
        }
    }

    /// The namespace of a socket as reports show it.
    pub fn netns_ref(&self, inode: u64) -> NetnsRef {
        NetnsRef {
            inode,
            name: self.netns_names.get(&inode).cloned(),
        }
    }

    /// `127.0.0.1:5000`, or `127.0.0.1:5000@kube-system/etcd-master1` for a socket in
    /// another namespace than shimcheck's own (`--all-netns`).
    pub fn endpoint_key(&self, netns: u64, addr: &SocketAddr) -> String {
        if netns == self.own_netns || netns == 0 {
            addr.to_string()
        } else {
            match self.netns_names.get(&netns) {
                Some(name) => format!("{addr}@{name}"),
                None => format!("{addr}@net:[{netns}]"),
            }
        }
    }
}

/// For the unit tests of the stages after the join.
#[cfg(test)]
impl Sample {
    /// A sample of `sockets`, held as `pairs` (inode, pid) say, taken in namespace 1 at a fixed
    /// time, the processes undescribed.
    pub(crate) fn of(sockets: Vec<Socket>, pairs: Vec<(u64, u32)>) -> Sample {
        Sample {
            taken_at: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
            hostname: "master1".into(),
            sockets,
            owners: OwnerIndex::from_pairs(pairs, HashMap::new()),
            scan: ScanStats::default(),
            host: HostFacts::default(),
            warnings: Vec::new(),
            own_netns: 1,
            netns_names: BTreeMap::new(),
            cgroup_places: BTreeMap::new(),
            tcp_info_age_ms: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_record_is_88_bytes() {
        // A million of them is the sample of a big proxy: the issue's memory budget counts on it.
        assert_eq!(std::mem::size_of::<Socket>(), 88);
    }

    #[test]
    fn sockets_give_back_the_endpoints_and_ids_they_were_given() {
        let (v4, v6): (SocketAddr, SocketAddr) = (
            "10.0.0.101:5000".parse().unwrap(),
            "[fe80::1]:6443".parse().unwrap(),
        );
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:2379".parse().unwrap();
        let mut s = Socket::new(TcpState::Established, v4, v6);
        assert_eq!((s.local(), s.remote()), (v4, v6));
        s.set_local(mapped);
        s.set_remote(v4);
        assert_eq!((s.local(), s.remote()), (mapped, v4));
        assert_eq!((s.cookie(), s.cgroup_id()), (None, None));
        s.set_cookie(Some(7));
        s.set_cgroup_id(Some(u64::MAX));
        assert_eq!((s.cookie(), s.cgroup_id()), (Some(7), Some(u64::MAX)));
        s.set_cookie(Some(0));
        assert_eq!(s.cookie(), None, "cookie 0 names no socket");
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains(r#""local":"[::ffff:127.0.0.1]:2379""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Socket>(&json).unwrap(), s);
    }

    #[test]
    fn state_names_round_trip() {
        for st in TcpState::ALL {
            assert_eq!(st.name().parse::<TcpState>(), Ok(st));
            assert_eq!(TcpState::from_kernel(st.kernel_number()), Some(st));
        }
        assert!("estab".parse::<TcpState>().is_err());
    }

    #[test]
    fn state_masks_match_the_kernel() {
        let est: StateSet = [TcpState::Established].into_iter().collect();
        assert_eq!(est.kernel_mask(), 1 << 1);
        assert_eq!(StateSet::all().kernel_mask(), 0xFFE | 1 << 12);
        assert_eq!(TcpState::from_kernel(12), Some(TcpState::SynRecv));
        assert_eq!(TcpState::from_kernel(0), None);
        assert_eq!(TcpState::from_kernel(13), None);
    }

    #[test]
    fn owners_are_found_by_inode() {
        let idx = OwnerIndex::from_pairs(vec![(9, 2), (5, 1), (9, 1), (9, 1)], HashMap::new());
        let pids: Vec<u32> = idx.owners(9).iter().map(|p| p.1).collect();
        assert_eq!(pids, [1, 2]);
        assert!(idx.owners(7).is_empty());
        assert!(idx.owners(0).is_empty());
    }
}
