//! Stage 2, process join, OS half: socket inode → owning processes, like the `users:` column
//! of `ss -tanp` or `lsof -i`.
//!
//! Input: a procfs root (`/proc`, or a fake tree in `fixtures/`). Output: an `OwnerIndex`
//! (sorted `(inode, pid)` pairs plus `Process` details for the pids that matter) and
//! `ScanStats` counting what could not be read. A process that vanishes mid-scan or hides its
//! fd table is counted, never fatal. The fd walk is the hot path (one `readlinkat` per fd,
//! relative to the open fd directory, into a stack buffer), so it uses `rustix` directly; the
//! few owner details go through `procfs`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;
use std::fmt::Write as _;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::{Dir, Mode, OFlags};
use rustix::io::Errno;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::cgroup::{self, Placement, PodDirectory, PodRef};
use crate::model::{
    Attribution, FD_NAMED_SHARE, FdUse, OwnerIndex, Place, Process, ScanStats, Socket, Warning,
};

/// Where the kubelet keeps one log directory per pod, named `<namespace>_<name>_<uid>`.
pub const DEFAULT_PODS_DIR: &str = "/var/log/pods";

/// What one walk over every fd table found.
#[derive(Debug, Clone, Default)]
pub struct FdScan {
    /// `(socket inode, pid)`, unsorted.
    pub pairs: Vec<(u64, u32)>,
    pub stats: ScanStats,
    /// Open files (and their limit) per process read.
    pub fds: Vec<(u32, FdUse)>,
    /// With `keep_tables`: every process's fd table, `(fd, socket inode or 0)` by fd.
    pub tables: Vec<(u32, FdTable)>,
}

/// One process's fd table as read: `(fd, socket inode)` ascending by fd, inode 0 for a file
/// that is not a socket.
pub type FdTable = Vec<(u32, u64)>;

/// One fd of a process as the owner cache last read it. 16 bytes an fd.
#[derive(Debug, Clone, Copy)]
struct Slot {
    fd: u32,
    /// The socket inode, 0 for another kind of file.
    socket: u64,
    /// The socket was in the dump when the slot was read: if it leaves the dump, the slot is
    /// one to read again (closed and perhaps reused).
    dumped: bool,
}

/// Reads `/proc/*/fd` under a root.
pub struct ProcScanner {
    root: PathBuf,
    pods_dir: PathBuf,
    /// Read once, again when a pod uid is not in it (a pod started since).
    pods: Mutex<PodDirectory>,
    /// The root is a procfs, so a `PID/fd` directory's size is its number of open files
    /// (Linux 6.2+; 0 before). Anywhere else (a fake tree, a copy) a directory's size counts
    /// bytes or entries of the filesystem holding it, not fds.
    fd_sizes: bool,
    /// The BPF fd walk, once loaded (`use_bpf`): `socket_fds` reads the fd tables through it.
    bpf: Option<crate::bpf::TaskFiles>,
    /// Why the BPF walk, which this host allows, failed to load.
    bpf_failed: Option<String>,
}

/// The most fds a process can hold (`fs.nr_open` cannot be set above this on 64-bit
/// kernels): a directory size beyond it is not an fd count.
const MAX_FDS: u64 = 2_147_483_584;

impl ProcScanner {
    /// A scanner over `root` (normally `/proc`).
    pub fn new(root: &Path) -> ProcScanner {
        ProcScanner::with_pods(root, Path::new(DEFAULT_PODS_DIR))
    }

    /// A scanner that names pods from `pods_dir` (the kubelet's /var/log/pods).
    pub fn with_pods(root: &Path, pods_dir: &Path) -> ProcScanner {
        ProcScanner {
            root: root.to_path_buf(),
            pods_dir: pods_dir.to_path_buf(),
            pods: Mutex::new(PodDirectory::read(pods_dir)),
            // One statfs for the scanner's life.
            fd_sizes: rustix::fs::statfs(root)
                .is_ok_and(|fs| fs.f_type == rustix::fs::PROC_SUPER_MAGIC),
            bpf: None,
            bpf_failed: None,
        }
    }

    /// Reads fd tables with the BPF iterator from now on, where this process may load it and
    /// the root numbers processes as the kernel does (`bpf::usable_with`); otherwise, and when
    /// loading fails (said by `bpf_warning`), through `/proc` as before.
    pub fn use_bpf(&mut self) {
        if crate::bpf::usable_with(&self.root) {
            match crate::bpf::TaskFiles::load() {
                Ok(files) => self.bpf = Some(files),
                Err(e) => self.bpf_failed = Some(e.to_string()),
            }
        }
    }

    /// The warning when the BPF walk could have been used and failed to load.
    pub fn bpf_warning(&self) -> Option<Warning> {
        self.bpf_failed.as_ref().map(|error| Warning::BpfFallback {
            error: error.clone(),
        })
    }

    /// True when open-file counts may come from the size of `PID/fd` (`stat`, no listing): the
    /// root is a procfs. Whether the kernel fills the size in (6.2+) shows per process: 0 is
    /// taken as unknown.
    pub fn fd_counts_from_size(&self) -> bool {
        self.fd_sizes
    }

