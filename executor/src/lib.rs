//! Flotilla's executor crate: the `flotilla daemon` fleet manager and the GitLab
//! custom-executor stages. `main.rs` only parses arguments and maps results to exit codes.

pub mod control;
pub mod daemon;
pub mod docker;
pub mod ec2;
pub mod forecast;
pub mod metrics;
pub mod migrate;
pub mod observe;
pub mod pki;
pub mod plan;
pub mod pool;
pub mod simulate;
pub mod stages;
pub mod state_store;
pub mod status;
pub mod tls;
