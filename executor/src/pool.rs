//! The daemon's model of its machines and leases, and the synchronous operations on it.
//!
//! Invariants: a machine holds at most its class's `jobs_per_machine` leases (slots), and
//! is `Leased` exactly while it holds one; a `Broken` or `Terminating` machine is never
//! leased; a lease outlives its machine only as a record that the machine was lost
//! (so the job's next stage fails with a system failure instead of a timeout). Nothing
//! here does I/O; the daemon persists [`Pool`] after every change.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use flotilla_proto::api::{Lease, MachineState, MachineStatus, ReleaseOutcome};
use flotilla_proto::bootstrap::{machine_dns_name, DOCKER_TLS_PORT};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminateReason {
    IdleTimeout,
    MaxBuilds,
    /// Older than its class's `max_age` (its server certificate expires after that).
    MaxAge,
    Broken,
    BootTimeout,
    OverCapacity,
    Drained,
    ClassRemoved,
    Orphan,
    Shutdown,
}

impl TerminateReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IdleTimeout => "idle_timeout",
            Self::MaxBuilds => "max_builds",
            Self::MaxAge => "max_age",
            Self::Broken => "broken",
            Self::BootTimeout => "boot_timeout",
            Self::OverCapacity => "over_capacity",
            Self::Drained => "drained",
            Self::ClassRemoved => "class_removed",
            Self::Orphan => "orphan",
            Self::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub id: String,
    /// Empty until RunInstances answered (the record is persisted before the call, so a
    /// crash mid-launch leaves a record the next observation can adopt by machine tag).
    pub instance_id: String,
    pub class: String,
    pub instance_type: String,
    pub address: String,
    pub state: MachineState,
    pub launched_at: DateTime<Utc>,
    pub ready_at: Option<DateTime<Utc>>,
    /// When the machine last became idle (ready, or its last job ended).
    pub idle_since: DateTime<Utc>,
    pub builds: u32,
    /// The leases it holds, oldest first: one per job running on it, at most its class's
    /// `jobs_per_machine`. (Read from the `lease_id` of state files written before slots.)
    #[serde(
        default,
        alias = "lease_id",
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub leases: Vec<String>,
    /// Reported broken (or abandoned) by one of its jobs while others still ran on it:
    /// it takes no new job and is broken once the last of them ends. Its other jobs are
    /// not failed for what one job reported; if the machine is really gone, their own
    /// stages find out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken_after_jobs: Option<String>,
    /// Why the machine is broken or being terminated, for operators.
    pub note: Option<String>,
    pub terminate_reason: Option<TerminateReason>,
    /// Set once TerminateInstances succeeded for it.
    #[serde(default)]
    pub terminate_sent_at: Option<DateTime<Utc>>,
    /// Adopted without a record (`flotilla daemon --adopt`): held `Leased` with no lease
    /// (never handed to a job) until drained, see [`crate::observe::adopt`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_at: Option<DateTime<Utc>>,
    /// Broken before it was ever ready (its class's `ready_command` failed): terminated as
    /// a failed boot, like one past its boot timeout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub boot_failed: bool,
    /// When the last StartInstances of a stopped machine was sent: its start times out
    /// from here, while `launched_at` (and so `max_age`) keeps counting from the launch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When EC2 accepted the StopInstances of this stopping machine (resent after a while
    /// if EC2 does not carry it out, as a termination is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_sent_at: Option<DateTime<Utc>>,
    /// When EC2 accepted the StartInstances of this starting machine (until then the start
    /// is resent; its boot timeout runs from `started_at` either way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_sent_at: Option<DateTime<Utc>>,
}

impl Machine {
    pub fn booting(id: String, class: String, instance_type: String, now: DateTime<Utc>) -> Self {
        Self {
            id,
            instance_id: String::new(),
            class,
            instance_type,
            address: String::new(),
            state: MachineState::Booting,
            launched_at: now,
            ready_at: None,
            idle_since: now,
            builds: 0,
            leases: Vec::new(),
            broken_after_jobs: None,
            note: None,
            terminate_reason: None,
            terminate_sent_at: None,
            adopted_at: None,
            boot_failed: false,
            started_at: None,
            stop_sent_at: None,
            start_sent_at: None,
        }
    }

    pub fn status(&self, pool: &Pool) -> MachineStatus {
        MachineStatus {
            machine_id: self.id.clone(),
            instance_id: self.instance_id.clone(),
            class: self.class.clone(),
            instance_type: self.instance_type.clone(),
            state: self.state,
            address: self.address.clone(),
            builds: self.builds,
            launched_at: self.launched_at,
            ready_at: self.ready_at,
            job_key: self
                .leases
                .first()
                .and_then(|l| pool.leases.get(l))
                .map(|l| l.job_key.clone()),
            jobs: self.leases.len() as u32,
        }
    }

    /// The jobs it may still take with `slots` per machine: all of them ready and idle;
    /// the slots left while leased (none for an adopted machine, held for no job, or one
    /// a job found broken). The lease and the plan both count by this.
    pub fn free_slots(&self, slots: u32) -> u32 {
        let slots = slots.max(1);
        match self.state {
            MachineState::Idle => slots,
            MachineState::Leased
                if self.adopted_at.is_none()
                    && self.broken_after_jobs.is_none()
                    && !self.leases.is_empty() =>
            {
                slots.saturating_sub(self.leases.len() as u32)
            }
            _ => 0,
        }
    }
}

/// A lease list, or the single optional lease id of older state files.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Option<String>),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => one.into_iter().collect(),
        OneOrMany::Many(many) => many,
    })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub lease_id: String,
    pub job_key: String,
    pub machine_id: String,
    pub acquired_at: DateTime<Utc>,
    /// Set when the machine was lost while leased.
    pub lost: Option<String>,
    /// The machine as it was when leased (kept so a lost machine can still be named).
    pub machine: LeasedMachine,
    /// SHA-256 (hex) of the job's lease secret; empty only for leases granted before
    /// secrets existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret_hash: String,
    /// The lease is abandoned after this long (the job's timeout plus time for its last
    /// stages and cleanup); `None`: the daemon's `lease_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_after_secs: Option<u64>,
}