    /// The procfs root this scanner reads.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens the procfs root directory.
    fn open_root(&self) -> Result<rustix::fd::OwnedFd, std::io::Error> {
        Ok(rustix::fs::open(
            &self.root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?)
    }

    /// Every pid under the root.
    pub fn pids(&self) -> Result<Vec<u32>, std::io::Error> {
        let root = self.open_root()?;
        let mut pids = Vec::new();
        for entry in Dir::read_from(&root)? {
            if let Some(pid) = parse_u32(entry?.file_name().to_bytes()) {
                pids.push(pid);
            }
        }
        Ok(pids)
    }

    /// A process's number of open files from the size of its fd directory (Linux 6.2+);
    /// `None` where the root is no procfs, the kernel reports 0 (before 6.2), the size cannot
    /// be an fd count, or the process is gone.
    fn fd_count(&self, pid: u32) -> Option<u64> {
        if !self.fd_sizes {
            return None;
        }
        let st = rustix::fs::stat(self.root.join(format!("{pid}/fd"))).ok()?;
        u64::try_from(st.st_size)
            .ok()
            .filter(|&n| n > 0 && n <= MAX_FDS)
    }

    /// A process's fd directory held open for `fd_count_held` (`O_PATH`: nothing is read, and
    /// no permission is needed beyond the lookup a `stat` makes); `None` where `fd_count`
    /// gives no count anyway.
    fn fd_dir(&self, pid: u32) -> Option<rustix::fd::OwnedFd> {
        if !self.fd_sizes {
            return None;
        }
        rustix::fs::open(
            self.root.join(format!("{pid}/fd")),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()
    }

    /// `fd_count` through a held fd directory, without a path lookup: a third of the cost.
    /// `Err` once its process is gone: a handle never follows a reused pid to another process.
    fn fd_count_held(dir: &rustix::fd::OwnedFd) -> Result<Option<u64>, Errno> {
        let st = rustix::fs::fstat(dir)?;
        Ok(u64::try_from(st.st_size)
            .ok()
            .filter(|&n| n > 0 && n <= MAX_FDS))
    }

    /// A process's number of open files by listing its fd directory (no link is read): what
    /// `fd_count` gives for free on Linux 6.2+, at the cost of one directory read.
    fn fd_count_listed(&self, pid: u32) -> Option<u64> {
        let dir = rustix::fs::open(
            self.root.join(format!("{pid}/fd")),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let mut open = 0;
        for entry in Dir::read_from(&dir).ok()? {
            if entry.ok()?.file_name().to_bytes().first() != Some(&b'.') {
                open += 1;
            }
        }
        Some(open)
    }

    /// Walks every process's fd table and returns `(socket inode, pid)` pairs, on `threads`
    /// threads that take the next pid as they finish one (fd tables differ wildly in size),
    /// and with `keep_tables` each table itself. Fails only when the root itself cannot be
    /// listed.
    pub fn socket_fds(&self, threads: usize, keep_tables: bool) -> Result<FdScan, std::io::Error> {
        // A walk that fails midway (it never has here) is done again through /proc: the
        // answer stays right, and `attribution` says how it was found.
        if let Some(scan) = self
            .bpf
            .as_ref()
            .and_then(|b| self.kernel_fds(b, keep_tables))
        {
            return Ok(scan);
        }
        let root = self.open_root()?;
        let pids = self.pids()?;
        let next = AtomicUsize::new(0);
        let work = || {
            let mut stats = ScanStats::default();
            let mut pairs = Vec::new();
            let mut fds = Vec::new();
            let mut tables = Vec::new();
            let mut path = String::with_capacity(24);
            while let Some(&pid) = pids.get(next.fetch_add(1, Ordering::Relaxed)) {
                path.clear();
                let _ = write!(path, "{pid}/fd");
                let mut table = keep_tables.then(Vec::new);
                match scan_fd_dir(&root, &path, pid, &mut pairs, table.as_mut()) {
                    Ok(open) => {
                        stats.scanned += 1;
                        if let Some(t) = table {
                            tables.push((pid, t));
                        }
                        fds.push((
                            pid,
                            FdUse {
                                open,
                                limit: self.fd_limit(pid),
                            },
                        ));
                    }
                    Err(Errno::NOENT | Errno::SRCH) => stats.vanished += 1,
                    Err(Errno::ACCESS | Errno::PERM) => stats.denied += 1,
                    Err(e) => {
                        stats.unreadable += 1;
                        stats.first_unreadable.get_or_insert_with(|| {
                            format!("{}/{pid}/fd: {e}", self.root.display())
                        });
                    }
                }
            }
            FdScan {
                pairs,
                stats,
                fds,
                tables,
            }
        };
        let parts: Vec<FdScan> = std::thread::scope(|s| {
            let helpers: Vec<_> = (1..threads.max(1)).map(|_| s.spawn(work)).collect();
            let mut parts = vec![work()];
            // A scan thread that panicked lost its share: that is a bug, not a vanished pid.
            parts.extend(helpers.into_iter().filter_map(|h| h.join().ok()));
            parts
        });
        let mut all = FdScan::default();
        for part in parts {
            all.pairs.extend(part.pairs);
            all.fds.extend(part.fds);
            all.tables.extend(part.tables);
            all.stats.merge(part.stats);
        }
        if all.stats.denied > 0 {
            all.stats.lacking = crate::privilege::lacking(crate::privilege::READ_OWNERS);
        }
        all.stats.hidepid = crate::privilege::proc_hides(&self.root);
        Ok(all)
    }

    /// `socket_fds` through the BPF walk: the same pairs, tables and open-file counts, every
    /// process seen (nothing is denied or hidden in the kernel). `None` if the walk failed.
    fn kernel_fds(&self, bpf: &crate::bpf::TaskFiles, keep_tables: bool) -> Option<FdScan> {
        let mut pairs = Vec::new();
        // Per process, in the order the walk met them: (pid, open files, table).
        let mut seen: Vec<(u32, u64, FdTable)> = Vec::new();
        let mut at: FxHashMap<u32, usize> = FxHashMap::default();
        bpf.walk(|f| {
            // A process's files come one after another; a lookup only when the pid changes.
            let i = match seen.last() {
                Some((pid, ..)) if *pid == f.pid => seen.len() - 1,
                _ => *at.entry(f.pid).or_insert_with(|| {
                    seen.push((f.pid, 0, Vec::new()));
                    seen.len() - 1
                }),
            };
            let (_, open, table) = &mut seen[i];
            *open += 1;
            if f.socket != 0 {
                pairs.push((f.socket, f.pid));
            }
            if keep_tables {
                table.push((f.fd, f.socket));
            }
        })
        .ok()?;
        let mut scan = FdScan {
            pairs,
            stats: ScanStats {
                scanned: seen.len(),
                attribution: Attribution::Bpf,
                ..ScanStats::default()
            },
            ..FdScan::default()
        };
        for (pid, open, mut table) in seen {
            scan.fds.push((
                pid,
                FdUse {
                    open,
                    limit: self.fd_limit(pid),
                },
            ));
            if keep_tables {
                table.sort_unstable();
                scan.tables.push((pid, table));
            }
        }
        Some(scan)
    }

    /// The soft RLIMIT_NOFILE of a process (`Max open files` in /proc/PID/limits).
    fn fd_limit(&self, pid: u32) -> Option<u64> {
        let p = procfs::process::Process::new_with_root(self.root.join(pid.to_string())).ok()?;
        match p.limits().ok()?.max_open_files.soft_limit {
            procfs::process::LimitValue::Value(v) => Some(v),
            procfs::process::LimitValue::Unlimited => None,
        }
    }

    /// `sys/net/ipv4/ip_local_port_range` under the root: the ephemeral port range.
    pub fn port_range(&self) -> Option<(u16, u16)> {
        let text =
            std::fs::read_to_string(self.root.join("sys/net/ipv4/ip_local_port_range")).ok()?;
        let mut it = text.split_whitespace().map(str::parse::<u16>);
        match (it.next(), it.next()) {
            (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Some((lo, hi)),
            _ => None,
        }
    }

    /// Reads name, command line and uid of one process; `None` if it has gone.
    pub fn process(&self, pid: u32) -> Option<Process> {
        let p = procfs::process::Process::new_with_root(self.root.join(pid.to_string())).ok()?;
        let comm = p.stat().ok()?.comm;
        // A kernel thread or a zombie has an empty cmdline; that is not an error.
        let cmdline = cmdline(&p).unwrap_or_default();
        // No cgroup file (a fake tree, an old kernel): the process simply has no placement.
        let placement = p
            .cgroups()
            .map(|g| cgroup::placement(&g.0))
            .unwrap_or_default();
        Some(Process {
            pid,
            comm,
            cmdline,
            uid: p.uid().ok(),
            place: self.place(&placement),
            container_id: placement.container_id,
        })
    }

    /// A cgroup placement named as operators name it: the pod its uid stands for, or its unit.
    pub fn place(&self, placement: &Placement) -> Place {
        Place {
            pod: placement.pod_uid.as_deref().and_then(|uid| self.pod(uid)),
            unit: placement.unit.clone(),
        }
    }

    /// The pod with this uid; the directory is read again once when the uid is new to it.
    pub fn pod(&self, uid: &str) -> Option<PodRef> {
        let mut pods = self.pods.lock().ok()?;
        if pods.get(uid).is_none() {
            *pods = PodDirectory::read(&self.pods_dir);
        }
        pods.get(uid).cloned()
    }

    /// Indexes the pairs and describes every process that holds one of `inodes`, plus the
    /// `extra` ones (processes a finding may name). A process that exits before it is
    /// described keeps its sockets under the name `?`.
    pub fn index(
        &self,
        pairs: impl Into<OwnerIndex>,
        inodes: impl Iterator<Item = u64>,
        extra: impl Iterator<Item = u32>,
    ) -> OwnerIndex {
        let mut index: OwnerIndex = pairs.into();
        let mut inodes: Vec<u64> = inodes.collect();
        inodes.sort_unstable();
        inodes.dedup();
        let mut pids: Vec<u32> = Vec::new();
        let held = index.pairs();
        index.walk_sorted(inodes.iter().copied(), |_, run| {
            pids.extend(held[run].iter().map(|&(_, pid)| pid))
        });
        pids.extend(extra);
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            let process = self.process(pid).unwrap_or_else(|| Process::unknown(pid));
            index.processes.insert(pid, process);
        }
        index
    }
}

/// Reads one fd directory: every socket's `(inode, pid)` into `pairs` and, with `table`,
/// every fd as `(fd, socket inode or 0)` in ascending order. Returns the number of open fds.
fn scan_fd_dir(
    root: &rustix::fd::OwnedFd,
    path: &str,
    pid: u32,
    pairs: &mut Vec<(u64, u32)>,
    mut table: Option<&mut FdTable>,
) -> Result<u64, Errno> {
    let fd_dir = rustix::fs::openat(
        root,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut link = [MaybeUninit::<u8>::uninit(); 64];
    let mut dir = Dir::new(fd_dir)?;
    let mut open = 0;
    // `Dir` owns the fd; readlinkat needs it too, so borrow it back through the iterator.
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name: &CStr = entry.file_name();
        if name.to_bytes().first() == Some(&b'.') {
            continue;
        }
        open += 1;
        match rustix::fs::readlinkat_raw(dir.fd()?, name, &mut link) {
            Ok((target, _)) => {
                let inode = socket_inode(target);
                if let Some(inode) = inode {
                    pairs.push((inode, pid));
                }
                if let (Some(t), Some(fd)) = (table.as_mut(), parse_u32(name.to_bytes())) {
                    t.push((fd, inode.unwrap_or(0)));
                }
            }
            // The fd was closed between listing and reading: it is simply gone.
            Err(Errno::NOENT) => {}
            Err(e) => return Err(e),
        }
    }
    if let Some(t) = table {
        t.sort_unstable();
    }
    Ok(open)
}

/// Reads one fd slot of an open `/proc/PID/fd` directory: `Some(inode)` for a socket,
/// `Some(0)` for another file, `None` for an fd not open.
fn read_slot(dir: &rustix::fd::OwnedFd, fd: u32) -> Result<Option<u64>, Errno> {
    let mut link = [MaybeUninit::<u8>::uninit(); 64];
    match rustix::fs::readlinkat_raw(dir, fd.to_string(), &mut link) {
        Ok((target, _)) => Ok(Some(socket_inode(target).unwrap_or(0))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `/proc/PID/cmdline`, its arguments joined by spaces. Read as bytes: procfs's `cmdline()`
/// fails on an argument that is not UTF-8, which would lose the whole line; a bad byte
/// becomes U+FFFD instead.
fn cmdline(p: &procfs::process::Process) -> Option<String> {
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut p.open_relative("cmdline").ok()?, &mut raw).ok()?;
    let args: Vec<_> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy)
        .collect();
    Some(args.join(" "))
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &[u8]) -> Option<u64> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn parse_u32(name: &[u8]) -> Option<u32> {
    if name.is_empty() || !name.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(name).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_links_parse() {
        assert_eq!(socket_inode(b"socket:[123]"), Some(123));
        assert_eq!(socket_inode(b"pipe:[123]"), None);
        assert_eq!(socket_inode(b"socket:[12"), None);
        assert_eq!(socket_inode(b"socket:[]"), None);
        assert_eq!(parse_u32(b"self"), None);
        assert_eq!(parse_u32(b"4242"), Some(4242));
    }
}

/// Samples between two full fd scans in watch mode: a socket that changes hands (inherited by
/// a new child, passed over a unix socket) keeps its old owners until the next full scan...
pub const FULL_SCAN_EVERY: u32 = 60;
/// ... and not more often than this (a watch every 100 ms scans every 2 minutes, not 6 s).
pub const FULL_SCAN_AFTER: std::time::Duration = std::time::Duration::from_secs(120);

/// The inode → owner map kept between watch samples, so that a sample looks only for the
/// sockets it has not seen: first in the processes that gained sockets before, then in the
/// others, stopping as soon as every new socket is found; a socket no visible process holds
/// is not searched for again.
#[derive(Debug, Default)]
pub struct OwnerCache {
    /// Sorted, deduplicated `(socket inode, pid)` of the sockets open at the last refresh:
    /// 16 bytes a holder, where a map of vectors cost about 100 at 120,000 sockets. Shared
    /// with the owner index of the samples (`index`): changed in place when none holds it.
    owners: Arc<Vec<(u64, u32)>>,
    unowned: FxHashSet<u64>,
    /// Pids that gained sockets, most recent first.
    recent: Vec<u32>,
    processes: HashMap<u32, Process>,
    fds: FxHashMap<u32, FdUse>,
    stats: ScanStats,
    since_full: Option<u32>,
    /// When the last full scan ran.
    last_full: Option<std::time::Instant>,
    /// The pids alive at the last refresh, ascending.
    live: Vec<u32>,
    /// Each process's fd table as last read, so that a search reads only its new slots.
    tables: FxHashMap<u32, Vec<Slot>>,
    /// Sockets seen in an fd table but not in the dump then, with where they were seen.
    undumped: FxHashMap<u64, (u32, u32)>,
    /// Live processes' fd directories, held open (up to `held_fd_dirs`) so that a sample's
    /// open-file counts need no path lookup each: the largest cost of a sample where nothing
    /// moved.
    fd_dirs: FxHashMap<u32, rustix::fd::OwnedFd>,
}

/// How many fd directories the owner cache holds open at most: half of what this process may
/// open beyond 64 for its own work (sockets, directories, threads), so that a low limit is
/// never why a sample fails; a process past it is counted by path.
fn held_fd_dirs() -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    usize::try_from(soft.saturating_sub(64) / 2)
        .unwrap_or(usize::MAX)
        .min(1 << 16)
}

/// The owner map after a refresh.
#[derive(Debug, Clone)]
pub struct Refreshed {
    /// Owners of the sockets passed in, with the details of their holders and of every
    /// process at half its fd limit or more.
    pub owners: OwnerIndex,
    /// The latest full scan's statistics.
    pub stats: ScanStats,
    /// Every live process's fd use.
    pub fds: BTreeMap<u32, FdUse>,
    pub cost: RefreshCost,
    /// The inodes of the sockets passed in that no process was found holding.
    pub unowned: FxHashSet<u64>,
}

/// The owner map after a refresh with the same sockets (`OwnerCache::refresh_same`).
#[derive(Debug, Clone)]
pub struct Still {
    /// The owners, only when they changed (a holder exited, or the full scan ran).
    pub owners: Option<OwnerIndex>,
    /// The latest full scan's statistics.
    pub stats: ScanStats,
    /// Every live process's fd use.
    pub fds: BTreeMap<u32, FdUse>,
}

/// What one incremental refresh cost, for the benchmark and the tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefreshCost {
    /// A full scan of every fd table ran.
    pub full: bool,
    /// Processes whose whole fd tables were read.
    pub processes_read: usize,
    /// Single fd slots read where a new socket could be (`read_new_slots`).
    pub slots_read: usize,
}

/// The owners a search found.
#[derive(Default)]
struct Found {
    added: FxHashSet<(u64, u32)>,
    added_inodes: FxHashSet<u64>,
    /// Pids that gained sockets, in the order found.
    found_in: Vec<u32>,
}

impl Found {
    /// Takes the `(inode, pid)` pairs read in one process: a missing socket, or a known one
    /// this process did not hold before (inherited, passed over a unix socket).
    fn take(
        &mut self,
        pid: u32,
        pairs: &[(u64, u32)],
        owners: &[(u64, u32)],
        missing: &mut FxHashSet<u64>,
        current: &Current,
    ) {
        let holds = |inode: u64| {
            let at = owners.partition_point(|&(i, _)| i < inode);
            owners.get(at).is_some_and(|&(i, _)| i == inode)
        };
        let mut gained = false;
        for &(inode, p) in pairs {
            let known = holds(inode) || self.added_inodes.contains(&inode);
            if (missing.remove(&inode) || known && current.contains(inode))
                && owners.binary_search(&(inode, p)).is_err()
                && self.added.insert((inode, p))
            {
                self.added_inodes.insert(inode);
                gained = true;
            }
        }
        if gained {
            self.found_in.push(pid);
        }
    }
}

/// The socket inodes of a dump, sorted and deduplicated, 0 left out: what a refresh compares
/// its owners with, by walks of both in inode order where a hash set cost a lookup (a cache
/// miss) a socket.
struct Current(Vec<u64>);

impl Current {
    fn new(mut inodes: Vec<u64>) -> Current {
        inodes.retain(|&i| i != 0);
        crate::join::radix_sort_by_key(&mut inodes, |&i| i);
        inodes.dedup();
        Current(inodes)
    }

    /// From inodes in ascending order, repeats allowed.
    fn from_sorted(inodes: impl Iterator<Item = u64>) -> Current {
        let mut inodes: Vec<u64> = inodes.filter(|&i| i != 0).collect();
        debug_assert!(inodes.is_sorted());
        inodes.dedup();
        Current(inodes)
    }

    fn contains(&self, inode: u64) -> bool {
        self.0.binary_search(&inode).is_ok()
    }

    /// Keeps the pairs of `owners` (sorted) whose socket is current, by one walk of both.
    fn retain_held(&self, owners: &mut Vec<(u64, u32)>) {
        let mut current = self.0.iter().copied().peekable();
        owners.retain(|&(inode, _)| {
            while current.next_if(|&i| i < inode).is_some() {}
            current.peek() == Some(&inode)
        });
    }

    /// `retain_held` of pairs a sample may share: copied only when one goes.
    fn retain_held_shared(&self, owners: &mut Arc<Vec<(u64, u32)>>) {
        let mut current = self.0.iter().copied().peekable();
        let all_held = owners.iter().all(|&(inode, _)| {
            while current.next_if(|&i| i < inode).is_some() {}
            current.peek() == Some(&inode)
        });
        if !all_held {
            self.retain_held(Arc::make_mut(owners));
        }
    }
}

/// The inodes of `current` no pair of `owners` (sorted) names, by one walk of both in inode
/// order: a search per inode costs a cache miss per step on a large map.
fn unheld<'a>(owners: &'a [(u64, u32)], current: &'a Current) -> impl Iterator<Item = u64> + 'a {
    let mut p = 0;
    current.0.iter().copied().filter(move |&inode| {
        while p < owners.len() && owners[p].0 < inode {
            p += 1;
        }
        !(p < owners.len() && owners[p].0 == inode)
    })
}

/// A table as slots, each marked with whether its socket is in the dump; sockets that are not
/// (yet: opened after the dump, before the read) go into `undumped`, where a later dump that
/// shows them finds their holder without reading anything.
fn slots_of(
    pid: u32,
    table: FdTable,
    current: &Current,
    undumped: &mut FxHashMap<u64, (u32, u32)>,
) -> Vec<Slot> {
    table
        .into_iter()
        .map(|(fd, socket)| slot(pid, fd, socket, current, undumped))
        .collect()
}

fn slot(
    pid: u32,
    fd: u32,
    socket: u64,
    current: &Current,
    undumped: &mut FxHashMap<u64, (u32, u32)>,
) -> Slot {
    let dumped = current.contains(socket);
    if socket != 0 && !dumped {
        undumped.insert(socket, (pid, fd));
    }
    Slot { fd, socket, dumped }
}

/// Reads the slots of `pid`'s fd table that can hold a socket opened since the table was
/// read: first the fds of sockets that left the dump (each either closed or reused), then the
/// slots that were free at the last read, lowest first (holes below the highest fd, then past
/// it), up to the first still free: the kernel hands out the lowest free fd, so that is where
/// new fds are. Updates the table, pushes the sockets found as `(inode, pid)`, and returns the
/// number of slots read. A slot that held another file, closed and reused since, is not among
/// them: the whole-table pass that follows finds what it holds.
fn read_new_slots(
    root: &rustix::fd::OwnedFd,
    pid: u32,
    table: &mut Vec<Slot>,
    current: &Current,
    pairs: &mut Vec<(u64, u32)>,
    undumped: &mut FxHashMap<u64, (u32, u32)>,
) -> usize {
    let Ok(dir) = rustix::fs::openat(
        root,
        format!("{pid}/fd"),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return 0;
    };
    let mut read = 0;
    let mut closed = Vec::new();
    for s in table
        .iter_mut()
        .filter(|s| s.dumped && !current.contains(s.socket))
    {
        read += 1;
        match read_slot(&dir, s.fd) {
            Ok(Some(inode)) => {
                *s = slot(pid, s.fd, inode, current, undumped);
                if inode != 0 {
                    pairs.push((inode, pid));
                }
            }
            Ok(None) => closed.push(s.fd),
            Err(_) => return read,
        }
    }
    table.retain(|s| closed.binary_search(&s.fd).is_err());
    // Slots freed just now say nothing of where newer fds went: skip them.
    let mut new = Vec::new();
    let mut known = table.iter().map(|s| s.fd).peekable();
    let mut fd = 0u32;
    loop {
        while known.next_if(|&k| k < fd).is_some() {}
        if known.peek() == Some(&fd) || closed.binary_search(&fd).is_ok() {
            fd += 1;
            continue;
        }
        read += 1;
        match read_slot(&dir, fd) {
            Ok(Some(inode)) => {
                new.push(slot(pid, fd, inode, current, undumped));
                if inode != 0 {
                    pairs.push((inode, pid));
                }
                fd += 1;
            }
            Ok(None) | Err(_) => break,
        }
    }
    if !new.is_empty() {
        table.extend(new);
        table.sort_unstable_by_key(|s| s.fd);
    }
    read
}

impl OwnerCache {
    /// An empty cache: the first refresh is a full scan.
    pub fn new() -> OwnerCache {
        OwnerCache::default()
    }

    /// How many processes' fd directories are held open for counting (the tests ask).
    pub fn held_fd_dirs(&self) -> usize {
        self.fd_dirs.len()
    }

    /// Brings the map up to date with `sockets`.
    pub fn refresh(
        &mut self,
        scanner: &ProcScanner,
        sockets: &[Socket],
        threads: usize,
    ) -> Result<Refreshed, std::io::Error> {
        let current = Current::new(sockets.iter().map(|s| s.inode).collect());
        self.refresh_current(scanner, current, threads)
    }

    /// `refresh` for sockets whose inodes come sorted already (`Topology::inodes`): no sort of
    /// its own.
    pub fn refresh_sorted(
        &mut self,
        scanner: &ProcScanner,
        inodes: impl Iterator<Item = u64>,
        threads: usize,
    ) -> Result<Refreshed, std::io::Error> {
        let current = Current::from_sorted(inodes);
        self.refresh_current(scanner, current, threads)
    }

    /// Brings the map up to date when the sockets are those of the last refresh (the
    /// collector saw nothing move): no fd table is read unless the periodic full scan is due;
    /// processes that exited are forgotten, open-file counts read again. The owners come back
    /// only when they changed.
    pub fn refresh_same(
        &mut self,
        scanner: &ProcScanner,
        threads: usize,
    ) -> Result<Still, std::io::Error> {
        if self.full_due() {
            // The sockets of the last refresh are those it found a holder for, and the rest.
            let current = Current::new(
                self.owners
                    .iter()
                    .map(|&(inode, _)| inode)
                    .chain(self.unowned.iter().copied())
                    .collect(),
            );
            let r = self.refresh_current(scanner, current, threads)?;
            return Ok(Still {
                owners: Some(r.owners),
                stats: r.stats,
                fds: r.fds,
            });
        }
        self.since_full = self.since_full.map(|n| n + 1);
        let mut live = scanner.pids()?;
        live.sort_unstable();
        let held = self.owners.len();
        if live != self.live {
            let live_set: FxHashSet<u32> = live.iter().copied().collect();
            self.forget_exited(&live_set);
        }
        self.count_fds(scanner, &live);
        self.live = live;
        let owners =
            (self.owners.len() != held).then(|| self.index(scanner, RefreshCost::default()).owners);
        Ok(Still {
            owners,
            stats: self.stats.clone(),
            fds: self.fds.iter().map(|(&p, &f)| (p, f)).collect(),
        })
    }

    fn refresh_current(
        &mut self,
        scanner: &ProcScanner,
        current: Current,
        threads: usize,
    ) -> Result<Refreshed, std::io::Error> {
        let mut cost = RefreshCost::default();
        let mut live = scanner.pids()?;
        live.sort_unstable();
        // With the BPF walk too: its whole walk (about 50 ms at 150,000 fds) costs more than
        // reading the few slots new sockets can be in (benches/ports.sh, churning watch).
        let full_due = self.full_due();
        let live_set: FxHashSet<u32> = live.iter().copied().collect();
        if full_due {
            let scan = scanner.socket_fds(threads, true)?;
            cost.full = true;
            let mut undumped = FxHashMap::default();
            self.tables = scan
                .tables
                .into_iter()
                .map(|(pid, table)| (pid, slots_of(pid, table, &current, &mut undumped)))
                .collect();
            self.undumped = undumped;
            cost.processes_read = scan.stats.scanned;
            let mut owners = scan.pairs;
            owners.sort_unstable();
            owners.dedup();
            current.retain_held(&mut owners);
            owners.shrink_to_fit();
            self.owners = Arc::new(owners);
            self.unowned = unheld(&self.owners, &current).collect();
            // Where new sockets are looked for first: the processes holding the most now.
            let mut held: FxHashMap<u32, usize> = FxHashMap::default();
            for (_, pid) in self.owners.iter() {
                *held.entry(*pid).or_default() += 1;
            }
            let mut recent: Vec<(u32, usize)> = held.into_iter().collect();
            recent.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            self.recent = recent.into_iter().map(|(pid, _)| pid).collect();
            self.fds = scan.fds.into_iter().collect();
            self.stats = scan.stats;
            self.processes.clear();
            self.since_full = Some(1);
            self.last_full = Some(std::time::Instant::now());
        } else {
            self.since_full = self.since_full.map(|n| n + 1);
            // Forget the dead and what closed.
            self.forget_exited(&live_set);
            current.retain_held_shared(&mut self.owners);
            self.unowned.retain(|&i| current.contains(i));
            let unowned = &self.unowned;
            let mut missing: FxHashSet<u64> = unheld(&self.owners, &current)
                .filter(|i| !unowned.contains(i))
                .collect();
            if !missing.is_empty() {
                let root = scanner.open_root()?;
                let order: Vec<u32> = self
                    .recent
                    .iter()
                    .copied()
                    .chain(live.iter().copied().filter(|p| !self.recent.contains(p)))
                    .collect();
                let mut found = Found::default();
                // Sockets an earlier read saw before they were in a dump: their holder is
                // known without reading anything.
                let seen: Vec<u64> = missing
                    .iter()
                    .copied()
                    .filter(|i| self.undumped.contains_key(i))
                    .collect();
                for inode in seen {
                    if let Some((pid, fd)) = self.undumped.remove(&inode) {
                        if let Some(s) = self
                            .tables
                            .get_mut(&pid)
                            .and_then(|t| t.iter_mut().find(|s| s.fd == fd && s.socket == inode))
                        {
                            s.dumped = true;
                        }
                        found.take(pid, &[(inode, pid)], &self.owners, &mut missing, &current);
                    }
                }
                // Then only the slots that can hold a new socket, in every process whose
                // table is known; then whole tables, until every new socket is found.
                for &pid in &order {
                    if missing.is_empty() {
                        break;
                    }
                    let Some(table) = self.tables.get_mut(&pid) else {
                        continue;
                    };
                    let mut pairs = Vec::new();
                    cost.slots_read +=
                        read_new_slots(&root, pid, table, &current, &mut pairs, &mut self.undumped);
                    found.take(pid, &pairs, &self.owners, &mut missing, &current);
                }
                // Whole tables: processes started since their tables were read first (a new
                // process is the likeliest holder of a new socket), then the others in order.
                let (unread, read): (Vec<u32>, Vec<u32>) =
                    order.iter().partition(|p| !self.tables.contains_key(p));
                for pid in unread.into_iter().rev().chain(read) {
                    if missing.is_empty() {
                        break;
                    }
                    let mut pairs = Vec::new();
                    let mut table = FdTable::new();
                    cost.processes_read += 1;
                    if scan_fd_dir(
                        &root,
                        &format!("{pid}/fd"),
                        pid,
                        &mut pairs,
                        Some(&mut table),
                    )
                    .is_err()
                    {
                        continue;
                    }
                    let slots = slots_of(pid, table, &current, &mut self.undumped);
                    self.tables.insert(pid, slots);
                    found.take(pid, &pairs, &self.owners, &mut missing, &current);
                }
                self.unowned.extend(missing);
                // Two sorted runs: the stable sort merges them in one pass.
                let mut added: Vec<(u64, u32)> = found.added.into_iter().collect();
                added.sort_unstable();
                let owners = Arc::make_mut(&mut self.owners);
                owners.extend(added);
                owners.sort();
                owners.dedup();
                for pid in found.found_in.into_iter().rev() {
                    self.recent.retain(|&p| p != pid);
                    self.recent.insert(0, pid);
                }
            }
            self.count_fds(scanner, &live);
        }
        self.live = live;
        Ok(self.index(scanner, cost))
    }

    /// True when the next refresh must scan every fd table: the first, or `FULL_SCAN_EVERY`
    /// samples and `FULL_SCAN_AFTER` since the last full scan.
    fn full_due(&self) -> bool {
        match (self.since_full, self.last_full) {
            (Some(n), Some(at)) => n >= FULL_SCAN_EVERY && at.elapsed() >= FULL_SCAN_AFTER,
            _ => true,
        }
    }

    /// Drops every process not in `live`, and what it held.
    fn forget_exited(&mut self, live: &FxHashSet<u32>) {
        if self.owners.iter().any(|(_, pid)| !live.contains(pid)) {
            Arc::make_mut(&mut self.owners).retain(|(_, pid)| live.contains(pid));
        }
        self.recent.retain(|p| live.contains(p));
        self.processes.retain(|p, _| live.contains(p));
        self.fds.retain(|p, _| live.contains(p));
        self.tables.retain(|p, _| live.contains(p));
        self.undumped.retain(|_, (p, _)| live.contains(p));
        self.fd_dirs.retain(|p, _| live.contains(p));
    }

    /// Open-file counts: cheap on Linux 6.2+ (the fd directory's size). Before, a process at
    /// half its limit or more (the ones findings and metrics name) has its fd directory listed;
    /// any other keeps its fd table as last read (the full scan, plus the slots a search read
    /// since: a leaking process's count follows its new sockets). Limits are read once per
    /// process.
    fn count_fds(&mut self, scanner: &ProcScanner, live: &[u32]) {
        let budget = held_fd_dirs();
        for &pid in live {
            let near_limit = self
                .fds
                .get(&pid)
                .is_some_and(|f| f.at_least(FD_NAMED_SHARE));
            let held = self.fd_dirs.get(&pid).map(ProcScanner::fd_count_held);
            let counted = match held {
                Some(Ok(n)) => n,
                gone => {
                    // Gone since, or never held: counted by path, and held from now on.
                    if gone.is_some() {
                        self.fd_dirs.remove(&pid);
                    }
                    let n = scanner.fd_count(pid);
                    if n.is_some()
                        && self.fd_dirs.len() < budget
                        && let Some(dir) = scanner.fd_dir(pid)
                    {
                        self.fd_dirs.insert(pid, dir);
                    }
                    n
                }
            };
            let open = counted
                .or_else(|| near_limit.then(|| scanner.fd_count_listed(pid)).flatten())
                .or_else(|| self.tables.get(&pid).map(|t| t.len() as u64));
            let entry = self.fds.entry(pid).or_insert_with(|| FdUse {
                open: 0,
                limit: scanner.fd_limit(pid),
            });
            if let Some(open) = open {
                entry.open = open;
            }
        }
    }

    /// The owner index of the sockets held now, with the details of their holders and of
    /// every process at half its fd limit or more (read once per process).
    fn index(&mut self, scanner: &ProcScanner, cost: RefreshCost) -> Refreshed {
        let mut index = OwnerIndex::shared(Arc::clone(&self.owners), HashMap::new());
        // A set: the holders are few, their pairs many, and a pid repeats the last one's or
        // the one before (a connection's two ends have inodes next to each other), which is
        // told without hashing.
        let mut wanted: FxHashSet<u32> = FxHashSet::default();
        let mut recent = [None, None];
        for &(_, pid) in self.owners.iter() {
            if !recent.contains(&Some(pid)) {
                wanted.insert(pid);
                recent = [Some(pid), recent[0]];
            }
        }
        wanted.extend(
            self.fds
                .iter()
                .filter(|(_, f)| f.at_least(FD_NAMED_SHARE))
                .map(|(p, _)| *p),
        );
        for pid in wanted {
            let p = match self.processes.get(&pid) {
                Some(p) => p.clone(),
                None => {
                    let p = scanner
                        .process(pid)
                        .unwrap_or_else(|| Process::unknown(pid));
                    self.processes.insert(pid, p.clone());
                    p
                }
            };
            index.processes.insert(pid, p);
        }
        Refreshed {
            owners: index,
            stats: self.stats.clone(),
            fds: self.fds.iter().map(|(&p, &f)| (p, f)).collect(),
            cost,
            unowned: self.unowned.clone(),
        }
    }
}
