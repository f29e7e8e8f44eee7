//! The reconcile loop: observe EC2 (one paginated Describe per interval), fold it into
//! the pool, plan, act. Woken early by acquires and releases, which need a plan but not a
//! fresh observation, so EC2 calls stay proportional to launches, not to jobs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::bootstrap::{CloudConfig, MachineBootstrap};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::class_status::LaunchBackoff;
use super::{new_id, probe, Shared};
use crate::ec2::LaunchSpec;
use crate::observe::{fold, Graces};
use crate::plan::{launch_order, plan, Action};
use crate::pool::TerminateReason;

const LAUNCH_BACKOFF_START: Duration = Duration::from_secs(5);
const LAUNCH_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Re-send a termination (or a stop) EC2 has not carried out after this long.
const TERMINATE_RETRY: Duration = Duration::from_secs(120);

pub(super) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let interval = shared.config.reconcile_interval.0;
    let graces = graces(&shared);
    let mut last_observe: Option<Instant> = None;
    let mut accounted: HashMap<String, Instant> = HashMap::new();
    loop {
        let soon = shared
            .observe_soon
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        let observing = soon || last_observe.is_none_or(|t| t.elapsed() >= interval);
        if observing {
            last_observe = Some(Instant::now());
            observe(&shared, &graces).await;
            account_machine_time(&shared, &mut accounted);
            shared.settle_reports().await;
        }
        // Launches run in the background (their handles are for tests).
        drop(act(&shared).await);
        if observing {
            shared
                .passes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let next = interval.saturating_sub(last_observe.map_or(Duration::ZERO, |t| t.elapsed()));
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = shared.wake.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

/// How long an instance may be missing from observations, and an unknown one be present,
/// before the pool acts on it.
pub(super) fn graces(shared: &Shared) -> Graces {
    Graces {
        visibility: shared
            .config
            .reconcile_interval
            .0
            .saturating_mul(3)
            .max(Duration::from_secs(30)),
        orphan: shared.config.orphan_grace.0,
    }
}

/// Adds each live machine's running time since the last pass to the cost counter
/// (stopped machines' time is not instance time).
fn account_machine_time(shared: &Shared, accounted: &mut HashMap<String, Instant>) {
    let now = Instant::now();
    let pool = shared.pool();
    accounted.retain(|id, _| pool.machines().contains_key(id));
    for m in pool.machines().values() {
        if m.instance_id.is_empty() {
            continue;
        }
        // A stopped instance bills its disks only, not instance time.
        if m.state == flotilla_proto::api::MachineState::Stopped {
            accounted.insert(m.id.clone(), now);
            continue;
        }
        let since = accounted.insert(m.id.clone(), now).unwrap_or(now);
        let secs = now.duration_since(since).as_secs_f64();
        if secs > 0.0 {
            shared
                .metrics
                .machine_time(&m.class, &m.instance_type, secs);
        }
    }
}

pub(super) async fn observe(shared: &Arc<Shared>, graces: &Graces) {
    let observed = match shared.ec2.describe_fleet(&shared.config.fleet).await {
        Ok(o) => o,
        Err(e) => {
            // Unknown is not dead: keep every machine as it was.
            tracing::warn!(error = %e, "could not observe the fleet; keeping the pool as it is");
            return;
        }
    };
    let now = shared.now();
    // `--adopt`: the first successful observation adopts the fleet's running instances.
    let adopting = shared
        .adopting
        .swap(false, std::sync::atomic::Ordering::SeqCst);
    let mut since: HashMap<String, chrono::DateTime<chrono::Utc>> = {
        let unknown = shared.unknown.lock().unwrap_or_else(|p| p.into_inner());
        unknown
            .iter()
            .map(|(id, u)| (id.clone(), u.first_seen))
            .collect()
    };
    let lease_timeout = shared.config.lease_timeout.0;
    let ((outcome, expired, adopted), gen) = shared.update(|pool| {
        let adopted = if adopting {
            crate::observe::adopt(pool, &observed, now, &shared.ownership)
        } else {
            Vec::new()
        };
        let outcome = fold(pool, &observed, now, graces, &shared.ownership, &mut since);
        (outcome, pool.expire_leases(now, lease_timeout), adopted)
    });
    if adopting {
        tracing::warn!(
            machines = ?adopted,
            "--adopt: adopted the fleet's running instances; they are never leased and are terminated once no job runs on them"
        );
    }
    for lease in &expired {
        tracing::warn!(lease = %lease, "lease expired without cleanup; its machine will be replaced");
    }
    {
        let mut unknown = shared.unknown.lock().unwrap_or_else(|p| p.into_inner());
        *unknown = since
            .into_iter()
            .map(|(id, first_seen)| {
                let machine_id = observed
                    .iter()
                    .find(|o| o.instance_id == id)
                    .and_then(|o| o.machine_id.clone());
                let not_ours = outcome
                    .foreign
                    .iter()
                    .find(|(i, _)| *i == id)
                    .map(|(_, why)| why.clone());
                let entry = super::UnknownInstance {
                    machine_id,
                    first_seen,
                    not_ours,
                };
                (id, entry)
            })
            .collect();
    }
    for (machine, why) in &outcome.lost {
        tracing::warn!(machine = %machine, reason = %why, "machine lost");
    }
    for machine in &outcome.stopped {
        tracing::info!(%machine, "machine stopped (stopped pool)");
    }
    // Started machines EC2 lists running: probed (again after a restart; one probe each).
    for machine in &outcome.started {
        probe::spawn(shared.clone(), machine.clone());
    }
    if !outcome.lost.is_empty() {
        shared.metrics.lost(outcome.lost.len() as u64);
        shared.changed.notify_waiters();
    }
    shared.commit(gen).await;
    if !outcome.orphans.is_empty() {
        tracing::warn!(instances = ?outcome.orphans, "terminating orphaned instances of this fleet");
        if let Err(e) = shared.ec2.terminate(&outcome.orphans).await {
            tracing::warn!(error = %e, "could not terminate orphans; will retry");
        } else {
            shared.metrics.orphans(outcome.orphans.len() as u64);
            shared
                .metrics
                .terminated("orphan", outcome.orphans.len() as u64);
            let mut unknown = shared.unknown.lock().unwrap_or_else(|p| p.into_inner());
            for id in &outcome.orphans {
                unknown.remove(id);
            }
        }
    }
}

/// Plans and acts: marks and sends terminations, reserves and starts launches (returned
/// so tests can await them; the loop lets them run in the background).
pub(super) async fn act(shared: &Arc<Shared>) -> Vec<JoinHandle<()>> {
    let now = shared.now();
    let mut launches = Vec::new();
    let mut changed = false;
    // Planned and applied in one critical section: an acquire between the two could
    // otherwise lease a machine the plan saw idle and is about to terminate.
    let (due, gen) = shared.update(|pool| {
        for action in plan(&shared.policy, pool, now) {
            match action {
                Action::Terminate { machine_id, reason } => {
                    if pool.begin_terminate(&machine_id, reason) {
                        if let Some(m) = pool.machines().get(&machine_id) {
                            tracing::info!(machine = %m.id, instance = %m.instance_id, reason = reason.as_str(), "terminating machine");
                        }
                        changed = true;
                    }
                }
                Action::Launch { class, count } => launches.push((class, count)),
                // The stopped pool: the state changes here, durable before the calls below.
                Action::Stop { machine_id } => {
                    if pool.begin_stop(&machine_id, now) {
                        if let Some(m) = pool.machines().get(&machine_id) {
                            tracing::info!(machine = %m.id, instance = %m.instance_id, "stopping machine (stopped pool)");
                        }
                        changed = true;
                    }
                }
                Action::Start { machine_id } => {
                    if pool.begin_start(&machine_id, now) {
                        if let Some(m) = pool.machines().get(&machine_id) {
                            tracing::info!(machine = %m.id, instance = %m.instance_id, "starting stopped machine");
                        }
                        changed = true;
                    }
                }
            }
        }
        (
            pool.terminations_due(now, TERMINATE_RETRY),
            pool.stops_due(now, TERMINATE_RETRY),
            pool.starts_due(),
        )
    });
    if changed {
        shared.commit_durable(gen).await;
    }
    let (to_terminate, to_stop, to_start) = due;

    if !to_terminate.is_empty() {
        let ids: Vec<String> = to_terminate.iter().map(|(_, i, _)| i.clone()).collect();
        match shared.ec2.terminate(&ids).await {
            Ok(()) => {
                for (_, _, reason) in &to_terminate {
                    shared
                        .metrics
                        .terminated(reason.map_or("unknown", |r| r.as_str()), 1);
                }
                let gen = shared
                    .update(|pool| pool.terminate_sent(to_terminate.iter().map(|(m, _, _)| m), now))
                    .1;
                shared.commit_durable(gen).await;
            }
            Err(e) => tracing::warn!(error = %e, "terminate failed; will retry"),
        }
    }
    if !to_stop.is_empty() {
        stop_or_start(shared, Lifecycle::Stop, to_stop).await;
    }
    if !to_start.is_empty() {
        stop_or_start(shared, Lifecycle::Start, to_start).await;
    }

    // Reserve the machines in the pool now (so the next plan counts them) and launch in the
    // background: a slow or throttled RunInstances must not stall observation, termination
    // or the launches of other classes.
    let mut reserved = Vec::new();
    for (class, count) in launches {
        if in_backoff(shared, &class) {
            continue;
        }
        for _ in 0..count {
            reserved.push((new_id("m-"), class.clone()));
        }
    }
    if reserved.is_empty() {
        return Vec::new();
    }
    let gen = shared
        .update(|pool| {
            for (id, class) in &reserved {
                let first_type = shared
                    .config
                    .classes
                    .get(class)
                    .and_then(|c| c.instance_types.first().cloned())
                    .unwrap_or_default();
                pool.reserve(id, class, &first_type, now);
            }
        })
        .1;
    shared.commit_durable(gen).await;
    reserved
        .into_iter()
        .map(|(id, class)| tokio::spawn(launch_reserved(shared.clone(), class, id)))
        .collect()
}

fn in_backoff(shared: &Shared, class: &str) -> bool {
    let now = shared.now();
    let map = shared
        .launch_backoff
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    map.get(class).is_some_and(|b| now < b.until)
}

/// A failed launch backs the class off (doubling from 5 s to 5 min); a success clears it.
fn note_launch_result(shared: &Shared, class: &str, result: Result<(), String>) {
    let now = shared.now();
    let mut map = shared
        .launch_backoff
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    match result {
        Ok(()) => {
            map.remove(class);
        }
        Err(last_error) => {
            let delay = map.get(class).map_or(LAUNCH_BACKOFF_START, |b| {
                b.delay.saturating_mul(2).min(LAUNCH_BACKOFF_MAX)
            });
            let until = super::saturating_add(now, delay);
            map.insert(
                class.to_owned(),
                LaunchBackoff {
                    until,
                    delay,
                    last_error,
                },
            );
        }
    }
}

/// Launches the machine `machine_id`, already recorded in the pool as booting.
async fn launch_reserved(shared: Arc<Shared>, class_name: String, machine_id: String) {
    let Some(class) = shared.config.classes.get(&class_name).cloned() else {
        return;
    };
    let dockerd = shared.config.dockerd_for(&class_name);
    let journal = shared.config.logs.build_machine_journal();
    let user_data = match shared
        .ca
        .issue_server(&machine_id)
        .map_err(|e| e.to_string())
        .and_then(|cert| {
            CloudConfig::for_machine(&MachineBootstrap {
                machine_id: &machine_id,
                ca_cert_pem: shared.ca.cert_pem(),
                server_cert_pem: &cert.cert_pem,
                server_key_pem: &cert.key_pem,
                dockerd: &dockerd,
                journal: journal.as_ref(),
            })
            .render_with(&class.user_data_parts)
            .map_err(|e| e.to_string())
        }) {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(class = %class_name, error = %e, "cannot build machine bootstrap");
            note_launch_result(&shared, &class_name, Err(format!("machine bootstrap: {e}")));
            abandon(&shared, &machine_id).await;
            return;
        }
    };

    let mut last_error = None;
    // Shortfall-only fallback: each capacity error moves this one machine to the next
    // subnet, then the next type, then (where allowed) on-demand.
    for (attempt, try_next) in launch_order(&class).into_iter().enumerate() {
        let spec = LaunchSpec {
            fleet: shared.config.fleet.clone(),
            daemon_id: shared.ownership.daemon_id.clone(),
            machine_id: machine_id.clone(),
            client_token: format!("{machine_id}-{}", attempt + 1),
            class: class_name.clone(),
            ami: class.ami.clone(),
            instance_type: try_next.instance_type.clone(),
            subnet: try_next.subnet.clone(),
            security_groups: class.security_groups.clone(),
            instance_profile: class.instance_profile.clone(),
            root_volume: class.effective_root_volume(),
            imds_hop_limit: class.imds_hop_limit,
            public_ip: class.public_ip,
            purchase: try_next.purchase,
            user_data: user_data.clone(),
            extra_tags: shared.config.machine_tags(&class_name),
            launch_template: class.launch_template.clone(),
        };
        let (instance_type, subnet, market) =
            (&spec.instance_type, &spec.subnet, spec.purchase.as_str());
        let started = Instant::now();
        match shared.ec2.launch(&spec).await {
            Ok(launched) => {
                tracing::info!(
                    machine = %machine_id,
                    instance = %launched.instance_id,
                    class = %class_name,
                    %instance_type,
                    market,
                    address = %launched.private_ip,
                    call_ms = started.elapsed().as_millis() as u64,
                    "launched machine"
                );
                let gen = shared
                    .update(|pool| {
                        pool.record_launch(
                            &machine_id,
                            &launched.instance_id,
                            &launched.private_ip,
                            instance_type,
                        )
                    })
                    .1;
                shared.commit_durable(gen).await;
                note_launch_result(&shared, &class_name, Ok(()));
                shared.metrics.launched(&class_name, instance_type, market);
                probe::spawn(shared.clone(), machine_id.clone());
                return;
            }
            Err(e) if e.is_capacity() => {
                tracing::warn!(class = %class_name, %instance_type, %subnet, market, error = %e, "no capacity; trying the next subnet, type or market");
                shared
                    .metrics
                    .launch_failed(&class_name, e.code.as_deref().unwrap_or("capacity"));
                last_error = Some(e);
            }
            Err(e) => {
                shared
                    .metrics
                    .launch_failed(&class_name, e.code.as_deref().unwrap_or("error"));
                last_error = Some(e);
                break;
            }
        }
    }
    if let Some(e) = &last_error {
        tracing::error!(class = %class_name, error = %e, "launch failed");
    }
    let why = last_error.map_or_else(
        || "no instance type or subnet to try".to_owned(),
        |e| e.to_string(),
    );
    note_launch_result(&shared, &class_name, Err(why));
    abandon(&shared, &machine_id).await;
}

/// A reserved machine that was never launched: it goes once observations show no instance
/// carries its machine tag (in case a lost response hid a launch that did happen).
async fn abandon(shared: &Shared, machine_id: &str) {
    let gen = shared
        .update(|pool| pool.abandon_launch(machine_id, "launch failed"))
        .1;
    shared.commit(gen).await;
    // Waiting jobs may now be planned for again.
    shared.wake.notify_one();
}

/// StopInstances or StartInstances, for the stopped pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    Stop,
    Start,
}

