//! Replies as older kernels send them, and every path that depends on what they lack
//! (`docs/kernels.md`): a shorter `tcp_info` (idle clocks, byte counters), a socket cookie
//! that names nothing stable (dump deduplication, the detector's socket identity), no
//! `INET_DIAG_CGROUP_ID` (`--by pod` for sockets no visible process holds), a refused compat
//! request, and open-file counts where `stat(/proc/PID/fd)` gives none.
//!
//! The fixtures are derived here from the recorded ones (`fixtures/netlink/README.md`), byte
//! for byte: `the_old_kernel_fixtures_are_what_their_derivation_gives` fails when a file
//! differs from its derivation, and rewrites them all with
//! `SHIMCHECK_WRITE_OLD_KERNEL_FIXTURES=1 cargo test --test pure old_kernels`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use shimcheck::aggregate::GroupBy;
use shimcheck::collect::CollectError;

use crate::support::netlink_datagrams as datagrams;
use shimcheck::collect::decode::{Dump, DumpDecoder, Feed, parse_tcp_info};
use shimcheck::detect::{self, Detail, DetectConfig, Finding, History, Kind, MIN_RISES};
use shimcheck::join::Joined;
use shimcheck::model::{Place, Sample, Socket, TcpState};
use shimcheck::procs::{OwnerCache, ProcScanner};

use crate::support::builders::{self, SocketWith, process, query, sock};

// ---- The derivation ----

/// `struct nlmsghdr`, then `struct inet_diag_msg` (`include/uapi/linux/inet_diag.h`).
const NLMSG_HDR: usize = 16;
const DIAG_MSG: usize = 72;
/// `idiag_cookie` (two native-endian u32, low half first) and `idiag_inode`, from the start of
/// a message.
const COOKIE_AT: usize = NLMSG_HDR + 44;
const INODE_AT: usize = NLMSG_HDR + 68;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const TCPDIAG_GETSOCK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
/// Attribute kinds, and the kernel that first sent each (unasked-for, or asked as shimcheck
/// asks): SHUTDOWN 3.7, SKV6ONLY 4.2, MARK 4.9 (to CAP_NET_ADMIN), CGROUP_ID 5.7, SOCKOPT
/// 5.10; INFO is asked for.
const INFO: u16 = 2;
const SHUTDOWN: u16 = 8;
const SKV6ONLY: u16 = 11;
const MARK: u16 = 15;
const CGROUP_ID: u16 = 21;
const SOCKOPT: u16 = 22;
/// `EOPNOTSUPP`: what `sock_diag` answers a compat request when no inet handler is there.
const EOPNOTSUPP: i32 = 95;

/// What an older kernel puts in `idiag_cookie`.
#[derive(Debug, Clone, Copy)]
enum Cookies {
    /// As recorded: 4.1+ numbers sockets from a counter.
    Kept,
    /// Before 4.1: the socket's kernel address; derived from the recorded cookie, 2 KiB apart
    /// (TCP sockets' slab stride) in the 64-bit direct map.
    KernelAddress,
    /// `INET_DIAG_NOCOOKIE`: all ones.
    NoCookie,
    Zero,
}

/// One derived fixture: a recorded reply as the kernel named would have sent it.
struct Derived {
    file: &'static str,
    from: &'static str,
    /// Bytes of `tcp_info` the kernel sends (`sizeof(struct tcp_info)` there); `None`: as
    /// recorded.
    tcp_info: Option<usize>,
    /// The attribute kinds the kernel sends; `None`: as recorded.
    attributes: Option<&'static [u16]>,
    cookies: Cookies,
    /// The kernel's largest dump datagram, when smaller than recorded: 3.10 filled one page
    /// (4096 bytes less the skb's shared info); later kernels size dump buffers to the
    /// reader's, up to 32 KiB.
    datagram: Option<usize>,
}

const DERIVED: [Derived; 5] = [
    Derived {
        file: "v4-3.10.bin",
        from: "v4-multipart.bin",
        tcp_info: Some(104),
        attributes: Some(&[SHUTDOWN, INFO]),
        cookies: Cookies::KernelAddress,
        datagram: Some(3776),
    },
    Derived {
        file: "v6-4.15.bin",
        from: "v6.bin",
        tcp_info: Some(192),
        attributes: Some(&[SHUTDOWN, SKV6ONLY, MARK, INFO]),
        cookies: Cookies::Kept,
        datagram: None,
    },
    Derived {
        file: "v6-5.4.bin",
        from: "v6.bin",
        tcp_info: Some(232),
        attributes: Some(&[SHUTDOWN, SKV6ONLY, MARK, INFO]),
        cookies: Cookies::Kept,
        datagram: None,
    },
    Derived {
        file: "v4-nocookie.bin",
        from: "v4-multipart.bin",
        tcp_info: None,
        attributes: None,
        cookies: Cookies::NoCookie,
        datagram: None,
    },
    Derived {
        file: "v6-zero-cookie.bin",
        from: "v6.bin",
        tcp_info: None,
        attributes: None,
        cookies: Cookies::Zero,
        datagram: None,
    },
];

