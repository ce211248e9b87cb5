//! Golden tests of the sock_diag decoder on replies captured from a real kernel
//! (`fixtures/netlink/`, recorded by `examples/capture_sockdiag.rs`).

use std::fmt::Write as _;

use shimcheck::collect::CollectError;

use crate::support::netlink_datagrams as datagrams;
use shimcheck::collect::decode::{Dump, DumpDecoder, Feed};
use shimcheck::model::{Socket, TcpState};

/// Feeds every datagram, stopping at the first error, as the transport does.
fn decode(name: &str) -> Result<Dump, CollectError> {
    let mut d = DumpDecoder::new();
    for dg in datagrams(name) {
        if d.feed(&dg)? == Feed::Done {
            break;
        }
    }
    d.finish()
}

/// One line per socket: everything the decoder extracted.
fn listing(sockets: &[Socket]) -> String {
    let mut out = String::new();
    for s in sockets {
        let info = match s.tcp_info {
            Some(t) => format!(
                "sent={} recv={} ack={}",
                t.last_data_sent_ms, t.last_data_recv_ms, t.last_ack_recv_ms,
            ),
            None => "no tcp_info".into(),
        };
        writeln!(
            out,
            "{:<11} {:<28} {:<28} inode={} cookie={:?} cgroup={:?} {info}",
            s.state.name(),
            s.local().to_string(),
            s.remote().to_string(),
            s.inode,
            s.cookie(),
            s.cgroup_id(),
        )
        .unwrap();
    }
    out
}

#[test]
fn ipv4_multipart_dump_decodes_every_socket_once() {
    assert!(
        datagrams("v4-multipart.bin").len() >= 3,
        "the fixture must span several datagrams"
    );
    let dump = decode("v4-multipart.bin").unwrap();
    assert!(!dump.interrupted);
    assert_eq!(dump.duplicates, 0);
    let s = &dump.sockets;
    let count = |st: TcpState, port: u16| {
        s.iter()
            .filter(|x| x.state == st && x.local().port() == port)
            .count()
    };
    // 120 registry-side and 120 client-side ends, the listeners, one CLOSE_WAIT client.
    assert_eq!(count(TcpState::Established, 5000), 120);
    assert_eq!(
        s.iter()
            .filter(|x| x.state == TcpState::Established && x.remote().port() == 5000)
            .count(),
        120
    );
    assert_eq!(count(TcpState::Listen, 5000), 1);
    assert_eq!(
        s.iter().filter(|x| x.state == TcpState::CloseWait).count(),
        1
    );
    assert!(s.iter().all(|x| x.local().is_ipv4()));
    let cookies: std::collections::HashSet<_> = s.iter().map(|x| x.cookie().unwrap()).collect();
    assert_eq!(cookies.len(), s.len());
    insta::assert_snapshot!(listing(s));
}

#[test]
fn ipv6_dump_keeps_v6_and_v4_mapped_addresses() {
    let dump = decode("v6.bin").unwrap();
    let s = &dump.sockets;
    assert_eq!(
        s.iter()
            .filter(|x| x.state == TcpState::Established && x.local().to_string() == "[::1]:8443")
            .count(),
        3
    );
    assert!(
        s.iter()
            .any(|x| x.local().to_string() == "[::ffff:127.0.0.1]:9000")
    );
    assert!(s.iter().all(|x| x.local().is_ipv6()));
    // INET_DIAG_CGROUP_ID, which the crate passes through as a raw attribute, is decoded.
    assert!(s.iter().all(|x| x.cgroup_id().is_some()));
    insta::assert_snapshot!(listing(s));
}

#[test]
fn a_short_tcp_info_yields_the_same_clocks() {
    let full = decode("v6.bin").unwrap().sockets;
    let short = decode("v6-short-tcp-info.bin").unwrap().sockets;
    assert_eq!(full.len(), short.len());
    for (f, s) in full.iter().zip(&short) {
        assert_eq!(
            (f.local(), f.remote(), f.cookie()),
            (s.local(), s.remote(), s.cookie())
        );
        let (Some(fi), Some(si)) = (f.tcp_info, s.tcp_info) else {
            panic!("both replies carry tcp_info for {}", f.local());
        };
        assert_eq!(fi, si);
    }
}