/// What a job brings to its lease: the hash of its secret and, when gitlab-runner told it,
/// how long the job may run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseTerms {
    pub secret_hash: String,
    pub expires_after_secs: Option<u64>,
    /// Jobs the class runs at once on a machine (`jobs_per_machine`; 0 counts as 1).
    pub slots: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeasedMachine {
    pub instance_id: String,
    pub class: String,
    pub address: String,
    pub previous_builds: u32,
}

/// An instance found running with a machine tag the pool does not know, to adopt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    pub machine_id: String,
    pub instance_id: String,
    pub class: String,
    pub instance_type: String,
    pub address: String,
    pub launched_at: DateTime<Utc>,
}

/// Everything the daemon persists, plus volatile demand counters.
#[derive(Debug, Default, Serialize, Deserialize)]
///
/// Its state is private: every change is one of the methods below, each keeping the
/// invariants in this module's header.
pub struct Pool {
    machines: BTreeMap<String, Machine>,
    leases: BTreeMap<String, LeaseRecord>,
    /// Acquire requests waiting, per class (not persisted: waiters die with the daemon).
    #[serde(skip)]
    waiting: BTreeMap<String, u32>,
    /// Persisted: a drained daemon stays drained across restarts until undrained.
    #[serde(default)]
    draining: bool,
    /// Job arrivals the policy learns from (bounded).
    #[serde(default)]
    history: crate::forecast::DemandHistory,
    /// The images each class's jobs ran (bounded): what new machines prefetch.
    #[serde(default)]
    images: crate::image_usage::ImageUsage,
    /// Machines marked broken or lost whose report (console output and dockerd events)
    /// is not made yet: persisted, so a daemon that dies between the verdict and the
    /// report makes it after its restart (bounded, oldest dropped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    casualties: Vec<Casualty>,
    /// Casualties handed out for a report that has not finished (not persisted: after a
    /// restart every casualty left is reported again).
    #[serde(skip)]
    reporting: std::collections::BTreeSet<String>,
}

/// A machine just marked broken or lost, as its report needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Casualty {
    pub machine_id: String,
    pub instance_id: String,
    pub address: String,
    pub why: String,
    /// When the report was first handed out: the time it names and its events window
    /// ends at, also when it is made again after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
}

/// Most casualties held between two takes (the simulator never takes them).
const MAX_CASUALTIES: usize = 64;

