//! The `bpf(2)` commands the two programs need (program load, link create, iter create for the
//! iterator; map create, map lookup and raw tracepoint open for the state-change program) and
//! the instruction encoding they are written in. `union bpf_attr` is laid out by hand for these
//! commands only: the kernel takes a shorter attr than its own and zero-fills the rest, so the
//! layout is stable across kernels.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::BpfError;

pub type Fd = OwnedFd;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_PROG_TYPE_TRACING: u32 = 26;
/// Expected attach types: a BTF-typed raw tracepoint, an iterator.
pub const BPF_TRACE_RAW_TP: u32 = 23;
pub const BPF_TRACE_ITER: u32 = 28;
/// Map types: an array, a ring buffer.
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_RINGBUF: u32 = 27;

/// `bpf(cmd, attr, sizeof attr)`: the new file descriptor.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    let ret = bpf_call(cmd, attr)?;
    let fd = i32::try_from(ret).map_err(|_| std::io::Error::other("bpf returned no fd"))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `bpf(cmd, attr, sizeof attr)`: its non-negative return.
fn bpf_call<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised repr(C) value of the size passed; the kernel reads
    // it, and writes only through the pointers it holds (a load's log buffer, a lookup's
    // value), each of which points at a live buffer of the size given with it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret)
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
}

/// Loads `insns` as a tracing program of `attach_type` (`BPF_TRACE_ITER`,
/// `BPF_TRACE_RAW_TP`) for what the BTF id `attach_id` names. A refusal carries the verifier's
/// log.
pub fn load_tracing(insns: &[u64], attach_type: u32, attach_id: u32) -> Result<OwnedFd, BpfError> {
    let license = c"Dual MIT/GPL";
    let mut name = [0u8; 16];
    name[..9].copy_from_slice(b"shimcheck");
    let attempt = |log: &mut Vec<u8>| {
        let mut attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_TRACING,
            insn_cnt: u32::try_from(insns.len()).unwrap_or(u32::MAX),
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: u32::from(!log.is_empty()),
            log_size: u32::try_from(log.len()).unwrap_or(0),
            // No buffer at all without a log: the kernel refuses a pointer with no size.
            log_buf: if log.is_empty() {
                0
            } else {
                log.as_mut_ptr() as u64
            },
            prog_name: name,
            expected_attach_type: attach_type,
            attach_btf_id: attach_id,
            ..ProgLoad::default()
        };
        bpf(BPF_PROG_LOAD, &mut attr)
    };
    match attempt(&mut Vec::new()) {
        Ok(fd) => Ok(fd),
        // Again with the verifier's log, for the message.
        Err(error) => {
            let mut log = vec![0u8; 64 * 1024];
            let _ = attempt(&mut log);
            let end = log.iter().position(|&b| b == 0).unwrap_or(0);
            let text = String::from_utf8_lossy(&log[..end]);
            let last = text.lines().rev().take(3).collect::<Vec<_>>();
            let log = if last.is_empty() {
                String::new()
            } else {
                format!(
                    " (verifier: {})",
                    last.into_iter().rev().collect::<Vec<_>>().join("; ")
                )
            };
            Err(BpfError::Syscall {
                command: "BPF_PROG_LOAD",
                error,
                log,
            })
        }
    }
}

#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
    pad: u32,
}

/// Links the loaded program to its iterator.
pub fn link_iter(prog: &OwnedFd) -> Result<OwnedFd, BpfError> {
    let mut attr = LinkCreate {
        prog_fd: raw(prog),
        attach_type: BPF_TRACE_ITER,
        ..LinkCreate::default()
    };
    bpf(BPF_LINK_CREATE, &mut attr).map_err(|error| BpfError::Syscall {
        command: "BPF_LINK_CREATE",
        error,
        log: String::new(),
    })
}

#[repr(C)]
#[derive(Default)]
struct IterCreate {
    link_fd: u32,
    flags: u32,
}

