//! Records the netlink fixtures in `fixtures/netlink/` from a real kernel: makes a fresh
//! network namespace with a small socket population (IPv4, IPv6, a v4 client of a dual-stack
//! server, CLOSE_WAIT, enough sockets for a multi-part dump), dumps it with shimcheck's own
//! transport and writes each reply as it came off the socket.
//!
//! Run as root: `cargo run --example capture_sockdiag -- fixtures/netlink`, then accept the
//! new golden output: `INSTA_UPDATE=always cargo test --test decode_fixtures`.
//!
//! File format: each datagram as a little-endian u32 length followed by its bytes.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6};
use shimcheck::collect::decode::DumpDecoder;
use shimcheck::collect::netlink::{Exact, NetlinkSource, Request};
use shimcheck::model::StateSet;

/// Offset of the `tcp_info` attribute's own length field, from the start of an inet_diag
/// message: 16 (nlmsghdr) + 72 (inet_diag_msg) — fixed here because the derived fixture must
/// be able to find it without a parser.
const DIAG_HEADER: usize = 16 + 72;
/// The length of `tcp_info` in Linux 2.6.x (up to `tcpi_total_retrans`): an "old kernel" reply.
const OLD_TCP_INFO_LEN: usize = 104;

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fixtures/netlink".into()),
    );
    // SAFETY: the process is still single-threaded here, so no other thread can be confused
    // by this thread moving to a new network namespace.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
        .context("unshare(CLONE_NEWNET): run as root")?;
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()?;
    if !up.success() {
        bail!("ip link set lo up failed");
    }
    let population = populate()?;
    let mut nl = NetlinkSource::open()?;
    let all = StateSet::all();

    let v4 = record(&mut nl, Request::Family(AF_INET), all)?;
    if v4.len() < 3 {
        bail!(
            "the IPv4 dump came in {} datagrams; the fixture needs a multi-part dump",
            v4.len()
        );
    }
    write(&dir.join("v4-multipart.bin"), &v4)?;
    write(&dir.join("truncated.bin"), &v4[..v4.len() - 1])?;
    let mut cut = v4[..1].to_vec();
    let first = &cut[0];
    cut[0] = first[..first.len() - 50].to_vec();
    write(&dir.join("cut-message.bin"), &cut)?;

    let v6 = record(&mut nl, Request::Family(AF_INET6), all)?;
    write(&dir.join("v6.bin"), &v6)?;
    write(&dir.join("v6-short-tcp-info.bin"), &shorten_tcp_info(&v6)?)?;

    // AF_UNSPEC has no sock_diag handler: the kernel answers with NLMSG_ERROR (-ENOENT).
    let err = record(&mut nl, Request::Family(0), all)?;
    write(&dir.join("error.bin"), &err)?;

    // The compat request: both families in one walk, message type TCPDIAG_GETSOCK.
    let both = record(&mut nl, Request::Both, all)?;
    write(&dir.join("both.bin"), &both)?;

    // Exact lookups (what a loop asks about a socket that changed): a v4 client, a v6 one, and
    // the v4 one under a cookie it does not have (-ENOENT: gone).
    let mut decoder = DumpDecoder::new();
    for d in &both {
        decoder.feed(d)?;
    }
    let dumped = decoder.finish()?.sockets;
    let exact = |local: std::net::SocketAddr, remote: &str| -> anyhow::Result<Exact> {
        let remote = remote.parse()?;
        let s = dumped
            .iter()
            .find(|s| s.local() == local && s.remote() == remote)
            .context("the socket to look up is not in the dump")?;
        Ok(Exact {
            local,
            remote,
            cookie: s.cookie().context("no cookie")?,
            bound_dev_if: 0,
        })
    };
    let v4 = exact(population[0].local_addr()?, "127.0.0.1:5000")?;
    let v6 = exact(population[240].local_addr()?, "[::1]:8443")?;
    let gone = Exact {
        cookie: v4.cookie + 1_000_000,
        ..v4
    };
    for (name, e) in [
        ("lookup-v4.bin", v4),
        ("lookup-v6.bin", v6),
        ("lookup-gone.bin", gone),
    ] {
        let reply = nl.lookup_raw(&e, <[u8]>::to_vec)?;
        write(&dir.join(name), &[reply])?;
    }
    println!("wrote fixtures to {}", dir.display());
    Ok(())
}

