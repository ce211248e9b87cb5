//! The kernel's BTF (`/sys/kernel/btf/vmlinux`), read for exactly what the two programs need:
//! the iterator's five member offsets and function id (`Offsets`), the state-change program's
//! socket member offsets and tracepoint id (`SockOffsets`).
//!
//! Why not a BTF crate: btf-rs 2.0 indexes every type and name of the 5.5 MB file first, which
//! took 234–528 ms here (measured with a scratch binary resolving the same five members), more
//! than the whole /proc walk it is meant to replace at 120,000 sockets. One pass over the type
//! section that stops at what it needs takes a few milliseconds (`Offsets::of_running_kernel`).

use super::BpfError;

/// Byte offsets of the members the program reads, and the BTF id of `bpf_iter_task_file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offsets {
    pub file_f_inode: u32,
    pub inode_i_mode: u32,
    pub inode_i_ino: u32,
    pub task_pid: u32,
    pub task_tgid: u32,
    pub attach_id: u32,
}

/// Where the running kernel publishes its BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_TYPE_TAG: u32 = 18;

/// Byte offsets of the socket members the state-change program (`events`) reads, and the BTF
/// id of the `inet_sock_set_state` tracepoint's type (`btf_trace_inet_sock_set_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockOffsets {
    /// `sock.__sk_common.skc_addrpair`: the IPv4 destination, then the bound source.
    pub addrpair: u32,
    /// `skc_portpair`: the destination port (network order), then the local port (host order).
    pub portpair: u32,
    pub family: u32,
    pub bound_dev_if: u32,
    pub v6_daddr: u32,
    pub v6_rcv_saddr: u32,
    /// `skc_net.net`: the pointer to the socket's `struct net`...
    pub net: u32,
    /// ... and `net.ns.inum` in it: the namespace's inode number.
    pub net_inum: u32,
    pub protocol: u32,
    pub attach_id: u32,
}

impl SockOffsets {
    /// The running kernel's.
    pub fn of_running_kernel() -> Result<SockOffsets, BpfError> {
        let bytes = std::fs::read(VMLINUX).map_err(|e| BpfError::Btf(format!("{VMLINUX}: {e}")))?;
        SockOffsets::from_btf(&bytes)
    }

    /// From a BTF blob.
    pub fn from_btf(bytes: &[u8]) -> Result<SockOffsets, BpfError> {
        let btf = Btf::parse(bytes).map_err(BpfError::Btf)?;
        let at = |path: &str| btf.path_bytes(path);
        Ok(SockOffsets {
            addrpair: at("sock.__sk_common.skc_addrpair")?,
            portpair: at("sock.__sk_common.skc_portpair")?,
            family: at("sock.__sk_common.skc_family")?,
            bound_dev_if: at("sock.__sk_common.skc_bound_dev_if")?,
            v6_daddr: at("sock.__sk_common.skc_v6_daddr")?,
            v6_rcv_saddr: at("sock.__sk_common.skc_v6_rcv_saddr")?,
            net: at("sock.__sk_common.skc_net.net")?,
            net_inum: at("net.ns.inum")?,
            protocol: at("sock.sk_protocol")?,
            attach_id: btf
                .find(KIND_TYPEDEF, "btf_trace_inet_sock_set_state", false)
                .ok_or_else(|| {
                    BpfError::Btf("no inet_sock_set_state tracepoint in the kernel's BTF".into())
                })?,
        })
    }
}

impl Offsets {
    /// The running kernel's.
    pub fn of_running_kernel() -> Result<Offsets, BpfError> {
        let bytes = std::fs::read(VMLINUX).map_err(|e| BpfError::Btf(format!("{VMLINUX}: {e}")))?;
        Offsets::from_btf(&bytes)
    }

    /// From a BTF blob.
    pub fn from_btf(bytes: &[u8]) -> Result<Offsets, BpfError> {
        let btf = Btf::parse(bytes).map_err(BpfError::Btf)?;
        Ok(Offsets {
            file_f_inode: btf.path_bytes("file.f_inode")?,
            inode_i_mode: btf.path_bytes("inode.i_mode")?,
            inode_i_ino: btf.path_bytes("inode.i_ino")?,
            task_pid: btf.path_bytes("task_struct.pid")?,
            task_tgid: btf.path_bytes("task_struct.tgid")?,
            attach_id: btf.func_named("bpf_iter_task_file").ok_or_else(|| {
                BpfError::Btf("no bpf_iter_task_file: the kernel has no task_file iterator".into())
            })?,
        })
    }
}