/// The compat request refused: `error.bin` answering shimcheck's `TCPDIAG_GETSOCK` with
/// `-EOPNOTSUPP`.
const COMPAT_REFUSED: &str = "compat-refused.bin";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/netlink")
        .join(name)
}

/// A fixture file's bytes.
fn file_bytes(datagrams: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for d in datagrams {
        out.extend((d.len() as u32).to_le_bytes());
        out.extend(d);
    }
    out
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
}

fn pad4(v: &mut Vec<u8>) {
    v.resize(v.len().div_ceil(4) * 4, 0);
}

/// The messages of a datagram, each as long as its header says.
fn messages(datagram: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < datagram.len() {
        let len = u32_at(datagram, off) as usize;
        out.push(&datagram[off..off + len]);
        off += len.div_ceil(4) * 4;
    }
    out
}

fn is_socket(message: &[u8]) -> bool {
    matches!(u16_at(message, 4), SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK)
}

/// `(kind, value)` of every attribute of a socket message.
fn attributes(message: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = NLMSG_HDR + DIAG_MSG;
    while at + 4 <= message.len() {
        let len = u16_at(message, at) as usize;
        out.push((u16_at(message, at + 2), &message[at + 4..at + len]));
        at += len.div_ceil(4) * 4;
    }
    out
}

fn raw_cookie(message: &[u8]) -> u64 {
    u64::from(u32_at(message, COOKIE_AT + 4)) << 32 | u64::from(u32_at(message, COOKIE_AT))
}

/// One socket message as the older kernel lays it out.
fn rewrite(message: &[u8], d: &Derived) -> Vec<u8> {
    let mut m = message[..NLMSG_HDR + DIAG_MSG].to_vec();
    let recorded = raw_cookie(message);
    let cookie = match d.cookies {
        Cookies::Kept => recorded,
        Cookies::KernelAddress => 0xffff_8800_0000_0000 + (recorded << 11),
        Cookies::NoCookie => u64::MAX,
        Cookies::Zero => 0,
    };
    m[COOKIE_AT..COOKIE_AT + 4].copy_from_slice(&(cookie as u32).to_ne_bytes());
    m[COOKIE_AT + 4..COOKIE_AT + 8].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    for (kind, value) in attributes(message) {
        if d.attributes.is_some_and(|sent| !sent.contains(&kind)) {
            continue;
        }
        let value = match (kind, d.tcp_info) {
            (INFO, Some(len)) => &value[..len.min(value.len())],
            _ => value,
        };
        m.extend(((value.len() + 4) as u16).to_ne_bytes());
        m.extend(kind.to_ne_bytes());
        m.extend(value);
        pad4(&mut m);
    }
    let len = m.len() as u32;
    m[..4].copy_from_slice(&len.to_ne_bytes());
    m
}

