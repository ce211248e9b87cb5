//! Stage 1, collector, fallback: /proc/net/tcp and /proc/net/tcp6, parsed by `procfs`.
//!
//! Input: a procfs root and a `StateSet`. Output: sockets without cookies or tcp_info (the
//! text tables have neither), states filtered here since the kernel cannot do it for us.
//! Used only when a sock_diag socket cannot be opened; `netstat -ant` reads the same files.

use std::fs::File;
use std::io::{BufRead, BufReader};
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

    fn table(&self, name: &str, states: StateSet) -> Result<Vec<Socket>, CollectError> {
        let path = self.root.join("net").join(name);
        let err = |reason: String| CollectError::ProcNet {
            path: path.display().to_string(),
            reason,
        };
        let file = File::open(&path).map_err(|e| err(e.to_string()))?;
        parse(BufReader::new(file), states).map_err(err)
    }
}

/// One `/proc/net/tcp{,6}` table's text → its sockets in `states` (the fuzz target's seam).
pub fn parse(text: impl BufRead, states: StateSet) -> Result<Vec<Socket>, String> {
    let entries = TcpNetEntries::from_buf_read(text, procfs::current_system_info())
        .map_err(|e| e.to_string())?;
    Ok(entries
        .0
        .into_iter()
        .filter_map(|e| socket(e, states))
        .collect())
}

fn socket(e: TcpNetEntry, states: StateSet) -> Option<Socket> {
    let state = TcpState::from_kernel(e.state as u8)?;
    states.contains(state).then(|| {
        let mut s = Socket::new(state, e.local_address, e.remote_address);
        s.inode = e.inode;
        s
    })
}

impl SocketSource for ProcNetSource {
    fn name(&self) -> &'static str {
        "/proc/net/tcp"
    }

    fn sockets(&mut self, states: StateSet) -> Result<Vec<Socket>, CollectError> {
        let mut out = self.table("tcp", states)?;
        out.extend(self.table("tcp6", states)?);
        Ok(out)
    }
}
