//! The control API between the stages / operator commands and the daemon: JSON over HTTP
//! on the daemon's Unix socket.
//!
//! Routes: `POST /v1/leases` ([`AcquireRequest`] -> [`Lease`]), `GET /v1/leases/{id}`,
//! `GET /v1/leases?job_key=K`, `POST /v1/leases/{id}/release` ([`ReleaseRequest`]),
//! `GET /v1/status` ([`StatusResponse`]). Errors are [`ApiError`] with a matching status.
//!
//! A lease is the job's alone: `acquire` carries a per-job secret (random, kept in the
//! job's temp dir with mode 0600) whose hash the daemon stores; looking a lease up or
//! releasing it needs that secret in the [`LEASE_SECRET_HEADER`] header, so a job that
//! learns another job's key or lease id still cannot touch it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const LEASES_PATH: &str = "/v1/leases";
pub const STATUS_PATH: &str = "/v1/status";
pub const DRAIN_PATH: &str = "/v1/drain";
pub const AUDIT_PATH: &str = "/v1/audit";
/// Header carrying the lease secret on lease lookups and releases.
pub const LEASE_SECRET_HEADER: &str = "flotilla-lease-secret";

/// Ask for a machine. Idempotent per `job_key`: asking again while the job holds a lease
/// returns that lease, so a `prepare` that crashed after the grant does not leak a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquireRequest {
    /// Identifies the job (e.g. `<runner short token>-<job id>`).
    pub job_key: String,
    /// Machine class; `None` means the daemon's default class.
    #[serde(default)]
    pub class: Option<String>,
    /// How long the daemon may hold the request waiting for a machine.
    pub timeout_ms: u64,
    /// The job's lease secret; asking again for the same `job_key` needs the same secret.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret: String,
    /// The job's timeout (gitlab-runner's `runner_info.timeout`): a lease held much
    /// longer than this without a release is abandoned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_timeout_secs: Option<u64>,
}

/// A machine granted to one job until released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub lease_id: String,
    pub job_key: String,
    pub machine_id: String,
    pub instance_id: String,
    pub class: String,
    /// The machine's private IP: where its dockerd listens.
    pub address: String,
    pub docker_port: u16,
    /// The DNS name the machine's server certificate carries; verify this, not the IP.
    pub server_name: String,
    pub acquired_at: DateTime<Utc>,
    /// Jobs the machine ran before this one (0 on a fresh machine).
    pub previous_builds: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseOutcome {
    /// The machine may be reused (subject to `max_builds` and the idle policy).
    Healthy,
    /// The machine must never be leased again; it is terminated and replaced.
    Broken,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub outcome: ReleaseOutcome,
    #[serde(default)]
    pub reason: Option<String>,
    /// The images the job's containers ran (job, services, helper), as cleanup found
    /// them: what the class's new machines prefetch (`prefetch_images`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseResponse {
    /// False when the lease was already gone (release is idempotent).
    pub released: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    UnknownClass,
    /// No machine became free within the request's timeout.
    Timeout,
    NotFound,
    /// The daemon is draining and grants no new leases.
    Draining,
    /// The lease's machine was lost (terminated, reclaimed, unreachable).
    MachineLost,
    /// Another job (another secret) holds a lease under this job key.
    Conflict,
    /// The daemon is stopping (a restart, an upgrade): send the request again to the next
    /// one.
    ShuttingDown,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

/// Lifecycle of a machine as the daemon tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineState {
    /// Launched; waiting for its dockerd to answer over mTLS.
    Booting,
    /// Ready and unleased.
    Idle,
    /// Held by a job.
    Leased,
    /// Failed; never leased again; will be terminated.
    Broken,
    /// Termination requested.
    Terminating,
    /// StopInstances requested: the machine leaves the hot pool but keeps its disk (image
    /// cache, certificates), billed for EBS only once stopped.
    Stopping,
    /// Stopped: a warm spare that starts in a fraction of a cold launch.
    Stopped,
    /// StartInstances requested; waiting for its dockerd to answer again.
    Starting,
}

impl MachineState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Booting => "booting",
            Self::Idle => "idle",
            Self::Leased => "leased",
            Self::Broken => "broken",
            Self::Terminating => "terminating",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Starting => "starting",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineStatus {
    pub machine_id: String,
    pub instance_id: String,
    pub class: String,
    pub instance_type: String,
    pub state: MachineState,
    pub address: String,
    pub builds: u32,
    pub launched_at: DateTime<Utc>,
    #[serde(default)]
    pub ready_at: Option<DateTime<Utc>>,
    /// The job holding the machine (the first, when several share it), when leased.
    #[serde(default)]
    pub job_key: Option<String>,
    /// Jobs running on it (more than one with `jobs_per_machine`).
    #[serde(default)]
    pub jobs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub fleet: String,
    pub draining: bool,
    pub machines: Vec<MachineStatus>,
    /// Acquire requests currently waiting, per class.
    pub waiting: std::collections::BTreeMap<String, u32>,
    /// Reconcile passes (observe, plan, act) completed since the daemon started: a way to
    /// wait for "the daemon has looked again" without guessing at its interval.
    #[serde(default)]
    pub reconcile_passes: u64,
    /// Per class: machines by state and, when jobs wait, what they wait for.
    #[serde(default)]
    pub classes: std::collections::BTreeMap<String, ClassStatus>,
}

/// One class in [`StatusResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassStatus {
    pub idle: u32,
    pub leased: u32,
    pub booting: u32,
    /// The stopped pool: stopping or stopped machines (they still count as live).
    #[serde(default)]
    pub stopped: u32,
    /// Stopped machines started, not answering yet.
    #[serde(default)]
    pub starting: u32,
    /// Machines that count against `max_machines` (terminating ones do not).
    pub live: u32,
    /// Jobs running on the class's machines: more than `leased` when machines run
    /// several (`jobs_per_machine`).
    #[serde(default)]
    pub jobs: u32,
    /// The class's `jobs_per_machine`.
    #[serde(default)]
    pub jobs_per_machine: u32,
    pub max_machines: u32,
    /// Acquire requests waiting for a machine of this class.
    pub waiting: u32,
    /// No launch before this: the last launch failed (see `last_launch_error`).
    #[serde(default)]
    pub launch_backoff_until: Option<DateTime<Utc>>,
    #[serde(default)]
    pub last_launch_error: Option<String>,
    /// When jobs wait: what for, in words (backoff and its error, max_machines, booting).
    #[serde(default)]
    pub waiting_for: Option<String>,
}

/// Turn draining on (no new leases; idle machines terminated) or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRequest {
    pub draining: bool,
}

/// One instance the daemon would terminate, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub instance_id: String,
    /// The `flotilla:machine` tag, when the instance has one.
    #[serde(default)]
    pub machine_id: Option<String>,
    pub reason: String,
    /// When the daemon reaps it on its own (orphans: first seen + orphan_grace).
    #[serde(default)]
    pub reap_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditResponse {
    pub entries: Vec<AuditEntry>,
    /// True when the entries were terminated by this request (`audit --terminate`).
    pub terminated: bool,
}
