//! Stage 1, collector, pure half: the bytes of a sock_diag dump reply → `Socket`s.
//!
//! Input: the datagrams one `recv` after another returned, in order, answering either
//! `SOCK_DIAG_BY_FAMILY` (one family) or the compat `TCPDIAG_GETSOCK` (both families in one walk
//! of the table): both carry the same `inet_diag_msg`. Output: the sockets, each once (a dump
//! under churn can report a socket twice: deduplicated by cookie, or, where the kernel's cookie
//! names nothing stable, by endpoints and inode; see `stable_cookie`), or a `CollectError` for
//! a kernel error, a malformed message or a dump that never reached `NLMSG_DONE`. No I/O
//! happens here, so captured replies in `fixtures/` test it byte for byte, and replies as older
//! kernels send them (`docs/kernels.md`) are derived from those.
//!
//! Per socket the crate's allocation-free header parser (`InetResponseHeader`) and attribute
//! iterator (`NlasIterator`) are used, and only the two attributes shimcheck reads are looked at:
//! the crate's whole-message parser allocates a vector per attribute, which cost 300–370 ns a
//! socket at 120,000 sockets (`benches/decode.sh`), more than the rest of a watch sample's
//! decoding, and it does not know the compat reply's message type. Control messages (done,
//! error) still go through the crate's full parser.

use std::io;
use std::net::SocketAddr;

use netlink_packet_core::{
    NLM_F_DUMP_INTR, NetlinkBuffer, NetlinkMessage, NetlinkPayload, NlasIterator, Parseable,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::SOCK_DIAG_BY_FAMILY;
use netlink_packet_sock_diag::inet::{InetResponseBuffer, InetResponseHeader};
use rustc_hash::FxHashSet;

use super::CollectError;
use crate::model::{Socket, TcpInfo, TcpState};

/// `TCPDIAG_GETSOCK` (`include/uapi/linux/inet_diag.h`): the compat request, and its replies'
/// message type.
pub const TCPDIAG_GETSOCK: u16 = 18;

/// What the decoder wants after a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// The dump goes on: read another datagram.
    More,
    /// `NLMSG_DONE` arrived: the dump is complete.
    Done,
}

/// Accumulates one family's dump, datagram by datagram.
#[derive(Debug, Default)]
pub struct DumpDecoder {
    sockets: Vec<Socket>,
    cookies: FxHashSet<u64>,
    /// Some socket came without a stable cookie: `finish` deduplicates those by endpoints and
    /// inode.
    uncookied: bool,
    bytes_seen: usize,
    done: bool,
    interrupted: bool,
    duplicates: usize,
}

/// A finished dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dump {
    pub sockets: Vec<Socket>,
    /// The kernel flagged the dump `NLM_F_DUMP_INTR`: the table changed under it; retry.
    pub interrupted: bool,
    /// Sockets reported twice and kept once.
    pub duplicates: usize,
}

impl DumpDecoder {
    /// A decoder for one dump.
    pub fn new() -> DumpDecoder {
        DumpDecoder::default()
    }

    /// A decoder for a dump of about `sockets` sockets: room made once, not by doubling (at a
    /// million sockets the last doubling alone holds the old and the new 88 MB at once).
    pub fn with_capacity(sockets: usize) -> DumpDecoder {
        DumpDecoder {
            sockets: Vec::with_capacity(sockets),
            cookies: FxHashSet::with_capacity_and_hasher(sockets, Default::default()),
            ..DumpDecoder::default()
        }
    }

    /// Decodes one datagram: zero or more netlink messages laid end to end.
    pub fn feed(&mut self, datagram: &[u8]) -> Result<Feed, CollectError> {
        let mut offset = 0;
        while offset < datagram.len() {
            if self.done {
                return Err(self.malformed(offset, "data after NLMSG_DONE".into()));
            }
            let rest = &datagram[offset..];
            let buf = NetlinkBuffer::new_checked(rest)
                .map_err(|e| self.malformed(offset, format!("bad netlink header: {e}")))?;
            let len = buf.length() as usize;
            if buf.flags() & NLM_F_DUMP_INTR != 0 {
                self.interrupted = true;
            }
            if matches!(buf.message_type(), SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK) {
                let socket =
                    to_socket(buf.payload()).map_err(|reason| self.malformed(offset, reason))?;
                self.push(socket);
            } else {
                self.control(&rest[..len], offset)?;
            }
            // Messages are 4-byte aligned; the last one may lack its padding.
            offset += (len + 3) & !3;
        }
        self.bytes_seen += datagram.len();
        Ok(if self.done { Feed::Done } else { Feed::More })
    }

