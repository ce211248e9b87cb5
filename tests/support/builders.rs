//! Builders for the model's plain data, so that no test writes a `Socket`, `Process` or
//! `Sample` literal: a field added to the model is one edit here.
//!
//! - `sock(state, local, remote, inode)`: cookie = inode, namespace 0 (shimcheck's own, as a
//!   single-namespace dump leaves it), everything else zero or absent; then `.cookie(n)`,
//!   `.netns(n)`, `.cgroup(id)`, `.idle(ms)`, `.tcp_info(..)`.
//! - `process(pid, comm)`: uid 0, command line `/usr/bin/COMM --v=2`, placed nowhere; then
//!   `.cmdline(..)`, `.uid(..)`, `.unit(..)`, `.pod(..)`, `.container(..)`.
//! - `sample()`: a `SampleBuilder` for one look at `master1` at the epoch, with nothing in it;
//!   `.sockets(..)`, `.owner(inode, pid)`, `.process(..)`, `.fds(..)` ..., then `.build()`.
//! - `query(by, states)`: `shimcheck ports --by BY --state ...` with no filter and no `--top`;
//!   `Query { top: Some(3), ..query(by, states) }` for the rest.
//! - `diag_message(&socket, seq)`, `diag_done()`: a socket as a sock_diag reply message, and
//!   the end of a dump, as the kernel encodes them (for the decoder).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use shimcheck::aggregate::{GroupBy, Query};
use shimcheck::cgroup::PodRef;
use shimcheck::model::{
    FdUse, HostFacts, OwnerIndex, Place, Process, Sample, ScanStats, Socket, StateSet, TcpInfo,
    TcpState, Warning,
};

/// The host's network namespace, as `ls -L -i /proc/1/ns/net` says on most machines.
pub const HOST_NS: u64 = 4_026_531_840;

/// A socket with the defaults above.
pub fn sock(state: TcpState, local: &str, remote: &str, inode: u64) -> Socket {
    let mut s = Socket::new(
        state,
        local
            .parse()
            .unwrap_or_else(|e| panic!("local {local}: {e}")),
        remote
            .parse()
            .unwrap_or_else(|e| panic!("remote {remote}: {e}")),
    );
    s.inode = inode;
    s.set_cookie(Some(inode));
    s
}

/// Chainable setters on a `Socket` from `sock`.
pub trait SocketWith: Sized {
    /// The kernel's socket id (`None`: the /proc/net fallback has none).
    fn cookie(self, cookie: impl Into<Option<u64>>) -> Self;
    /// The network namespace's inode.
    fn netns(self, inode: u64) -> Self;
    /// The cgroup id of the cgroup that created the socket.
    fn cgroup(self, id: u64) -> Self;
    /// `tcp_info` as the kernel sends it.
    fn tcp_info(self, info: TcpInfo) -> Self;
    /// `tcp_info` with both data clocks at `ms` (no data either way for that long).
    fn idle(self, ms: u32) -> Self;
}

impl SocketWith for Socket {
    fn cookie(mut self, cookie: impl Into<Option<u64>>) -> Self {
        self.set_cookie(cookie.into());
        self
    }

    fn netns(mut self, inode: u64) -> Self {
        self.netns = inode;
        self
    }

    fn cgroup(mut self, id: u64) -> Self {
        self.set_cgroup_id(Some(id));
        self
    }

    fn tcp_info(mut self, info: TcpInfo) -> Self {
        self.tcp_info = Some(info);
        self
    }

    fn idle(self, ms: u32) -> Self {
        self.tcp_info(TcpInfo {
            last_data_sent_ms: ms,
            last_data_recv_ms: ms,
            ..TcpInfo::default()
        })
    }
}

/// A process with the defaults above.
pub fn process(pid: u32, comm: &str) -> Process {
    Process {
        cmdline: format!("/usr/bin/{comm} --v=2"),
        uid: Some(0),
        comm: comm.into(),
        ..Process::unknown(pid)
    }
}

/// Chainable setters on a `Process` from `process`.
pub trait ProcessWith: Sized {
    fn cmdline(self, cmdline: &str) -> Self;
    fn uid(self, uid: Option<u32>) -> Self;
    /// Its systemd unit (a host process).
    fn unit(self, unit: &str) -> Self;
    /// Its pod (a container process).
    fn pod(self, pod: PodRef) -> Self;
    /// Its container id.
    fn container(self, id: &str) -> Self;
}

