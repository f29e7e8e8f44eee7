//! Boot probes: a booting machine becomes idle the moment its dockerd answers `/_ping`
//! over mutual TLS (and its class's `ready_command`, if any, passed). Polls with a short
//! capped backoff (no fixed sleeps); past the class's boot timeout the probe gives up and
//! the plan replaces the machine; a failed ready command marks the boot failed at once,
//! and the plan replaces it the same way. A stopped machine that was started is probed
//! the same way (same certificate, the address the last listing gave), its boot timeout
//! counted from its start; one that answers past its `max_age` is retired, not idle.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::api::MachineState;

use super::Shared;

const FIRST_DELAY: Duration = Duration::from_millis(50);
const MAX_DELAY: Duration = Duration::from_millis(500);

/// Starts probes for machines left booting by a previous daemon.
pub(super) fn resume(shared: &Arc<Shared>) {
    let ids: Vec<String> = shared
        .pool()
        .machines()
        .values()
        .filter(|m| m.state == MachineState::Booting && !m.address.is_empty())
        .map(|m| m.id.clone())
        .collect();
    for id in ids {
        spawn(shared.clone(), id);
    }
}

pub(super) fn spawn(shared: Arc<Shared>, machine_id: String) {
    {
        let mut probing = shared.probing.lock().unwrap_or_else(|p| p.into_inner());
        if !probing.insert(machine_id.clone()) {
            return;
        }
    }
    tokio::spawn(async move {
        run(&shared, &machine_id).await;
        shared
            .probing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&machine_id);
    });
}

/// Whether a machine in `state` is waiting for its probe.
fn coming_up(state: MachineState) -> bool {
    matches!(state, MachineState::Booting | MachineState::Starting)
}

async fn run(shared: &Arc<Shared>, machine_id: &str) {
    let Some((since, deadline, class, starting)) = ({
        let pool = shared.pool();
        pool.machines().get(machine_id).and_then(|m| {
            let timeout = shared.policy.classes.get(&m.class)?.boot_timeout;
            let starting = m.state == MachineState::Starting;
            let since = match m.started_at {
                Some(t) if starting => t,
                _ => m.launched_at,
            };
            Some((
                since,
                super::saturating_add(since, timeout),
                m.class.clone(),
                starting,
            ))
        })
    }) else {
        return;
    };
    let mut delay = FIRST_DELAY;
    let mut last_error;
    loop {
        // Read each time: a listing may give a started machine a new address meanwhile.
        let Some(address) = shared
            .pool()
            .machines()
            .get(machine_id)
            .filter(|m| coming_up(m.state))
            .map(|m| m.address.clone())
        else {
            return;
        };
        let ping = tokio::time::timeout(
            super::machine_api::CALL_TIMEOUT,
            shared.machines.ping(machine_id, &address),
        );
        match ping.await.unwrap_or_else(|_| Err("no answer".into())) {
            Ok(()) => {
                if let Err(why) = check_ready(shared, machine_id, &address, &class, deadline).await
                {
                    let gen = shared.update(|p| p.fail_boot(machine_id, &why)).1;
                    shared.commit(gen).await;
                    tracing::warn!(machine = machine_id, %address, class = %class, error = %why, "machine failed its ready_command: a failed boot, replaced");
                    shared.wake.notify_one();
                    return;
                }
                let now = shared.now();
                let ((ready, retired), gen) = shared.update(|p| {
                    let ready =
                        p.mark_ready_retiring(machine_id, now, |m| shared.retire_reason(m, now));
                    let retired = !ready
                        && p.machine(machine_id)
                            .is_some_and(|m| m.state == MachineState::Terminating);
                    (ready, retired)
                });
                shared.commit(gen).await;
                let ms = (now - since).num_milliseconds();
                if ready && starting {
                    tracing::info!(machine = machine_id, %address, start_ms = ms, "started machine ready");
                } else if ready {
                    shared.metrics.boot_time.observe(ms as f64 / 1000.0);
                    tracing::info!(machine = machine_id, %address, boot_ms = ms, "machine ready");
                } else if retired {
                    tracing::info!(machine = machine_id, %address, "machine answered past its max_age; retired instead of idle");
                }
                if ready {
                    // Launched or started: the class's most used images, while it is idle.
                    super::prefetch::spawn(shared, machine_id, &address, &class);
                }
                shared.changed.notify_waiters();
                shared.wake.notify_one();
                return;
            }
            Err(e) => last_error = e,
        }
        if shared.now() >= deadline {
            tracing::warn!(machine = machine_id, %address, error = %last_error, "machine did not answer within its boot timeout");
            shared.wake.notify_one();
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_DELAY);
    }
}