/// Socket messages packed into datagrams of at most `limit` bytes, in order; a datagram
/// without sockets (the final `NLMSG_DONE`) stays as it was.
fn repack(datagrams: Vec<Vec<u8>>, limit: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    for d in datagrams {
        if !messages(&d).iter().any(|m| is_socket(m)) {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            out.push(d);
            continue;
        }
        for m in messages(&d) {
            if !current.is_empty() && current.len() + m.len() > limit {
                out.push(std::mem::take(&mut current));
            }
            current.extend(m);
            pad4(&mut current);
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The datagrams of a derived fixture, from the recorded one.
fn derive(d: &Derived) -> Vec<Vec<u8>> {
    let out: Vec<Vec<u8>> = datagrams(d.from)
        .iter()
        .map(|dg| {
            let mut new = Vec::with_capacity(dg.len());
            for m in messages(dg) {
                if is_socket(m) {
                    new.extend(rewrite(m, d));
                } else {
                    new.extend(m);
                }
                pad4(&mut new);
            }
            new
        })
        .collect();
    match d.datagram {
        Some(limit) => repack(out, limit),
        None => out,
    }
}

/// `error.bin` (the kernel's `NLMSG_ERROR` for a family it has no handler for) as the answer
/// to shimcheck's compat request instead: same sequence and port id, `-EOPNOTSUPP`, and the
/// request echoed as `netlink.rs` builds it (`struct inet_diag_req`: family, src_len,
/// dst_len, ext, a 48-byte socket id, states, dbs), asking for the recorded request's states.
fn derive_compat_refused() -> Vec<Vec<u8>> {
    let recorded = &datagrams("error.bin")[0];
    assert_eq!(u16_at(recorded, 4), NLMSG_ERROR);
    let echoed_hdr = &recorded[NLMSG_HDR + 4..NLMSG_HDR + 4 + NLMSG_HDR];
    let v2 = &recorded[NLMSG_HDR + 4 + NLMSG_HDR..];
    // struct inet_diag_req_v2: family, protocol, ext, pad, states.
    let (ext, states) = (v2[2], u32_at(v2, 4));
    let mut request = vec![0u8; NLMSG_HDR + 60];
    request[..4].copy_from_slice(&((NLMSG_HDR + 60) as u32).to_ne_bytes());
    request[4..6].copy_from_slice(&TCPDIAG_GETSOCK.to_ne_bytes());
    request[6..16].copy_from_slice(&echoed_hdr[6..16]);
    request[NLMSG_HDR] = 2; // AF_INET
    request[NLMSG_HDR + 3] = ext;
    request[NLMSG_HDR + 52..NLMSG_HDR + 56].copy_from_slice(&states.to_ne_bytes());
    let mut m = recorded[..NLMSG_HDR].to_vec();
    m.extend((-EOPNOTSUPP).to_ne_bytes());
    m.extend(request);
    let len = m.len() as u32;
    m[..4].copy_from_slice(&len.to_ne_bytes());
    vec![m]
}

fn all_derived() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let mut all: Vec<_> = DERIVED.iter().map(|d| (d.file, derive(d))).collect();
    all.push((COMPAT_REFUSED, derive_compat_refused()));
    all
}

#[test]
fn the_old_kernel_fixtures_are_what_their_derivation_gives() {
    let write = std::env::var_os("SHIMCHECK_WRITE_OLD_KERNEL_FIXTURES").is_some();
    for (file, datagrams) in all_derived() {
        let bytes = file_bytes(&datagrams);
        let path = fixture(file);
        if write {
            std::fs::write(&path, &bytes).unwrap();
        }
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            on_disk == bytes,
            "{file} is not what its derivation gives (re-recorded sources?): \
             SHIMCHECK_WRITE_OLD_KERNEL_FIXTURES=1 cargo test --test pure old_kernels"
        );
    }
}

/// The derived files look like what they stand for, read without shimcheck's decoder: the
/// crate's full parser takes every message, and lengths, attributes and cookies are the old
/// kernel's.
#[test]
fn the_old_kernel_fixtures_are_well_formed_and_look_their_age() {
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
    use netlink_packet_sock_diag::SockDiagMessage;

    for d in &DERIVED {
        let mut sockets = 0;
        for dg in datagrams(d.file) {
            if let Some(limit) = d.datagram {
                assert!(
                    dg.len() <= limit,
                    "{}: a {}-byte datagram",
                    d.file,
                    dg.len()
                );
            }
            for m in messages(&dg) {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(m).unwrap();
                if !is_socket(m) {
                    assert!(matches!(msg.payload, NetlinkPayload::Done(_)), "{}", d.file);
                    continue;
                }
                assert!(matches!(
                    msg.payload,
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(_))
                ));
                sockets += 1;
                let attrs = attributes(m);
                if let Some(sent) = d.attributes {
                    assert!(attrs.iter().all(|(k, _)| sent.contains(k)), "{}", d.file);
                    assert!(!attrs.iter().any(|(k, _)| [CGROUP_ID, SOCKOPT].contains(k)));
                }
                if let Some(len) = d.tcp_info {
                    for (_, info) in attrs.iter().filter(|(k, _)| *k == INFO) {
                        assert_eq!(info.len(), len, "{}", d.file);
                    }
                }
                let cookie = raw_cookie(m);
                match d.cookies {
                    Cookies::Kept => assert!(cookie > 0 && cookie < 1 << 63),
                    Cookies::KernelAddress => assert_eq!(cookie >> 40, 0xff_ff88),
                    Cookies::NoCookie => assert_eq!(cookie, u64::MAX),
                    Cookies::Zero => assert_eq!(cookie, 0),
                }
            }
        }
        let recorded = decode(d.from).unwrap().sockets.len();
        assert_eq!(sockets, recorded, "{}: every socket of {}", d.file, d.from);
    }
    // 3.10 fills a page per datagram: more datagrams than recorded for the same sockets.
    assert!(datagrams("v4-3.10.bin").len() > datagrams("v4-multipart.bin").len() + 5);
}

// ---- What the decoder makes of them ----