impl ProcessWith for Process {
    fn cmdline(mut self, cmdline: &str) -> Self {
        self.cmdline = cmdline.into();
        self
    }

    fn uid(mut self, uid: Option<u32>) -> Self {
        self.uid = uid;
        self
    }

    fn unit(mut self, unit: &str) -> Self {
        self.place = Place {
            unit: Some(unit.into()),
            ..self.place
        };
        self
    }

    fn pod(mut self, pod: PodRef) -> Self {
        self.place = Place {
            pod: Some(pod),
            ..self.place
        };
        self
    }

    fn container(mut self, id: &str) -> Self {
        self.container_id = Some(id.into());
        self
    }
}

/// An empty sample to fill in: see `SampleBuilder`.
pub fn sample() -> SampleBuilder {
    SampleBuilder::default()
}

/// One look at a node, built up from its parts. Owners are `(inode, pid)` pairs plus the
/// processes that describe them (a pid with no process is one the scan could not describe),
/// or a whole `OwnerIndex` from a fake /proc tree.
#[derive(Default)]
pub struct SampleBuilder {
    taken_at: Option<SystemTime>,
    hostname: Option<String>,
    sockets: Vec<Socket>,
    pairs: Vec<(u64, u32)>,
    processes: HashMap<u32, Process>,
    index: Option<OwnerIndex>,
    scan: ScanStats,
    host: HostFacts,
    warnings: Vec<Warning>,
    own_netns: u64,
    netns_names: BTreeMap<u64, String>,
    cgroup_places: BTreeMap<u64, Place>,
}

impl SampleBuilder {
    /// Taken `secs` seconds after the epoch (default: at the epoch).
    pub fn at(mut self, secs: u64) -> Self {
        self.taken_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        self
    }

    /// The node's name (default `master1`).
    pub fn hostname(mut self, name: &str) -> Self {
        self.hostname = Some(name.into());
        self
    }

    pub fn socket(mut self, socket: Socket) -> Self {
        self.sockets.push(socket);
        self
    }

    pub fn sockets(mut self, sockets: impl IntoIterator<Item = Socket>) -> Self {
        self.sockets.extend(sockets);
        self
    }

    /// `pid` holds socket `inode`.
    pub fn owner(mut self, inode: u64, pid: u32) -> Self {
        self.pairs.push((inode, pid));
        self
    }

    /// `(inode, pid)` pairs, in any order, duplicates allowed (as the fd scan finds them).
    pub fn owners(mut self, pairs: impl IntoIterator<Item = (u64, u32)>) -> Self {
        self.pairs.extend(pairs);
        self
    }

    /// Owners found by a scanner (`ProcScanner::index`), instead of pairs and processes.
    pub fn owner_index(mut self, index: OwnerIndex) -> Self {
        self.index = Some(index);
        self
    }

    /// The description of a holder.
    pub fn process(mut self, process: Process) -> Self {
        self.processes.insert(process.pid, process);
        self
    }

    pub fn processes(mut self, processes: impl IntoIterator<Item = Process>) -> Self {
        for p in processes {
            self = self.process(p);
        }
        self
    }

    /// What the /proc scan could not read.
    pub fn scan(mut self, stats: ScanStats) -> Self {
        self.scan = stats;
        self
    }

    /// `pid` has `open` files against a soft limit of `limit` (`None`: unlimited).
    pub fn fds(mut self, pid: u32, open: u64, limit: Option<u64>) -> Self {
        self.host.fds.insert(pid, FdUse { open, limit });
        self
    }

    /// `net.ipv4.ip_local_port_range`.
    pub fn port_range(mut self, low: u16, high: u16) -> Self {
        self.host.port_range = Some((low, high));
        self
    }

    /// Every host fact at once.
    pub fn host(mut self, host: HostFacts) -> Self {
        self.host = host;
        self
    }

    pub fn warning(mut self, warning: Warning) -> Self {
        self.warnings.push(warning);
        self
    }

    /// shimcheck runs in namespace `inode`, named `host`, and the sockets left in namespace 0
    /// are in it: what the sampler makes of a single-namespace dump.
    pub fn host_netns(mut self, inode: u64) -> Self {
        self.own_netns = inode;
        self.netns_names.insert(inode, "host".into());
        self
    }

    /// Names namespace `inode` (an `ip netns` name, a pod).
    pub fn netns_name(mut self, inode: u64, name: &str) -> Self {
        self.netns_names.insert(inode, name.into());
        self
    }

