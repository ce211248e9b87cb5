//! Live tests: real sockets, most of them in network namespaces each test makes and checked
//! against `ss`, `netstat` and a `--watch` of their own. Those that make namespaces need root:
//! as another user they say they were skipped, and under CI (`CI` set) they fail instead.
//! Watch mode's memory test and the `--all-netns` sweep that needs a still host have binaries
//! of their own (`tests/watch_memory.rs`, `tests/quiet_sweep.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "../support/mod.rs"]
mod support;

mod bpf;
mod collect;
mod events;
mod faults;
mod findings;
mod incremental;
mod netns;
mod offnode;
mod owner_cache;
mod ports;
mod privilege;
mod serve;
mod states;
mod watch;