    /// A message that is not a socket: the end of the dump, an error, or nothing.
    fn control(&mut self, message: &[u8], offset: usize) -> Result<(), CollectError> {
        let msg = NetlinkMessage::<SockDiagMessage>::deserialize(message)
            .map_err(|e| self.malformed(offset, format!("{e}")))?;
        match msg.payload {
            NetlinkPayload::Done(done) => {
                if done.code < 0 {
                    // `saturating_neg`: a forged i32::MIN (found by fuzzing) must not overflow.
                    return Err(CollectError::Kernel(io::Error::from_raw_os_error(
                        done.code.saturating_neg(),
                    )));
                }
                self.done = true;
                Ok(())
            }
            // An ACK (code 0) is not an end of dump either: nothing here asks for one.
            // Not the crate's `to_io`: its `abs()` overflows on a forged i32::MIN (fuzzing).
            NetlinkPayload::Error(err) => Err(CollectError::Kernel(io::Error::from_raw_os_error(
                err.raw_code().saturating_abs(),
            ))),
            NetlinkPayload::Noop => Ok(()),
            other => {
                let kind = other.message_type();
                Err(self.malformed(offset, format!("unexpected message type {kind}")))
            }
        }
    }

    /// Ends the dump: an error unless `NLMSG_DONE` was seen.
    pub fn finish(mut self) -> Result<Dump, CollectError> {
        if !self.done {
            return Err(CollectError::Truncated {
                sockets: self.sockets.len(),
            });
        }
        if self.uncookied {
            self.duplicates += drop_repeats_without_cookie(&mut self.sockets);
        }
        Ok(Dump {
            sockets: self.sockets,
            interrupted: self.interrupted,
            duplicates: self.duplicates,
        })
    }

    fn push(&mut self, socket: Socket) {
        match socket.cookie() {
            Some(cookie) if !self.cookies.insert(cookie) => {
                self.duplicates += 1;
                return;
            }
            Some(_) => {}
            // Never deduplicated by a cookie that is not one: a whole dump of sockets sharing
            // INET_DIAG_NOCOOKIE or 0 would shrink to one socket.
            None => self.uncookied = true,
        }
        self.sockets.push(socket);
    }

    fn malformed(&self, offset: usize, reason: String) -> CollectError {
        CollectError::Malformed {
            offset: self.bytes_seen + offset,
            reason,
        }
    }
}

/// Removes the second and later reports of a socket without a stable cookie, keeping the
/// first, and returns how many went. Such a socket is told apart by its endpoints and inode:
/// two live sockets never share all three (a socket with an open file has an inode of its own;
/// one without, TIME_WAIT, SYN_RECV or orphaned, is the only holder of its 4-tuple). One sort
/// of the indices of those sockets, at the end of a dump, only on kernels that need it: no
/// per-socket set of 72-byte keys.
fn drop_repeats_without_cookie(sockets: &mut Vec<Socket>) -> usize {
    let key = |i: u32| -> (SocketAddr, SocketAddr, u64) {
        let s = &sockets[i as usize];
        (s.local(), s.remote(), s.inode)
    };
    let mut order: Vec<u32> = (0..sockets.len() as u32)
        .filter(|&i| sockets[i as usize].cookie().is_none())
        .collect();
    // Equal keys end up together, earliest report first.
    order.sort_unstable_by(|&a, &b| key(a).cmp(&key(b)).then(a.cmp(&b)));
    let mut repeat = vec![false; sockets.len()];
    let mut repeats = 0;
    for pair in order.windows(2) {
        if key(pair[0]) == key(pair[1]) {
            repeat[pair[1] as usize] = true;
            repeats += 1;
        }
    }
    if repeats > 0 {
        let mut at = 0;
        sockets.retain(|_| {
            at += 1;
            !repeat[at - 1]
        });
    }
    repeats
}

/// Runs `dump`, which feeds one whole dump's datagrams to the decoder it is given, until a dump
/// comes back without `NLM_F_DUMP_INTR` (the socket table changed under the walk), at most
/// `attempts` times: the transport's retry, kept apart from its socket so that captured replies
/// drive it in tests.
pub fn until_uninterrupted(
    attempts: u32,
    capacity: usize,
    mut dump: impl FnMut(&mut DumpDecoder) -> Result<(), CollectError>,
) -> Result<Vec<Socket>, CollectError> {
    for _ in 0..attempts {
        let mut decoder = DumpDecoder::with_capacity(capacity);
        dump(&mut decoder)?;
        let dump = decoder.finish()?;
        if !dump.interrupted {
            return Ok(dump.sockets);
        }
    }
    Err(CollectError::Interrupted(attempts))
}

