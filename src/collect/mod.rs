//! Stage 1, collector: the node's TCP sockets, like `ss -tan`.
//!
//! Input: the set of states to show. Output: a `Dump` (sockets, the namespaces they came from,
//! warnings). The `SocketSource` trait is the seam, and `open` the one place a source is
//! chosen: `netlink` asks the kernel over NETLINK_SOCK_DIAG (filtered in the kernel, with
//! tcp_info and cookies); `events` keeps a loop's table of them by the kernel's state-change
//! events, looking up only what changed; `netns::AllNetns` dumps every network namespace
//! (`--all-netns`); `procnet` reads /proc/net/tcp{,6} when sock_diag cannot be opened;
//! `decode` is the pure byte decoder both the transport and the fixture tests use.

pub mod counters;
pub mod decode;
pub mod events;
pub mod netlink;
pub mod netns;
pub mod procnet;

use std::io;
use std::path::Path;

use crate::model::{Socket, StateSet, Warning};

/// Why a socket dump failed. Each variant says what to do about it in `hint`.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("cannot open a NETLINK_SOCK_DIAG socket: {0}")]
    Open(#[source] io::Error),
    #[error("sending the sock_diag dump request failed: {0}")]
    Send(#[source] io::Error),
    #[error("reading the sock_diag reply failed: {0}")]
    Recv(#[source] io::Error),
    #[error("the kernel answered the sock_diag dump with an error: {0}")]
    Kernel(#[source] io::Error),
    #[error("malformed sock_diag reply at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: String },
    #[error(
        "the sock_diag dump ended without NLMSG_DONE after {sockets} sockets: the reply was \
         truncated"
    )]
    Truncated { sockets: usize },
    #[error("the socket table changed during every one of {0} dump attempts (NLM_F_DUMP_INTR)")]
    Interrupted(u32),
    #[error("cannot read {path}: {reason}")]
    ProcNet { path: String, reason: String },
}

impl CollectError {
    /// One sentence on what the operator can do.
    pub fn hint(&self) -> &'static str {
        match self {
            CollectError::Open(_) | CollectError::ProcNet { .. } => {
                "check that /proc is mounted and that this container may open netlink sockets"
            }
            CollectError::Interrupted(_) => {
                "the node is churning sockets fast: run the command again"
            }
            _ => "run the command again; if it keeps failing, report it with `uname -r`",
        }
    }
}

/// What one dump found.
#[derive(Debug, Default)]
pub struct Dump {
    /// The sockets; `netns` is 0 where the source dumped only the namespace it runs in.
    pub sockets: Vec<Socket>,
    /// The namespaces dumped (`--all-netns`; empty for a single-namespace source).
    pub namespaces: Vec<netns::Target>,
    /// What the operator must know about this dump (namespaces that could not be entered).
    pub warnings: Vec<Warning>,
    /// Where the first sockets are a table's own, lent (`events`): what changed in them since
    /// it last lent them, for the peer match to patch its last result instead of starting over.
    pub edits: Option<events::Edits>,
}

/// Where sockets come from. Implementations: the kernel (`netlink::NetlinkSource`), the
/// kernel in every namespace (`netns::AllNetns`) and the /proc/net text tables
/// (`procnet::ProcNetSource`).
pub trait SocketSource {
    /// A short name for messages: "sock_diag" or "/proc/net/tcp".
    fn name(&self) -> &'static str;
    /// Every TCP socket (IPv4 and IPv6) in one of `states`.
    fn sockets(&mut self, states: StateSet) -> Result<Vec<Socket>, CollectError>;
    /// The sockets with what else the dump learned; a single-namespace source has only sockets.
    fn dump(&mut self, states: StateSet) -> Result<Dump, CollectError> {
        Ok(Dump {
            sockets: self.sockets(states)?,
            ..Dump::default()
        })
    }
    /// True when nothing moved since the last dump of `states`, by counters that cost far less
    /// than a dump (`counters::Stillness`): that dump's sockets still hold, their clocks older
    /// by the time since. A source that keeps no such counters answers false.
    fn still(&mut self, _states: StateSet) -> bool {
        false
    }
    /// Reads again the tcp_info clocks of the sockets at `which` of `sockets` (the last
    /// sample's, which this source gave), where it aged them instead of reading them
    /// (`events`); returns how many it read. A source whose every sample reads every clock
    /// has nothing to do.
    fn fresh_clocks(&mut self, _sockets: &mut [Socket], _which: &[u32]) -> usize {
        0
    }
    /// Takes back the sockets of the last sample this source gave, which the caller is done
    /// with: a source that lent its own (`events`) needs them for the next; others drop them.
    fn recycle(&mut self, _sockets: Vec<Socket>) {}
}

