//! The sampler: the one way every command looks at the node. It owns the socket source
//! (stage 1), the /proc scanner (stage 2) and, for loops, the incremental owner cache, and
//! turns them into a `Sample` plus the `Topology` computed beside the dump.
//!
//! Input: where to look (`NodeArgs`) and which states to show. Output: `Taken` (a `Sample`
//! and its `Topology`). One-shot commands (`ports`, `snapshot`) run the dump beside a full fd
//! scan; loops (`--watch`, `serve`) dump, then bring the owner cache up to date, reading only
//! what is new. Everything after this stage is pure.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, anyhow};
use rustc_hash::FxHashSet;

use crate::cgroup;
use crate::cli::NodeArgs;
use crate::collect::events::Edits;
use crate::collect::{self, CollectError, Dump, SocketSource};
use crate::join::{KeptTopology, Topology};
use crate::model::{
    FD_NAMED_SHARE, FdUse, HostFacts, Moved, OwnerIndex, Place, Sample, ScanStats, Socket,
    StateSet, TcpState, Warning,
};
use crate::procs::{OwnerCache, ProcScanner};

/// States always dumped, whatever `--state` shows: LISTEN tells server ports from client
/// ports; ESTABLISHED and CLOSE_WAIT are what the detector looks at.
pub const DETECT_STATES: [TcpState; 3] =
    [TcpState::Listen, TcpState::Established, TcpState::CloseWait];

/// Where cgroup v2 is mounted on a Linux host.
pub const SYS_FS_CGROUP: &str = "/sys/fs/cgroup";

/// How owners are found from one sample to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every fd table read beside the dump: the fastest single look.
    OneShot,
    /// Owners kept between samples; a sample reads only the fd tables that can hold its new
    /// sockets (`procs::OwnerCache`).
    Incremental,
}

/// One sample, the peer topology computed from its sockets, and, where an event-kept table
/// lent them, what it wrote since its last lend (for the stages a loop keeps).
pub struct Taken {
    pub sample: Sample,
    pub topology: Topology,
    pub edits: Option<Box<Edits>>,
}

/// What a loop's look at the node found.
pub enum Look {
    /// A new sample.
    New(Taken),
    /// The collector saw nothing move since the last look: the sockets, in the same order,
    /// and the topology are the last sample's; what moved is here (`Sample::apply`).
    Same(Moved),
}

/// The socket source, the /proc scanner and (incremental mode) the owner cache.
pub struct Sampler {
    source: Box<dyn SocketSource + Send>,
    scanner: ProcScanner,
    cache: Option<OwnerCache>,
    /// Incremental mode: the peer match, patched where the source says what changed.
    peers: KeptTopology,
    /// Said when the source was opened (a fallback); part of every sample's warnings.
    opened: Option<Warning>,
    sys_fs_cgroup: PathBuf,
    threads: usize,
    /// shimcheck's own pid as the scanned procfs numbers it (`ROOT/self`): its fd use is left
    /// out of the host facts. Its descriptors come and go within a sample (directory handles,
    /// threads), and a low limit of its own is not the node's problem.
    own_pid: Option<u32>,
}

impl Sampler {
    /// Opens the best source the host allows for `node` (sock_diag, every namespace with
    /// `--all-netns`, else /proc/net with a warning) and a scanner of `node.proc_root`.
    pub fn open(node: &NodeArgs, mode: Mode) -> Sampler {
        let threads = worker_threads();
        let reuse = match mode {
            Mode::OneShot => collect::Reuse::Nothing,
            // --no-bpf: no BPF program of any kind.
            Mode::Incremental if node.no_bpf => collect::Reuse::Unmoved,
            Mode::Incremental => collect::Reuse::Events,
        };
        let (source, opened) = collect::open(&node.proc_root, node.all_netns, threads, reuse);
        let mut scanner = ProcScanner::with_pods(&node.proc_root, &node.pods_dir);
        if !node.no_bpf {
            scanner.use_bpf();
        }
        let mut sampler = Sampler::with_source(source, scanner, mode);
        sampler.opened = opened;
        sampler
    }