fn feed(dgs: &[Vec<u8>]) -> Result<Dump, CollectError> {
    let mut d = DumpDecoder::new();
    for dg in dgs {
        if d.feed(dg)? == Feed::Done {
            break;
        }
    }
    d.finish()
}

fn decode(name: &str) -> Result<Dump, CollectError> {
    feed(&datagrams(name))
}

/// What identifies a socket in a dump besides its cookie.
fn key(s: &Socket) -> (TcpState, SocketAddr, SocketAddr, u64) {
    (s.state, s.local(), s.remote(), s.inode)
}

/// The `tcp_info` bytes of the connection that carried the one request, as recorded (280
/// bytes from Linux 6.18): its counters are not zero.
fn recorded_tcp_info() -> Vec<u8> {
    for dg in datagrams("v4-multipart.bin") {
        for m in messages(&dg) {
            if !is_socket(m) {
                continue;
            }
            let sport = u16::from_be_bytes([m[NLMSG_HDR + 4], m[NLMSG_HDR + 5]]);
            let dport = u16::from_be_bytes([m[NLMSG_HDR + 6], m[NLMSG_HDR + 7]]);
            if (sport, dport) == (49574, 5000)
                && let Some((_, info)) = attributes(m).into_iter().find(|(k, _)| *k == INFO)
            {
                return info.to_vec();
            }
        }
    }
    panic!("the client that sent the request is in v4-multipart.bin");
}

#[test]
fn every_kernels_tcp_info_length_gives_the_idle_clocks() {
    let full = recorded_tcp_info();
    let all = parse_tcp_info(&full).unwrap();
    assert_ne!(
        all,
        Default::default(),
        "the recorded clocks are not all zero"
    );
    // sizeof(struct tcp_info) by kernel (include/uapi/linux/tcp.h).
    let kernels = [
        ("2.6 to 3.14, RHEL/CentOS 7's 3.10", 104),
        ("3.15 to 4.0 (pacing rates)", 120),
        ("4.1 (bytes_acked, bytes_received)", 136),
        ("4.2 to 4.5 (segs_out, segs_in)", 144),
        ("4.6 to 4.8 (notsent_bytes, min_rtt, data_segs)", 160),
        ("4.9 (delivery_rate)", 168),
        ("4.10 to 4.17, Ubuntu 18.04's 4.15 (busy_time ...)", 192),
        ("4.18 (delivered, delivered_ce)", 200),
        ("4.19 to 5.3, Debian 10 (bytes_sent ...)", 224),
        ("5.4 to 6.1, Ubuntu 20.04 (rcv_ooopack, snd_wnd)", 232),
        ("6.18, as recorded", full.len()),
    ];
    for (kernel, len) in kernels {
        let info = parse_tcp_info(&full[..len]).unwrap_or_else(|| panic!("{kernel}"));
        assert_eq!(
            info, all,
            "{kernel}: the idle clocks are read from any kernel"
        );
    }
    // Shorter than the clocks: no tcp_info at all (no kernel sends that little).
    assert_eq!(parse_tcp_info(&full[..59]), None);
    assert!(parse_tcp_info(&full[..60]).is_some());
}

#[test]
fn a_3_10_reply_has_every_socket_and_its_clocks_but_no_cookies_or_cgroup_ids() {
    let recorded = decode("v4-multipart.bin").unwrap().sockets;
    let old = decode("v4-3.10.bin").unwrap();
    assert!(!old.interrupted);
    assert_eq!(
        old.duplicates, 0,
        "kernel addresses are not taken for duplicates"
    );
    let old = old.sockets;
    assert_eq!(
        old.iter().map(key).collect::<Vec<_>>(),
        recorded.iter().map(key).collect::<Vec<_>>()
    );
    for (r, o) in recorded.iter().zip(&old) {
        // A kernel address is no identity: the detector follows the socket by its 4-tuple.
        assert_eq!(o.cookie(), None, "{}", o.local());
        assert!(r.cookie().is_some());
        assert_eq!(o.cgroup_id(), None);
        match (r.tcp_info, o.tcp_info) {
            (Some(ri), Some(oi)) => {
                assert_eq!(oi.last_data_sent_ms, ri.last_data_sent_ms);
                assert_eq!(oi.last_data_recv_ms, ri.last_data_recv_ms);
                assert_eq!(oi.last_ack_recv_ms, ri.last_ack_recv_ms);
                assert_eq!(oi.data_idle_ms(), ri.data_idle_ms());
            }
            // The orphaned FIN_WAIT2 end has none on any kernel.
            (None, None) => assert_eq!(r.state, TcpState::FinWait2),
            other => panic!("{}: {other:?}", r.local()),
        }
    }
}

