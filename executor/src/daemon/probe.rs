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
                m.launched_at + chrono::Duration::from_std(timeout).ok()?,
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
