//! Stage 1, collector: the node's TCP sockets, like `ss -tan`.
//!
//! Input: the set of states to show. Output: `Vec<Socket>`. The `SocketSource` trait is the
//! seam: `netlink` asks the kernel over NETLINK_SOCK_DIAG (filtered in the kernel, with
//! tcp_info and cookies); `procnet` reads /proc/net/tcp{,6} when sock_diag cannot be opened;
//! `decode` is the pure byte decoder both the transport and the fixture tests use.

pub mod decode;
pub mod netlink;
pub mod netns;
pub mod procnet;

use std::io;
use std::path::Path;

use crate::model::{Socket, StateSet};

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
        "the sock_diag dump ended without NLMSG_DONE after {sockets} sockets: the reply was truncated"
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

/// Where sockets come from. Implementations: the kernel (`netlink::NetlinkSource`) and the
/// /proc/net text tables (`procnet::ProcNetSource`).
pub trait SocketSource {
    /// A short name for messages: "sock_diag" or "/proc/net/tcp".
    fn name(&self) -> &'static str;
    /// Every TCP socket (IPv4 and IPv6) in one of `states`.
    fn sockets(&mut self, states: StateSet) -> Result<Vec<Socket>, CollectError>;
}

/// The best source this host allows: sock_diag, else /proc/net/tcp{,6} with a warning saying
/// what was lost.
pub fn open_default(proc_root: &Path) -> (Box<dyn SocketSource + Send>, Option<String>) {
    choose_source(netlink::NetlinkSource::open(), proc_root)
}

fn choose_source(
    netlink: Result<netlink::NetlinkSource, CollectError>,
    proc_root: &Path,
) -> (Box<dyn SocketSource + Send>, Option<String>) {
    match netlink {
        Ok(src) => (Box::new(src), None),
        Err(e) => (
            Box::new(procnet::ProcNetSource::new(proc_root)),
            Some(format!(
                "{e}; falling back to {}/net/tcp and tcp6: slower, no socket cookies or idle \
                 times, and states are filtered after reading",
                proc_root.display()
            )),
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
        let (src, warning) = choose_source(denied, Path::new("/proc"));
        assert_eq!(src.name(), "/proc/net/tcp");
        let warning = warning.unwrap();
        assert!(
            warning.contains("cannot open a NETLINK_SOCK_DIAG socket"),
            "{warning}"
        );
        assert!(
            warning.contains("falling back to /proc/net/tcp"),
            "{warning}"
        );
    }

    fn libc_eacces() -> i32 {
        rustix::io::Errno::ACCESS.raw_os_error()
    }
}