/// What a loop keeps between its samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Nothing: every sample dumps (one-shot commands).
    Nothing,
    /// A namespace whose counters did not move since its last dump is not dumped again
    /// (`counters`).
    Unmoved,
    /// That, and where BPF may be loaded, each namespace's table kept by state-change events
    /// (`events`).
    Events,
}

/// The best source this host allows for one namespace or, with `all_netns`, every namespace
/// (dumped on `threads` worker threads): sock_diag, else /proc/net/tcp{,6} of shimcheck's own
/// namespace with a warning saying what was lost; for a loop, what `reuse` allows.
pub fn open(
    proc_root: &Path,
    all_netns: bool,
    threads: usize,
    reuse: Reuse,
) -> (Box<dyn SocketSource + Send>, Option<Warning>) {
    let netlink = netlink::NetlinkSource::open();
    let changes = (reuse == Reuse::Events && netlink.is_ok())
        .then(|| {
            // With --all-netns, the changes of every namespace, kept apart by inode; else only
            // those of this thread's namespace, the one the netlink socket dumps.
            let only = if all_netns {
                None
            } else {
                let own = netns::inode_of(Path::new("/proc/thread-self/ns/net"))?;
                Some(u32::try_from(own).ok()?)
            };
            crate::bpf::events::StateChanges::load(only).ok()
        })
        .flatten();
    match (netlink, changes) {
        (Ok(src), Some(changes)) if all_netns => (
            Box::new(netns::AllNetns::new(src, proc_root, threads, true).with_events(changes)),
            None,
        ),
        (Ok(src), Some(changes)) => (Box::new(events::EventSource::new(src, changes)), None),
        (netlink, _) => choose_source(
            netlink,
            proc_root,
            all_netns,
            threads,
            reuse != Reuse::Nothing,
        ),
    }
}

fn choose_source(
    netlink: Result<netlink::NetlinkSource, CollectError>,
    proc_root: &Path,
    all_netns: bool,
    threads: usize,
    reuse: bool,
) -> (Box<dyn SocketSource + Send>, Option<Warning>) {
    match netlink {
        Ok(src) if all_netns => (
            Box::new(netns::AllNetns::new(src, proc_root, threads, reuse)),
            None,
        ),
        Ok(src) if reuse => (Box::new(src.reusing_unchanged_dumps()), None),
        Ok(src) => (Box::new(src), None),
        Err(e) => (
            Box::new(procnet::ProcNetSource::new(proc_root)),
            Some(Warning::CollectorFallback {
                error: e.to_string(),
                proc_root: proc_root.display().to_string(),
                all_netns,
            }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_sock_diag_falls_back_to_proc_net_with_a_warning() {
        let denied = Err(CollectError::Open(io::Error::from_raw_os_error(
            libc_eacces(),
        )));
        let (src, warning) = choose_source(denied, Path::new("/proc"), false, 1, false);
        assert_eq!(src.name(), "/proc/net/tcp");
        let warning = warning.unwrap().to_string();
        assert!(
            warning.contains("cannot open a NETLINK_SOCK_DIAG socket"),
            "{warning}"
        );
        assert!(
            warning.contains("falling back to /proc/net/tcp"),
            "{warning}"
        );
    }

    #[test]
    fn all_netns_without_sock_diag_says_only_one_namespace_is_counted() {
        let denied = Err(CollectError::Open(io::Error::from_raw_os_error(
            libc_eacces(),
        )));
        let (src, warning) = choose_source(denied, Path::new("/proc"), true, 1, false);
        assert_eq!(src.name(), "/proc/net/tcp");
        let warning = warning.unwrap().to_string();
        assert!(
            warning.contains("only shimcheck's own network namespace is counted"),
            "{warning}"
        );
    }

    fn libc_eacces() -> i32 {
        rustix::io::Errno::ACCESS.raw_os_error()
    }
}