/// What the daemon keeps of a lease secret.
pub fn secret_hash(secret: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl Casualty {
    fn of(m: &Machine, why: &str) -> Self {
        Self {
            machine_id: m.id.clone(),
            instance_id: m.instance_id.clone(),
            address: m.address.clone(),
            why: why.to_owned(),
            at: None,
        }
    }
}

impl LeaseRecord {
    /// Whether `presented` is this lease's secret (compared in constant time).
    pub fn accepts(&self, presented: Option<&str>) -> bool {
        if self.secret_hash.is_empty() {
            return true;
        }
        let Some(p) = presented else { return false };
        let a = secret_hash(p);
        a.len() == self.secret_hash.len()
            && a.bytes()
                .zip(self.secret_hash.bytes())
                .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                == 0
    }

    pub fn to_api(&self) -> Lease {
        Lease {
            lease_id: self.lease_id.clone(),
            job_key: self.job_key.clone(),
            machine_id: self.machine_id.clone(),
            instance_id: self.machine.instance_id.clone(),
            class: self.machine.class.clone(),
            address: self.machine.address.clone(),
            docker_port: DOCKER_TLS_PORT,
            server_name: machine_dns_name(&self.machine_id),
            acquired_at: self.acquired_at,
            previous_builds: self.machine.previous_builds,
        }
    }
}

impl Pool {
    pub fn machines(&self) -> &BTreeMap<String, Machine> {
        &self.machines
    }

    pub fn machine(&self, machine_id: &str) -> Option<&Machine> {
        self.machines.get(machine_id)
    }

    pub fn leases(&self) -> &BTreeMap<String, LeaseRecord> {
        &self.leases
    }

    pub fn lease(&self, lease_id: &str) -> Option<&LeaseRecord> {
        self.leases.get(lease_id)
    }

    /// Acquire requests waiting for a machine of `class`.
    pub fn waiting(&self, class: &str) -> u32 {
        self.waiting.get(class).copied().unwrap_or(0)
    }

    /// Acquire requests waiting, per class.
    pub fn waiting_by_class(&self) -> &BTreeMap<String, u32> {
        &self.waiting
    }

    /// One more acquire request waits for a machine of `class` (the plan launches for it).
    pub fn add_waiter(&mut self, class: &str) {
        *self.waiting.entry(class.to_owned()).or_default() += 1;
    }

    /// An acquire request for `class` stopped waiting (served, timed out or gone).
    pub fn remove_waiter(&mut self, class: &str) {
        if let Some(n) = self.waiting.get_mut(class) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.waiting.remove(class);
            }
        }
    }

    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// A drained pool launches nothing, leases nothing, and terminates idle machines.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    pub fn history(&self) -> &crate::forecast::DemandHistory {
        &self.history
    }

    pub fn lease_for_job(&self, job_key: &str) -> Option<&LeaseRecord> {
        self.leases.values().find(|l| l.job_key == job_key)
    }

    /// Leases an idle machine of `class` to the job (one job per machine), preferring the
    /// most recently used one (warm caches; lets the oldest idle machines age out and be
    /// scaled down).
    pub fn try_lease(
        &mut self,
        job_key: &str,
        class: &str,
        lease_id: String,
        now: DateTime<Utc>,
    ) -> Option<&LeaseRecord> {
        self.try_lease_with_terms(job_key, class, lease_id, LeaseTerms::default(), now)
    }

    /// [`Pool::try_lease`] for a job that proves itself with a secret (see
    /// [`LeaseRecord::accepts`]), says how long it may run, and may share a machine with
    /// `terms.slots - 1` other jobs.
    pub fn try_lease_with_terms(
        &mut self,
        job_key: &str,
        class: &str,
        lease_id: String,
        terms: LeaseTerms,
        now: DateTime<Utc>,
    ) -> Option<&LeaseRecord> {
        self.try_lease_where(job_key, class, lease_id, terms, now, |_| true)
    }

    /// [`Pool::try_lease_with_terms`] on a machine `may_take` accepts (one that must take
    /// no further job, `max_builds` or `max_age`, is refused there). With slots, machines
    /// already running jobs are filled first, the fullest first: the others stay idle, to
    /// be scaled down or kept for a burst.
    pub fn try_lease_where(
        &mut self,
        job_key: &str,
        class: &str,
        lease_id: String,
        terms: LeaseTerms,
        now: DateTime<Utc>,
        may_take: impl Fn(&Machine) -> bool,
    ) -> Option<&LeaseRecord> {
        let machine = self
            .machines
            .values_mut()
            .filter(|m| m.class == class && m.free_slots(terms.slots) > 0)
            .filter(|m| may_take(m))
            .max_by(|a, b| {
                (a.leases.len(), a.idle_since, &a.id).cmp(&(b.leases.len(), b.idle_since, &b.id))
            })?;
        machine.state = MachineState::Leased;
        machine.leases.push(lease_id.clone());
        let record = LeaseRecord {
            lease_id: lease_id.clone(),
            job_key: job_key.to_owned(),
            machine_id: machine.id.clone(),
            acquired_at: now,
            lost: None,
            machine: LeasedMachine {
                instance_id: machine.instance_id.clone(),
                class: machine.class.clone(),
                address: machine.address.clone(),
                previous_builds: machine.builds,
            },
            secret_hash: terms.secret_hash,
            expires_after_secs: terms.expires_after_secs,
        };
        self.leases.insert(lease_id.clone(), record);
        self.leases.get(&lease_id)
    }

    /// Ends a lease. Healthy machines go back to idle (the plan decides whether they stay);
    /// broken ones are never leased again. Returns false when the lease was already gone.
    pub fn release(
        &mut self,
        lease_id: &str,
        outcome: ReleaseOutcome,
        reason: Option<String>,
        now: DateTime<Utc>,
    ) -> bool {
        let Some(lease) = self.leases.remove(lease_id) else {
            return false;
        };
        if let Some(m) = self.machines.get_mut(&lease.machine_id) {
            if let Some(at) = m.leases.iter().position(|l| l == lease_id) {
                m.leases.remove(at);
                m.builds = m.builds.saturating_add(1);
                if m.state == MachineState::Leased {
                    let why = || reason.unwrap_or_else(|| "reported broken by a job".into());
                    match outcome {
                        // Other jobs still run on it: it stays leased.
                        ReleaseOutcome::Healthy if !m.leases.is_empty() => {}
                        ReleaseOutcome::Healthy if m.broken_after_jobs.is_none() => {
                            m.state = MachineState::Idle;
                            m.idle_since = now;
                        }
                        ReleaseOutcome::Healthy => {
                            let why = m.broken_after_jobs.take().unwrap_or_default();
                            let machine_id = m.id.clone();
                            self.mark_broken(&machine_id, &why);
                        }
                        ReleaseOutcome::Broken => {
                            let machine_id = m.id.clone();
                            self.broken_by_job(&machine_id, lease_id, why());
                        }
                    }
                }
            }
        }
        true
    }

    fn record_casualty(&mut self, c: Casualty) {
        if self.casualties.len() >= MAX_CASUALTIES {
            let dropped = self.casualties.remove(0);
            self.reporting.remove(&dropped.machine_id);
        }
        self.casualties.push(c);
    }

    /// Casualties whose report is not under way, oldest first, now marked under way (and
    /// stamped `now` if they never were). They stay in the pool, and so in the state
    /// file, until [`Pool::casualty_reported`].
    pub fn casualties_to_report(&mut self, now: DateTime<Utc>) -> Vec<Casualty> {
        let mut out = Vec::new();
        for c in &mut self.casualties {
            if self.reporting.insert(c.machine_id.clone()) {
                c.at.get_or_insert(now);
                out.push(c.clone());
            }
        }
        out
    }

    /// The report of `machine_id` was saved (or could not be made and will not be
    /// retried): forget the casualty.
    pub fn casualty_reported(&mut self, machine_id: &str) {
        self.casualties.retain(|c| c.machine_id != machine_id);
        self.reporting.remove(machine_id);
    }

    /// A booting machine's dockerd answered over mTLS.
    pub fn mark_ready(&mut self, machine_id: &str, now: DateTime<Utc>) -> bool {
        match self.machines.get_mut(machine_id) {
            Some(m) if matches!(m.state, MachineState::Booting | MachineState::Starting) => {
                m.state = MachineState::Idle;
                m.ready_at = Some(now);
                m.idle_since = now;
                true
            }
            _ => false,
        }
    }

    /// [`Pool::mark_ready`], then retires the machine if `retire` says it must take no
    /// job (`max_age`): in the same critical section, so no waiting job leases it first.
    /// A stopped machine started just before its `max_age` answers after it; leased then,
    /// its job could outlive the server certificate (see [`crate::pki`]). Returns whether
    /// it became idle (false: not booting or starting, or retired).
    pub fn mark_ready_retiring(
        &mut self,
        machine_id: &str,
        now: DateTime<Utc>,
        retire: impl Fn(&Machine) -> Option<TerminateReason>,
    ) -> bool {
        if !self.mark_ready(machine_id, now) {
            return false;
        }
        let Some(m) = self.machines.get_mut(machine_id) else {
            return false;
        };
        match retire(m) {
            Some(why) => {
                m.state = MachineState::Terminating;
                m.terminate_reason = Some(why);
                false
            }
            None => true,
        }
    }

    /// The plan stops an idle machine: it leaves the hot pool at once (no lease can take
    /// it), and is `stopped` once EC2 says so. False when it is no longer idle.
    pub fn begin_stop(&mut self, machine_id: &str, now: DateTime<Utc>) -> bool {
        match self.machines.get_mut(machine_id) {
            Some(m) if m.state == MachineState::Idle && m.leases.is_empty() => {
                m.state = MachineState::Stopping;
                m.idle_since = now;
                m.stop_sent_at = None;
                true
            }
            _ => false,
        }
    }

    /// EC2 reports a stopping machine stopped.
    pub fn mark_stopped(&mut self, machine_id: &str) -> bool {
        match self.machines.get_mut(machine_id) {
            Some(m) if m.state == MachineState::Stopping => {
                m.state = MachineState::Stopped;
                m.stop_sent_at = None;
                true
            }
            _ => false,
        }
    }

    /// The plan starts a stopped machine: `starting` until its dockerd answers again
    /// ([`Self::mark_ready`]) or its start times out (the plan terminates it).
    pub fn begin_start(&mut self, machine_id: &str, now: DateTime<Utc>) -> bool {
        match self.machines.get_mut(machine_id) {
            Some(m) if m.state == MachineState::Stopped => {
                m.state = MachineState::Starting;
                m.started_at = Some(now);
                m.start_sent_at = None;
                true
            }
            _ => false,
        }
    }

    /// EC2 lists a machine the pool has stopped as pending or running: started outside
    /// Flotilla (an operator). It is taken back as a start sent at `now`: health-checked
    /// like any start, idle once its dockerd answers, replaced if it does not within its
    /// boot timeout. False unless it was stopped.
    pub fn started_outside(&mut self, machine_id: &str, now: DateTime<Utc>) -> bool {
        let started = self.begin_start(machine_id, now);
        if let (true, Some(m)) = (started, self.machines.get_mut(machine_id)) {
            m.start_sent_at = Some(now);
        }
        started
    }

    /// Stopping machines with an instance whose StopInstances was never accepted, or
    /// accepted at least `retry` ago without EC2 carrying it out: (machine, instance).
    pub fn stops_due(
        &self,
        now: DateTime<Utc>,
        retry: std::time::Duration,
    ) -> Vec<(String, String)> {
        self.machines
            .values()
            .filter(|m| m.state == MachineState::Stopping && !m.instance_id.is_empty())
            .filter(|m| {
                m.stop_sent_at
                    .is_none_or(|t| (now - t).to_std().unwrap_or_default() >= retry)
            })
            .map(|m| (m.id.clone(), m.instance_id.clone()))
            .collect()
    }

    /// EC2 accepted the StopInstances of these machines at `now`.
    pub fn stop_sent<'a>(
        &mut self,
        machine_ids: impl IntoIterator<Item = &'a String>,
        now: DateTime<Utc>,
    ) {
        for id in machine_ids {
            if let Some(m) = self.machines.get_mut(id) {
                if m.state == MachineState::Stopping {
                    m.stop_sent_at = Some(now);
                }
            }
        }
    }

    /// Starting machines whose StartInstances EC2 has not accepted yet: (machine,
    /// instance). A start once accepted is not resent: its boot timeout decides.
    pub fn starts_due(&self) -> Vec<(String, String)> {
        self.machines
            .values()
            .filter(|m| m.state == MachineState::Starting && !m.instance_id.is_empty())
            .filter(|m| m.start_sent_at.is_none())
            .map(|m| (m.id.clone(), m.instance_id.clone()))
            .collect()
    }

    /// EC2 accepted the StartInstances of these machines at `now`.
    pub fn start_sent<'a>(
        &mut self,
        machine_ids: impl IntoIterator<Item = &'a String>,
        now: DateTime<Utc>,
    ) {
        for id in machine_ids {
            if let Some(m) = self.machines.get_mut(id) {
                if m.state == MachineState::Starting {
                    m.start_sent_at = Some(now);
                }
            }
        }
    }

    /// The private address DescribeInstances gives a starting machine (a start may move
    /// an instance outside a VPC; inside one it keeps its address, but the listing is the
    /// truth). Only a starting machine's address changes. Returns whether it did.
    pub fn readdress_started(&mut self, machine_id: &str, address: &str) -> bool {
        match self.machines.get_mut(machine_id) {
            Some(m)
                if m.state == MachineState::Starting
                    && !address.is_empty()
                    && m.address != address =>
            {
                m.address = address.to_owned();
                true
            }
            _ => false,
        }
    }

    /// A booting (or starting) machine failed its boot (its `ready_command`): never ready,
    /// replaced by the plan as a failed boot. False when it is no longer booting.
    pub fn fail_boot(&mut self, machine_id: &str, why: &str) -> bool {
        match self.machines.get_mut(machine_id) {
            Some(m) if matches!(m.state, MachineState::Booting | MachineState::Starting) => {
                m.state = MachineState::Broken;
                m.boot_failed = true;
                m.note = Some(why.to_owned());
                true
            }
            _ => false,
        }
    }

    /// The machine is gone or unusable: never lease it again, and tell its job.
    pub fn mark_broken(&mut self, machine_id: &str, why: &str) {
        let Some(m) = self.machines.get_mut(machine_id) else {
            return;
        };
        if matches!(m.state, MachineState::Terminating | MachineState::Broken) {
            return;
        }
        m.state = MachineState::Broken;
        m.note = Some(why.to_owned());
        let casualty = Casualty::of(m, why);
        self.record_casualty(casualty);
        let Some(m) = self.machines.get_mut(machine_id) else {
            return;
        };
        for lease_id in std::mem::take(&mut m.leases) {
            if let Some(lease) = self.leases.get_mut(&lease_id) {
                lease.lost = Some(why.to_owned());
            }
        }
    }

    /// The job holding `lease_id` found its machine broken (or abandoned it): the machine
    /// is broken now if no other job runs on it, else once the last of them ends (they
    /// are not failed for what one job found).
    fn broken_by_job(&mut self, machine_id: &str, lease_id: &str, why: String) {
        match self.machines.get_mut(machine_id) {
            Some(m) if m.leases.iter().any(|l| l != lease_id) => {
                m.leases.retain(|l| l != lease_id);
                m.broken_after_jobs = Some(why);
            }
            _ => self.mark_broken(machine_id, &why),
        }
    }

    /// Leases older than their job may run (or `max_age` when the job did not say) belong
    /// to jobs whose runner died before `cleanup`: their machines are taken back as broken
    /// (never reused: their state is unknown). Returns the expired lease ids.
    pub fn expire_leases(
        &mut self,
        now: DateTime<Utc>,
        max_age: std::time::Duration,
    ) -> Vec<String> {
        let expired: Vec<(String, String)> = self
            .leases
            .values()
            .filter(|l| l.lost.is_none())
            .filter(|l| {
                let limit = l
                    .expires_after_secs
                    .map_or(max_age, std::time::Duration::from_secs);
                (now - l.acquired_at).to_std().unwrap_or_default() >= limit
            })
            .map(|l| (l.lease_id.clone(), l.machine_id.clone()))
            .collect();
        for (lease_id, machine_id) in &expired {
            let why = format!(
                "lease {lease_id} was held longer than its job may run without cleanup (its runner is gone)"
            );
            self.broken_by_job(machine_id, lease_id, why.clone());
            if let Some(l) = self.leases.get_mut(lease_id) {
                l.lost = Some(why);
            }
        }
        expired.into_iter().map(|(l, _)| l).collect()
    }

    /// [`Pool::release`], then retires the machine if `retire` says it must take no further
    /// job (`max_builds`, `max_age`): in the same critical section as the release, so a
    /// waiting job is never handed a machine the plan is about to terminate.
    pub fn release_retiring(
        &mut self,
        lease_id: &str,
        outcome: ReleaseOutcome,
        reason: Option<String>,
        now: DateTime<Utc>,
        retire: impl Fn(&Machine) -> Option<TerminateReason>,
    ) -> bool {
        let machine = self.leases.get(lease_id).map(|l| l.machine_id.clone());
        let released = self.release(lease_id, outcome, reason, now);
        if let Some(m) = machine.and_then(|m| self.machines.get_mut(&m)) {
            if let (true, MachineState::Idle, Some(why)) = (released, m.state, retire(m)) {
                m.state = MachineState::Terminating;
                m.terminate_reason = Some(why);
            }
        }
        released
    }

    /// Retires every idle machine `retire` names a reason for (a state loaded from disk
    /// whose journal replayed releases without the policy at hand). Returns their ids.
    pub fn retire_idle(
        &mut self,
        retire: impl Fn(&Machine) -> Option<TerminateReason>,
    ) -> Vec<String> {
        let mut retired = Vec::new();
        for m in self.machines.values_mut() {
            if m.state != MachineState::Idle {
                continue;
            }
            if let Some(why) = retire(m) {
                m.state = MachineState::Terminating;
                m.terminate_reason = Some(why);
                retired.push(m.id.clone());
            }
        }
        retired
    }

    /// Marks a machine for termination (the next act sends it). A leased machine is never
    /// taken from its job this way. Returns whether it changed.
    pub fn begin_terminate(&mut self, machine_id: &str, reason: TerminateReason) -> bool {
        match self.machines.get_mut(machine_id) {
            Some(m) if m.leases.is_empty() && m.state != MachineState::Terminating => {
                m.state = MachineState::Terminating;
                m.terminate_reason = Some(reason);
                true
            }
            _ => false,
        }
    }

    /// Terminating machines with an instance whose TerminateInstances was never sent, or
    /// sent at least `retry` ago without EC2 carrying it out: (machine, instance, reason).
    pub fn terminations_due(
        &self,
        now: DateTime<Utc>,
        retry: std::time::Duration,
    ) -> Vec<(String, String, Option<TerminateReason>)> {
        self.machines
            .values()
            .filter(|m| m.state == MachineState::Terminating && !m.instance_id.is_empty())
            .filter(|m| {
                m.terminate_sent_at
                    .is_none_or(|t| (now - t).to_std().unwrap_or_default() >= retry)
            })
            .map(|m| (m.id.clone(), m.instance_id.clone(), m.terminate_reason))
            .collect()
    }

    /// EC2 accepted the termination of these machines at `now`.
    pub fn terminate_sent<'a>(
        &mut self,
        machine_ids: impl IntoIterator<Item = &'a String>,
        now: DateTime<Utc>,
    ) {
        for id in machine_ids {
            if let Some(m) = self.machines.get_mut(id) {
                m.terminate_sent_at = Some(now);
            }
        }
    }

    /// Records a machine about to be launched (booting, no instance yet): recorded first,
    /// launched second, so a crash in between leaves a record the next observation adopts
    /// by its machine tag instead of an orphan.
    pub fn reserve(
        &mut self,
        machine_id: &str,
        class: &str,
        instance_type: &str,
        now: DateTime<Utc>,
    ) {
        self.machines.insert(
            machine_id.to_owned(),
            Machine::booting(machine_id.into(), class.into(), instance_type.into(), now),
        );
    }

    /// RunInstances answered for a reserved machine.
    pub fn record_launch(
        &mut self,
        machine_id: &str,
        instance_id: &str,
        address: &str,
        instance_type: &str,
    ) {
        if let Some(m) = self.machines.get_mut(machine_id) {
            m.instance_id = instance_id.to_owned();
            m.address = address.to_owned();
            m.instance_type = instance_type.to_owned();
        }
    }

    /// A reserved machine whose launch failed: terminating, so observation forgets it once
    /// no instance carries its machine tag (a lost response may have hidden a launch).
    pub fn abandon_launch(&mut self, machine_id: &str, why: &str) {
        if let Some(m) = self.machines.get_mut(machine_id) {
            m.state = MachineState::Terminating;
            m.terminate_reason = Some(TerminateReason::Broken);
            m.note = Some(why.to_owned());
        }
    }

    /// Shutdown with `on_shutdown = "terminate"`: every unleased machine with an instance
    /// goes; leased ones finish their jobs. Returns their instance ids.
    pub fn terminate_unleased(&mut self) -> Vec<String> {
        let mut ids = Vec::new();
        for m in self.machines.values_mut() {
            if matches!(
                m.state,
                MachineState::Idle
                    | MachineState::Booting
                    | MachineState::Broken
                    | MachineState::Stopping
                    | MachineState::Stopped
                    | MachineState::Starting
            ) && !m.instance_id.is_empty()
            {
                m.state = MachineState::Terminating;
                m.terminate_reason = Some(TerminateReason::Shutdown);
                ids.push(m.instance_id.clone());
            }
        }
        ids
    }

    /// A lease as the journal recorded it (replayed when the state is loaded).
    pub fn restore_lease(&mut self, lease: &LeaseRecord) {
        if let Some(m) = self.machines.get_mut(&lease.machine_id) {
            m.state = MachineState::Leased;
            if !m.leases.contains(&lease.lease_id) {
                m.leases.push(lease.lease_id.clone());
            }
        }
        self.leases.insert(lease.lease_id.clone(), lease.clone());
    }

    /// Takes back a lease that could not be made durable (its journal record failed): the
    /// machine is idle again, as if the lease had never been granted.
    pub fn undo_lease(&mut self, lease_id: &str) {
        let Some(l) = self.leases.remove(lease_id) else {
            return;
        };
        if let Some(m) = self.machines.get_mut(&l.machine_id) {
            if let Some(at) = m.leases.iter().position(|x| x == lease_id) {
                m.leases.remove(at);
                if m.leases.is_empty() {
                    m.state = MachineState::Idle;
                }
            }
        }
    }

    /// A job asked for a machine of `class` at `now`: the forecast learns from it.
    pub fn record_arrival(&mut self, class: &str, now: DateTime<Utc>) {
        self.history.record(class, now);
    }

    /// The images a job of `class` ran, as its cleanup reported them.
    pub fn record_images(&mut self, class: &str, images: &[String], now: DateTime<Utc>) {
        self.images.record(class, images, now);
    }

    /// The `n` images of `class` a new machine should pull, most used first.
    pub fn images_to_prefetch(&self, class: &str, n: usize, now: DateTime<Utc>) -> Vec<String> {
        self.images.top(class, n, now)
    }

    /// Drops the record of a machine EC2 no longer has (terminated, or a launch that never
    /// ran). Returns whether there was one.
    pub fn forget(&mut self, machine_id: &str) -> bool {
        self.machines.remove(machine_id).is_some()
    }

    /// What a listing says of a machine whose launch response was lost (a crash between
    /// record and launch, a timeout): its instance id and private address, where the
    /// record has none yet.
    pub fn fill_in_instance(&mut self, machine_id: &str, instance_id: &str, address: Option<&str>) {
        let Some(m) = self.machines.get_mut(machine_id) else {
            return;
        };
        if m.instance_id.is_empty() {
            m.instance_id = instance_id.to_owned();
        }
        if let (true, Some(address)) = (m.address.is_empty(), address) {
            m.address = address.to_owned();
        }
    }

    /// Records an instance adopted without a record (`flotilla daemon --adopt`): held
    /// `Leased` with no lease, so it is never handed to a job nor terminated by the plan,
    /// until it is drained (see [`crate::observe::adopt`]).
    pub fn adopt(&mut self, found: Adopted, now: DateTime<Utc>) {
        let mut m = Machine::booting(
            found.machine_id,
            found.class,
            found.instance_type,
            found.launched_at,
        );
        m.instance_id = found.instance_id;
        m.address = found.address;
        m.state = MachineState::Leased;
        m.idle_since = now;
        m.adopted_at = Some(now);
        m.note = Some(
            "adopted after an unreadable pool state: drained (never leased), terminated once no job runs on it"
                .into(),
        );
        self.machines.insert(m.id.clone(), m);
    }

    /// Terminates an adopted machine that is drained (reason `drained`, `why` as its note).
    /// Only an adopted machine still held for draining changes; returns whether it did.
    pub fn retire_adopted(&mut self, machine_id: &str, why: String) -> bool {
        match self.machines.get_mut(machine_id) {
            Some(m)
                if m.adopted_at.is_some()
                    && m.state == MachineState::Leased
                    && m.leases.is_empty() =>
            {
                m.state = MachineState::Terminating;
                m.terminate_reason = Some(TerminateReason::Drained);
                m.note = Some(why);
                true
            }
            _ => false,
        }
    }

    /// Test scaffolding: puts a machine in any state straight into the pool.
    #[cfg(test)]
    pub(crate) fn insert_for_test(&mut self, m: Machine) {
        self.machines.insert(m.id.clone(), m);
    }

    /// Test scaffolding: `n` acquire requests waiting for `class`.
    #[cfg(test)]
    pub(crate) fn set_waiting_for_test(&mut self, class: &str, n: u32) {
        self.waiting.insert(class.to_owned(), n);
    }

    /// Test scaffolding: a machine to edit in place.
    #[cfg(test)]
    pub(crate) fn machine_mut_for_test(&mut self, machine_id: &str) -> Option<&mut Machine> {
        self.machines.get_mut(machine_id)
    }

    /// Jobs running on the class's machines: the leases they hold, several per machine
    /// with `jobs_per_machine`.
    pub fn jobs_on(&self, class: &str) -> u32 {
        self.machines
            .values()
            .filter(|m| m.class == class)
            .map(|m| m.leases.len() as u32)
            .sum()
    }

    pub fn count(&self, class: &str, state: MachineState) -> u32 {
        self.machines
            .values()
            .filter(|m| m.class == class && m.state == state)
            .count() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap()
    }

    fn idle(pool: &mut Pool, id: &str, since: i64) {
        let mut m = Machine::booting(id.into(), "c".into(), "t3.micro".into(), t(0));
        m.instance_id = format!("i-{id}");
        pool.machines.insert(id.into(), m);
        assert!(pool.mark_ready(id, t(since)));
    }

    fn slots(n: u32) -> LeaseTerms {
        LeaseTerms {
            slots: n,
            ..LeaseTerms::default()
        }
    }

    fn lease_on(pool: &mut Pool, job: &str, n: u32, at: i64) -> Option<String> {
        pool.try_lease_with_terms(job, "c", format!("l-{job}"), slots(n), t(at))
            .map(|l| l.machine_id.clone())
    }

    #[test]
    fn with_slots_jobs_fill_a_busy_machine_before_an_idle_one() {
        let mut pool = Pool::default();
        idle(&mut pool, "a", 0);
        idle(&mut pool, "b", 5);
        assert_eq!(lease_on(&mut pool, "j1", 2, 10).as_deref(), Some("b"));
        // b has a slot left: the next job shares it, and a stays idle.
        assert_eq!(lease_on(&mut pool, "j2", 2, 11).as_deref(), Some("b"));
        assert_eq!(lease_on(&mut pool, "j3", 2, 12).as_deref(), Some("a"));
        assert_eq!(pool.machine("b").unwrap().leases, ["l-j1", "l-j2"]);
        // One job per machine never shares.
        assert_eq!(lease_on(&mut pool, "j4", 1, 13), None);
        // The machine is leased while any of its jobs runs, idle after the last.
        pool.release("l-j1", ReleaseOutcome::Healthy, None, t(20));
        let b = pool.machine("b").unwrap();
        assert_eq!(
            (b.state, b.builds, b.idle_since),
            (MachineState::Leased, 1, t(5))
        );
        pool.release("l-j2", ReleaseOutcome::Healthy, None, t(30));
        let b = pool.machine("b").unwrap();
        assert_eq!(
            (b.state, b.builds, b.idle_since),
            (MachineState::Idle, 2, t(30))
        );
    }

    #[test]
    fn a_shared_machine_one_job_reports_broken_takes_no_new_job_and_breaks_after_the_others() {
        let mut pool = Pool::default();
        idle(&mut pool, "a", 0);
        idle(&mut pool, "b", 0);
        assert_eq!(lease_on(&mut pool, "j1", 3, 1).as_deref(), Some("b"));
        lease_on(&mut pool, "j2", 3, 1);
        pool.release(
            "l-j1",
            ReleaseOutcome::Broken,
            Some("disk gone".into()),
            t(2),
        );
        // j2 is not failed for what j1 reported; no new job joins it.
        let b = pool.machine("b").unwrap();
        assert_eq!(b.state, MachineState::Leased);
        assert_eq!(pool.lease("l-j2").unwrap().lost, None);
        assert_eq!(lease_on(&mut pool, "j3", 3, 3).as_deref(), Some("a"));
        // Broken once j2 ends, healthy as j2 found it: never leased again.
        pool.release("l-j2", ReleaseOutcome::Healthy, None, t(4));
        let b = pool.machine("b").unwrap();
        assert_eq!(
            (b.state, b.note.as_deref()),
            (MachineState::Broken, Some("disk gone"))
        );
        assert_eq!(pool.casualties_to_report(t(5)).len(), 1);
    }

    #[test]
    fn an_abandoned_lease_on_a_shared_machine_leaves_its_other_jobs_running() {
        let mut pool = Pool::default();
        idle(&mut pool, "a", 0);
        let terms = |secs| LeaseTerms {
            expires_after_secs: Some(secs),
            slots: 2,
            ..LeaseTerms::default()
        };
        pool.try_lease_with_terms("j1", "c", "l1".into(), terms(60), t(0));
        pool.try_lease_with_terms("j2", "c", "l2".into(), terms(600), t(0));
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(pool.expire_leases(t(60), day), ["l1".to_string()]);
        let a = pool.machine("a").unwrap();
        assert_eq!(
            (a.state, a.leases.clone()),
            (MachineState::Leased, vec!["l2".to_string()])
        );
        assert!(pool.lease("l1").unwrap().lost.is_some());
        assert_eq!(pool.lease("l2").unwrap().lost, None);
        // The last job's end breaks it (its state after an abandoned job is unknown).
        pool.release("l2", ReleaseOutcome::Healthy, None, t(100));
        assert_eq!(pool.machine("a").unwrap().state, MachineState::Broken);
    }

    #[test]
    fn a_lease_undone_on_a_shared_machine_leaves_the_others() {
        let mut pool = Pool::default();
        idle(&mut pool, "a", 0);
        lease_on(&mut pool, "j1", 2, 1);
        lease_on(&mut pool, "j2", 2, 1);
        pool.undo_lease("l-j2");
        let a = pool.machine("a").unwrap();
        assert_eq!(
            (a.state, a.leases.clone()),
            (MachineState::Leased, vec!["l-j1".to_string()])
        );
        pool.undo_lease("l-j1");
        assert_eq!(pool.machine("a").unwrap().state, MachineState::Idle);
    }

    #[test]
    fn state_files_from_before_slots_load_their_single_lease() {
        let mut pool = Pool::default();
        idle(&mut pool, "a", 0);
        lease_on(&mut pool, "j1", 1, 1);
        let mut json = serde_json::to_value(&pool).unwrap();
        let m = &mut json["machines"]["a"];
        assert_eq!(m["leases"], serde_json::json!(["l-j1"]));
        let obj = m.as_object_mut().unwrap();
        obj.remove("leases");
        obj.insert("lease_id".into(), "l-j1".into());
        let old: Pool = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(old.machine("a").unwrap().leases, ["l-j1"]);
        json["machines"]["a"]["lease_id"] = serde_json::Value::Null;
        let old: Pool = serde_json::from_value(json).unwrap();
        assert!(old.machine("a").unwrap().leases.is_empty());
    }

    #[test]
    fn a_lease_expires_after_its_jobs_own_time_not_the_default() {
        let mut pool = Pool::default();
        idle(&mut pool, "a", 0);
        idle(&mut pool, "b", 0);
        let terms = |secs| LeaseTerms {
            secret_hash: secret_hash("s"),
            expires_after_secs: secs,
            slots: 1,
        };
        pool.try_lease_with_terms("job-1", "c", "l1".into(), terms(Some(600)), t(0))
            .unwrap();
        pool.try_lease_with_terms("job-2", "c", "l2".into(), terms(None), t(0))
            .unwrap();
        let day = std::time::Duration::from_secs(86_400);
        assert!(pool.expire_leases(t(599), day).is_empty());
        assert_eq!(pool.expire_leases(t(600), day), vec!["l1".to_string()]);
        assert!(pool.expire_leases(t(86_399), day).is_empty());
        assert_eq!(pool.expire_leases(t(86_400), day), vec!["l2".to_string()]);
    }

    #[test]
    fn only_the_secret_a_lease_was_granted_with_opens_it() {
        let mut pool = Pool::default();
        idle(&mut pool, "a", 0);
        let terms = LeaseTerms {
            secret_hash: secret_hash("right"),
            expires_after_secs: None,
            slots: 1,
        };
        let lease = pool
            .try_lease_with_terms("job-1", "c", "l1".into(), terms, t(0))
            .unwrap();
        assert!(lease.accepts(Some("right")));
        assert!(!lease.accepts(Some("wrong")));
        assert!(!lease.accepts(None));
    }

    #[test]
    fn lease_prefers_most_recently_idle_machine() {
        let mut pool = Pool::default();
        idle(&mut pool, "a", 10);
        idle(&mut pool, "b", 20);
        let lease = pool.try_lease("job-1", "c", "l1".into(), t(30)).unwrap();
        assert_eq!(lease.machine_id, "b");
        assert_eq!(pool.machines["b"].state, MachineState::Leased);
    }

    #[test]
    fn broken_machine_is_never_leased_again() {
        let mut pool = Pool::default();
        idle(&mut pool, "a", 10);
        pool.try_lease("job-1", "c", "l1".into(), t(30)).unwrap();
        assert!(pool.release(
            "l1",
            ReleaseOutcome::Broken,
            Some("docker died".into()),
            t(40)
        ));
        assert!(pool.try_lease("job-2", "c", "l2".into(), t(50)).is_none());
        assert_eq!(pool.machines["a"].state, MachineState::Broken);
    }

    #[test]
    fn release_is_idempotent_and_counts_builds() {
        let mut pool = Pool::default();
        idle(&mut pool, "a", 10);
        pool.try_lease("job-1", "c", "l1".into(), t(30)).unwrap();
        assert!(pool.release("l1", ReleaseOutcome::Healthy, None, t(40)));
        assert!(!pool.release("l1", ReleaseOutcome::Healthy, None, t(41)));
        assert_eq!(pool.machines["a"].builds, 1);
        assert_eq!(pool.machines["a"].idle_since, t(40));
    }

    #[test]
    fn losing_a_leased_machine_marks_its_lease_lost() {
        let mut pool = Pool::default();
        idle(&mut pool, "a", 10);
        pool.try_lease("job-1", "c", "l1".into(), t(30)).unwrap();
        pool.mark_broken("a", "instance terminated outside flotilla");
        assert!(pool.leases["l1"].lost.is_some());
        assert_eq!(pool.lease_for_job("job-1").unwrap().lease_id, "l1");
    }

    /// Every way into `Broken` (lost, unanswered checks, expired lease, a job's broken
    /// release) queues the machine once for its report; a second mark does not.
    #[test]
    fn every_broken_machine_is_queued_once_for_its_report() {
        let mut pool = Pool::default();
        idle(&mut pool, "a", 10);
        pool.try_lease("job-1", "c", "l1".into(), t(30)).unwrap();
        pool.mark_broken("a", "instance terminated outside flotilla");
        pool.mark_broken("a", "again");
        idle(&mut pool, "b", 10);
        pool.try_lease("job-2", "c", "l2".into(), t(31)).unwrap();
        pool.release("l2", ReleaseOutcome::Broken, None, t(40));
        let taken = pool.casualties_to_report(t(41));
        let ids: Vec<(&str, &str)> = taken
            .iter()
            .map(|c| (c.machine_id.as_str(), c.why.as_str()))
            .collect();
        assert_eq!(
            ids,
            vec![
                ("a", "instance terminated outside flotilla"),
                ("b", "reported broken by a job")
            ]
        );
        assert!(taken.iter().all(|c| c.at == Some(t(41))));
        assert!(
            pool.casualties_to_report(t(42)).is_empty(),
            "handed out once"
        );
        for i in 0..100 {
            idle(&mut pool, &format!("m{i}"), 10);
            pool.mark_broken(&format!("m{i}"), "x");
        }
        let taken = pool.casualties_to_report(t(43));
        assert_eq!(taken.len(), MAX_CASUALTIES);
        assert_eq!(taken.last().unwrap().machine_id, "m99", "the newest kept");
    }

    #[test]
    fn a_casualty_stays_in_the_state_until_reported_and_is_reported_again_after_a_restart() {
        let mut pool = Pool::default();
        idle(&mut pool, "a", 10);
        idle(&mut pool, "b", 10);
        pool.mark_broken("a", "lost");
        pool.mark_broken("b", "lost");
        assert_eq!(pool.casualties_to_report(t(50)).len(), 2);
        pool.casualty_reported("b");
        // The daemon dies with a's report under way: the state it left still holds a,
        // with the time of the verdict's first report.
        let saved = serde_json::to_string(&pool).unwrap();
        let mut restarted: Pool = serde_json::from_str(&saved).unwrap();
        let again = restarted.casualties_to_report(t(90));
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].machine_id, "a");
        assert_eq!(
            again[0].at,
            Some(t(50)),
            "the report keeps its original time"
        );
        restarted.casualty_reported("a");
        let empty = serde_json::to_value(&restarted).unwrap();
        assert!(empty.get("casualties").is_none(), "{empty}");
    }

    #[test]
    fn abandoned_lease_expires_and_its_machine_is_not_reused() {
        let mut pool = Pool::default();
        idle(&mut pool, "a", 10);
        pool.try_lease("job-1", "c", "l1".into(), t(30)).unwrap();
        let day = std::time::Duration::from_secs(86_400);
        assert!(pool.expire_leases(t(30 + 86_399), day).is_empty());
        assert_eq!(pool.expire_leases(t(30 + 86_400), day), vec!["l1"]);
        assert_eq!(pool.machines["a"].state, MachineState::Broken);
        assert!(pool.leases["l1"].lost.is_some());
        assert!(
            pool.expire_leases(t(30 + 90_000), day).is_empty(),
            "expired once"
        );
    }

    /// Server certificates live 30 days from launch and validation keeps `max_age` plus
    /// `lease_timeout` inside that; the plan retires a stopped machine at `max_age` since
    /// its launch, so the stopped period itself never outlives the certificate (dockerd
    /// does not even serve it while stopped). The gap: a machine started just before its
    /// `max_age` answers just after it, and a lease granted then would run up to
    /// `lease_timeout` past `max_age + boot_timeout`. So a machine that answers past its
    /// `max_age` is retired in the same critical section, never idle.
    #[test]
    fn a_started_machine_answering_past_max_age_is_retired_not_idle() {
        let mut pool = Pool::default();
        idle(&mut pool, "a", 0);
        assert!(pool.begin_stop("a", t(10)));
        assert!(pool.mark_stopped("a"));
        let max_age = |m: &Machine| {
            ((m.launched_at + chrono::Duration::seconds(100)) <= t(100))
                .then_some(TerminateReason::MaxAge)
        };
        assert!(pool.begin_start("a", t(99)));
        assert!(!pool.mark_ready_retiring("a", t(100), max_age));
        assert_eq!(pool.machines["a"].state, MachineState::Terminating);
        assert_eq!(
            pool.machines["a"].terminate_reason,
            Some(TerminateReason::MaxAge)
        );
        assert!(pool.try_lease("job", "c", "l1".into(), t(100)).is_none());
        // Younger: idle as usual.
        idle(&mut pool, "b", 0);
        assert!(pool.begin_stop("b", t(10)));
        assert!(pool.mark_stopped("b"));
        assert!(pool.begin_start("b", t(20)));
        assert!(pool.mark_ready_retiring("b", t(30), |_| None));
        assert_eq!(pool.machines["b"].state, MachineState::Idle);
    }

    #[test]
    fn other_class_is_not_leased() {
        let mut pool = Pool::default();
        idle(&mut pool, "a", 10);
        assert!(pool
            .try_lease("job-1", "other", "l1".into(), t(30))
            .is_none());
    }
}