#[test]
fn an_error_reply_is_an_error_not_an_empty_dump() {
    let err = decode("error.bin").unwrap_err();
    match err {
        CollectError::Kernel(e) => assert_eq!(e.raw_os_error(), Some(2), "ENOENT: {e}"),
        other => panic!("expected a kernel error, got {other}"),
    }
}

#[test]
fn a_dump_without_done_is_truncated() {
    let full = decode("v4-multipart.bin").unwrap().sockets.len();
    match decode("truncated.bin").unwrap_err() {
        CollectError::Truncated { sockets } => assert_eq!(sockets, full),
        other => panic!("expected Truncated, got {other}"),
    }
}

#[test]
fn a_message_cut_short_is_malformed() {
    let err = decode("cut-message.bin").unwrap_err();
    assert!(matches!(err, CollectError::Malformed { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("malformed sock_diag reply at byte"),
        "{err}"
    );
}

#[test]
fn a_socket_reported_twice_under_churn_is_kept_once() {
    let dgs = datagrams("v4-multipart.bin");
    let mut d = DumpDecoder::new();
    // Replay the first datagram twice, as a dump that resumed from an earlier bucket would.
    d.feed(&dgs[0]).unwrap();
    d.feed(&dgs[0]).unwrap();
    for dg in &dgs[1..] {
        d.feed(dg).unwrap();
    }
    let dump = d.finish().unwrap();
    assert_eq!(
        dump.sockets.len(),
        decode("v4-multipart.bin").unwrap().sockets.len()
    );
    assert!(dump.duplicates > 0);
}

/// The dump as the kernel sends it when the table changed during the walk: NLM_F_DUMP_INTR
/// (0x10) set in the first message's flags (bytes 6-7 of its header).
fn interrupted(name: &str) -> Vec<Vec<u8>> {
    let mut dgs = datagrams(name);
    let flags = u16::from_ne_bytes([dgs[0][6], dgs[0][7]]) | 0x10;
    dgs[0][6..8].copy_from_slice(&flags.to_ne_bytes());
    dgs
}

/// Feeds `dgs` as one dump.
fn replay(dgs: &[Vec<u8>], d: &mut DumpDecoder) -> Result<(), CollectError> {
    for dg in dgs {
        if d.feed(dg)? == Feed::Done {
            break;
        }
    }
    Ok(())
}

#[test]
fn a_dump_the_kernel_flags_interrupted_is_taken_again() {
    use shimcheck::collect::decode::until_uninterrupted;
    let clean = decode("v4-multipart.bin").unwrap();
    assert!(!clean.interrupted);
    let flagged = interrupted("v4-multipart.bin");
    // Two walks the table changed under, then a clean one: its sockets, each once.
    let mut walks = 0;
    let sockets = until_uninterrupted(3, 0, |d| {
        walks += 1;
        let dgs = if walks < 3 {
            flagged.clone()
        } else {
            datagrams("v4-multipart.bin")
        };
        replay(&dgs, d)
    })
    .unwrap();
    assert_eq!((walks, sockets), (3, clean.sockets));
    // Interrupted every time: an error naming the attempts, never a partial table.
    let mut walks = 0;
    let err = until_uninterrupted(3, 0, |d| {
        walks += 1;
        replay(&flagged, d)
    })
    .unwrap_err();
    assert_eq!(walks, 3);
    assert!(matches!(err, CollectError::Interrupted(3)), "{err}");
    // A walk that fails is not retried: the error is the answer.
    let mut walks = 0;
    let err = until_uninterrupted(3, 0, |d| {
        walks += 1;
        replay(&datagrams("error.bin"), d)
    })
    .unwrap_err();
    assert_eq!(walks, 1);
    assert!(matches!(err, CollectError::Kernel(_)), "{err}");
}

#[test]
fn the_compat_dump_returns_both_families_in_one_walk() {
    let dgs = datagrams("both.bin");
    // Every socket message is a TCPDIAG_GETSOCK reply (type 18, bytes 4-5 of its header).
    assert_eq!(u16::from_ne_bytes([dgs[0][4], dgs[0][5]]), 18);
    let both = decode("both.bin").unwrap().sockets;
    let mut separate = decode("v4-multipart.bin").unwrap().sockets;
    separate.extend(decode("v6.bin").unwrap().sockets);
    let key = |s: &Socket| (s.cookie(), s.state, s.local(), s.remote(), s.inode);
    let mut a: Vec<_> = both.iter().map(key).collect();
    let mut b: Vec<_> = separate.iter().map(key).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "one walk finds what the two per-family dumps found");
    assert!(both.iter().any(|s| s.local().is_ipv4()) && both.iter().any(|s| s.local().is_ipv6()));
}

/// The decoder reads the header and two attributes itself; the crate's full parser, which
/// allocates per attribute, is the oracle for every socket in every fixture.
#[test]
fn the_decoder_agrees_with_the_crates_full_parser() {
    use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload, Nla as _};
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_packet_sock_diag::inet::nlas::Nla;
    use shimcheck::collect::decode::parse_tcp_info;

    for name in ["v4-multipart.bin", "v6.bin", "v6-short-tcp-info.bin"] {
        let mut expected = Vec::new();
        for dg in datagrams(name) {
            let mut off = 0;
            while off < dg.len() {
                let len = NetlinkBuffer::new_checked(&dg[off..]).unwrap().length() as usize;
                let msg =
                    NetlinkMessage::<SockDiagMessage>::deserialize(&dg[off..off + len]).unwrap();
                if let NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) = msg.payload
                {
                    let h = &r.header;
                    let id = &h.socket_id;
                    let tcp_info = r.nlas.iter().find_map(|n| match n {
                        Nla::TcpInfo(b) => parse_tcp_info(b),
                        _ => None,
                    });
                    let cgroup = r.nlas.iter().find_map(|n| match n {
                        Nla::Other(a) if a.kind() == 21 => {
                            let mut v = [0u8; 8];
                            a.emit_value(&mut v);
                            Some(u64::from_ne_bytes(v))
                        }
                        _ => None,
                    });
                    expected.push((
                        h.state,
                        std::net::SocketAddr::from((id.source_address, id.source_port)),
                        std::net::SocketAddr::from((id.destination_address, id.destination_port)),
                        u64::from(h.inode),
                        u64::from_ne_bytes(id.cookie),
                        tcp_info,
                        cgroup,
                    ));
                }
                off += (len + 3) & !3;
            }
        }
        let got: Vec<_> = decode(name)
            .unwrap()
            .sockets
            .into_iter()
            .map(|s| {
                (
                    s.state.kernel_number(),
                    s.local(),
                    s.remote(),
                    s.inode,
                    s.cookie().unwrap(),
                    s.tcp_info,
                    s.cgroup_id(),
                )
            })
            .collect();
        assert!(!got.is_empty(), "{name}");
        assert_eq!(got, expected, "{name}");
    }
}