    /// A sampler over a given source and scanner (fixtures, fakes).
    pub fn with_source(
        source: Box<dyn SocketSource + Send>,
        scanner: ProcScanner,
        mode: Mode,
    ) -> Sampler {
        Sampler {
            source,
            cache: (mode == Mode::Incremental).then(OwnerCache::new),
            peers: KeptTopology::default(),
            opened: None,
            sys_fs_cgroup: PathBuf::from(SYS_FS_CGROUP),
            threads: worker_threads(),
            own_pid: std::fs::read_link(scanner.root().join("self"))
                .ok()
                .and_then(|p| p.to_str()?.parse().ok()),
            scanner,
        }
    }

    /// What opening the source had to say (a fallback), for a loop to print before its first
    /// sample.
    pub fn opened(&self) -> Option<&Warning> {
        self.opened.as_ref()
    }

    /// Takes one whole sample of `states` (plus `DETECT_STATES`, always dumped).
    pub fn sample(&mut self, states: StateSet) -> anyhow::Result<Taken> {
        let taken_at = SystemTime::now();
        let dump_states = states.union(DETECT_STATES.into_iter().collect());
        let own = collect::netns::own(self.scanner.root()).unwrap_or(0);
        if let Some(cache) = &mut self.cache {
            let mut dump = tagged(self.source.dump(dump_states).map_err(collect_failed)?, own);
            let topology = self.peers.topology(&dump.sockets, dump.edits.as_ref());
            let found = refreshed(cache, &topology, &self.scanner, self.threads, &dump)?;
            let edits = dump.edits.take().map(Box::new);
            let mut taken = self.build(dump, topology, found, own, taken_at);
            taken.edits = edits;
            return Ok(taken);
        }
        let source = &mut self.source;
        let scanner = &self.scanner;
        // The dump (the longer of the two) on one thread; the fd walk on this one, which then
        // sorts the pairs while the dump goes on.
        let (dumped, scan) = std::thread::scope(|s| {
            let dump = s.spawn(|| source.dump(dump_states).map(|d| tagged(d, own)));
            let scan = scanner
                .socket_fds(self.threads, false)
                .map(|scan| (OwnerIndex::from(scan.pairs), scan.stats, scan.fds));
            (dump.join(), scan)
        });
        let dump = dumped
            .map_err(|_| anyhow!("the socket collector thread panicked"))?
            .map_err(collect_failed)?;
        let (pairs, stats, fds) = scan.with_context(|| proc_failed(scanner.root()))?;
        // Processes at half their fd limit or more get a name too: a finding or a metric may
        // be about them.
        let near_limit: Vec<u32> = fds
            .iter()
            .filter(|(_, f)| f.at_least(FD_NAMED_SHARE))
            .map(|(pid, _)| *pid)
            .collect();
        // Then the peer match and the description of the owners, side by side.
        let (topology, owners) = std::thread::scope(|s| {
            let topology = s.spawn(|| Topology::new(&dump.sockets));
            let owners = scanner.index(
                pairs,
                dump.sockets.iter().map(|s| s.inode),
                near_limit.into_iter(),
            );
            (topology.join(), owners)
        });
        let topology = topology.map_err(|_| anyhow!("the peer match thread panicked"))?;
        let found = Found {
            owners,
            stats,
            fds: fds.into_iter().collect(),
            cgroups_unowned: None,
        };
        Ok(self.build(dump, topology, found, own, taken_at))
    }

    /// A loop's look: like `sample`, except that when the collector sees nothing move since
    /// the last look (incremental mode, `collect::counters`), only what moved is read and
    /// returned. `before_new` runs just before a new sample is taken: the loop drops its last
    /// one there, so that two samples are never held at once, and gives back its sockets (a
    /// source that keeps a table lends the table's own to each sample).
    pub fn look(
        &mut self,
        states: StateSet,
        before_new: impl FnOnce() -> Option<Vec<Socket>>,
    ) -> anyhow::Result<Look> {
        let dump_states = states.union(DETECT_STATES.into_iter().collect());
        let cache = match &mut self.cache {
            Some(cache) if self.source.still(dump_states) => cache,
            _ => {
                if let Some(sockets) = before_new() {
                    self.source.recycle(sockets);
                }
                return self.sample(states).map(Look::New);
            }
        };
        let taken_at = SystemTime::now();
        let still = cache
            .refresh_same(&self.scanner, self.threads)
            .with_context(|| proc_failed(self.scanner.root()))?;
        Ok(Look::Same(Moved {
            taken_at,
            fds: self.others(still.fds),
            scan: still.stats,
            warnings: self
                .opened
                .iter()
                .cloned()
                .chain(self.scanner.bpf_warning())
                .collect(),
            owners: still.owners,
        }))
    }

