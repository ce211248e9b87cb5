//! Stage 2, process join, kernel side (issue 12): every open file of every process from a BPF
//! `task_file` iterator instead of one `readlinkat` per `/proc/PID/fd` entry, the /proc scan's
//! cost (about 3 µs an fd here) cut to the kernel's walk of the fd tables.
//!
//! Input: the running kernel (its BTF at `/sys/kernel/btf/vmlinux`, the `bpf(2)` syscall).
//! Output: `(socket inode or 0, tgid, fd)` for every open fd of every thread-group leader, the
//! records `procs::ProcScanner` turns into the same `FdScan` the /proc walk gives.
//!
//! The program is the 27 instructions of `program` below: its source is this file, so nothing
//! is compiled for BPF at build time and no BPF toolchain is needed. The offsets it reads at
//! (`file.f_inode`, `inode.i_mode`, `inode.i_ino`, `task_struct.pid`/`tgid`) and the id of the
//! attach point come from the kernel's BTF at run time (`btf`), so one binary fits every kernel
//! from 5.8 (iterators) with BTF. It is loaded with raw `bpf(2)` calls (`sys`): the
//! program-load, link-create and iter-create commands are all it needs.

mod btf;
pub mod events;
mod sys;

use std::io::Read;
use std::path::Path;

use rustix::thread::CapabilitySet;

/// Why the BPF path is not used.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The kernel has no BTF, or its BTF lacks what the program reads.
    #[error("kernel BTF: {0}")]
    Btf(String),
    /// A `bpf(2)` command failed: `log` is the verifier's, for a refused program.
    #[error("bpf({command}): {error}{log}")]
    Syscall {
        command: &'static str,
        error: std::io::Error,
        log: String,
    },
    /// Reading the iterator failed.
    #[error("reading the task_file iterator: {0}")]
    Read(std::io::Error),
}

/// Whether the BPF walk may be used with the procfs at `proc_root`: this process may load a
/// tracing program (CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN), the kernel has BTF, and the
/// root numbers processes as the kernel does (the walk reports global thread-group ids:
/// shimcheck and the root must both be in the initial pid namespace). Where it is not, the
/// /proc walk runs and nothing is said: this is a host without the fast path, not a fault.
pub fn usable_with(proc_root: &Path) -> bool {
    let may_load = rustix::thread::capabilities(None).is_ok_and(|c| {
        c.effective.contains(CapabilitySet::SYS_ADMIN)
            || c.effective
                .contains(CapabilitySet::BPF | CapabilitySet::PERFMON)
    });
    may_load && Path::new(btf::VMLINUX).exists() && global_pids(proc_root)
}

/// True when this process is in the initial pid namespace (one pid in `NSpid`) and `proc_root`
/// numbers it as the kernel does.
fn global_pids(proc_root: &Path) -> bool {
    let me = std::process::id();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let one_level = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .is_some_and(|ids| ids.split_whitespace().count() == 1);
    let root_says = std::fs::read_link(proc_root.join("self"))
        .ok()
        .and_then(|p| p.to_str()?.parse::<u32>().ok());
    one_level && root_says == Some(me)
}

/// One open file of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFile {
    /// The socket's inode (`socket:[INODE]`), 0 for a file that is not a socket.
    pub socket: u64,
    /// The thread-group id: the pid `/proc` names the process by.
    pub pid: u32,
    pub fd: u32,
}

/// The loaded iterator: a link to attach one walk of every fd table to, as often as needed.
pub struct TaskFiles {
    link: sys::Fd,
}

const RECORD: usize = 16;

impl TaskFiles {
    /// Loads the program and links it to the `task_file` iterator.
    pub fn load() -> Result<TaskFiles, BpfError> {
        let offsets = btf::Offsets::of_running_kernel()?;
        let program = program(&offsets);
        let prog = sys::load_tracing(&program, sys::BPF_TRACE_ITER, offsets.attach_id)?;
        let link = sys::link_iter(&prog)?;
        Ok(TaskFiles { link })
    }