/// The reply to one exact lookup (`SOCK_DIAG_BY_FAMILY` without `NLM_F_DUMP`): the socket, or
/// `None` when the kernel answered `ENOENT` (no socket with that 4-tuple and cookie: it is gone).
/// Any other error, a malformed reply or an empty one is an error.
pub fn lookup_reply(datagram: &[u8]) -> Result<Option<Socket>, CollectError> {
    let malformed = |reason: String| CollectError::Malformed { offset: 0, reason };
    let buf = NetlinkBuffer::new_checked(datagram)
        .map_err(|e| malformed(format!("bad netlink header: {e}")))?;
    if matches!(buf.message_type(), SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK) {
        return to_socket(buf.payload()).map(Some).map_err(malformed);
    }
    let len = (buf.length() as usize).min(datagram.len());
    let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&datagram[..len])
        .map_err(|e| malformed(format!("{e}")))?;
    match msg.payload {
        NetlinkPayload::Error(err) => {
            let code = err.raw_code().saturating_abs();
            if code == ENOENT {
                Ok(None)
            } else {
                Err(CollectError::Kernel(io::Error::from_raw_os_error(code)))
            }
        }
        other => Err(malformed(format!(
            "unexpected message type {} in a lookup's reply",
            other.message_type()
        ))),
    }
}

/// `ENOENT`: what the kernel answers a lookup of a socket that is not there.
const ENOENT: i32 = 2;

/// The cookie a socket can be told apart by, across samples too: `None` for one that names
/// nothing stable. Since Linux 4.1 the kernel numbers sockets from a counter the first time
/// one is dumped, so a cookie is never 0 and never reaches 2^63. Before 4.1 `idiag_cookie` was
/// the socket's kernel address (`0xffff8...` on 64-bit kernels), which the next socket
/// allocated there reuses at once, and which a socket changes when it goes TIME_WAIT; all ones
/// is `INET_DIAG_NOCOOKIE`, which names no socket. (5.10's per-cpu generator could hand out a
/// cookie counting down from all ones when generation nested in an interrupt: also taken as
/// none, which costs nothing but the cookie.) Without one, the dump deduplicates by endpoints
/// and inode and the detector follows the socket by its 4-tuple (`docs/kernels.md`).
pub fn stable_cookie(raw: u64) -> Option<u64> {
    (raw != 0 && raw >> 63 == 0).then_some(raw)
}

/// One `inet_diag_msg` and its attributes → a `Socket`, without allocating.
fn to_socket(payload: &[u8]) -> Result<Socket, String> {
    let h = InetResponseHeader::parse(payload).map_err(|e| e.to_string())?;
    let state = TcpState::from_kernel(h.state)
        .ok_or_else(|| format!("unknown TCP state {} in reply", h.state))?;
    let id = &h.socket_id;
    // idiag_cookie is two native-endian u32 halves, low half first.
    let lo = u32::from_ne_bytes([id.cookie[0], id.cookie[1], id.cookie[2], id.cookie[3]]);
    let hi = u32::from_ne_bytes([id.cookie[4], id.cookie[5], id.cookie[6], id.cookie[7]]);
    let mut tcp_info = None;
    let mut cgroup_id = None;
    let attrs = payload
        .get(std::mem::size_of::<InetResponseBuffer>()..)
        .unwrap_or_default();
    for nla in NlasIterator::new(attrs) {
        let nla = nla.map_err(|e| format!("bad attribute: {e}"))?;
        match nla.kind() {
            INET_DIAG_INFO => tcp_info = parse_tcp_info(nla.value()),
            // The crate does not know INET_DIAG_CGROUP_ID (Linux 5.7+).
            INET_DIAG_CGROUP_ID => {
                cgroup_id = <[u8; 8]>::try_from(nla.value())
                    .ok()
                    .map(u64::from_ne_bytes);
            }
            _ => {}
        }
    }
    let mut socket = Socket::new(
        state,
        (id.source_address, id.source_port).into(),
        (id.destination_address, id.destination_port).into(),
    );
    socket.inode = u64::from(h.inode);
    socket.set_cookie(stable_cookie(u64::from(hi) << 32 | u64::from(lo)));
    socket.tcp_info = tcp_info;
    socket.set_cgroup_id(cgroup_id);
    Ok(socket)
}