/// The type section indexed by id (types start at 1), and the strings.
struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// Byte offset in `types` of each type, by id - 1.
    at: Vec<u32>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl<'a> Btf<'a> {
    fn parse(b: &'a [u8]) -> Result<Btf<'a>, String> {
        let magic = b.get(..2).map(|m| u16::from_ne_bytes([m[0], m[1]]));
        if magic != Some(0xeb9f) {
            return Err("not BTF (bad magic)".into());
        }
        let field = |at| u32_at(b, at).map(|v| v as usize).ok_or("truncated header");
        let hdr_len = field(4)?;
        let (type_off, type_len) = (field(8)?, field(12)?);
        let (str_off, str_len) = (field(16)?, field(20)?);
        let section = |off: usize, len: usize| {
            b.get(hdr_len + off..hdr_len + off + len)
                .ok_or("section out of bounds")
        };
        let types = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;
        let mut at = Vec::with_capacity(type_len / 24);
        let mut p = 0usize;
        while p < types.len() {
            let info = u32_at(types, p + 4).ok_or("truncated type")?;
            let vlen = (info & 0xffff) as usize;
            let extra = match (info >> 24) & 0x1f {
                2 | 7..=12 | 16 | 18 => 0,
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 | 19 => 12 * vlen,
                6 | 13 => 8 * vlen,
                kind => return Err(format!("unknown BTF kind {kind}")),
            };
            at.push(u32::try_from(p).map_err(|_| "type section too large")?);
            p += 12 + extra;
        }
        Ok(Btf { types, strings, at })
    }

    fn name(&self, off: u32) -> &'a [u8] {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        &s[..s.iter().position(|&c| c == 0).unwrap_or(s.len())]
    }

    /// `(name_off, info, size_or_type)` and the byte offset of what follows, of type `id`.
    fn header(&self, id: u32) -> Option<(u32, u32, usize)> {
        let p = *self.at.get((id as usize).checked_sub(1)?)? as usize;
        Some((u32_at(self.types, p)?, u32_at(self.types, p + 4)?, p + 12))
    }

    fn find(&self, kind: u32, name: &str, sized: bool) -> Option<u32> {
        (1..=self.at.len() as u32).find(|&id| {
            self.header(id).is_some_and(|(n, info, _)| {
                (info >> 24) & 0x1f == kind
                    && self.name(n) == name.as_bytes()
                    // A forward declaration or an empty struct of the same name is not it.
                    && (!sized || info & 0xffff != 0)
            })
        })
    }

    fn struct_named(&self, name: &str) -> Option<u32> {
        self.find(KIND_STRUCT, name, true)
    }

    fn func_named(&self, name: &str) -> Option<u32> {
        self.find(KIND_FUNC, name, false)
    }

    /// The byte offset of `struct.member.member...` from the start of the struct, each member
    /// looked up in the type of the one before (through typedefs and qualifiers); every member
    /// byte-aligned and not a bitfield's part, the whole within a load's 16-bit offset.
    fn path_bytes(&self, path: &str) -> Result<u32, BpfError> {
        let mut names = path.split('.');
        let first = names.next().unwrap_or_default();
        let mut id = self
            .struct_named(first)
            .ok_or_else(|| BpfError::Btf(format!("no struct {first}")))?;
        let mut bits = 0u32;
        for name in names {
            let (at, ty) = self
                .member(id, name, 0)
                .ok_or_else(|| BpfError::Btf(format!("no member {name} in {path}")))?;
            bits += at;
            id = self.resolved(ty);
        }
        if !bits.is_multiple_of(8) || bits / 8 > i16::MAX as u32 {
            return Err(BpfError::Btf(format!("{path} at bit {bits}")));
        }
        Ok(bits / 8)
    }

    /// Type `id` with typedefs and qualifiers taken off.
    fn resolved(&self, mut id: u32) -> u32 {
        // A bounded walk: a malformed blob's cycle must not hang.
        for _ in 0..32 {
            match self.header(id) {
                Some((_, info, _))
                    if matches!(
                        (info >> 24) & 0x1f,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    let p = self.at[(id - 1) as usize] as usize;
                    match u32_at(self.types, p + 8) {
                        Some(next) => id = next,
                        None => return id,
                    }
                }
                _ => return id,
            }
        }
        id
    }

    /// The bit offset and the type of member `name` of struct or union `id`, looking into
    /// anonymous struct and union members; `base` is the offset of `id` itself.
    fn member(&self, id: u32, name: &str, base: u32) -> Option<(u32, u32)> {
        let (_, info, members) = self.header(id)?;
        let kind = (info >> 24) & 0x1f;
        if kind != KIND_STRUCT && kind != KIND_UNION {
            return None;
        }
        let bitfields = info >> 31 == 1;
        for m in 0..(info & 0xffff) as usize {
            let at = members + 12 * m;
            let (m_name, m_type, m_off) = (
                u32_at(self.types, at)?,
                u32_at(self.types, at + 4)?,
                u32_at(self.types, at + 8)?,
            );
            let bits = base
                + if bitfields {
                    m_off & 0x00ff_ffff
                } else {
                    m_off
                };
            // A bitfield member (its size in the top byte) is no load's target.
            if bitfields && m_off >> 24 != 0 {
                continue;
            }
            if m_name == 0 {
                if let Some(found) = self.member(self.resolved(m_type), name, bits) {
                    return Some(found);
                }
            } else if self.name(m_name) == name.as_bytes() {
                return Some((bits, m_type));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernels_offsets_are_found_where_it_has_btf() {
        let Ok(bytes) = std::fs::read(VMLINUX) else {
            return;
        };
        let o = Offsets::from_btf(&bytes);
        let o = match o {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        };
        // i_mode opens struct inode on every kernel; pid comes right before tgid.
        assert_eq!(o.inode_i_mode, 0);
        assert_eq!(o.task_tgid, o.task_pid + 4);
        assert!(o.attach_id > 0);
    }

    #[test]
    fn the_running_kernels_socket_offsets_are_found_where_it_has_btf() {
        let Ok(bytes) = std::fs::read(VMLINUX) else {
            return;
        };
        let o = match SockOffsets::from_btf(&bytes) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        };
        // struct sock_common opens with the address pair, then the hash, then the ports.
        assert_eq!(o.addrpair, 0);
        assert_eq!(o.portpair, 12);
        assert_eq!(o.family, 16);
        assert!(o.v6_rcv_saddr == o.v6_daddr + 16, "{o:?}");
        assert!(o.attach_id > 0);
    }

    #[test]
    fn a_blob_that_is_not_btf_is_refused() {
        assert!(Offsets::from_btf(b"\x00\x01garbage").is_err());
        assert!(Offsets::from_btf(&[]).is_err());
    }
}