    /// Where cgroup `id` puts the sockets it created.
    pub fn cgroup_place(mut self, id: u64, place: Place) -> Self {
        self.cgroup_places.insert(id, place);
        self
    }

    pub fn cgroup_places(mut self, places: BTreeMap<u64, Place>) -> Self {
        self.cgroup_places.extend(places);
        self
    }

    pub fn build(self) -> Sample {
        let owners = match self.index {
            Some(index) => {
                assert!(
                    self.pairs.is_empty() && self.processes.is_empty(),
                    "owners come from the index or from pairs and processes, not both"
                );
                index
            }
            None => OwnerIndex::from_pairs(self.pairs, self.processes),
        };
        let own = self.own_netns;
        let sockets = self
            .sockets
            .into_iter()
            .map(|s| if s.netns == 0 { s.netns(own) } else { s })
            .collect();
        Sample {
            tcp_info_age_ms: 0,
            taken_at: self.taken_at.unwrap_or(SystemTime::UNIX_EPOCH),
            hostname: self.hostname.unwrap_or_else(|| "master1".into()),
            sockets,
            owners,
            scan: self.scan,
            host: self.host,
            warnings: self.warnings,
            own_netns: own,
            netns_names: self.netns_names,
            cgroup_places: self.cgroup_places,
        }
    }
}

/// The query of `shimcheck ports --by BY --state STATES --top 0`.
pub fn query(by: GroupBy, states: &[TcpState]) -> Query {
    Query {
        group_by: by,
        states: states.iter().copied().collect::<StateSet>(),
        port: None,
        pid: None,
        process: None,
        top: None,
        fold: false,
    }
}

/// Warnings as the operator reads them.
pub fn texts(warnings: &[Warning]) -> Vec<String> {
    warnings.iter().map(ToString::to_string).collect()
}

/// One `SOCK_DIAG_BY_FAMILY` reply message for `s`, laid out as the kernel lays it out
/// (`struct inet_diag_msg`, then `INET_DIAG_INFO` and `INET_DIAG_CGROUP_ID` attributes).
pub fn diag_message(s: &Socket, seq: u32) -> Vec<u8> {
    use std::net::IpAddr;
    let mut body = Vec::new();
    let family: u8 = if s.local().is_ipv6() { 10 } else { 2 };
    body.extend([family, s.state.kernel_number(), 0, 0]);
    body.extend(s.local().port().to_be_bytes());
    body.extend(s.remote().port().to_be_bytes());
    for a in [s.local().ip(), s.remote().ip()] {
        let mut bytes = [0u8; 16];
        match a {
            IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => bytes = v6.octets(),
        }
        body.extend(bytes);
    }
    body.extend(0u32.to_ne_bytes()); // interface
    let cookie = s.cookie().unwrap_or_default();
    body.extend((cookie as u32).to_ne_bytes());
    body.extend(((cookie >> 32) as u32).to_ne_bytes());
    body.extend(0u32.to_ne_bytes()); // expires
    // Queues and uid, which shimcheck does not read: any values.
    body.extend([0xA5; 12]);
    body.extend((s.inode as u32).to_ne_bytes());
    let mut attr = |kind: u16, value: &[u8]| {
        body.extend(((4 + value.len()) as u16).to_ne_bytes());
        body.extend(kind.to_ne_bytes());
        body.extend(value);
        while body.len() % 4 != 0 {
            body.push(0);
        }
    };
    if let Some(t) = s.tcp_info {
        let mut info = vec![0u8; 232];
        info[44..48].copy_from_slice(&t.last_data_sent_ms.to_ne_bytes());
        info[52..56].copy_from_slice(&t.last_data_recv_ms.to_ne_bytes());
        info[56..60].copy_from_slice(&t.last_ack_recv_ms.to_ne_bytes());
        attr(2, &info);
    }
    if let Some(id) = s.cgroup_id() {
        attr(21, &id.to_ne_bytes());
    }
    let mut msg = Vec::new();
    msg.extend(((16 + body.len()) as u32).to_ne_bytes());
    msg.extend(20u16.to_ne_bytes());
    msg.extend(2u16.to_ne_bytes()); // NLM_F_MULTI
    msg.extend(seq.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    msg.extend(body);
    msg
}

/// `NLMSG_DONE` with status 0.
pub fn diag_done() -> Vec<u8> {
    let mut msg = Vec::new();
    msg.extend(20u32.to_ne_bytes());
    msg.extend(3u16.to_ne_bytes());
    msg.extend(2u16.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    msg.extend(0i32.to_ne_bytes());
    msg
}