/// The class's `ready_command` on a machine whose dockerd answers, within its own timeout
/// and what is left of the boot timeout; `Ok` without one.
async fn check_ready(
    shared: &Arc<Shared>,
    machine_id: &str,
    address: &str,
    class: &str,
    deadline: chrono::DateTime<chrono::Utc>,
) -> Result<(), String> {
    let Some(cmd) = shared
        .config
        .classes
        .get(class)
        .and_then(|c| c.ready_command.as_ref())
    else {
        return Ok(());
    };
    let left = (deadline - shared.now()).to_std().unwrap_or_default();
    let timeout = cmd.timeout.map_or(left, |t| t.0.min(left));
    if timeout.is_zero() {
        return Err("no time left within boot_timeout for ready_command".into());
    }
    let started = std::time::Instant::now();
    let run = shared
        .machines
        .ready_command(machine_id, address, cmd, timeout)
        .await;
    if let Ok(r) = &run {
        tracing::info!(
            machine = machine_id,
            exit_code = r.exit_code,
            run_ms = started.elapsed().as_millis() as u64,
            "ready_command ran"
        );
    }
    super::ready::verdict(&run)
}

/// Consecutive failed pings before an unleased machine is declared lost.
const HEALTH_FAILURES: u32 = 3;

/// Bound on one health check (the ping's own timeout, plus the adopted machines' list).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Health checks in flight at once: one slow machine costs one slot for one timeout.
const CHECKS_AT_ONCE: usize = 64;

/// Shortest pause between health rounds, whatever is configured.
const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(100);

/// What the health watcher does about a machine after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HealthAction {
    /// Nothing (healthy, or not yet enough misses).
    Keep,
    /// Mark it broken: never leased again, replaced.
    MarkLost,
    /// Unhealthy but leased: leave it to its job (whose Docker calls fail if the machine
    /// is really gone) and to EC2 observation, so a network blip never kills a running job.
    Tolerate,
}

/// The health watcher's decision for a machine that has failed its last
/// `consecutive_failures` checks (0: its last check passed). Pure.
pub(super) fn health_action(leased: bool, consecutive_failures: u32) -> HealthAction {
    if consecutive_failures < HEALTH_FAILURES {
        HealthAction::Keep
    } else if leased {
        HealthAction::Tolerate
    } else {
        HealthAction::MarkLost
    }
}

/// How old a lease must be before the health watcher looks for its job's containers and
/// network: prepare creates the network while it pulls, but only after its lease arrived.
pub(super) const LEASE_RECLAIM_GRACE: Duration = Duration::from_secs(600);

/// What the health watcher does about a lease after listing its job's containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LeaseAction {
    Keep,
    /// The job's containers are gone (its cleanup removed them, but its release never
    /// reached the daemon): release the lease as healthy.
    Reclaim,
}

/// The decision for a lease `age` old whose machine has `containers` job containers now,
/// `empty_before` telling whether the previous check found none too. Pure.
pub(super) fn lease_action(age: Duration, containers: usize, empty_before: bool) -> LeaseAction {
    if age >= LEASE_RECLAIM_GRACE && containers == 0 && empty_before {
        LeaseAction::Reclaim
    } else {
        LeaseAction::Keep
    }
}

/// Whether a check's finding counts as "no containers" for the next check's
/// `empty_before`. Pure.
fn lease_empty(age: Duration, containers: usize) -> bool {
    age >= LEASE_RECLAIM_GRACE && containers == 0
}

/// What one health check does on a machine.
#[derive(Debug, Clone)]
enum Check {
    Ping,
    /// Adopted without a lease: count all job containers (drain check).
    Adopted,
    /// Leases past [`LEASE_RECLAIM_GRACE`] (one per job on the machine): count each
    /// job's containers.
    Leases(Vec<LeaseCheck>),
}

/// A lease old enough to be checked for its job's containers.
#[derive(Debug, Clone)]
struct LeaseCheck {
    lease_id: String,
    job_key: String,
    age: Duration,
}

