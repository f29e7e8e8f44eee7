//! flotilla-sandbox: a local cloud for Flotilla's end-to-end tests and demos.
//!
//! moto plays EC2/IAM ([`moto`]), Debian's docker-registry serves busybox test images
//! ([`registry`]), the machine emulator turns the fleet's instances into real dockerd
//! ([`emulator`]), the runner emulator calls the `flotilla` stages like gitlab-runner
//! ([`runner`], [`script`]), and [`sandbox`] ties them together with a running
//! `flotilla daemon`; [`prometheus`] runs a real Prometheus against it, and [`kit`] and
//! [`promql`] read the observability kit (`observability/`) for the tests that check it.
//! Nothing here talks to anything but loopback and its own containers.

pub mod auth_registry;
pub mod cloud_init;
pub mod emulator;
pub mod faults;
pub mod gitlab_stub;
pub mod images;
pub mod kit;
pub mod moto;
pub mod prom;
pub mod prometheus;
pub mod promql;
pub mod registry;
pub mod runner;
pub mod sandbox;
pub mod script;
pub mod util;

pub use emulator::{EmulatedMachine, Emulator, MachinePhase, StoppedMachine};
pub use runner::{
    Cancel, CancelWhen, Job, JobResult, Outcome, RunnerOptions, StageDriver, StageResult,
};
pub use sandbox::{docker_on, Sandbox, SandboxOptions};
