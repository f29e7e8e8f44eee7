//! Flotilla's executor crate: the `flotilla daemon` fleet manager and the GitLab
//! custom-executor stages. `main.rs` only parses arguments and maps results to exit codes.
//!
//! Public modules are what the binary and the sandbox's tests use; everything else is
//! `pub(crate)`, and `unreachable_pub` keeps an item from claiming to be API when nothing
//! outside the crate can reach it.

#![warn(unreachable_pub)]

pub mod control;
pub(crate) mod cwlogs;
pub mod daemon;
pub(crate) mod docker;
pub(crate) mod ec2;
pub(crate) mod forecast;
pub(crate) mod image_usage;
pub mod metrics;
pub mod migrate;
pub(crate) mod observe;
pub mod pki;
pub(crate) mod plan;
pub mod pool;
pub mod simulate;
pub mod stages;
pub mod state_store;
pub mod status;
pub mod tls;
