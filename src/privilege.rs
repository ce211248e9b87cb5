//! Host facts beside the /proc scan: what this process may see of other processes. Its
//! effective capabilities and how the procfs it scans is mounted (`hidepid`) decide which
//! sockets can be attributed; the warnings about sockets that could not be name what is
//! missing (a capability, a mount option), not only "run as root".
//!
//! Input: `capget(2)` of this process and `/proc/self/mountinfo`. Output: names of missing
//! capabilities and the `hidepid` mode that hides processes, both stored in `ScanStats` or the
//! namespace warnings, so a snapshot carries them.

use std::path::Path;

use procfs::FromBufRead;
use procfs::process::MountInfos;
use rustix::thread::CapabilitySet;

/// A capability shimcheck uses, by what it is for (docs/deploy.md has the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// Opening `/proc/PID/fd` of another user's process.
    DacReadSearch,
    /// Reading the fd links and `/proc/PID/ns/net` of another user's process, and seeing
    /// processes that `hidepid` hides.
    SysPtrace,
    /// `setns()` into another network namespace (`--all-netns`).
    SysAdmin,
}

/// What reading every socket's owner needs.
pub const READ_OWNERS: &[Cap] = &[Cap::DacReadSearch, Cap::SysPtrace];
/// What finding every process's network namespace needs.
pub const SEE_NETNS: &[Cap] = &[Cap::SysPtrace];
/// What dumping another network namespace needs.
pub const ENTER_NETNS: &[Cap] = &[Cap::SysAdmin];

impl Cap {
    /// The name operators grant it by (`setpriv`, pod specs, systemd units).
    pub fn name(self) -> &'static str {
        match self {
            Cap::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Cap::SysPtrace => "CAP_SYS_PTRACE",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
        }
    }

    /// Whether `effective` grants what this capability is used for here: CAP_DAC_OVERRIDE
    /// covers CAP_DAC_READ_SEARCH's use.
    fn held_in(self, effective: CapabilitySet) -> bool {
        match self {
            Cap::DacReadSearch => {
                effective.intersects(CapabilitySet::DAC_READ_SEARCH | CapabilitySet::DAC_OVERRIDE)
            }
            Cap::SysPtrace => effective.contains(CapabilitySet::SYS_PTRACE),
            Cap::SysAdmin => effective.contains(CapabilitySet::SYS_ADMIN),
        }
    }
}

/// The names of the capabilities in `needed` that this process does not hold. When its own
/// capabilities cannot be read (a seccomp filter refusing capget), all of them: the advice to
/// grant them is right either way.
pub fn lacking(needed: &[Cap]) -> Vec<String> {
    let effective = rustix::thread::capabilities(None).map(|c| c.effective);
    needed
        .iter()
        .filter(|c| !effective.is_ok_and(|e| c.held_in(e)))
        .map(|c| c.name().to_string())
        .collect()
}

/// `CAP_A`, `CAP_A and CAP_B`: capability names as a sentence says them.
pub fn listed(names: &[String]) -> String {
    match names {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// The `hidepid=` mode of the procfs mounted at `proc_root`, when it hides other users'
/// processes from this one: `invisible` (2) or `ptraceable` (4), unless this process holds
/// CAP_SYS_PTRACE or is in the mount's `gid=` group. `noaccess` (1) is not reported here: it
/// lists the processes and refuses their files, which the scan counts as denied.
pub fn proc_hides(proc_root: &Path) -> Option<String> {
    if lacking(&[Cap::SysPtrace]).is_empty() {
        return None;
    }
    let file = std::fs::File::open("/proc/self/mountinfo").ok()?;
    let mounts = MountInfos::from_buf_read(std::io::BufReader::new(file)).ok()?;
    let root = std::fs::canonicalize(proc_root).ok()?;
    let mut groups = rustix::process::getgroups().unwrap_or_default();
    groups.push(rustix::process::getegid());
    let groups: Vec<u32> = groups.iter().map(|g| g.as_raw()).collect();
    hiding_mode(&mounts, &root, &groups)
}

/// The `hidepid` mode that hides processes from a member of `groups` without CAP_SYS_PTRACE,
/// of the procfs mounted last at `root` in `mounts`.
pub fn hiding_mode(mounts: &MountInfos, root: &Path, groups: &[u32]) -> Option<String> {
    let proc = mounts
        .iter()
        .rev()
        .find(|m| m.fs_type == "proc" && m.mount_point == root)?;
    let mode = proc.super_options.get("hidepid")?.as_deref()?;
    let exempt = proc
        .super_options
        .get("gid")
        .and_then(|g| g.as_deref()?.parse::<u32>().ok())
        .is_some_and(|gid| groups.contains(&gid));
    let hides = matches!(mode, "2" | "invisible" | "4" | "ptraceable");
    (hides && !exempt).then(|| format!("hidepid={mode}"))
}
