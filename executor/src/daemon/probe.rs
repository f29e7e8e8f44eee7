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

/// Consecutive failed pings before a ready machine is declared lost.
const HEALTH_FAILURES: u32 = 3;

/// Pings every idle and leased machine each `health_interval`. A machine whose dockerd
/// stops answering (spot reclaim, crash) is marked broken: never leased again, replaced,
/// and its job's next stage fails with a system failure saying the machine was lost.
/// Machines adopted after an unreadable state (`--adopt`) are checked by listing their job
/// containers instead, and drained once none are left ([`crate::observe::drain_adopted`]).
pub async fn watch_health(shared: Arc<Shared>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut failures: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(shared.config.health_interval.0) => {}
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
                async move {
                    let name = machine_dns_name(&id);
                    let r = if adopted {
                        job_containers(tls, &address, &name).await.map(|n| {
                            if n == 0 {
                                free.lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .insert(id.clone());
                            }
                        })
                    } else {
                        crate::docker::ping(tls, &address, DOCKER_TLS_PORT, &name, PING_TIMEOUT)
                            .await
                    };
                    (id, r)
                }
            })
            .collect();
        use futures_util::StreamExt;
        let results: Vec<_> = futures_util::stream::iter(pings)
            .buffer_unordered(32)
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
                    *n += 1;
                    tracing::warn!(machine = %id, failures = *n, error = %e, "machine did not answer its health check");
                    if *n >= HEALTH_FAILURES {
                        lost.push((id, e));
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
        shared.metrics.lost(lost.len() as u64);
        let gen = shared
            .update(|pool| {
                for (id, e) in &lost {
                    pool.mark_broken(id, &format!("its Docker daemon stopped answering ({e})"));
                }
            })
            .1;
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
