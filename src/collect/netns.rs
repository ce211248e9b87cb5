//! Stage 1, collector, every network namespace (`--all-netns`): find the distinct namespaces
//! through /proc/*/ns/net (and `ip netns` mounts in /run/netns), enter each on a worker thread
//! (`setns` is per thread) and dump there; tag every socket with its namespace inode.
//!
//! `AllNetns` is the `SocketSource` for `--all-netns`. Input: a procfs root and a `StateSet`.
//! Output: a `Dump` of tagged sockets, the namespaces dumped, and warnings for namespaces that
//! could not be looked at or entered.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::fs::{Mode, OFlags};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use super::netlink::NetlinkSource;
use super::{CollectError, Dump, SocketSource};
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
}

impl AllNetns {
    /// Dumps the namespaces of the processes under `proc_root` and those `ip netns` names,
    /// on up to `threads` worker threads; `own` is a sock_diag socket of this namespace.
    pub fn new(own: NetlinkSource, proc_root: &Path, threads: usize) -> AllNetns {
        AllNetns {
            own,
            proc_root: proc_root.to_path_buf(),
            ip_netns_dir: PathBuf::from(IP_NETNS_DIR),
            threads,
        }
    }
}

impl SocketSource for AllNetns {
    fn name(&self) -> &'static str {
        "sock_diag in every network namespace"
    }

    fn sockets(&mut self, states: StateSet) -> Result<Vec<Socket>, CollectError> {
        self.dump(states).map(|d| d.sockets)
    }

    fn dump(&mut self, states: StateSet) -> Result<Dump, CollectError> {
        let pids = list_pids(&self.proc_root);
        let (targets, denied) = discover(&self.proc_root, &pids, &self.ip_netns_dir);
        let own_inode = own(&self.proc_root).unwrap_or(0);
        let (sockets, mut warnings) =
            dump_all(&mut self.own, &targets, own_inode, states, self.threads);
        if denied > 0 {
            warnings.push(Warning::NetnsHidden { processes: denied });
        }
        Ok(Dump {
            sockets,
            namespaces: targets,
            warnings,
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

/// The sockets of every target. Shimcheck's own namespace (`own_inode`) is dumped on the
/// calling thread through `own_source`, without `setns` (any user may); every other one on
/// fresh worker threads (`threads` of them, each entering namespace after namespace, then
/// ending, so no thread is left in a foreign namespace). Sockets carry their namespace's
/// inode; a namespace that cannot be entered (not root, or gone) is counted in the returned
/// warning and left out.
fn dump_all(
    own_source: &mut NetlinkSource,
    targets: &[Target],
    own_inode: u64,
    states: StateSet,
    threads: usize,
) -> (Vec<Socket>, Vec<Warning>) {
    let failures: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());
    let fail = |inode: u64, e: String| {
        if let Ok(mut f) = failures.lock() {
            f.push((inode, e));
        }
    };
    let tag = |mut sockets: Vec<Socket>, inode: u64| {
        sockets.iter_mut().for_each(|s| s.netns = inode);
        sockets
    };
    let (own, others): (Vec<&Target>, Vec<&Target>) =
        targets.iter().partition(|t| t.inode == own_inode);
    let mut all = Vec::new();
    for t in own {
        match own_source.sockets(states) {
            Ok(sockets) => all.extend(tag(sockets, t.inode)),
            Err(e) => fail(t.inode, e.to_string()),
        }
    }
    let next = AtomicUsize::new(0);
    let work = || {
        let mut out = Vec::new();
        while let Some(t) = others.get(next.fetch_add(1, Ordering::Relaxed)) {
            match enter_and_dump(t, states) {
                Ok(sockets) => out.extend(tag(sockets, t.inode)),
                Err(e) => fail(t.inode, e),
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
                Ok(sockets) => all.extend(sockets),
                Err(_) => fail(0, "a namespace worker thread panicked".into()),
            }
        }
    });
    let failures = failures.into_inner().unwrap_or_default();
    let mut warnings = Vec::new();
    if let Some((inode, first)) = failures.first() {
        warnings.push(Warning::NetnsNotDumped {
            failed: failures.len(),
            total: targets.len(),
            first_inode: *inode,
            first_error: first.clone(),
        });
    }
    (all, warnings)
}

/// Moves this (worker) thread into one namespace and dumps it there.
fn enter_and_dump(t: &Target, states: StateSet) -> Result<Vec<Socket>, String> {
    let fd = rustix::fs::open(&t.path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| e.to_string())?;
    move_into_link_name_space(
        rustix::fd::AsFd::as_fd(&fd),
        Some(LinkNameSpaceType::Network),
    )
    .map_err(|e| format!("setns: {e}"))?;
    let mut source = NetlinkSource::open().map_err(|e: CollectError| e.to_string())?;
    source.sockets(states).map_err(|e| e.to_string())
}