    /// Reads again the tcp_info clocks of the sockets at `which` of `sample` (the last new
    /// sample this sampler took), where the collector aged them instead of reading them
    /// (state-change events say nothing of data); returns how many it read. What the detector
    /// judges by these clocks (`History::clocks_wanted`) is then judged on clocks read now.
    pub fn fresh_clocks(&mut self, sample: &mut Sample, which: &[u32]) -> usize {
        self.source.fresh_clocks(&mut sample.sockets, which)
    }

    /// `fds` without shimcheck's own.
    fn others(&self, mut fds: BTreeMap<u32, FdUse>) -> BTreeMap<u32, FdUse> {
        if let Some(pid) = self.own_pid {
            fds.remove(&pid);
        }
        fds
    }

    /// The sample itself.
    fn build(
        &self,
        dump: Dump,
        topology: Topology,
        found: Found,
        own: u64,
        taken_at: SystemTime,
    ) -> Taken {
        let scanner = &self.scanner;
        let mut warnings: Vec<Warning> = self.opened.iter().cloned().collect();
        warnings.extend(scanner.bpf_warning());
        warnings.extend(dump.warnings);
        let cgroup_places = match &found.cgroups_unowned {
            Some(wanted) => places_of_cgroups(scanner, &self.sys_fs_cgroup, wanted),
            None => cgroup_places(scanner, &self.sys_fs_cgroup, &dump.sockets, &found.owners),
        };
        let sample = Sample {
            tcp_info_age_ms: 0,
            taken_at,
            hostname: hostname(),
            cgroup_places,
            netns_names: name_namespaces(scanner, own, &dump.namespaces),
            sockets: dump.sockets,
            owners: found.owners,
            scan: found.stats,
            host: HostFacts {
                port_range: scanner.port_range(),
                fds: self.others(found.fds),
            },
            warnings,
            own_netns: own,
        };
        Taken {
            sample,
            topology,
            edits: None,
        }
    }
}

/// The owners side of a sample, however it was found.
struct Found {
    owners: OwnerIndex,
    stats: ScanStats,
    fds: BTreeMap<u32, FdUse>,
    /// The cgroups of the sockets no process holds, where the owner cache knows those; else
    /// `cgroup_places` finds them.
    cgroups_unowned: Option<HashSet<u64>>,
}

/// Incremental mode: a new dump's owners from the owner cache brought up to date. The owner
/// cache and the join both walk the sockets in inode order: the topology's, kept for both.
fn refreshed(
    cache: &mut OwnerCache,
    topology: &Topology,
    scanner: &ProcScanner,
    threads: usize,
    dump: &Dump,
) -> anyhow::Result<Found> {
    let r = cache
        .refresh_sorted(scanner, topology.inodes(), threads)
        .with_context(|| proc_failed(scanner.root()))?;
    // Usually every socket has an inode and a holder: then no pass over them is needed.
    let cgroups_unowned = if r.unowned.is_empty() && topology.inodes().len() == dump.sockets.len() {
        HashSet::new()
    } else {
        cgroups_of(&dump.sockets, &r.unowned)
    };
    let found = Found {
        owners: r.owners,
        stats: r.stats,
        fds: r.fds,
        cgroups_unowned: Some(cgroups_unowned),
    };
    Ok(found)
}

/// A dump with the sockets of a single-namespace source tagged as shimcheck's own.
fn tagged(mut dump: Dump, own: u64) -> Dump {
    for s in dump.sockets.iter_mut().filter(|s| s.netns == 0) {
        s.netns = own;
    }
    dump
}

fn collect_failed(e: CollectError) -> anyhow::Error {
    let hint = e.hint();
    anyhow::Error::new(e).context(format!("cannot list TCP sockets ({hint})"))
}

fn proc_failed(root: &Path) -> String {
    format!(
        "cannot list processes in {} (is procfs mounted there? --proc-root names another)",
        root.display()
    )
}