/// Sends the stops (or starts) of `due` (machine, instance), already durable as
/// `stopping` (`starting`) in the pool, in one batched call. Accepted: the pool records it
/// (a start's machine is then probed over mTLS like a fresh boot, same certificate, once
/// the next listing, asked for at once, shows it pending or running, at the address that
/// listing gives). A transient failure (throttling, no answer, EC2's own
/// error) is retried by the next pass. A refusal (a one-time spot instance cannot be
/// stopped, no capacity for a start, a role without `ec2:StopInstances`) would be refused
/// again: a refused stop terminates the machine instead, a refused start terminates it as a
/// failed boot (the plan replaces it). A refused batch of several is asked one by one, so
/// one machine's refusal never decides for the others.
async fn stop_or_start(shared: &Arc<Shared>, op: Lifecycle, due: Vec<(String, String)>) {
    let mut batches = vec![due];
    let mut refused: Vec<(String, String, crate::ec2::Ec2Error)> = Vec::new();
    let now = shared.now();
    while let Some(batch) = batches.pop() {
        let ids: Vec<String> = batch.iter().map(|(_, i)| i.clone()).collect();
        let sent = match op {
            Lifecycle::Stop => shared.ec2.stop(&ids).await,
            Lifecycle::Start => shared.ec2.start(&ids).await,
        };
        match sent {
            Ok(()) => {
                let machines = batch.iter().map(|(m, _)| m);
                let gen = shared
                    .update(|pool| match op {
                        Lifecycle::Stop => pool.stop_sent(machines, now),
                        Lifecycle::Start => pool.start_sent(machines, now),
                    })
                    .1;
                shared.commit_durable(gen).await;
                for (machine, instance) in &batch {
                    match op {
                        Lifecycle::Stop => {
                            tracing::info!(%machine, %instance, "StopInstances accepted");
                        }
                        Lifecycle::Start => {
                            tracing::info!(%machine, %instance, "StartInstances accepted");
                        }
                    }
                }
                if op == Lifecycle::Start {
                    // Probed once a listing shows it pending or running, at the address
                    // that listing gives: observe on the next pass, not a whole interval on.
                    shared
                        .observe_soon
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    shared.wake.notify_one();
                }
            }
            Err(e) if !is_refusal(&e) => {
                tracing::warn!(op = ?op, instances = ?ids, error = %e, "stop/start failed; will retry");
            }
            Err(e) if batch.len() > 1 => {
                tracing::warn!(op = ?op, instances = ?ids, error = %e, "batch refused; asking one by one");
                batches.extend(batch.into_iter().map(|one| vec![one]));
            }
            Err(e) => {
                refused.extend(batch.into_iter().map(|(m, i)| (m, i, e.clone())));
            }
        }
    }
    if refused.is_empty() {
        return;
    }
    let gen = shared
        .update(|pool| {
            for (machine, instance, e) in &refused {
                let reason = match op {
                    Lifecycle::Stop => TerminateReason::IdleTimeout,
                    Lifecycle::Start => TerminateReason::BootTimeout,
                };
                let what = match op {
                    Lifecycle::Stop => "cannot be stopped; terminating it instead",
                    Lifecycle::Start => "cannot be started; terminating it (replaced)",
                };
                tracing::error!(%machine, %instance, error = %e, "machine {what}");
                pool.begin_terminate(machine, reason);
            }
        })
        .1;
    shared.commit_durable(gen).await;
    shared.wake.notify_one();
}

/// An EC2 answer that would be the same if asked again: an error code that is neither
/// throttling nor EC2's own failure. No code (a timeout, a dropped connection) is not one.
fn is_refusal(e: &crate::ec2::Ec2Error) -> bool {
    e.code.as_deref().is_some_and(|c| {
        !e.is_throttling()
            && !matches!(
                c,
                "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable"
            )
    })
}
