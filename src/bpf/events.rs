//! Stage 1, collector, kernel side of a loop's socket table: every TCP state change, as it
//! happens, from a BPF program on the `inet_sock_set_state` tracepoint, so that a later sample
//! asks the kernel only about the sockets that changed instead of dumping every socket again.
//!
//! Input: the running kernel (BTF-typed tracepoints, ring buffers, `bpf_get_socket_cookie` on a
//! tracepoint's socket: 5.12 and later). Output: `StateChange`s, each a socket's cookie, its
//! namespace, the state it left and the state it entered, and its endpoints as the kernel held
//! them at that moment; and how many changes were lost because the ring buffer was full
//! (`Drained::lost`: the table cannot be trusted then, and the caller dumps everything).
//!
//! Every change of a TCP socket's state goes through the tracepoint (`tcp_set_state`,
//! `inet_sk_state_store`, `inet_sk_set_state`): connects, accepts, closes, resets, listens.
//! What it does not see: a socket turning into a TIME_WAIT mini-socket and that mini-socket
//! expiring, request sockets (SYN_RECV), and an accepted socket getting its inode when the
//! application calls `accept`. `collect::events` works within those limits.
//!
//! The program is the instructions of `program` below, assembled here like the iterator's
//! (`bpf.rs`): no BPF toolchain at build time, offsets from the kernel's BTF at run time. The
//! ring buffer is read through two shared mappings (`memmap2`), the consumer's position page
//! (read-write) and the producer's page with the data pages after it (read-only).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use super::BpfError;
use super::btf::SockOffsets;
use super::sys;

/// The ring buffer's size: 4 MiB hold 58,000 changes between two drains.
const RING_BYTES: u32 = 4 << 20;
/// A record as the program writes it (`decode`), and its header in the ring.
pub const RECORD: usize = 64;
const HEADER: usize = 8;
const BUSY: u32 = 1 << 31;
const DISCARDED: u32 = 1 << 30;

/// `TCP_SYN_RECV`: a request socket's child being created, not a change shimcheck follows
/// (the child's change to ESTABLISHED comes next).
const TCP_SYN_RECV: i32 = 3;
const IPPROTO_TCP: i32 = 6;

/// One state change of one TCP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateChange {
    pub cookie: u64,
    /// The inode number of the socket's network namespace.
    pub netns: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// The kernel's state numbers (`TCP_ESTABLISHED` is 1 ... `TCP_CLOSING` 11).
    pub old: u8,
    pub new: u8,
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
    /// The device the socket is bound to, 0 for none.
    pub bound_dev_if: u32,
}

/// What a drain found besides the changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Drained {
    /// Changes read.
    pub changes: usize,
    /// Changes the program could not write since the last drain: the ring was full.
    pub lost: u64,
}

/// The attached program, its ring buffer and its lost-changes counter.
pub struct StateChanges {
    // Dropping the attachment detaches the program; the maps go with the program.
    _attached: OwnedFd,
    lost_map: OwnedFd,
    consumer: MmapRaw,
    producer: MmapRaw,
    lost_seen: u64,
}