/// TIME_WAIT sockets have no file, so every one of them has inode 0: the dump tells them apart
/// by their cookies. Each distinct cookie is one socket, however many share inode 0; a socket
/// the dump reports again (same cookie) is kept once and counted as a duplicate.
#[test]
fn time_wait_sockets_all_of_inode_0_count_once_each_by_cookie() {
    use crate::support::builders::{SocketWith, diag_done, diag_message, sock};
    let time_wait: Vec<Socket> = (0..300u64)
        .map(|i| {
            sock(
                TcpState::TimeWait,
                &format!("10.0.0.1:{}", 30000 + i),
                "10.0.0.2:5000",
                0,
            )
            .cookie(1000 + i)
        })
        .collect();
    let established: Vec<Socket> = (0..5u64)
        .map(|i| {
            sock(
                TcpState::Established,
                &format!("10.0.0.1:{}", 40000 + i),
                "10.0.0.2:5000",
                7000 + i,
            )
        })
        .collect();
    let all: Vec<&Socket> = time_wait.iter().chain(&established).collect();
    let mut d = DumpDecoder::new();
    for chunk in all.chunks(50) {
        let datagram: Vec<u8> = chunk.iter().flat_map(|s| diag_message(s, 1)).collect();
        assert_eq!(d.feed(&datagram).unwrap(), Feed::More);
    }
    // Under churn the dump reports the first 20 TIME_WAIT sockets again.
    let again: Vec<u8> = time_wait[..20]
        .iter()
        .flat_map(|s| diag_message(s, 1))
        .collect();
    assert_eq!(d.feed(&again).unwrap(), Feed::More);
    assert_eq!(d.feed(&diag_done()).unwrap(), Feed::Done);
    let dump = d.finish().unwrap();
    let waiting = dump
        .sockets
        .iter()
        .filter(|s| s.state == TcpState::TimeWait)
        .count();
    assert_eq!(waiting, 300, "every TIME_WAIT socket once, all of inode 0");
    assert_eq!(dump.sockets.len(), 305);
    assert_eq!(dump.duplicates, 20);
    let cookies: std::collections::HashSet<_> = dump.sockets.iter().map(|s| s.cookie()).collect();
    assert_eq!(cookies.len(), 305);
}