#[test]
fn replies_of_4_15_and_5_4_lose_only_the_cgroup_id() {
    let recorded = decode("v6.bin").unwrap().sockets;
    assert!(recorded.iter().all(|s| s.cgroup_id().is_some()));
    for file in ["v6-4.15.bin", "v6-5.4.bin"] {
        let old = decode(file).unwrap().sockets;
        let without_cgroup: Vec<Socket> = recorded
            .iter()
            .map(|s| {
                let mut s = s.clone();
                s.set_cgroup_id(None);
                s
            })
            .collect();
        // Same cookies (4.1+ counts them), same clocks, no cgroup.
        assert_eq!(old, without_cgroup, "{file}");
    }
}

#[test]
fn a_dump_whose_cookies_are_all_nocookie_or_zero_keeps_every_socket() {
    for (file, from) in [
        ("v4-nocookie.bin", "v4-multipart.bin"),
        ("v6-zero-cookie.bin", "v6.bin"),
    ] {
        let recorded = decode(from).unwrap().sockets;
        let dump = decode(file).unwrap();
        assert_eq!(dump.duplicates, 0, "{file}");
        assert_eq!(dump.sockets.len(), recorded.len(), "{file}: no socket lost");
        for (r, s) in recorded.iter().zip(&dump.sockets) {
            let mut without_cookie = r.clone();
            without_cookie.set_cookie(None);
            assert_eq!(s, &without_cookie, "{file}");
        }
    }
}

/// Replays `file`'s first datagram, as a dump resuming from an earlier bucket does.
fn replayed(file: &str) -> (Dump, usize) {
    let dgs = datagrams(file);
    let first = messages(&dgs[0]).iter().filter(|m| is_socket(m)).count();
    let mut replay = vec![dgs[0].clone()];
    replay.extend(dgs);
    (feed(&replay).unwrap(), first)
}

#[test]
fn a_socket_reported_twice_without_a_cookie_is_kept_once() {
    for file in ["v4-nocookie.bin", "v4-3.10.bin"] {
        let (dump, repeated) = replayed(file);
        assert!(
            repeated >= 5,
            "{file}: {repeated} sockets in the first datagram"
        );
        assert_eq!(dump.duplicates, repeated, "{file}");
        // The first report of each stays, in order: the dump as if nothing was repeated.
        assert_eq!(dump.sockets, decode(file).unwrap().sockets, "{file}");
    }
}

#[test]
fn listeners_sharing_an_address_without_cookies_are_two_sockets() {
    // SO_REUSEPORT: two listeners on 127.0.0.1:5000, told apart by their inodes only.
    let dgs = datagrams("v4-nocookie.bin");
    let listener = messages(&dgs[0])
        .into_iter()
        .find(|m| {
            is_socket(m)
                && m[NLMSG_HDR + 1] == 10
                && m[NLMSG_HDR + 4..NLMSG_HDR + 6] == 5000u16.to_be_bytes()
        })
        .unwrap()
        .to_vec();
    let mut twin = listener.clone();
    let inode = u32_at(&listener, INODE_AT) + 1_000_000;
    twin[INODE_AT..INODE_AT + 4].copy_from_slice(&inode.to_ne_bytes());
    let mut first = listener;
    first.extend(twin);
    let mut replay = vec![first];
    replay.extend(dgs);
    let dump = feed(&replay).unwrap();
    let on_5000: Vec<u64> = dump
        .sockets
        .iter()
        .filter(|s| s.state == TcpState::Listen && s.local().port() == 5000)
        .map(|s| s.inode)
        .collect();
    assert_eq!(on_5000.len(), 2, "{on_5000:?}");
    assert_eq!(on_5000[1], on_5000[0] + 1_000_000);
    // The recorded listener, reported again by the dump proper, is the one repeat.
    assert_eq!(dump.duplicates, 1);
}

#[test]
fn a_refused_compat_request_is_the_kernel_error_that_switches_to_per_family_dumps() {
    let dgs = datagrams(COMPAT_REFUSED);
    // The error echoes the compat request.
    assert_eq!(u16_at(&dgs[0], 4), NLMSG_ERROR);
    assert_eq!(u16_at(&dgs[0], NLMSG_HDR + 4 + 4), TCPDIAG_GETSOCK);
    // `NetlinkSource` answers `CollectError::Kernel` from the compat request by dumping each
    // family with `SOCK_DIAG_BY_FAMILY` from then on.
    match decode(COMPAT_REFUSED) {
        Err(CollectError::Kernel(e)) => assert_eq!(e.raw_os_error(), Some(EOPNOTSUPP), "{e}"),
        other => panic!("expected the kernel's EOPNOTSUPP, got {other:?}"),
    }
}

