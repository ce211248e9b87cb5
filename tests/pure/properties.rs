//! Properties over generated inputs (proptest), on stable: the sock_diag decoder never panics on
//! arbitrary bytes and gives back every socket it is fed, encoded as the kernel encodes it; a
//! snapshot written and read back is the sample it was taken from.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use shimcheck::collect::decode::{DumpDecoder, Feed};
use shimcheck::model::{Socket, TcpInfo, TcpState};

use crate::support::builders::{self, diag_done, diag_message, process};

fn state() -> impl Strategy<Value = TcpState> {
    proptest::sample::select(TcpState::ALL.to_vec())
}

fn addr(v6: bool) -> impl Strategy<Value = SocketAddr> {
    (any::<u128>(), any::<u16>()).prop_map(move |(bits, port)| {
        let ip = if v6 {
            IpAddr::V6(Ipv6Addr::from(bits))
        } else {
            IpAddr::V4(Ipv4Addr::from(bits as u32))
        };
        SocketAddr::new(ip, port)
    })
}

fn tcp_info() -> impl Strategy<Value = Option<TcpInfo>> {
    proptest::option::of((any::<u32>(), any::<u32>(), any::<u32>())).prop_map(|t| {
        t.map(|(sent, recv, ack)| TcpInfo {
            last_data_sent_ms: sent,
            last_data_recv_ms: recv,
            last_ack_recv_ms: ack,
        })
    })
}

/// A socket as sock_diag can report it: 32-bit inode, a cookie, both ends of one family.
fn socket() -> impl Strategy<Value = Socket> {
    any::<bool>().prop_flat_map(|v6| {
        (
            state(),
            addr(v6),
            addr(v6),
            any::<u32>(),
            any::<u64>(),
            tcp_info(),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |(state, local, remote, inode, cookie, tcp_info, cgroup_id)| {
                    let mut s = Socket::new(state, local, remote);
                    s.inode = u64::from(inode);
                    s.set_cookie(Some(cookie));
                    s.tcp_info = tcp_info;
                    s.set_cgroup_id(cgroup_id);
                    s
                },
            )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the bytes, the decoder answers with sockets or an error, never a panic.
    #[test]
    fn the_decoder_never_panics_on_arbitrary_bytes(
        datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 0..4)
    ) {
        let mut d = DumpDecoder::new();
        for dg in &datagrams {
            match d.feed(dg) {
                Ok(Feed::Done) | Err(_) => break,
                Ok(Feed::More) => {}
            }
        }
        let _ = d.finish();
    }

    /// Sockets encoded as the kernel encodes them, several to a datagram, come back whole and
    /// in order (cookies made distinct: a repeated cookie is a duplicate the decoder drops).
    #[test]
    fn the_decoder_gives_back_every_socket_it_is_fed(
        sockets in proptest::collection::vec(socket(), 0..40),
        per_datagram in 1usize..8,
    ) {
        let sockets: Vec<Socket> = sockets
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                s.set_cookie(Some(i as u64 + 1));
                s
            })
            .collect();
        let mut d = DumpDecoder::new();
        for chunk in sockets.chunks(per_datagram) {
            let datagram: Vec<u8> = chunk.iter().flat_map(|s| diag_message(s, 1)).collect();
            prop_assert_eq!(d.feed(&datagram).unwrap(), Feed::More);
        }
        prop_assert_eq!(d.feed(&diag_done()).unwrap(), Feed::Done);
        let dump = d.finish().unwrap();
        prop_assert_eq!(dump.sockets, sockets);
    }

    /// A snapshot read back is the sample written: sockets, holders, processes, host facts
    /// and the time to the millisecond.
    #[test]
    fn a_snapshot_read_back_is_the_sample_written(
        sockets in proptest::collection::vec(socket(), 0..30),
        pids in proptest::collection::vec(1u32..100_000, 1..5),
        comm in "[ -~]{0,15}",
        millis in 0u64..4_000_000_000_000,
    ) {
        let owners: Vec<(u64, u32)> = sockets
            .iter()
            .enumerate()
            .filter(|(_, s)| s.inode != 0)
            .map(|(i, s)| (s.inode, pids[i % pids.len()]))
            .collect();
        let mut sample = builders::sample()
            .sockets(sockets)
            .owners(owners)
            .processes(pids.iter().map(|&p| process(p, &comm)))
            .port_range(32768, 60999)
            .build();
        sample.taken_at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(millis);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        shimcheck::snapshot::write_file(&sample, &path).unwrap();
        let back = shimcheck::snapshot::read(&path).unwrap();
        prop_assert_eq!(&back.sockets, &sample.sockets);
        prop_assert_eq!(back.owners.pairs(), sample.owners.pairs());
        prop_assert_eq!(&back.owners.processes, &sample.owners.processes);
        prop_assert_eq!(back.taken_at, sample.taken_at);
        prop_assert_eq!(back.host.port_range, sample.host.port_range);
    }
}