/// A new walk of the linked iterator, read like a file.
pub fn open_iter(link: &OwnedFd) -> Result<File, BpfError> {
    let mut attr = IterCreate {
        link_fd: raw(link),
        flags: 0,
    };
    bpf(BPF_ITER_CREATE, &mut attr)
        .map(File::from)
        .map_err(|error| BpfError::Syscall {
            command: "BPF_ITER_CREATE",
            error,
            log: String::new(),
        })
}

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// A new map.
pub fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> Result<OwnedFd, BpfError> {
    let mut attr = MapCreate {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    bpf(BPF_MAP_CREATE, &mut attr).map_err(|error| BpfError::Syscall {
        command: "BPF_MAP_CREATE",
        error,
        log: String::new(),
    })
}

#[repr(C)]
#[derive(Default)]
struct MapElem {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The `u64` value at `u32` key `key` of an array map.
pub fn lookup_u64(map: &OwnedFd, key: u32) -> Result<u64, BpfError> {
    let mut value = 0u64;
    let mut attr = MapElem {
        map_fd: raw(map),
        key: std::ptr::from_ref(&key) as u64,
        value: std::ptr::from_mut(&mut value) as u64,
        ..MapElem::default()
    };
    bpf_call(BPF_MAP_LOOKUP_ELEM, &mut attr).map_err(|error| BpfError::Syscall {
        command: "BPF_MAP_LOOKUP_ELEM",
        error,
        log: String::new(),
    })?;
    Ok(value)
}

#[repr(C)]
#[derive(Default)]
struct RawTracepointOpen {
    name: u64,
    prog_fd: u32,
    pad: u32,
}

/// Attaches a loaded BTF-typed raw tracepoint program (`BPF_TRACE_RAW_TP`) to the tracepoint
/// its load named; it stays attached while the returned descriptor is open.
pub fn attach_raw_tracepoint(prog: &OwnedFd) -> Result<OwnedFd, BpfError> {
    let mut attr = RawTracepointOpen {
        name: 0,
        prog_fd: raw(prog),
        pad: 0,
    };
    bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr).map_err(|error| BpfError::Syscall {
        command: "BPF_RAW_TRACEPOINT_OPEN",
        error,
        log: String::new(),
    })
}

/// The descriptor's number, for an attr or an instruction.
pub fn raw(fd: &OwnedFd) -> u32 {
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

/// eBPF instructions as `struct bpf_insn` lays them out in memory (little-endian hosts: opcode,
/// then dst in the low nibble and src in the high one, a 16-bit offset, a 32-bit immediate).
pub mod insn {
    /// Load/store sizes.
    pub const W: u8 = 0x00;
    pub const H: u8 = 0x08;
    pub const B: u8 = 0x10;
    pub const DW: u8 = 0x18;
    /// `bpf_seq_write(seq, data, len)`.
    pub const BPF_FUNC_SEQ_WRITE: i32 = 127;
    /// `bpf_map_lookup_elem(map, key)`.
    pub const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
    /// `bpf_get_socket_cookie(sk)`.
    pub const BPF_FUNC_GET_SOCKET_COOKIE: i32 = 46;
    /// `bpf_ringbuf_output(ringbuf, data, size, flags)`.
    pub const BPF_FUNC_RINGBUF_OUTPUT: i32 = 130;
    /// A jump to the program's exit, placed by `resolve_exits`.
    pub const EXIT: i16 = i16::MIN;

    fn op(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        u64::from(code)
            | u64::from((src << 4) | (dst & 0x0f)) << 8
            | u64::from(off as u16) << 16
            | u64::from(imm as u32) << 32
    }

    pub fn mov64_reg(dst: u8, src: u8) -> u64 {
        op(0xbf, dst, src, 0, 0)
    }
    pub fn mov64_imm(dst: u8, imm: i32) -> u64 {
        op(0xb7, dst, 0, 0, imm)
    }
    pub fn add64_imm(dst: u8, imm: i32) -> u64 {
        op(0x07, dst, 0, 0, imm)
    }
    pub fn and64_imm(dst: u8, imm: i32) -> u64 {
        op(0x57, dst, 0, 0, imm)
    }
    /// `dst = *(size *)(src + off)`; `off` in bytes.
    pub fn ldx(size: u8, dst: u8, src: u8, off: u32) -> u64 {
        op(0x61 | size, dst, src, off as i16, 0)
    }
    /// `*(size *)(dst + off) = src`.
    pub fn stx(size: u8, dst: u8, src: u8, off: i16) -> u64 {
        op(0x63 | size, dst, src, off, 0)
    }
    pub fn jeq_imm(dst: u8, imm: i32, off: i16) -> u64 {
        op(0x15, dst, 0, off, imm)
    }
    pub fn jne_imm(dst: u8, imm: i32, off: i16) -> u64 {
        op(0x55, dst, 0, off, imm)
    }
    pub fn jne_reg(dst: u8, src: u8, off: i16) -> u64 {
        op(0x5d, dst, src, off, 0)
    }
    /// `if (u32)dst != (u32)imm goto +off`: a 32-bit compare, for values past `i32::MAX`.
    pub fn jne32_imm(dst: u8, imm: u32, off: i16) -> u64 {
        op(0x56, dst, 0, off, imm as i32)
    }
    /// `*(size *)(dst + off) = imm`.
    pub fn st_imm(size: u8, dst: u8, off: i16, imm: i32) -> u64 {
        op(0x62 | size, dst, 0, off, imm)
    }
    /// `lock *(u64 *)(dst + off) += src`.
    pub fn atomic_add64(dst: u8, src: u8, off: i16) -> u64 {
        op(0xdb, dst, src, off, 0)
    }
    /// `dst = map` for the map whose descriptor is `fd`: two instruction slots.
    pub fn ld_map_fd(dst: u8, fd: u32) -> [u64; 2] {
        // src 1: BPF_PSEUDO_MAP_FD.
        [op(0x18, dst, 1, 0, fd as i32), 0]
    }
    pub fn call(helper: i32) -> u64 {
        op(0x85, 0, 0, 0, helper)
    }
    pub fn exit() -> u64 {
        op(0x95, 0, 0, 0, 0)
    }

    /// Ends the program with `return 0` and points every jump written with `EXIT` there.
    pub fn with_exit(mut p: Vec<u64>) -> Vec<u64> {
        let exit_at = p.len();
        p.extend([mov64_imm(0, 0), exit()]);
        resolve_exits(&mut p, exit_at);
        p
    }

    /// Points every jump written with `EXIT` at instruction `exit_at`.
    fn resolve_exits(p: &mut [u64], exit_at: usize) {
        for (i, insn) in p.iter_mut().enumerate() {
            let off = ((*insn >> 16) & 0xffff) as u16 as i16;
            let code = (*insn & 0xff) as u8;
            // Jumps of both classes: BPF_JMP (5) and BPF_JMP32 (6).
            if off == EXIT && matches!(code & 0x07, 0x05 | 0x06) {
                let to = (exit_at as i64 - i as i64 - 1) as i16;
                *insn = (*insn & !(0xffff << 16)) | (u64::from(to as u16) << 16);
            }
        }
    }
}