// ---- What the detector and the grouping make of them ----

const SHIM: u32 = 4242;
const REGISTRY: u32 = 2811;

fn is_client(s: &Socket) -> bool {
    s.state == TcpState::Established && s.remote().port() == 5000
}

/// A sample of `sockets` taken at `t` seconds, the clients held by image-cri-shim and the
/// registry's ends by the registry, every tcp_info clock `age_ms` older than dumped.
fn sample(sockets: Vec<Socket>, t: u64, age_ms: u64) -> Sample {
    let owners: Vec<(u64, u32)> = sockets
        .iter()
        .filter_map(|s| {
            if is_client(s) {
                Some((s.inode, SHIM))
            } else if s.local().port() == 5000 {
                Some((s.inode, REGISTRY))
            } else {
                None
            }
        })
        .collect();
    let mut sample = builders::sample()
        .at(1_800_000_000 + t)
        .sockets(sockets)
        .owners(owners)
        .process(process(SHIM, "image-cri-shim"))
        .process(process(REGISTRY, "registry"))
        .build();
    sample.tcp_info_age_ms = age_ms;
    sample
}

fn idle_findings(sample: &Sample) -> Vec<Finding> {
    detect::findings(&Joined::new(sample), None, &DetectConfig::default())
        .into_iter()
        .filter(|f| f.kind == Kind::Idle)
        .collect()
}

#[test]
fn the_idle_finding_needs_only_the_clocks_a_3_10_kernel_sends() {
    let sockets = decode("v4-3.10.bin").unwrap().sockets;
    let clients = sockets.iter().filter(|s| is_client(s)).count();
    assert_eq!(clients, 120);
    // Ten minutes after the dump, nothing sent either way since.
    let found = idle_findings(&sample(sockets.clone(), 0, 600_000));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].pid, found[0].count, found[0].remote.as_deref()),
        (Some(SHIM), clients, Some("127.0.0.1:5000"))
    );
    // Without tcp_info (the /proc/net fallback) idleness cannot be judged at all.
    let blind: Vec<Socket> = sockets
        .into_iter()
        .map(|mut s| {
            s.tcp_info = None;
            s
        })
        .collect();
    assert!(idle_findings(&sample(blind, 0, 600_000)).is_empty());
}

/// The growth findings after each sample of a series, in watch mode over a 60 s window; the
/// clocks of every sample are one second older than the sample's time, so no connection
/// carried data while watched (a leak's connections).
fn growth(series: Vec<(u64, Vec<Socket>)>) -> Vec<Vec<Finding>> {
    let cfg = DetectConfig {
        window: Duration::from_secs(60),
        ..DetectConfig::default()
    };
    let mut history = History::new(cfg.window, MIN_RISES);
    series
        .into_iter()
        .map(|(t, sockets)| {
            let s = sample(sockets, t, (t + 1) * 1000);
            let j = Joined::new(&s);
            history.observe(&j);
            history.growth(&j, &cfg)
        })
        .collect()
}

/// The clients of a dump, 60 at first and 10 more every 10 s, `churn` making each sample's
/// connections new ones (other local ports: closed and reopened) that keep their place in the
/// list, as a kernel address reused by the next socket would.
fn clients_series(sockets: &[Socket], churn: bool) -> Vec<(u64, Vec<Socket>)> {
    let clients: Vec<Socket> = sockets.iter().filter(|s| is_client(s)).cloned().collect();
    (0..5u16)
        .map(|k| {
            let n = 60 + 10 * usize::from(k);
            let now = clients[..n]
                .iter()
                .map(|s| {
                    let mut s = s.clone();
                    if churn {
                        let mut local = s.local();
                        local.set_port(local.port() - 1000 * k);
                        s.set_local(local);
                        s.inode += 1_000_000 * u64::from(k);
                    }
                    s
                })
                .collect();
            (u64::from(k) * 10, now)
        })
        .collect()
}

fn growth_retained(f: &Finding) -> f64 {
    match f.detail {
        Detail::Growth { retained, .. } => retained,
        ref other => panic!("{other:?}"),
    }
}

#[test]
fn a_leak_is_seen_growing_in_a_dump_without_cookies() {
    let sockets = decode("v4-nocookie.bin").unwrap().sockets;
    assert!(sockets.iter().all(|s| s.cookie().is_none()));
    let results = growth(clients_series(&sockets, false));
    let last = results.last().unwrap();
    assert_eq!(last.len(), 1, "{results:?}");
    assert_eq!((last[0].pid, last[0].count), (Some(SHIM), 100));
    // Kept sockets are recognised by their 4-tuple.
    assert_eq!(growth_retained(&last[0]), 1.0);
}

