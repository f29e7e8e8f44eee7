//! Flotilla's end-to-end tests: each test starts its own sandbox (moto, registry, machine
//! emulator, `flotilla daemon`) and drives the `flotilla` stages like gitlab-runner.
//!
//! Needs root, dockerd, docker-registry, busybox-static and moto (`scripts/sandbox up`
//! installs them) and a built `flotilla` binary (`cargo build -p flotilla` with the same
//! CARGO_TARGET_DIR, or FLOTILLA_BIN). `FLOTILLA_E2E_PARALLEL` caps concurrent sandboxes
//! (default 3); `FLOTILLA_KEEP_SANDBOX=1` keeps their directories for inspection.

mod adopt;
mod chaos;
mod common;
mod compat;
mod dind;
mod disk;
mod fleet;
mod harness;
mod helper;
mod isolation;
mod jobs;
mod machines;
mod observability;
mod pipelines;
mod pool;
mod postmortem;
mod prefetch;
mod prometheus;
mod restart;
mod shared;
mod stages;
mod stopped;
mod tls;