/// Pings every idle and leased machine each `health_interval`, concurrently, each check
/// bounded by [`CHECK_TIMEOUT`]. An unleased machine whose dockerd stops answering three
/// times in a row (spot reclaim, crash) is marked broken: never leased again, replaced. A
/// leased machine is not: its job's own Docker calls fail if the machine is gone (the
/// stages then report it lost) and EC2 observation catches a terminated instance; a blip
/// must not take a machine from under a running job.
/// Machines adopted after an unreadable state (`--adopt`) are checked by listing their job
/// containers instead, and drained once none are left ([`crate::observe::drain_adopted`]).
/// A lease older than [`LEASE_RECLAIM_GRACE`] is checked by listing its job's containers:
/// none on two checks in a row means the job's cleanup ran but its release never reached
/// the daemon, and the lease is released as healthy ([`lease_action`]).
pub(super) async fn watch_health(
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut failures: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    // Leases whose last check found no job containers.
    let mut empty_leases: std::collections::HashSet<String> = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(shared.config.health_interval.0.max(MIN_HEALTH_INTERVAL)) => {}
            _ = stop.changed() => return,
        }
        let now = shared.now();
        let targets: Vec<(String, String, Check)> = {
            let pool = shared.pool();
            pool.machines()
                .values()
                .filter(|m| matches!(m.state, MachineState::Idle | MachineState::Leased))
                .map(|m| {
                    let old: Vec<LeaseCheck> = m
                        .leases
                        .iter()
                        .filter_map(|l| pool.leases().get(l))
                        .filter(|l| l.lost.is_none())
                        .map(|l| LeaseCheck {
                            lease_id: l.lease_id.clone(),
                            job_key: l.job_key.clone(),
                            age: (now - l.acquired_at).to_std().unwrap_or_default(),
                        })
                        .filter(|l| l.age >= LEASE_RECLAIM_GRACE)
                        .collect();
                    let check = if m.leases.is_empty() && m.adopted_at.is_some() {
                        Check::Adopted
                    } else if old.is_empty() {
                        Check::Ping
                    } else {
                        Check::Leases(old)
                    };
                    (m.id.clone(), m.address.clone(), check)
                })
                .collect()
        };
        failures.retain(|id, _| targets.iter().any(|(t, _, _)| t == id));
        empty_leases.retain(|l| {
            targets.iter().any(
                |(_, _, c)| matches!(c, Check::Leases(old) if old.iter().any(|o| &o.lease_id == l)),
            )
        });
        let free = std::sync::Mutex::new(std::collections::HashSet::new());
        // (lease id, age, job containers) of each leased machine checked by listing.
        let lease_counts = std::sync::Mutex::new(Vec::new());
        let pings: Vec<_> = targets
            .iter()
            .cloned()
            .map(|(id, address, check)| {
                let machines = shared.machines.clone();
                let free = &free;
                let lease_counts = &lease_counts;
                let check_id = id.clone();
                let check = async move {
                    match check {
                        Check::Adopted => machines
                            .job_containers(&check_id, &address, None)
                            .await
                            .map(|n| {
                                if n == 0 {
                                    free.lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .insert(check_id.clone());
                                }
                            }),
                        Check::Leases(old) => {
                            for l in old {
                                let n = machines
                                    .job_containers(&check_id, &address, Some(&l.job_key))
                                    .await?;
                                lease_counts
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push((l.lease_id, l.age, n));
                            }
                            Ok(())
                        }
                        Check::Ping => machines.ping(&check_id, &address).await,
                    }
                };
                async move {
                    let r = tokio::time::timeout(CHECK_TIMEOUT, check)
                        .await
                        .unwrap_or_else(|_| {
                            Err(format!("no answer within {}s", CHECK_TIMEOUT.as_secs()))
                        });
                    (id, r)
                }
            })
            .collect();
        use futures_util::StreamExt;
        let results: Vec<_> = futures_util::stream::iter(pings)
            .buffer_unordered(CHECKS_AT_ONCE)
            .collect()
            .await;
        let mut lost = Vec::new();
        for (id, result) in results {
            match result {
                Ok(()) => {
                    failures.remove(&id);
                }
                Err(e) => {
                    let n = failures.entry(id.clone()).or_default();
                    *n = n.saturating_add(1);
                    let leased = shared
                        .pool()
                        .machines()
                        .get(&id)
                        .is_some_and(|m| !m.leases.is_empty());
                    match health_action(leased, *n) {
                        HealthAction::Tolerate => {
                            tracing::warn!(machine = %id, failures = *n, error = %e, "leased machine did not answer its health check; left to its job and to EC2 observation")
                        }
                        _ => {
                            tracing::warn!(machine = %id, failures = *n, error = %e, "machine did not answer its health check")
                        }
                    }
                    if health_action(leased, *n) == HealthAction::MarkLost {
                        lost.push((id, e, *n));
                    }
                }
            }
        }
        let mut reclaim = Vec::new();
        for (lease_id, age, n) in lease_counts.into_inner().unwrap_or_else(|p| p.into_inner()) {
            let empty_before = empty_leases.contains(&lease_id);
            if lease_action(age, n, empty_before) == LeaseAction::Reclaim {
                empty_leases.remove(&lease_id);
                reclaim.push(lease_id);
            } else if lease_empty(age, n) {
                empty_leases.insert(lease_id);
            } else {
                empty_leases.remove(&lease_id);
            }
        }
        for lease_id in reclaim {
            reclaim_lease(&shared, &lease_id).await;
        }
        let free = free.into_inner().unwrap_or_else(|p| p.into_inner());
        if targets
            .iter()
            .any(|(_, _, check)| matches!(check, Check::Adopted))
        {
            let lease_timeout = shared.config.lease_timeout.0;
            let (drained, gen) = shared.update(|pool| {
                crate::observe::drain_adopted(pool, &free, shared.now(), lease_timeout)
            });
            if !drained.is_empty() {
                tracing::info!(machines = ?drained, "adopted machines drained; terminating them");
                shared.commit(gen).await;
                shared.wake.notify_one();
            }
        }
        if lost.is_empty() {
            continue;
        }
        let (marked, gen) = shared.update(|pool| {
            let mut marked = 0u64;
            for (id, e, n) in &lost {
                // Decided again under the lock: the machine may have been leased meanwhile.
                let leased = pool
                    .machines()
                    .get(id)
                    .is_some_and(|m| !m.leases.is_empty());
                if health_action(leased, *n) == HealthAction::MarkLost {
                    pool.mark_broken(id, &format!("its Docker daemon stopped answering ({e})"));
                    marked += 1;
                }
            }
            marked
        });
        shared.metrics.lost(marked);
        shared.commit(gen).await;
        shared.changed.notify_waiters();
        shared.wake.notify_one();
    }
}

