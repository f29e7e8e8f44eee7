//! `flotilla-provision`: plan / apply / destroy / output for the AWS side of a Flotilla
//! fleet, described by one stack file.
//!
//! Two steps, as everywhere in Flotilla: [`Stack::load`] parses and checks the stack
//! file without touching the network; then a pass ([`converge`] or [`destroy`]) reads
//! AWS and computes (plan) or makes (apply) the changes, recorded in the [`Ctx`]'s
//! [`Plan`]. What the `flotilla-provision` binary needs is re-exported here; every
//! module is private to the crate.
//!
//! Module map: `context` (what a pass hands every resource module), `engine` (the
//! order of the passes, nothing else), one module per resource (`ec2::*` for each EC2
//! type, `iam`, `s3`, `ssm`, `logs`, `registration` for the GitLab runner; `log_settings` is
//! the stack file's `[logs]`), `plan` (changes,
//! and the `Go` a write needs), `id` (ids, or placeholders for ids apply will create),
//! `poll` (the one wait loop), `aws` (clients, the one choke point for calls),
//! `host_config`, `render`, `cloudinit`, `paths` (what a runner host is configured with),
//! `run_command` (SSM Run Command: readiness and drain), `binary`, `stack`, `vpn` (the
//! `[network.vpn]` section), `naming`.

mod aws;
mod binary;
mod cidr;
mod cloudinit;
mod context;
mod ec2;
mod engine;
mod error;
mod gitlab;
mod host_config;
mod iam;
mod id;
mod log_settings;
mod logs;
mod monitoring;
mod naming;
mod oidc;
mod oidc_section;
mod outputs;
mod paths;
mod plan;
mod poll;
mod registration;
mod render;
mod run_command;
mod s3;
mod ssm;
mod stack;
mod vpn;

pub use aws::{Aws, AwsError, Meter};
pub use binary::{resolve as resolve_binary, BinaryError, LocalBinary, Resolved};
pub use context::{Ctx, HostOptions};
pub use engine::{converge, destroy};
pub use error::{Error, Result};
pub use gitlab::{GitlabError, Secret};
pub use monitoring::ScrapeTarget;
pub use oidc::DeployOutputs;
pub use outputs::{HostOutput, NatOutput, Outputs};
pub use plan::{Mode, Plan};
pub use stack::{Stack, StackError};
