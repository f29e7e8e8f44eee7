//! `flotilla daemon`: owns the pool of build machines.
//!
//! Three kinds of tasks share one [`Shared`]: the reconcile loop (observe EC2, plan, act),
//! one boot probe per booting machine, and the control API on the Unix socket. Pool changes
//! happen under one short synchronous lock and are persisted before they are acknowledged.
//!
//! The long-running tasks (reconcile loop, health watcher, control API, metrics endpoint,
//! client certificate renewal) are supervised: one that ends or panics before shutdown
//! stops the daemon with an error naming it and a non-zero exit, so systemd restarts it
//! rather than leaving a daemon that serves leases but never scales.

mod api;
mod certs;
pub mod class_status;
mod clock;
#[cfg(test)]
mod fakes;
pub mod machine_api;
mod postmortem;
mod prefetch;
mod probe;
mod ready;
mod reconcile;
#[cfg(test)]
mod scenarios;
mod shared;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use chrono::Utc;
use flotilla_proto::config::{Config, ShutdownPolicy};
use tokio::sync::watch;

use crate::ec2::{Ec2Api, Ec2Client};
use crate::metrics::Metrics;
use crate::pki::FleetCa;
use crate::pool::Pool;
use crate::state_store::StateStore;
pub use clock::{chrono_duration, saturating_add, Clock};
use machine_api::{MachineApi, MtlsMachines};
pub(crate) use shared::{new_id, Parts, Shared, UnknownInstance};

/// The file in the state directory holding the daemon's persistent id.
pub const DAEMON_ID_FILE: &str = "daemon-id";

/// This daemon's id: read from `<state_dir>/daemon-id`, created (random, written
/// atomically, 0644) on first start. Tagged `flotilla:daemon` on every launch; only
/// instances carrying it (or none, from before daemon ids) are ever reaped as orphans.
/// A lost file means a new id: the old instances are then reported, never reaped.
fn load_or_create_daemon_id(dir: &Path) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(DAEMON_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            let valid = !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid {
                bail!(
                    "{} does not hold a daemon id ({id:?}); refusing to start (a new id would stop this daemon reaping its own orphans)",
                    path.display()
                );
            }
            Ok(id.to_owned())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = new_id("d-");
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            f.write_all(format!("{id}\n").as_bytes())
                .and_then(|()| f.sync_all())
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("cannot sync {}", dir.display()))?;
            tracing::info!(daemon_id = %id, path = %path.display(), "created the daemon id");
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Refuses a second daemon on the same state directory (two daemons would both launch,
/// and each would reap the other's machines as orphans).
fn lock_state_dir(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = dir.join("daemon.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another flotilla daemon holds {} ({e}); only one daemon may own a state directory",
            path.display()
        )
    })
}

/// Loads the pool. An unreadable state is a refusal to start unless `adopt`, which moves
/// it aside and starts empty, adopting the fleet's running instances (returns true then).
fn open_state(state_dir: &Path, adopt: bool) -> anyhow::Result<(StateStore, Pool, bool)> {
    match StateStore::open(state_dir) {
        Ok((store, pool)) => {
            if adopt {
                tracing::warn!(
                    "--adopt given but the pool state is readable: starting from it; nothing is moved or adopted"
                );
            }
            Ok((store, pool, false))
        }
        Err(e) if e.is_unreadable_state() && adopt => {
            let aside = crate::state_store::move_aside(state_dir, Utc::now())
                .context("cannot move the unreadable pool state aside")?;
            tracing::warn!(
                error = %e,
                moved_to = %aside.display(),
                "--adopt: unreadable pool state moved aside; starting with an empty pool that adopts the fleet's running instances (health-checked, drained, never leased)"
            );
            let (store, pool) = StateStore::open(state_dir)?;
            Ok((store, pool, true))
        }
        Err(e) => Err(anyhow::Error::new(e).context("cannot load the pool state")),
    }
}

