//! Fuzz target: the /proc/net/tcp{,6} fallback parser (stage 1) on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shimcheck::model::StateSet;

fuzz_target!(|data: &[u8]| {
    let _ = shimcheck::collect::procnet::parse(data, StateSet::all());
});
