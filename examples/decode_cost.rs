//! The decoder's own cost, for `benches/decode.sh`: records one sock_diag dump of this network
//! namespace (both families in one walk, the states `shimcheck ports` asks for, tcp_info included) into
//! memory, then decodes the recorded datagrams again and again and prints the time per socket.
//! Kernel time is left out: what is measured is only `collect::decode`.
//!
//! `cargo run --release --example decode_cost -- [ROUNDS]`

use std::time::Instant;

use anyhow::bail;
use shimcheck::collect::decode::{DumpDecoder, Feed};
use shimcheck::collect::netlink::{NetlinkSource, Request};

fn main() -> anyhow::Result<()> {
    let rounds: u32 = std::env::args()
        .nth(1)
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(10);
    let states = shimcheck::sample::DETECT_STATES.into_iter().collect();
    let mut nl = NetlinkSource::open()?;
    let mut datagrams: Vec<Vec<u8>> = Vec::new();
    let mut probe = DumpDecoder::new();
    nl.dump_raw(Request::Both, states, &mut |d| {
        datagrams.push(d.to_vec());
        probe.feed(d)
    })?;
    let mut sockets = 0;
    let started = Instant::now();
    for _ in 0..rounds {
        let mut d = DumpDecoder::new();
        for dg in &datagrams {
            if d.feed(dg)? == Feed::Done {
                break;
            }
        }
        sockets = d.finish()?.sockets.len();
    }
    if sockets == 0 {
        bail!("no socket to decode: run it where there are TCP sockets (benches/decode.sh)");
    }
    let per = started.elapsed().as_nanos() as f64 / f64::from(rounds) / sockets as f64;
    println!("{sockets} sockets, {rounds} rounds: {per:.0} ns per socket decoded");
    Ok(())
}