/// A malformed message's offset counts every byte fed before it: earlier datagrams, and the
/// messages before it in its own.
#[test]
fn a_malformed_message_is_located_by_its_byte_in_the_whole_dump() {
    use crate::support::builders::{diag_message, sock};
    let one = diag_message(
        &sock(TcpState::Established, "10.0.0.1:40000", "10.0.0.2:5000", 1),
        1,
    );
    let two = diag_message(
        &sock(TcpState::Established, "10.0.0.1:40001", "10.0.0.2:5000", 2),
        1,
    );
    let mut d = DumpDecoder::new();
    assert_eq!(d.feed(&one).unwrap(), Feed::More);
    let mut second = two.clone();
    // A socket message whose state is no TCP state (byte 1 of `inet_diag_msg`).
    let mut bad = two.clone();
    bad[16 + 1] = 99;
    second.extend(&bad);
    let err = d.feed(&second).unwrap_err();
    let at = one.len() + two.len();
    match &err {
        CollectError::Malformed { offset, reason } => {
            assert_eq!(*offset, at, "{err}");
            assert!(reason.contains("unknown TCP state 99"), "{err}");
        }
        other => panic!("expected Malformed, got {other}"),
    }
    assert!(err.to_string().contains(&format!("at byte {at}")), "{err}");
}

/// The one datagram of a lookup fixture.
fn reply(name: &str) -> Vec<u8> {
    let mut all = datagrams(name);
    assert_eq!(all.len(), 1, "{name}: a lookup's reply is one datagram");
    all.remove(0)
}

#[test]
fn a_lookup_reply_is_the_socket_as_a_dump_reports_it() {
    use shimcheck::collect::decode::lookup_reply;
    let v4 = lookup_reply(&reply("lookup-v4.bin")).unwrap().unwrap();
    assert_eq!(v4.state, TcpState::Established);
    assert_eq!(v4.remote(), "127.0.0.1:5000".parse().unwrap());
    assert!(
        v4.inode != 0 && v4.cookie().is_some() && v4.tcp_info.is_some(),
        "{v4:?}"
    );
    let v6 = lookup_reply(&reply("lookup-v6.bin")).unwrap().unwrap();
    assert_eq!(v6.remote(), "[::1]:8443".parse().unwrap());
    assert!(
        v6.inode != 0 && v6.cookie().is_some() && v6.tcp_info.is_some(),
        "{v6:?}"
    );
}

#[test]
fn a_lookup_of_a_socket_that_is_gone_is_none_and_echoes_the_cookie_asked_for() {
    use shimcheck::collect::decode::lookup_reply;
    let gone = reply("lookup-gone.bin");
    assert_eq!(lookup_reply(&gone).unwrap(), None);
    // NLMSG_ERROR: header (16), error (4), then the request echoed: its header (16) and the
    // inet_diag_req_v2 (family, protocol, ext, pad, states u32, then the socket id, whose
    // cookie is its last 8 bytes at 8 + 40).
    let cookie_at = 16 + 4 + 16 + 8 + 40;
    let lo = u32::from_ne_bytes(gone[cookie_at..cookie_at + 4].try_into().unwrap());
    let hi = u32::from_ne_bytes(gone[cookie_at + 4..cookie_at + 8].try_into().unwrap());
    let asked = (u64::from(hi) << 32) | u64::from(lo);
    let found = lookup_reply(&reply("lookup-v4.bin")).unwrap().unwrap();
    assert_eq!(Some(asked), found.cookie().map(|c| c + 1_000_000));
}

#[test]
fn a_lookup_reply_that_is_not_one_is_an_error_not_a_panic() {
    use shimcheck::collect::decode::lookup_reply;
    assert!(lookup_reply(&[]).is_err());
    let mut cut = reply("lookup-v4.bin");
    cut.truncate(40);
    assert!(lookup_reply(&cut).is_err());
    // Another error than ENOENT is the kernel's error.
    let mut eperm = reply("lookup-gone.bin");
    eperm[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
    assert!(matches!(lookup_reply(&eperm), Err(CollectError::Kernel(_))));
}
