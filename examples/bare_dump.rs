//! The kernel's own cost of a namespace sweep, for `benches/netns.sh`: enters each namespace
//! named on the command line (a `/proc/PID/ns/net` or `/run/netns/NAME` path) on a thread of
//! its own and dumps its TCP sockets (the states `shimcheck ports` asks for, both families in one
//! walk, as shimcheck does) without decoding
//! them: only the netlink headers are looked at, to find the end of the dump.
//!
//! `cargo run --release --example bare_dump -- /run/netns/a /run/netns/b ...`

use anyhow::{Context, bail};
use netlink_packet_core::{NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer};
use rustix::fs::{Mode, OFlags};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use shimcheck::collect::CollectError;
use shimcheck::collect::decode::Feed;
use shimcheck::collect::netlink::{NetlinkSource, Request};

fn main() -> anyhow::Result<()> {
    let states = shimcheck::sample::DETECT_STATES.into_iter().collect();
    let mut bytes = 0usize;
    for path in std::env::args().skip(1) {
        bytes += std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<usize> {
                let fd = rustix::fs::open(&path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
                    .with_context(|| format!("open {path}"))?;
                move_into_link_name_space(
                    rustix::fd::AsFd::as_fd(&fd),
                    Some(LinkNameSpaceType::Network),
                )
                .with_context(|| format!("setns {path}"))?;
                let mut nl = NetlinkSource::open()?;
                let mut n = 0;
                nl.dump_raw(Request::Both, states, &mut |d| {
                    n += d.len();
                    last_type(d)
                })?;
                Ok(n)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("dump thread panicked"))?
        })?;
    }
    if bytes == 0 {
        bail!("no namespace given");
    }
    println!("{bytes} bytes");
    Ok(())
}

/// Walks the message headers of a datagram: `Done` at NLMSG_DONE; an error reply is an error.
fn last_type(d: &[u8]) -> Result<Feed, CollectError> {
    let mut off = 0;
    while off < d.len() {
        let buf = NetlinkBuffer::new_checked(&d[off..]).map_err(|e| CollectError::Malformed {
            offset: off,
            reason: e.to_string(),
        })?;
        match buf.message_type() {
            NLMSG_DONE => return Ok(Feed::Done),
            NLMSG_ERROR => {
                return Err(CollectError::Malformed {
                    offset: off,
                    reason: "error reply".into(),
                });
            }
            _ => {}
        }
        off += (buf.length() as usize).div_ceil(4) * 4;
    }
    Ok(Feed::More)
}