/// Threads for the fd scan and the namespace sweep: every core, up to 8 (past that /proc's
/// locks, not CPUs, limit).
pub fn worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// The node's name, as `hostname` prints it.
pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// Names the owners of sockets no visible process holds (unprivileged, another pid namespace)
/// by the cgroup that created them: their pod or systemd unit.
pub fn cgroup_places(
    scanner: &ProcScanner,
    sys_fs_cgroup: &Path,
    sockets: &[Socket],
    owners: &OwnerIndex,
) -> BTreeMap<u64, Place> {
    let mut by_inode: Vec<(u64, u64)> = sockets
        .iter()
        .filter_map(|s| Some((s.inode, s.cgroup_id()?)))
        .collect();
    crate::join::radix_sort_by_key(&mut by_inode, |&(inode, _)| inode);
    let mut wanted: HashSet<u64> = HashSet::new();
    owners.walk_sorted(by_inode.iter().map(|&(i, _)| i), |i, run| {
        if run.is_empty() {
            wanted.insert(by_inode[i].1);
        }
    });
    places_of_cgroups(scanner, sys_fs_cgroup, &wanted)
}

/// The cgroups of the sockets without an inode or whose inode is in `unowned`: what
/// `cgroup_places` looks up, where the inodes no process holds are known already (the owner
/// cache keeps them), found without a sort of every socket.
fn cgroups_of(sockets: &[Socket], unowned: &FxHashSet<u64>) -> HashSet<u64> {
    sockets
        .iter()
        .filter(|s| s.inode == 0 || (!unowned.is_empty() && unowned.contains(&s.inode)))
        .filter_map(Socket::cgroup_id)
        .collect()
}

/// The pod or unit of each cgroup of `wanted`, by its path under the cgroup v2 mount.
fn places_of_cgroups(
    scanner: &ProcScanner,
    sys_fs_cgroup: &Path,
    wanted: &HashSet<u64>,
) -> BTreeMap<u64, Place> {
    if wanted.is_empty() {
        return BTreeMap::new();
    }
    let Some(root) = cgroup::v2_root(sys_fs_cgroup) else {
        return BTreeMap::new();
    };
    cgroup::paths_by_id(&root, wanted)
        .into_iter()
        .map(|(id, path)| (id, scanner.place(&cgroup::placement_of_path(&path))))
        .collect()
}

/// Names namespaces as operators know them: `host` (PID 1's, or shimcheck's own where PID 1's
/// cannot be read), `ip netns` names, and the pod of a process living in one.
pub fn name_namespaces(
    scanner: &ProcScanner,
    own: u64,
    targets: &[collect::netns::Target],
) -> BTreeMap<u64, String> {
    let mut names = BTreeMap::new();
    let host = collect::netns::inode_of(&scanner.root().join("1/ns/net")).unwrap_or(own);
    names.insert(host, "host".to_string());
    for (inode, name) in collect::netns::ip_netns(Path::new(collect::netns::IP_NETNS_DIR)) {
        names.entry(inode).or_insert(name);
    }
    for t in targets {
        if names.contains_key(&t.inode) {
            continue;
        }
        if let Some(pod) = t
            .pid
            .and_then(|pid| scanner.process(pid))
            .and_then(|p| p.place.pod)
        {
            names.insert(t.inode, format!("{}/{}", pod.namespace, pod.name));
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroups_wanted_are_those_of_sockets_with_no_inode_or_no_holder() {
        let sock = |inode: u64, cgroup: u64| {
            let mut s = Socket::new(
                TcpState::Established,
                "127.0.0.1:40000".parse().unwrap_or_else(|_| unreachable!()),
                "127.0.0.1:5000".parse().unwrap_or_else(|_| unreachable!()),
            );
            s.inode = inode;
            s.set_cgroup_id(Some(cgroup));
            s
        };
        let sockets = [sock(10, 1), sock(11, 2), sock(0, 3), sock(12, 4)];
        let none = FxHashSet::default();
        assert_eq!(cgroups_of(&sockets, &none), HashSet::from([3]));
        let unowned: FxHashSet<u64> = [12].into_iter().collect();
        assert_eq!(cgroups_of(&sockets, &unowned), HashSet::from([3, 4]));
    }
}
