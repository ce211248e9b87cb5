//! Stage 1, collector, kernel half: one `SOCK_DIAG_BY_FAMILY` dump per address family over a
//! NETLINK_SOCK_DIAG socket, states filtered in the kernel, tcp_info requested.
//!
//! Input: a `StateSet`. Output: sockets via `decode::DumpDecoder`, which owns every rule about
//! what a complete reply is; this file only moves bytes. Like `ss -tan`, unprivileged.

use std::time::Duration;

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::{Socket as NlSocket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};

use super::decode::{DumpDecoder, Feed};
use super::{CollectError, SocketSource};
use crate::model::{Socket, StateSet};

/// The kernel hands out dump datagrams of at most 32 KiB; twice that means a full buffer can
/// only be a truncated datagram.
const RECV_BUF: usize = 64 * 1024;
/// A dump that stalls this long is treated as lost rather than waited on forever.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at a dump the kernel keeps flagging `NLM_F_DUMP_INTR`.
const MAX_ATTEMPTS: u32 = 3;

/// A NETLINK_SOCK_DIAG socket in the caller's network namespace.
pub struct NetlinkSource {
    socket: NlSocket,
    buf: Vec<u8>,
    seq: u32,
    /// Sockets the last dump found: the next one is sized for about as many.
    last_len: usize,
}

impl NetlinkSource {
    /// Opens the socket; fails where netlink is blocked (seccomp, a stripped container).
    pub fn open() -> Result<NetlinkSource, CollectError> {
        let mut socket = NlSocket::new(NETLINK_SOCK_DIAG).map_err(CollectError::Open)?;
        socket.bind_auto().map_err(CollectError::Open)?;
        socket
            .connect(&NlAddr::new(0, 0))
            .map_err(CollectError::Open)?;
        rustix::net::sockopt::set_socket_timeout(
            &socket,
            rustix::net::sockopt::Timeout::Recv,
            Some(RECV_TIMEOUT),
        )
        .map_err(|e| CollectError::Open(e.into()))?;
        Ok(NetlinkSource {
            socket,
            buf: Vec::with_capacity(RECV_BUF),
            seq: 0,
            last_len: 0,
        })
    }

    /// Dumps one family, handing each datagram to `sink` as it arrives (the capture tool
    /// records them; `sockets` decodes them).
    pub fn dump_raw(
        &mut self,
        family: u8,
        states: StateSet,
        sink: &mut dyn FnMut(&[u8]) -> Result<Feed, CollectError>,
    ) -> Result<(), CollectError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let socket_id = if family == AF_INET6 {
            SocketId::new_v6()
        } else {
            SocketId::new_v4()
        };
        let mut msg = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::INFO,
                states: StateFlags::from_bits_retain(states.kernel_mask()),
                socket_id,
            })
            .into(),
        );
        msg.finalize();
        let mut req = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut req);
        self.socket.send(&req, 0).map_err(CollectError::Send)?;
        loop {
            self.buf.clear();
            let n = self
                .socket
                .recv(&mut self.buf, 0)
                .map_err(CollectError::Recv)?;
            if n == 0 {
                // The socket closed under us: whatever came so far is not a whole dump.
                return sink(&[]).and(Ok(()));
            }
            if n >= RECV_BUF {
                return Err(CollectError::Malformed {
                    offset: 0,
                    reason: format!("a datagram filled the whole {RECV_BUF}-byte buffer"),
                });
            }
            if sink(&self.buf[..n])? == Feed::Done {
                return Ok(());
            }
        }
    }

    fn dump_family(
        &mut self,
        family: u8,
        states: StateSet,
        capacity: usize,
    ) -> Result<Vec<Socket>, CollectError> {
        for _ in 0..MAX_ATTEMPTS {
            let mut decoder = DumpDecoder::with_capacity(capacity);
            self.dump_raw(family, states, &mut |d| decoder.feed(d))?;
            let dump = decoder.finish()?;
            if !dump.interrupted {
                return Ok(dump.sockets);
            }
        }
        Err(CollectError::Interrupted(MAX_ATTEMPTS))
    }
}

impl SocketSource for NetlinkSource {
    fn name(&self) -> &'static str {
        "sock_diag"
    }

    fn sockets(&mut self, states: StateSet) -> Result<Vec<Socket>, CollectError> {
        // Room for both families and some growth in the first vector, so that appending the
        // second one does not reallocate. The first dump is sized by the kernel's counters.
        if self.last_len == 0 {
            self.last_len = tcp_in_use();
        }
        let room = self.last_len + self.last_len / 8;
        let mut all = self.dump_family(AF_INET, states, room)?;
        all.extend(self.dump_family(AF_INET6, states, 0)?);
        self.last_len = all.len();
        Ok(all)
    }
}

/// TCP sockets of this thread's network namespace by the kernel's own counters
/// (`/proc/thread-self/net/sockstat{,6}`: `inuse` plus `tw`, about 3 µs to read): the size to
/// expect of a dump. 0 when they cannot be read; a dump then grows as it goes.
fn tcp_in_use() -> usize {
    ["sockstat", "sockstat6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/proc/thread-self/net/{f}")).ok())
        .map(|text| sockstat_tcp(&text))
        .sum()
}

/// `inuse` + `tw` of the `TCP:` or `TCP6:` line of a sockstat file.
fn sockstat_tcp(text: &str) -> usize {
    let Some(line) = text
        .lines()
        .find(|l| l.starts_with("TCP: ") || l.starts_with("TCP6: "))
    else {
        return 0;
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "inuse" || w[0] == "tw")
        .filter_map(|w| w[1].parse::<usize>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::sockstat_tcp;

    #[test]
    fn sockstat_counts_in_use_and_time_wait_sockets() {
        let v4 =
            "sockets: used 290\nTCP: inuse 5 orphan 0 tw 3 alloc 7 mem 1\nUDP: inuse 2 mem 0\n";
        assert_eq!(sockstat_tcp(v4), 8);
        assert_eq!(sockstat_tcp("TCP6: inuse 4\nUDP6: inuse 1\n"), 4);
        assert_eq!(sockstat_tcp("garbage"), 0);
    }
}