/// Releases, as healthy, a lease whose job containers are gone, journaled as the API's
/// release is (and retiring a machine at `max_builds` or `max_age` in the same critical
/// section, so no waiter leases it first).
async fn reclaim_lease(shared: &Arc<Shared>, lease_id: &str) {
    use crate::state_store::JournalOp;
    use flotilla_proto::api::ReleaseOutcome;
    let now = shared.now();
    let reason =
        Some("its job's containers are gone; the release never reached the daemon".to_string());
    let released = shared.update_journaled(|pool| {
        let machine = pool.leases().get(lease_id).map(|l| l.machine_id.clone());
        let released = pool.release_retiring(
            lease_id,
            ReleaseOutcome::Healthy,
            reason.clone(),
            now,
            |m| shared.retire_reason(m, now),
        );
        let op = released.then(|| JournalOp::Released {
            lease_id: lease_id.to_owned(),
            outcome: ReleaseOutcome::Healthy,
            reason: reason.clone(),
            at: now,
        });
        ((released, machine), op)
    });
    let (released, machine) = match released {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "could not journal a reclaimed lease; writing a snapshot");
            let gen = shared.update(|_| ()).1;
            shared.commit(gen).await;
            (true, None)
        }
    };
    if released {
        tracing::warn!(lease = %lease_id, machine = ?machine, "lease reclaimed: its job's containers are gone but its release never arrived");
        shared.changed.notify_waiters();
        shared.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_machines_are_lost_after_three_misses_leased_ones_never_by_health_alone() {
        for n in 0..HEALTH_FAILURES {
            assert_eq!(health_action(false, n), HealthAction::Keep);
            assert_eq!(health_action(true, n), HealthAction::Keep);
        }
        assert_eq!(health_action(false, 3), HealthAction::MarkLost);
        assert_eq!(health_action(false, 50), HealthAction::MarkLost);
        assert_eq!(health_action(true, 3), HealthAction::Tolerate);
        assert_eq!(health_action(true, u32::MAX), HealthAction::Tolerate);
    }

    #[test]
    fn a_lease_is_reclaimed_only_past_the_grace_with_no_containers_twice() {
        let old = LEASE_RECLAIM_GRACE + Duration::from_secs(1);
        let young = LEASE_RECLAIM_GRACE - Duration::from_secs(1);
        assert_eq!(lease_action(old, 0, true), LeaseAction::Reclaim);
        assert_eq!(
            lease_action(LEASE_RECLAIM_GRACE, 0, true),
            LeaseAction::Reclaim
        );
        // First empty check: wait for a second one.
        assert_eq!(lease_action(old, 0, false), LeaseAction::Keep);
        assert!(lease_empty(old, 0));
        // A job that still has containers keeps its lease, however old.
        assert_eq!(lease_action(old, 1, true), LeaseAction::Keep);
        assert!(!lease_empty(old, 3));
        // Prepare may still be pulling: no containers yet within the grace.
        assert_eq!(lease_action(young, 0, true), LeaseAction::Keep);
        assert!(!lease_empty(young, 0));
        assert_eq!(lease_action(Duration::ZERO, 0, true), LeaseAction::Keep);
    }
}
