//! [`Shared`]: what the daemon's tasks (reconcile loop, probes, health watcher, control
//! API, certificate renewal) hold in common: the config and policy, the pool behind one
//! short synchronous lock, its persistence, the edges (EC2, the machines' dockerd) and the
//! notifications between the tasks. Its own module so the tasks depend on it and
//! `daemon/mod.rs`, which wires them up, depends on them: no cycle.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use flotilla_proto::config::Config;
use tokio::sync::{watch, Notify};

use super::class_status;
use super::clock::Clock;
use super::machine_api::MachineApi;
use super::postmortem::Postmortems;
use crate::ec2::Ec2Api;
use crate::metrics::Metrics;
use crate::pki::FleetCa;
use crate::plan::Policy;
use crate::pool::Pool;
use crate::state_store::StateStore;

pub(crate) struct Shared {
    pub config: Config,
    pub policy: Policy,
    pool: Mutex<Pool>,
    store: StateStore,
    /// Pool changed in a way a waiting acquire may care about.
    pub changed: Notify,
    /// Something the reconcile loop should act on without waiting for its next tick.
    pub wake: Notify,
    pub ca: FleetCa,
    pub ec2: Arc<dyn Ec2Api>,
    /// The machines' dockerd, as the daemon itself calls it (probes, health checks).
    pub machines: Arc<dyn MachineApi>,
    /// Where "now" comes from (the system clock; tokio's paused clock in tests).
    pub clock: Clock,
    pub(super) probing: Mutex<HashSet<String>>,
    pub(super) launch_backoff: Mutex<HashMap<String, class_status::LaunchBackoff>>,
    pub metrics: Arc<Metrics>,
    /// Fleet-tagged instances unknown to the pool, by instance id.
    pub unknown: Mutex<BTreeMap<String, UnknownInstance>>,
    /// What makes an unknown instance ours to reap: this daemon's persistent id (tagged
    /// `flotilla:daemon` at launch) and the configured subnets.
    pub ownership: crate::observe::Ownership,
    /// `--adopt` after an unreadable state: the first successful observation adopts the
    /// fleet's instances instead of treating them as orphans (see [`crate::observe::adopt`]).
    pub adopting: AtomicBool,
    /// Becomes true at shutdown: waiting acquires give up at once (so shutdown is not held
    /// up by requests that may wait for hours).
    pub stop: watch::Receiver<bool>,
    /// The daemon's own effective uid: with root, the only callers of operator routes.
    pub uid: u32,
    /// Reconcile passes completed (shown by `status`).
    pub passes: std::sync::atomic::AtomicU64,
    /// The next reconcile pass observes EC2 whatever its interval (set after a start: the
    /// started machine is probed at the address the listing gives it).
    pub observe_soon: AtomicBool,
    /// Saves each machine marked broken or lost (see [`Shared::update`]).
    pub(super) postmortems: Arc<Postmortems>,
}

/// What the daemon is built from once its state, CA and EC2 client are loaded.
pub(crate) struct Parts {
    pub config: Config,
    pub pool: Pool,
    pub store: StateStore,
    pub ca: FleetCa,
    pub ec2: Arc<dyn Ec2Api>,
    pub machines: Arc<dyn MachineApi>,
    pub clock: Clock,
    pub metrics: Arc<Metrics>,
    pub daemon_id: String,
    pub adopting: bool,
    pub stop: watch::Receiver<bool>,
}

impl Shared {
    pub(crate) fn new(p: Parts) -> Self {
        Self {
            postmortems: Arc::new(Postmortems::new(
                &p.config,
                p.ec2.clone(),
                p.machines.clone(),
            )),
            policy: Policy::from_config(&p.config),
            ownership: ownership(&p.config, p.daemon_id),
            config: p.config,
            pool: Mutex::new(p.pool),
            store: p.store,
            changed: Notify::new(),
            wake: Notify::new(),
            ca: p.ca,
            ec2: p.ec2,
            machines: p.machines,
            clock: p.clock,
            probing: Mutex::new(HashSet::new()),
            launch_backoff: Mutex::new(HashMap::new()),
            metrics: p.metrics,
            unknown: Mutex::new(BTreeMap::new()),
            adopting: AtomicBool::new(p.adopting),
            stop: p.stop,
            uid: nix::unistd::geteuid().as_raw(),
            passes: std::sync::atomic::AtomicU64::new(0),
            observe_soon: AtomicBool::new(false),
        }
    }
}