impl StateChanges {
    /// Loads the program and attaches it; with `netns`, only changes of sockets in the network
    /// namespace of that inode number are written.
    pub fn load(netns: Option<u32>) -> Result<StateChanges, BpfError> {
        let offsets = SockOffsets::of_running_kernel()?;
        let ring = sys::create_map(sys::BPF_MAP_TYPE_RINGBUF, 0, 0, RING_BYTES)?;
        let lost_map = sys::create_map(sys::BPF_MAP_TYPE_ARRAY, 4, 8, 1)?;
        let insns = program(&offsets, sys::raw(&ring), sys::raw(&lost_map), netns);
        let prog = sys::load_tracing(&insns, sys::BPF_TRACE_RAW_TP, offsets.attach_id)?;
        let page = rustix::param::page_size();
        let mmap = |what: &'static str, e: std::io::Error| BpfError::Syscall {
            command: what,
            error: e,
            log: String::new(),
        };
        let consumer = MmapOptions::new()
            .len(page)
            .map_raw(&ring)
            .map_err(|e| mmap("mmap of the ring's consumer page", e))?;
        // The data pages are mapped twice in a row: a record that wraps reads as one piece.
        let producer = MmapOptions::new()
            .offset(page as u64)
            .len(page + 2 * RING_BYTES as usize)
            .map_raw_read_only(&ring)
            .map_err(|e| mmap("mmap of the ring's data", e))?;
        let attached = sys::attach_raw_tracepoint(&prog)?;
        Ok(StateChanges {
            _attached: attached,
            lost_map,
            consumer,
            producer,
            lost_seen: 0,
        })
    }

    /// Hands `each` every change written since the last drain, oldest first, and frees their
    /// room in the ring.
    pub fn drain(&mut self, mut each: impl FnMut(StateChange)) -> Result<Drained, BpfError> {
        let page = rustix::param::page_size();
        let cons_ptr = self.consumer.as_mut_ptr().cast::<AtomicU64>();
        let prod_ptr = self.producer.as_ptr().cast::<AtomicU64>();
        // SAFETY: both pages are mapped for as long as `self` lives, page-aligned (so aligned
        // for u64), and the kernel defines their first 8 bytes as the consumer's and the
        // producer's positions, shared with it: they are only read and written atomically.
        let (consumer_pos, producer_pos) = unsafe { (&*cons_ptr, &*prod_ptr) };
        let data = self.producer.as_ptr().wrapping_add(page);
        let mask = u64::from(RING_BYTES) - 1;
        let mut pos = consumer_pos.load(Ordering::Acquire);
        let end = producer_pos.load(Ordering::Acquire);
        let mut changes = 0;
        while pos < end {
            let at = (pos & mask) as usize;
            // SAFETY: `at` < RING_BYTES and the data is mapped twice (2 * RING_BYTES bytes
            // after the producer page), so the header and the whole record after it are
            // inside the mapping; headers are 8-byte aligned. The header is the kernel's to
            // write until its busy bit clears: read atomically, with acquire ordering.
            let header = unsafe { &*data.wrapping_add(at).cast::<AtomicU32>() };
            let len_word = header.load(Ordering::Acquire);
            if len_word & BUSY != 0 {
                break;
            }
            let len = (len_word & !(BUSY | DISCARDED)) as usize;
            if len_word & DISCARDED == 0 && len == RECORD {
                // SAFETY: as above; the record's bytes are committed (busy bit clear).
                let bytes =
                    unsafe { std::slice::from_raw_parts(data.wrapping_add(at + HEADER), RECORD) };
                if let Some(change) = decode(bytes) {
                    each(change);
                    changes += 1;
                }
            }
            pos += ((len + HEADER + 7) & !7) as u64;
            consumer_pos.store(pos, Ordering::Release);
        }
        let lost_total = sys::lookup_u64(&self.lost_map, 0)?;
        let lost = lost_total.saturating_sub(self.lost_seen);
        self.lost_seen = lost_total;
        Ok(Drained { changes, lost })
    }
}

/// A record: `[cookie u64][netns u32][family u16][old u8][new u8][dport be16][sport u16]
/// [bound_dev_if u32][v4 daddr][v4 saddr][v6 daddr 16][v6 saddr 16]`, native-endian except
/// where the kernel keeps network order. `None` for a family other than IPv4 and IPv6.
pub fn decode(r: &[u8]) -> Option<StateChange> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let bytes = |at: usize, n: usize| r.get(at..at + n);
    let u32_at = |at| Some(u32::from_ne_bytes(bytes(at, 4)?.try_into().ok()?));
    let cookie = u64::from_ne_bytes(bytes(0, 8)?.try_into().ok()?);
    let family = u16::from_ne_bytes(bytes(12, 2)?.try_into().ok()?);
    let dport = u16::from_be_bytes(bytes(16, 2)?.try_into().ok()?);
    let sport = u16::from_ne_bytes(bytes(18, 2)?.try_into().ok()?);
    let (local, remote) = match i32::from(family) {
        libc::AF_INET => {
            let d: [u8; 4] = bytes(24, 4)?.try_into().ok()?;
            let s: [u8; 4] = bytes(28, 4)?.try_into().ok()?;
            (IpAddr::V4(Ipv4Addr::from(s)), IpAddr::V4(Ipv4Addr::from(d)))
        }
        libc::AF_INET6 => {
            let d: [u8; 16] = bytes(32, 16)?.try_into().ok()?;
            let s: [u8; 16] = bytes(48, 16)?.try_into().ok()?;
            (IpAddr::V6(Ipv6Addr::from(s)), IpAddr::V6(Ipv6Addr::from(d)))
        }
        _ => return None,
    };
    Some(StateChange {
        cookie,
        netns: u32_at(8)?,
        family,
        old: *r.get(14)?,
        new: *r.get(15)?,
        local: SocketAddr::new(local, sport),
        remote: SocketAddr::new(remote, dport),
        bound_dev_if: u32_at(20)?,
    })
}