#[test]
fn reused_kernel_addresses_do_not_make_a_churning_client_look_like_a_leak() {
    let sockets = decode("v4-3.10.bin").unwrap().sockets;
    assert!(sockets.iter().all(|s| s.cookie().is_none()));
    // Growing, but every connection of a sample is new: a busy client, not a leak.
    let churning = clients_series(&sockets, true);
    assert!(
        growth(churning.clone()).iter().all(Vec::is_empty),
        "judged by 4-tuple, nothing is retained"
    );
    // Had the reused addresses been taken for identities (the i-th socket of every sample
    // at the address of the i-th before it), the same churn would have passed for a leak.
    let by_address: Vec<(u64, Vec<Socket>)> = churning
        .into_iter()
        .map(|(t, sockets)| {
            let sockets = sockets
                .into_iter()
                .enumerate()
                .map(|(i, s)| s.cookie(0xffff_8800_0000_0000 + ((i as u64) << 11)))
                .collect();
            (t, sockets)
        })
        .collect();
    let fooled = growth(by_address);
    assert_eq!(fooled.last().unwrap().len(), 1, "{fooled:?}");
    assert_eq!(growth_retained(&fooled.last().unwrap()[0]), 1.0);
}

#[test]
fn without_the_cgroup_id_unheld_sockets_stay_unattributed_by_pod() {
    let unit = Place {
        pod: None,
        unit: Some("image-cri-shim.service".into()),
    };
    let group = |file: &str| -> Vec<(String, usize)> {
        let sockets = decode(file).unwrap().sockets;
        // Nobody visibly holds them (unprivileged, another pid namespace); the cgroup tree
        // names the cgroup the recorded sockets were created in.
        let recorded = decode("v6.bin").unwrap().sockets;
        let places: BTreeMap<u64, Place> = recorded
            .iter()
            .filter_map(|s| s.cgroup_id())
            .map(|id| (id, unit.clone()))
            .collect();
        let s = builders::sample()
            .sockets(sockets)
            .cgroup_places(places)
            .build();
        let r = shimcheck::ports_report(&s, &query(GroupBy::Pod, &[TcpState::Established]));
        r.groups.iter().map(|g| (g.key.clone(), g.count)).collect()
    };
    assert_eq!(group("v6.bin"), [("unit image-cri-shim.service".into(), 7)]);
    assert_eq!(group("v6-5.4.bin"), [("(unattributed)".into(), 7)]);
    assert_eq!(group("v6-4.15.bin"), [("(unattributed)".into(), 7)]);
}

// ---- Open-file counts without stat(/proc/PID/fd) ----

fn proc_fixture(tree: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/proc")
        .join(tree)
}

/// The sockets the `shared` tree's processes hold.
fn shared_sockets(extra: &[u64]) -> Vec<Socket> {
    [1000u64, 1001, 1002, 1003, 2001, 2002, 2003, 3001]
        .iter()
        .chain(extra)
        .map(|&inode| {
            sock(
                TcpState::Established,
                &format!("10.0.0.1:{}", 30000 + inode),
                "10.0.0.2:5000",
                inode,
            )
        })
        .collect()
}

fn open_files(fds: &BTreeMap<u32, shimcheck::model::FdUse>) -> BTreeMap<u32, u64> {
    fds.iter().map(|(&pid, f)| (pid, f.open)).collect()
}

#[test]
fn only_a_procfs_root_is_trusted_for_fd_counts_by_size() {
    assert!(!ProcScanner::new(&proc_fixture("shared")).fd_counts_from_size());
    assert!(!ProcScanner::new(Path::new("/nonexistent")).fd_counts_from_size());
    assert!(ProcScanner::new(Path::new("/proc")).fd_counts_from_size());
}

#[test]
fn on_a_fake_proc_tree_open_files_are_counted_from_the_tables_read() {
    let scanner = ProcScanner::new(&proc_fixture("shared"));
    let mut cache = OwnerCache::new();
    let full = cache.refresh(&scanner, &shared_sockets(&[]), 1).unwrap();
    assert!(full.cost.full);
    let listed = BTreeMap::from([(2811, 7), (2812, 2), (4242, 5), (4243, 1)]);
    assert_eq!(open_files(&full.fds), listed);
    // A later sample with nothing moved, and one with a socket gone: no listing, and the
    // directory's size (bytes on this filesystem, not fds) is not taken for a count.
    let same = cache.refresh_same(&scanner, 1).unwrap();
    assert_eq!(open_files(&same.fds), listed);
    let later = cache
        .refresh(&scanner, &shared_sockets(&[])[1..], 1)
        .unwrap();
    assert!(!later.cost.full);
    assert_eq!(open_files(&later.fds), listed);
}