/// Runs the daemon until SIGTERM or SIGINT. `adopt`: see [`open_state`].
pub async fn run(config: Config, adopt: bool) -> anyhow::Result<()> {
    let state_dir = config.state_dir.clone();
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create state directory {}", state_dir.display()))?;
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", state_dir.display()))?;
    let _lock = lock_state_dir(&state_dir)?;
    let daemon_id = load_or_create_daemon_id(&state_dir)?;

    let (store, pool, adopting) = open_state(&state_dir, adopt)?;
    // The CA after the state: with machines on record (or being adopted), a missing CA is
    // a refusal to start, never a new CA those machines would not trust.
    let machines_on_record = pool.machines().len().max(usize::from(adopting));
    let ca = FleetCa::load_or_create(&state_dir, machines_on_record).context("fleet CA")?;
    let (tls, client_cert) = crate::tls::reloadable_machine_client_config(&state_dir)
        .context("stage client certificate")?;
    let metrics = Arc::new(Metrics::new());
    let ec2: Arc<dyn Ec2Api> = Arc::new(Ec2Client::new(&config.aws, metrics.clone()).await);
    let machines: Arc<dyn MachineApi> = Arc::new(MtlsMachines { tls });

    let socket = config.socket_path();
    if socket.exists() {
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            bail!("{} is already served by a running daemon", socket.display());
        }
        std::fs::remove_file(&socket)
            .with_context(|| format!("cannot remove stale socket {}", socket.display()))?;
    }
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // Bound under a temporary name and restricted to 0660 before it takes the real name:
    // no client ever connects while the umask's mode is in force.
    let fresh = socket.with_extension("new");
    let _ = std::fs::remove_file(&fresh);
    let listener = tokio::net::UnixListener::bind(&fresh)
        .with_context(|| format!("cannot listen on {}", fresh.display()))?;
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set permissions on {}", fresh.display()))?;
    std::fs::rename(&fresh, &socket)
        .with_context(|| format!("cannot move {} to {}", fresh.display(), socket.display()))?;

    tracing::info!(
        fleet = %config.fleet,
        daemon_id = %daemon_id,
        socket = %socket.display(),
        machines = pool.machines().len(),
        leases = pool.leases().len(),
        "daemon starting"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared::new(Parts {
        config,
        pool,
        store,
        ca,
        ec2,
        machines,
        clock: Clock::System,
        metrics,
        daemon_id,
        adopting,
        stop: stop_rx.clone(),
    }));
    retire_on_load(&shared).await;

    let metrics_listener = match &shared.config.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?,
        ),
        None => None,
    };

    let mut tasks = Tasks::new();
    supervise(
        &mut tasks,
        "control API",
        api::serve(shared.clone(), listener, stop_rx.clone()),
    );
    if let Some(l) = metrics_listener {
        supervise(
            &mut tasks,
            "metrics endpoint",
            api::serve_metrics(shared.clone(), l, stop_rx.clone()),
        );
    }
    probe::resume(&shared);
    supervise(
        &mut tasks,
        "health watcher",
        probe::watch_health(shared.clone(), stop_rx.clone()),
    );
    supervise(
        &mut tasks,
        "client certificate renewal",
        certs::renew_client_cert(shared.clone(), client_cert, stop_rx.clone()),
    );
    supervise(
        &mut tasks,
        "reconcile loop",
        reconcile::run(shared.clone(), stop_rx),
    );

    let failure = tokio::select! {
        _ = wait_for_signal() => None,
        Some(ended) = tasks.join_next() => Some(task_failure(ended)),
    };
    if let Some(why) = &failure {
        tracing::error!("{why}; stopping the daemon so that its supervisor restarts it");
    }
    let _ = stop_tx.send(true);
    let joined = async {
        while let Some(ended) = tasks.join_next().await {
            if let Ok((name, true)) = ended {
                tracing::error!(task = name, "task panicked while shutting down");
            }
        }
    };
    if tokio::time::timeout(SHUTDOWN_JOIN, joined).await.is_err() {
        tracing::warn!("background tasks did not stop in time; abandoning them");
        tasks.abort_all();
    }
    if let Some(why) = failure {
        // A crash, not an operator's stop: keep every machine for the restart.
        let gen = shared.update(|_| ()).1;
        shared.commit(gen).await;
        let _ = std::fs::remove_file(&socket);
        bail!("{why}");
    }
    match shared.config.on_shutdown {
        ShutdownPolicy::Keep => {
            tracing::info!("shutting down: leases and machines are kept for the next start")
        }
        ShutdownPolicy::Terminate => terminate_unleased(&shared).await,
    }
    let gen = shared.update(|_| ()).1;
    shared.commit(gen).await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Retires the idle machines a loaded state holds past `max_builds` or `max_age` (the
/// journal replays releases without the policy), before any acquire can lease one.
async fn retire_on_load(shared: &Shared) {
    let now = shared.now();
    let (retired, gen) = shared.update(|pool| pool.retire_idle(|m| shared.retire_reason(m, now)));
    if !retired.is_empty() {
        tracing::info!(machines = ?retired, "retiring machines past max_builds or max_age");
        shared.commit(gen).await;
    }
}

/// How long shutdown waits for the background tasks to notice the stop.
const SHUTDOWN_JOIN: std::time::Duration = std::time::Duration::from_secs(20);

/// Supervised tasks: each ends with its name and whether it panicked.
type Tasks = tokio::task::JoinSet<(&'static str, bool)>;

fn supervise(
    tasks: &mut Tasks,
    name: &'static str,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use futures_util::FutureExt;
    tasks.spawn(async move {
        let panicked = std::panic::AssertUnwindSafe(task)
            .catch_unwind()
            .await
            .is_err();
        (name, panicked)
    });
}

/// What to say about a supervised task that ended before shutdown (none ever should).
fn task_failure(ended: Result<(&'static str, bool), tokio::task::JoinError>) -> String {
    match ended {
        Ok((name, true)) => format!("the {name} task panicked"),
        Ok((name, false)) => format!("the {name} task ended unexpectedly"),
        Err(e) => format!("a background task failed: {e}"),
    }
}

/// `on_shutdown = "terminate"`: idle and booting machines go; leased ones finish their jobs
/// and are reaped by the next daemon (or adopted, if it shares the state directory).
async fn terminate_unleased(shared: &Shared) {
    let (ids, gen) = shared.update(Pool::terminate_unleased);
    shared.commit(gen).await;
    tracing::info!(
        machines = ids.len(),
        "shutting down: terminating unleased machines"
    );
    if let Err(e) = shared.ec2.terminate(&ids).await {
        tracing::error!(error = %e, "could not terminate machines at shutdown; the next start reaps them");
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon can only be killed; keep running.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// A [`Shared`] over a fresh state directory with fake EC2 and machines, the system clock
/// and a one-class config, for tests of the daemon's tasks.
#[cfg(test)]
pub(crate) async fn test_shared(dir: &Path, stop: watch::Receiver<bool>) -> Arc<Shared> {
    let clock = Clock::System;
    test_rig(
        dir,
        stop,
        "",
        "",
        Arc::new(fakes::FakeEc2::new(clock.clone())),
        Arc::new(fakes::FakeMachines::default()),
        clock,
    )
}

/// A [`Shared`] over `dir` (a fresh or existing state) whose config is the one-class base
/// (class `c`, type `t`, subnet `s` unless `class_extra` sets `instance_types`) plus
/// `top_extra` top-level keys and `class_extra` keys of `[classes.c]`, with the given edges
/// and clock.
#[cfg(test)]
pub(crate) fn test_rig(
    dir: &Path,
    stop: watch::Receiver<bool>,
    top_extra: &str,
    class_extra: &str,
    ec2: Arc<dyn Ec2Api>,
    machines: Arc<dyn MachineApi>,
    clock: Clock,
) -> Arc<Shared> {
    let text = format!(
        "fleet = \"f\"\nstate_dir = {:?}\ndefault_class = \"c\"\n{top_extra}\n[aws]\nregion = \"us-east-1\"\nendpoint_url = \"http://127.0.0.1:9\"\n[classes.c]\nami = \"a\"\n{}\n",
        dir.display().to_string(),
        if class_extra.contains("instance_types") {
            class_extra.to_string()
        } else {
            format!("instance_types = [\"t\"]\nsubnets = [\"s\"]\n{class_extra}")
        }
    );
    let config = Config::from_toml(&text).unwrap();
    let (store, pool) = StateStore::open(dir).unwrap();
    let ca = FleetCa::load_or_create(dir, pool.machines().len()).unwrap();
    Arc::new(Shared::new(Parts {
        daemon_id: load_or_create_daemon_id(dir).unwrap(),
        config,
        pool,
        store,
        ca,
        ec2,
        machines,
        clock,
        metrics: Arc::new(Metrics::new()),
        adopting: false,
        stop,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn the_daemon_id_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let id = load_or_create_daemon_id(dir.path()).unwrap();
        assert!(id.starts_with("d-") && id.len() > 10, "{id}");
        assert_eq!(load_or_create_daemon_id(dir.path()).unwrap(), id);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_create_daemon_id(other.path()).unwrap(), id);
        std::fs::write(dir.path().join(DAEMON_ID_FILE), "not an id!\n").unwrap();
        assert!(load_or_create_daemon_id(dir.path()).is_err());
    }

    #[test]
    fn a_forecast_window_of_any_length_does_not_panic() {
        let t = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
        let mut h = crate::forecast::DemandHistory::default();
        h.record("c", t);
        let o = h.outlook("c", t, std::time::Duration::from_secs(u64::MAX));
        assert!(o.recent_per_hour >= 0.0);
    }

    #[tokio::test]
    async fn a_supervised_task_that_ends_or_panics_is_named() {
        let mut tasks = Tasks::new();
        supervise(&mut tasks, "quitter", async {});
        let ended = tasks.join_next().await.unwrap();
        assert_eq!(task_failure(ended), "the quitter task ended unexpectedly");
        supervise(&mut tasks, "reconcile loop", async { panic!("boom") });
        let ended = tasks.join_next().await.unwrap();
        assert_eq!(task_failure(ended), "the reconcile loop task panicked");
    }
}