/// The tracepoint program. For each state change of a TCP socket (not to SYN_RECV) in the
/// namespace asked for: the record `decode` reads, built on the stack and written to the ring
/// buffer; when the ring is full, the lost counter (array slot 0) goes up instead.
///
/// Registers: r6 the context (the tracepoint's arguments: sk, oldstate, newstate), r7 the
/// socket, r8 its `struct net`.
pub fn program(o: &SockOffsets, ring: u32, lost: u32, netns: Option<u32>) -> Vec<u64> {
    use sys::insn::*;
    let mut p = vec![
        mov64_reg(6, 1),
        ldx(DW, 7, 6, 0),
        jeq_imm(7, 0, EXIT),
        ldx(H, 2, 7, o.protocol),
        jne_imm(2, IPPROTO_TCP, EXIT),
        ldx(DW, 3, 6, 16),
        jeq_imm(3, TCP_SYN_RECV, EXIT),
        stx(B, 10, 3, -49),
        ldx(DW, 2, 6, 8),
        stx(B, 10, 2, -50),
        ldx(DW, 8, 7, o.net),
        jeq_imm(8, 0, EXIT),
        ldx(W, 2, 8, o.net_inum),
    ];
    if let Some(ns) = netns {
        p.push(jne32_imm(2, ns, EXIT));
    }
    p.extend([
        stx(W, 10, 2, -56),
        ldx(H, 2, 7, o.family),
        stx(H, 10, 2, -52),
        ldx(W, 2, 7, o.portpair),
        stx(W, 10, 2, -48),
        ldx(W, 2, 7, o.bound_dev_if),
        stx(W, 10, 2, -44),
        ldx(DW, 2, 7, o.addrpair),
        stx(DW, 10, 2, -40),
        ldx(DW, 2, 7, o.v6_daddr),
        stx(DW, 10, 2, -32),
        ldx(DW, 2, 7, o.v6_daddr + 8),
        stx(DW, 10, 2, -24),
        ldx(DW, 2, 7, o.v6_rcv_saddr),
        stx(DW, 10, 2, -16),
        ldx(DW, 2, 7, o.v6_rcv_saddr + 8),
        stx(DW, 10, 2, -8),
        mov64_reg(1, 7),
        call(BPF_FUNC_GET_SOCKET_COOKIE),
        stx(DW, 10, 0, -64),
    ]);
    p.extend(ld_map_fd(1, ring));
    p.extend([
        mov64_reg(2, 10),
        add64_imm(2, -(RECORD as i32)),
        mov64_imm(3, RECORD as i32),
        mov64_imm(4, 0),
        call(BPF_FUNC_RINGBUF_OUTPUT),
        jeq_imm(0, 0, EXIT),
        // The ring is full: count the change as lost.
        st_imm(W, 10, -68, 0),
    ]);
    p.extend(ld_map_fd(1, lost));
    p.extend([
        mov64_reg(2, 10),
        add64_imm(2, -68),
        call(BPF_FUNC_MAP_LOOKUP_ELEM),
        jeq_imm(0, 0, EXIT),
        mov64_imm(1, 1),
        atomic_add64(0, 1, 0),
    ]);
    with_exit(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_connection_is_seen_opening_and_closing_where_bpf_may_be_loaded() {
        let me = crate::collect::netns::inode_of(std::path::Path::new("/proc/thread-self/ns/net"));
        let mut changes = match StateChanges::load(me.and_then(|i| u32::try_from(i).ok())) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipped: BPF cannot be loaded here: {e}");
                return;
            }
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        let local = client.local_addr().unwrap();
        drop(client);
        drop(server);
        let mut seen = Vec::new();
        let drained = changes
            .drain(|c| {
                if c.local == local || c.remote == local {
                    seen.push((c.local == local, c.old, c.new));
                }
            })
            .unwrap();
        assert_eq!(drained.lost, 0);
        // The client: SYN_SENT, ESTABLISHED, then FIN_WAIT1 on its close; the server's end:
        // ESTABLISHED (from SYN_RECV), then on.
        assert!(seen.contains(&(true, 2, 1)), "{seen:?}");
        assert!(seen.contains(&(true, 1, 4)), "{seen:?}");
        assert!(seen.contains(&(false, 3, 1)), "{seen:?}");
    }

    #[test]
    fn a_record_decodes_both_families() {
        let mut r = [0u8; RECORD];
        r[..8].copy_from_slice(&77u64.to_ne_bytes());
        r[8..12].copy_from_slice(&4026531840u32.to_ne_bytes());
        r[12..14].copy_from_slice(&2u16.to_ne_bytes());
        r[14] = 10;
        r[15] = 1;
        r[16..18].copy_from_slice(&5000u16.to_be_bytes());
        r[18..20].copy_from_slice(&40000u16.to_ne_bytes());
        r[24..28].copy_from_slice(&[127, 0, 0, 2]);
        r[28..32].copy_from_slice(&[127, 0, 0, 1]);
        let c = decode(&r).unwrap();
        assert_eq!(c.cookie, 77);
        assert_eq!(c.netns, 4026531840);
        assert_eq!((c.old, c.new), (10, 1));
        assert_eq!(c.local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(c.remote, "127.0.0.2:5000".parse().unwrap());
        r[12..14].copy_from_slice(&10u16.to_ne_bytes());
        r[32..48].copy_from_slice(&"::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        r[48..64].copy_from_slice(&"::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        let c = decode(&r).unwrap();
        assert_eq!(c.local, "[::1]:40000".parse().unwrap());
        assert_eq!(c.remote, "[::2]:5000".parse().unwrap());
        r[12..14].copy_from_slice(&1u16.to_ne_bytes());
        assert_eq!(decode(&r), None, "AF_UNIX is not a TCP family");
        assert_eq!(decode(&r[..10]), None);
    }
}
