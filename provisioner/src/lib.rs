//! `flotilla-provision`: plan / apply / destroy / output for the AWS side of a Flotilla
//! fleet, described by one stack file.
//!
//! Two steps, as everywhere in Flotilla: [`stack::Stack::load`] parses and checks the
//! stack file without touching the network; then a pass of [`engine`] reads AWS and
//! computes (plan) or makes (apply) the changes. One resource module per AWS service
//! ([`ec2`], [`iam`], [`s3`], [`ssm`]) plus [`gitlab`] for runner registration,
//! [`binary`] (the flotilla binary the hosts install, resolved without network),
//! [`run_command`] (SSM Run Command on the hosts: readiness and drain) and [`poll`] (the
//! one wait loop).

pub mod aws;
pub mod binary;
pub mod cidr;
pub mod cloudinit;
pub mod ec2;
pub mod engine;
pub mod error;
pub mod gitlab;
pub mod iam;
pub mod naming;
pub mod plan;
pub mod poll;
pub mod render;
pub mod run_command;
pub mod s3;
pub mod ssm;
pub mod stack;