/// Copies a fake /proc tree, symlinks as links.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else if kind.is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_socket_found_between_full_scans_counts_as_an_open_file_without_fd_sizes() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&proc_fixture("shared"), dir.path());
    let scanner = ProcScanner::new(dir.path());
    assert!(!scanner.fd_counts_from_size());
    let mut cache = OwnerCache::new();
    cache.refresh(&scanner, &shared_sockets(&[]), 1).unwrap();
    // The registry accepts one more connection, on its lowest free fd.
    std::os::unix::fs::symlink("socket:[1004]", dir.path().join("2811/fd/7")).unwrap();
    let r = cache
        .refresh(&scanner, &shared_sockets(&[1004]), 1)
        .unwrap();
    assert!(!r.cost.full);
    assert_eq!(r.owners.owners(1004), [(1004, 2811)]);
    assert_eq!(r.fds[&2811].open, 8, "the slot the search read counts");
    assert_eq!(r.fds[&4242].open, 5);
}

#[test]
fn a_process_near_its_fd_limit_is_counted_by_listing_without_fd_sizes() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&proc_fixture("shared"), dir.path());
    let open_more = |pid: u32, fds: std::ops::Range<u32>| {
        for fd in fds {
            let link = dir.path().join(format!("{pid}/fd/{fd}"));
            std::os::unix::fs::symlink("/dev/null", link).unwrap();
        }
    };
    // image-cri-shim (soft limit 16) holds 9 files: over half its limit.
    open_more(4242, 10..14);
    let scanner = ProcScanner::new(dir.path());
    let mut cache = OwnerCache::new();
    let full = cache.refresh(&scanner, &shared_sockets(&[]), 1).unwrap();
    assert_eq!(full.fds[&4242].open, 9);
    // Four more files, none a socket: no search reads its table, a listing counts them.
    open_more(4242, 14..18);
    // The registry, far from its limit, opens files too: its count stays the table's.
    open_more(2811, 7..9);
    let same = cache.refresh_same(&scanner, 1).unwrap();
    assert_eq!(same.fds[&4242].open, 13);
    assert!(
        same.fds[&4242].near_limit(),
        "13 of 16: the fd-limit finding's rule"
    );
    assert_eq!(same.fds[&2811].open, 7);
}

/// The running kernel's `major.minor`.
fn kernel_version() -> (u32, u32) {
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[test]
fn on_the_real_proc_open_files_are_counted_by_size_from_linux_6_2() {
    let scanner = ProcScanner::new(Path::new("/proc"));
    let me = std::process::id();
    let mut cache = OwnerCache::new();
    let before = cache.refresh(&scanner, &[], 2).unwrap().fds[&me].open;
    let extra: Vec<std::fs::File> = (0..200)
        .map(|_| std::fs::File::open("/dev/null").unwrap())
        .collect();
    let after = cache.refresh_same(&scanner, 2).unwrap().fds[&me].open;
    drop(extra);
    if kernel_version() >= (6, 2) {
        // Other tests of this binary open and close files meanwhile: a margin, not an
        // equality.
        assert!(
            after >= before + 150,
            "stat(/proc/{me}/fd) counts the 200 new files: {before} -> {after}"
        );
    } else {
        assert_eq!(after, before, "kept from the table read before");
    }
}

#[test]
fn a_process_is_counted_through_its_held_fd_directory_until_it_exits() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    if kernel_version() < (6, 2) {
        eprintln!("skipped: counts by fd directory size need Linux 6.2");
        return;
    }
    let scanner = ProcScanner::new(Path::new("/proc"));
    // A child that says when it is up (its start opens and closes files), then opens 100
    // files when asked and says so.
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\n\
             keep=[open('/dev/null') for _ in range(100)]\nprint('opened', flush=True)\n\
             sys.stdin.readline()",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut said = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    said.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let mut cache = OwnerCache::new();
    // The first look scans every fd table; the next counts by path and holds the directory.
    let first = cache.refresh(&scanner, &[], 2).unwrap().fds[&pid].open;
    let _ = cache.refresh_same(&scanner, 2).unwrap();
    assert!(cache.held_fd_dirs() > 0, "fd directories are held");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin).unwrap();
    line.clear();
    said.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "opened");
    let held = cache.refresh_same(&scanner, 2).unwrap().fds[&pid].open;
    assert_eq!(held, first + 100, "counted through the held directory");
    drop(stdin);
    child.wait().unwrap();
    let gone = cache.refresh_same(&scanner, 2).unwrap();
    assert!(
        !gone.fds.contains_key(&pid),
        "an exited process is forgotten"
    );
}
