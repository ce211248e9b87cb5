//! Stage 1, collector, fallback: /proc/net/tcp and /proc/net/tcp6, parsed by `procfs`.
//!
//! Input: a procfs root and a `StateSet`. Output: sockets without cookies or tcp_info (the
//! text tables have neither), states filtered here since the kernel cannot do it for us.
//! Used only when a sock_diag socket cannot be opened; `netstat -ant` reads the same files.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use procfs::FromBufReadSI;
use procfs::net::{TcpNetEntries, TcpNetEntry};

use super::{CollectError, SocketSource};
use crate::model::{Socket, StateSet, TcpState};

/// Reads `<root>/net/tcp` and `<root>/net/tcp6`.
pub struct ProcNetSource {
    root: PathBuf,
}

impl ProcNetSource {
    /// A source reading the tables under `root` (normally `/proc`).
    pub fn new(root: &Path) -> ProcNetSource {
        ProcNetSource {
            root: root.to_path_buf(),
        }
    }

    fn table(&self, name: &str) -> Result<Vec<TcpNetEntry>, CollectError> {
        let path = self.root.join("net").join(name);
        let err = |reason: String| CollectError::ProcNet {
            path: path.display().to_string(),
            reason,
        };
        let file = File::open(&path).map_err(|e| err(e.to_string()))?;
        TcpNetEntries::from_buf_read(BufReader::new(file), procfs::current_system_info())
            .map(|t| t.0)
            .map_err(|e| err(e.to_string()))
    }
}

impl SocketSource for ProcNetSource {
    fn name(&self) -> &'static str {
        "/proc/net/tcp"
    }

    fn sockets(&mut self, states: StateSet) -> Result<Vec<Socket>, CollectError> {
        let mut out = Vec::new();
        for name in ["tcp", "tcp6"] {
            for e in self.table(name)? {
                let Some(state) = TcpState::from_kernel(e.state as u8) else {
                    continue;
                };
                if !states.contains(state) {
                    continue;
                }
                out.push(Socket {
                    state,
                    local: e.local_address,
                    remote: e.remote_address,
                    inode: e.inode,
                    cookie: None,
                    uid: e.uid,
                    recv_q: e.rx_queue,
                    send_q: e.tx_queue,
                    tcp_info: None,
                    netns: 0,
                    cgroup_id: None,
                });
            }
        }
        Ok(out)
    }
}