/// `INET_DIAG_INFO`: `struct tcp_info`.
const INET_DIAG_INFO: u16 = 2;
/// `INET_DIAG_CGROUP_ID` (`include/uapi/linux/inet_diag.h`).
const INET_DIAG_CGROUP_ID: u16 = 21;

/// Offsets in `struct tcp_info` (`include/uapi/linux/tcp.h`): 8 one-byte fields, then u32s.
/// The idle clocks have been there since 2.6 (every kernel sends at least 104 bytes, up to
/// `tcpi_total_retrans`).
const LAST_DATA_SENT: usize = 44;
const LAST_DATA_RECV: usize = 52;
const LAST_ACK_RECV: usize = 56;

/// Reads the fields shimcheck needs by length: `tcp_info` grows with the kernel (104 bytes in
/// 3.10, 192 in 4.15, 224 in 4.19, 232 in 5.4), so a field past the end of what this kernel
/// sent is absent, and a reply too short to hold even the idle clocks yields no `TcpInfo` at
/// all. By length, not by version: a distribution kernel that backported a field has it.
pub fn parse_tcp_info(bytes: &[u8]) -> Option<TcpInfo> {
    let u32_at = |off: usize| -> Option<u32> {
        let b = bytes.get(off..off + 4)?;
        Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    Some(TcpInfo {
        last_data_sent_ms: u32_at(LAST_DATA_SENT)?,
        last_data_recv_ms: u32_at(LAST_DATA_RECV)?,
        last_ack_recv_ms: u32_at(LAST_ACK_RECV)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_info_is_read_by_length() {
        let mut full = vec![0u8; 232];
        full[LAST_DATA_SENT..LAST_DATA_SENT + 4].copy_from_slice(&7000u32.to_ne_bytes());
        full[LAST_DATA_RECV..LAST_DATA_RECV + 4].copy_from_slice(&6000u32.to_ne_bytes());
        full[LAST_ACK_RECV..LAST_ACK_RECV + 4].copy_from_slice(&100u32.to_ne_bytes());
        let info = parse_tcp_info(&full).unwrap();
        assert_eq!(info.data_idle_ms(), 6000);
        // A 2.6-era tcp_info (104 bytes) has the clocks.
        let old = parse_tcp_info(&full[..104]).unwrap();
        assert_eq!(old, info);
        assert_eq!(old.last_ack_recv_ms, 100);
        assert_eq!(parse_tcp_info(&full[..59]), None);
    }

    #[test]
    fn only_a_counter_cookie_is_stable() {
        assert_eq!(stable_cookie(1), Some(1));
        assert_eq!(stable_cookie((1 << 63) - 1), Some((1 << 63) - 1));
        assert_eq!(stable_cookie(0), None);
        // INET_DIAG_NOCOOKIE, and a kernel address as Linux 3.10 sends it.
        assert_eq!(stable_cookie(u64::MAX), None);
        assert_eq!(stable_cookie(0xffff_8800_3a4b_5c00), None);
    }

    #[test]
    fn a_done_with_the_most_negative_status_is_an_error_not_an_overflow() {
        let mut done = Vec::new();
        done.extend(20u32.to_ne_bytes());
        done.extend(3u16.to_ne_bytes()); // NLMSG_DONE
        done.extend(2u16.to_ne_bytes());
        done.extend([0u8; 8]);
        done.extend(i32::MIN.to_ne_bytes());
        let err = DumpDecoder::new().feed(&done).unwrap_err();
        assert!(matches!(err, CollectError::Kernel(_)), "{err}");
        // The same status in an NLMSG_ERROR.
        done[4..6].copy_from_slice(&2u16.to_ne_bytes());
        let err = DumpDecoder::new().feed(&done).unwrap_err();
        assert!(matches!(err, CollectError::Kernel(_)), "{err}");
    }

    #[test]
    fn empty_input_is_not_a_finished_dump() {
        let d = DumpDecoder::new();
        assert!(matches!(
            d.finish(),
            Err(CollectError::Truncated { sockets: 0 })
        ));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let mut d = DumpDecoder::new();
        let err = d.feed(&[0xff; 7]).unwrap_err();
        assert!(
            matches!(err, CollectError::Malformed { offset: 0, .. }),
            "{err}"
        );
        // A header that claims more bytes than there are.
        let mut hdr = vec![0u8; 20];
        hdr[0..4].copy_from_slice(&400u32.to_ne_bytes());
        hdr[4..6].copy_from_slice(&20u16.to_ne_bytes());
        let mut d = DumpDecoder::new();
        assert!(matches!(d.feed(&hdr), Err(CollectError::Malformed { .. })));
    }
}
