//! The tests that need neither root nor a network namespace, in one binary: the pipeline's pure
//! stages on samples built with `support::builders`, decoders and the /proc join on recorded
//! fixtures, and the binary's command-line contract.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod aggregate;
mod cli;
mod decode_fixtures;
mod detect;
mod events;
mod join;
mod old_kernels;
mod owner_cache;
mod owners;
mod privilege;
mod proc_join;
mod procnet_fallback;
mod properties;
mod render;
