//! Fuzz target: the sock_diag reply decoders (stage 1) on datagrams as `fixtures/netlink/`
//! stores them (a little-endian u32 length, then the bytes); the rest of the input is a last
//! datagram. Each datagram goes to the dump decoder and, alone, to a lookup's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shimcheck::collect::decode::{DumpDecoder, Feed, lookup_reply};

fuzz_target!(|data: &[u8]| {
    let mut d = DumpDecoder::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (datagram, next) = match rest.split_first_chunk::<4>() {
            Some((len, tail)) => {
                let len = (u32::from_le_bytes(*len) as usize).min(tail.len());
                tail.split_at(len)
            }
            None => (rest, &[][..]),
        };
        rest = next;
        let _ = lookup_reply(datagram);
        match d.feed(datagram) {
            Ok(Feed::More) => {}
            Ok(Feed::Done) | Err(_) => break,
        }
    }
    let _ = d.finish();
});
