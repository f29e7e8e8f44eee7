//! Boot probes: a booting machine becomes idle the moment its dockerd answers `/_ping`
//! over mutual TLS. Polls with a short capped backoff (no fixed sleeps); past the class's
//! boot timeout the probe gives up and the plan replaces the machine.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use flotilla_proto::api::MachineState;
use flotilla_proto::bootstrap::{machine_dns_name, DOCKER_TLS_PORT};

use super::Shared;

const FIRST_DELAY: Duration = Duration::from_millis(50);
const MAX_DELAY: Duration = Duration::from_millis(500);
const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// Starts probes for machines left booting by a previous daemon.
pub fn resume(shared: &Arc<Shared>) {
    let ids: Vec<String> = shared
        .pool()
        .machines
        .values()
        .filter(|m| m.state == MachineState::Booting && !m.address.is_empty())
        .map(|m| m.id.clone())
        .collect();
    for id in ids {
        spawn(shared.clone(), id);
    }
}

pub fn spawn(shared: Arc<Shared>, machine_id: String) {
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

async fn run(shared: &Arc<Shared>, machine_id: &str) {
    let Some((address, deadline)) = ({
        let pool = shared.pool();
        pool.machines.get(machine_id).and_then(|m| {
            let timeout = shared.policy.classes.get(&m.class)?.boot_timeout;
            Some((
                m.address.clone(),
                super::saturating_add(m.launched_at, timeout),
            ))
        })
    }) else {
        return;
    };
    let server_name = machine_dns_name(machine_id);
    let mut delay = FIRST_DELAY;
    let mut last_error;
    loop {
        let still_booting = shared
            .pool()
            .machines
            .get(machine_id)
            .is_some_and(|m| m.state == MachineState::Booting);
        if !still_booting {
            return;
        }
        match crate::docker::ping(
            shared.tls.clone(),
            &address,
            DOCKER_TLS_PORT,
            &server_name,
            PING_TIMEOUT,
        )
        .await
        {
            Ok(()) => {
                let now = Utc::now();
                let (boot_ms, gen) = shared.update(|p| {
                    let launched = p.machines.get(machine_id).map(|m| m.launched_at)?;
                    p.mark_ready(machine_id, now)
                        .then(|| (now - launched).num_milliseconds())
                });
                shared.commit(gen).await;
                if let Some(boot_ms) = boot_ms {
                    shared.metrics.boot_time.observe(boot_ms as f64 / 1000.0);
                    tracing::info!(machine = machine_id, %address, boot_ms, "machine ready");
                    shared.changed.notify_waiters();
                    shared.wake.notify_one();
                }
                return;
            }
            Err(e) => last_error = e,
        }
        if Utc::now() >= deadline {
            tracing::warn!(machine = machine_id, %address, error = %last_error, "machine did not answer within its boot timeout");
            shared.wake.notify_one();
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_DELAY);
    }
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
pub enum HealthAction {
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
pub fn health_action(leased: bool, consecutive_failures: u32) -> HealthAction {
    if consecutive_failures < HEALTH_FAILURES {
        HealthAction::Keep
    } else if leased {
        HealthAction::Tolerate
    } else {
        HealthAction::MarkLost
    }
}

/// Pings every idle and leased machine each `health_interval`, concurrently, each check
/// bounded by [`CHECK_TIMEOUT`]. An unleased machine whose dockerd stops answering three
/// times in a row (spot reclaim, crash) is marked broken: never leased again, replaced. A
/// leased machine is not: its job's own Docker calls fail if the machine is gone (the
/// stages then report it lost) and EC2 observation catches a terminated instance; a blip
/// must not take a machine from under a running job.
/// Machines adopted after an unreadable state (`--adopt`) are checked by listing their job
/// containers instead, and drained once none are left ([`crate::observe::drain_adopted`]).
pub async fn watch_health(shared: Arc<Shared>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut failures: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(shared.config.health_interval.0.max(MIN_HEALTH_INTERVAL)) => {}
            _ = stop.changed() => return,
        }
        let targets: Vec<(String, String, bool)> = shared
            .pool()
            .machines
            .values()
            .filter(|m| matches!(m.state, MachineState::Idle | MachineState::Leased))
            .map(|m| {
                let adopted = m.adopted_at.is_some() && m.lease_id.is_none();
                (m.id.clone(), m.address.clone(), adopted)
            })
            .collect();
        failures.retain(|id, _| targets.iter().any(|(t, _, _)| t == id));
        let free = std::sync::Mutex::new(std::collections::HashSet::new());
        let pings: Vec<_> = targets
            .iter()
            .cloned()
            .map(|(id, address, adopted)| {
                let tls = shared.tls.clone();
                let free = &free;
                let check_id = id.clone();
                let check = async move {
                    let name = machine_dns_name(&check_id);
                    if adopted {
                        job_containers(tls, &address, &name).await.map(|n| {
                            if n == 0 {
                                free.lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .insert(check_id.clone());
                            }
                        })
                    } else {
                        crate::docker::ping(tls, &address, DOCKER_TLS_PORT, &name, PING_TIMEOUT)
                            .await
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
                        .machines
                        .get(&id)
                        .is_some_and(|m| m.lease_id.is_some());
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
        let free = free.into_inner().unwrap_or_else(|p| p.into_inner());
        if targets.iter().any(|(_, _, adopted)| *adopted) {
            let lease_timeout = shared.config.lease_timeout.0;
            let (drained, gen) = shared.update(|pool| {
                crate::observe::drain_adopted(pool, &free, Utc::now(), lease_timeout)
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
                let leased = pool.machines.get(id).is_some_and(|m| m.lease_id.is_some());
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

/// How many job containers (labelled by the stages, running or not) a machine has: the
/// drain check of an adopted machine. Answering at all also proves its dockerd is alive.
async fn job_containers(
    tls: std::sync::Arc<rustls::ClientConfig>,
    address: &str,
    server_name: &str,
) -> Result<usize, String> {
    use bollard::query_parameters::ListContainersOptions;
    let docker = crate::docker::connect(tls, address, DOCKER_TLS_PORT, server_name, PING_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let filters = std::collections::HashMap::from([(
        "label".to_string(),
        vec![crate::stages::job::JOB_LABEL.to_string()],
    )]);
    let list = tokio::time::timeout(
        PING_TIMEOUT,
        docker.list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        })),
    )
    .await
    .map_err(|_| "timed out listing job containers".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(list.len())
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
}