    /// One walk: every open fd of every thread-group leader, as the kernel's fd tables hold
    /// them at the moment the walk passes each task.
    pub fn walk(&self, mut each: impl FnMut(OpenFile)) -> Result<(), BpfError> {
        let mut iter = sys::open_iter(&self.link)?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut kept = 0;
        loop {
            let n = match iter.read(&mut buf[kept..]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(BpfError::Read(e)),
            };
            let filled = kept + n;
            let whole = filled - filled % RECORD;
            for r in buf[..whole].chunks_exact(RECORD) {
                each(decode(r));
            }
            buf.copy_within(whole..filled, 0);
            kept = filled - whole;
        }
        if kept != 0 {
            return Err(BpfError::Read(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{kept} bytes of a record at the end"),
            )));
        }
        Ok(())
    }
}

/// `[inode u64][tgid u32][fd u32]`, native-endian, as the program writes it.
fn decode(r: &[u8]) -> OpenFile {
    let word = |at: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&r[at..at + 4]);
        u32::from_ne_bytes(b)
    };
    let mut ino = [0u8; 8];
    ino.copy_from_slice(&r[..8]);
    OpenFile {
        socket: u64::from_ne_bytes(ino),
        pid: word(8),
        fd: word(12),
    }
}

/// The iterator program. For each (task, fd, file) the kernel passes it: skip threads other
/// than the group leader (their fd table, when they have one of their own, is not
/// `/proc/TGID/fd`); write the record `[inode or 0][tgid][fd]` with `bpf_seq_write`.
///
/// Registers: r6 the context, r7 the task, r8 the file, r9 the inode.
pub fn program(o: &btf::Offsets) -> Vec<u64> {
    use sys::insn::*;
    // struct bpf_iter__task_file: meta at 0, task at 8, fd (u32) at 16, file at 24.
    let p = vec![
        mov64_reg(6, 1),
        ldx(DW, 7, 6, 8),
        jeq_imm(7, 0, EXIT),
        ldx(DW, 8, 6, 24),
        jeq_imm(8, 0, EXIT),
        // Only the group leader: pid == tgid.
        ldx(W, 2, 7, o.task_pid),
        ldx(W, 3, 7, o.task_tgid),
        jne_reg(2, 3, EXIT),
        ldx(DW, 9, 8, o.file_f_inode),
        jeq_imm(9, 0, EXIT),
        // A socket's inode number, else 0: (i_mode & S_IFMT) == S_IFSOCK.
        mov64_imm(4, 0),
        ldx(H, 2, 9, o.inode_i_mode),
        and64_imm(2, 0o170000),
        jne_imm(2, 0o140000, 1),
        ldx(DW, 4, 9, o.inode_i_ino),
        stx(DW, 10, 4, -16),
        stx(W, 10, 3, -8),
        ldx(W, 2, 6, 16),
        stx(W, 10, 2, -4),
        // bpf_seq_write(ctx->meta->seq, fp - 16, 16)
        ldx(DW, 1, 6, 0),
        ldx(DW, 1, 1, 0),
        mov64_reg(2, 10),
        add64_imm(2, -16),
        mov64_imm(3, 16),
        call(BPF_FUNC_SEQ_WRITE),
    ];
    with_exit(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walk_finds_this_processs_own_socket_where_bpf_may_be_loaded() {
        let files = match TaskFiles::load() {
            Ok(f) => f,
            Err(e) => {
                eprintln!("skipped: BPF cannot be loaded here: {e}");
                return;
            }
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0");
        let Ok(listener) = listener else { return };
        let inode = match std::fs::metadata(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&listener)
        )) {
            Ok(m) => std::os::unix::fs::MetadataExt::ino(&m),
            Err(e) => panic!("{e}"),
        };
        let me = std::process::id();
        let mut mine = Vec::new();
        if let Err(e) = files.walk(|f| {
            if f.pid == me {
                mine.push(f);
            }
        }) {
            panic!("{e}");
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener) as u32;
        assert!(
            mine.contains(&OpenFile {
                socket: inode,
                pid: me,
                fd
            }),
            "{mine:?}"
        );
        // stdin/stdout/stderr or the test harness's files: not sockets, listed with 0.
        assert!(mine.iter().any(|f| f.socket == 0), "{mine:?}");
    }
}