/// An instance carrying this fleet's tag that the pool does not know: its
/// `flotilla:machine` tag, and when it was first seen (the orphan grace runs from there).
#[derive(Debug, Clone)]
pub(crate) struct UnknownInstance {
    /// Its `flotilla:machine` tag.
    pub machine_id: Option<String>,
    pub first_seen: DateTime<Utc>,
    /// Why it is not ours to terminate (another daemon's, outside our subnets): reported
    /// by `flotilla audit`, never reaped. `None`: an orphan, reaped past the grace.
    pub not_ours: Option<String>,
}

/// Ownership of unknown instances for `config` and `daemon_id` (see [`Shared::ownership`]).
fn ownership(config: &Config, daemon_id: String) -> crate::observe::Ownership {
    crate::observe::Ownership {
        fleet: config.fleet.clone(),
        daemon_id,
        subnets: config
            .classes
            .values()
            .flat_map(|c| c.subnets.iter().cloned())
            .collect(),
    }
}

impl Shared {
    /// Why machine `m` must take no further job at `now` (its class's `max_builds`,
    /// `max_age`), if it must not.
    pub(crate) fn retire_reason(
        &self,
        m: &crate::pool::Machine,
        now: DateTime<Utc>,
    ) -> Option<crate::pool::TerminateReason> {
        self.policy
            .classes
            .get(&m.class)
            .and_then(|c| c.retire_reason(m, now))
    }

    /// The daemon's notion of now (see [`Clock`]).
    pub(crate) fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    pub(crate) fn pool(&self) -> MutexGuard<'_, Pool> {
        // A panic while holding the lock cannot leave the pool half-updated in a way
        // worse than stopping the daemon would; keep serving.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a change to the pool and returns the generation to persist.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut Pool) -> R) -> (R, u64) {
        let mut pool = self.pool();
        let r = f(&mut pool);
        let now = self.now();
        self.postmortems.submit(pool.casualties_to_report(now), now);
        (r, self.store.bump())
    }

    /// Runs `f` on the pool and journals the operation it returns, under one lock hold;
    /// returns once the record is on disk (flushed after the lock is released, so
    /// concurrent operations share a flush). On error the operation must not be
    /// acknowledged (and its change to the pool undone).
    pub(crate) fn update_journaled<R>(
        &self,
        f: impl FnOnce(&mut Pool) -> (R, Option<crate::state_store::JournalOp>),
    ) -> Result<R, crate::state_store::StoreError> {
        let (r, written) = {
            let mut pool = self.pool();
            let (r, op) = f(&mut pool);
            let now = self.now();
            self.postmortems.submit(pool.casualties_to_report(now), now);
            let written = match op {
                Some(op) => Some(self.store.append(&op)?),
                None => None,
            };
            (r, written)
        };
        if let Some(written) = written {
            blocking(|| self.store.flush(written))?;
        }
        Ok(r)
    }

    /// Writes a snapshot including generation `gen` (fsynced, atomic rename, the previous
    /// one kept); failures are logged (the next change retries).
    pub(crate) async fn commit(&self, gen: u64) -> bool {
        match self.store.persist(&self.pool, gen).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "could not persist pool state");
                false
            }
        }
    }

    /// [`Shared::commit`], named where durability is the point (launches, terminations).
    /// Every snapshot is fsynced.
    pub(crate) async fn commit_durable(&self, gen: u64) -> bool {
        self.commit(gen).await
    }

    /// Forgets the casualties whose report finished, and persists that: until then a
    /// restart makes their reports again (see [`Postmortems`]).
    pub(crate) async fn settle_reports(&self) {
        let finished = self.postmortems.take_finished();
        if finished.is_empty() {
            return;
        }
        let gen = self
            .update(|pool| {
                for id in &finished {
                    pool.casualty_reported(id);
                }
            })
            .1;
        self.commit(gen).await;
    }
}

/// Runs blocking `f` (a disk flush) from async code: on the multi-threaded runtime the
/// worker hands its other tasks over first, elsewhere (tests) it just blocks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Random ids: machine ids name machines in DNS, so lowercase letters and digits only.
pub(crate) fn new_id(prefix: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let tail: String = (0..12)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{tail}")
}