/// Sockets the fixtures describe; kept alive until the dumps are done.
fn populate() -> anyhow::Result<Vec<TcpStream>> {
    let mut keep = Vec::new();
    let registry = TcpListener::bind("127.0.0.1:5000")?;
    for _ in 0..120 {
        keep.push(TcpStream::connect("127.0.0.1:5000")?);
        keep.push(registry.accept()?.0);
    }
    // One connection that carried data, so its byte counters are not zero.
    keep[0].write_all(b"GET /v2/ HTTP/1.1\r\n\r\n")?;
    let mut buf = [0u8; 21];
    keep[1].read_exact(&mut buf)?;
    let v6 = TcpListener::bind("[::1]:8443")?;
    for _ in 0..3 {
        keep.push(TcpStream::connect("[::1]:8443")?);
        keep.push(v6.accept()?.0);
    }
    let dual = TcpListener::bind("[::]:9000")?;
    keep.push(TcpStream::connect("127.0.0.1:9000")?);
    keep.push(dual.accept()?.0);
    // The server closes, the client never does: the client sits in CLOSE_WAIT.
    let closer = TcpListener::bind("127.0.0.1:7000")?;
    keep.push(TcpStream::connect("127.0.0.1:7000")?);
    drop(closer.accept()?);
    std::thread::sleep(std::time::Duration::from_millis(50));
    // The listeners stay open too (they are in the dump as LISTEN).
    std::mem::forget((registry, v6, dual, closer));
    Ok(keep)
}

fn record(
    nl: &mut NetlinkSource,
    request: Request,
    states: StateSet,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut datagrams = Vec::new();
    let mut decoder = DumpDecoder::new();
    let outcome = nl.dump_raw(request, states, &mut |d| {
        datagrams.push(d.to_vec());
        decoder.feed(d)
    });
    match outcome {
        Ok(()) => Ok(datagrams),
        // The error reply is itself a fixture.
        Err(_) if !datagrams.is_empty() => Ok(datagrams),
        Err(e) => Err(e.into()),
    }
}

/// Rewrites every `tcp_info` attribute to its 2.6-era length, fixing up the attribute and
/// message lengths: what an old kernel would have sent for the same sockets.
fn shorten_tcp_info(datagrams: &[Vec<u8>]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for d in datagrams {
        let mut new = Vec::with_capacity(d.len());
        let mut off = 0;
        while off < d.len() {
            let len = u32::from_ne_bytes(d[off..off + 4].try_into()?) as usize;
            let msg = &d[off..off + len];
            if msg.len() <= DIAG_HEADER {
                new.extend_from_slice(msg);
            } else {
                let mut m = msg[..DIAG_HEADER].to_vec();
                let mut a = DIAG_HEADER;
                while a + 4 <= msg.len() {
                    let alen = u16::from_ne_bytes(msg[a..a + 2].try_into()?) as usize;
                    let kind = u16::from_ne_bytes(msg[a + 2..a + 4].try_into()?);
                    if alen < 4 {
                        bail!("bad attribute length {alen}");
                    }
                    let mut attr = msg[a..a + alen].to_vec();
                    if kind == 2 && alen > 4 + OLD_TCP_INFO_LEN {
                        attr.truncate(4 + OLD_TCP_INFO_LEN);
                        attr[0..2].copy_from_slice(&((4 + OLD_TCP_INFO_LEN) as u16).to_ne_bytes());
                    }
                    m.extend_from_slice(&attr);
                    m.resize(m.len().div_ceil(4) * 4, 0);
                    a += alen.div_ceil(4) * 4;
                }
                let mlen = m.len() as u32;
                m[0..4].copy_from_slice(&mlen.to_ne_bytes());
                new.extend_from_slice(&m);
            }
            off += len.div_ceil(4) * 4;
        }
        out.push(new);
    }
    Ok(out)
}

fn write(path: &Path, datagrams: &[Vec<u8>]) -> anyhow::Result<()> {
    let mut f =
        BufWriter::new(File::create(path).with_context(|| format!("create {}", path.display()))?);
    for d in datagrams {
        f.write_all(&(d.len() as u32).to_le_bytes())?;
        f.write_all(d)?;
    }
    f.flush()?;
    Ok(())
}
