//! The `mcld` binary and its commands end to end (evaluate, infer, test on tiny weights,
//! download against a loopback Hub).
//! One test crate per area (each links the library once); one module per former test file.

#[path = "../common/mod.rs"]
mod common;

mod binary;
mod download;
mod evaluate;
mod infer;
mod pipeline;
mod serve;
mod serve_browser;
