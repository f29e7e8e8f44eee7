//! The control API on the daemon's Unix socket (axum, JSON types from `flotilla_proto::api`).
//!
//! Lease routes need the job's lease secret (see `flotilla_proto::api`): a wrong or missing
//! secret is answered as if the lease did not exist.
//!
//! Who may call what: the socket's mode (0660, created by the daemon) is the first gate;
//! lease routes and status are open to any local user who can reach it. Operator routes
//! (drain, terminating orphans) also check the caller's uid (SO_PEERCRED): only root and
//! the daemon's own user; others get 403. At shutdown waiting acquires return 503
//! `draining` at once, so the graceful stop is never held up by them.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use flotilla_proto::api::{
    AcquireRequest, ApiError, AuditEntry, AuditResponse, DrainRequest, ErrorCode, Lease,
    MachineState, ReleaseRequest, ReleaseResponse, StatusResponse, AUDIT_PATH, DRAIN_PATH,
    LEASES_PATH, LEASE_SECRET_HEADER, STATUS_PATH,
};
use serde::Deserialize;
use tokio::sync::watch;

use super::{new_id, Shared};
use crate::state_store::JournalOp;

/// How long past its job's timeout a lease is kept before it counts as abandoned.
pub(super) const LEASE_GRACE_SECS: u64 = 3600;

/// Longest an acquire may wait, whatever the client asks.
const MAX_ACQUIRE_WAIT: Duration = Duration::from_secs(24 * 3600);

pub(super) async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::UnixListener,
    mut stop: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route(LEASES_PATH, post(acquire).get(find_lease))
        .route(&format!("{LEASES_PATH}/{{id}}"), get(get_lease))
        .route(&format!("{LEASES_PATH}/{{id}}/release"), post(release))
        .route(STATUS_PATH, get(status))
        .route(DRAIN_PATH, post(drain))
        .route(AUDIT_PATH, get(audit))
        .route(&format!("{AUDIT_PATH}/terminate"), post(audit_terminate))
        .with_state(shared);
    let result = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "control API stopped");
    }
}

/// The caller on the other end of a control-socket connection (SO_PEERCRED); `None` when
/// the kernel would not say (then operator routes are refused).
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer {
    pub uid: Option<u32>,
}

impl Connected<IncomingStream<'_, tokio::net::UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        Self {
            uid: stream.io().peer_cred().ok().map(|c| c.uid()),
        }
    }
}

/// Operator routes are for root and the daemon's own user only.
pub(super) fn may_operate(peer_uid: Option<u32>, daemon_uid: u32) -> bool {
    matches!(peer_uid, Some(uid) if uid == 0 || uid == daemon_uid)
}

fn require_operator(shared: &Shared, peer: Peer, what: &str) -> Result<(), Failure> {
    if may_operate(peer.uid, shared.uid) {
        return Ok(());
    }
    let who = peer
        .uid
        .map_or_else(|| "an unknown user".to_owned(), |u| format!("uid {u}"));
    tracing::warn!(caller = %who, "{what} refused: not root or the daemon's user");
    Err(Failure::new(
        StatusCode::FORBIDDEN,
        ErrorCode::BadRequest,
        format!(
            "{what} is for root or the daemon's user (uid {}) only; the caller is {who}",
            shared.uid
        ),
    ))
}

/// Resolves once the daemon is shutting down (or its stop channel is gone).
async fn stopping(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

struct Failure(StatusCode, ApiError);

impl Failure {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self(
            status,
            ApiError {
                code,
                message: message.into(),
            },
        )
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

/// Counts a request as waiting for its class while it lives (also when the client hangs
/// up and axum drops the handler), so the plan launches for real demand only.
struct Waiting<'a> {
    shared: &'a Shared,
    class: String,
    armed: bool,
}

impl<'a> Waiting<'a> {
    fn new(shared: &'a Shared, class: &str) -> Self {
        shared.pool().add_waiter(class);
        shared.wake.notify_one();
        Self {
            shared,
            class: class.to_owned(),
            armed: true,
        }
    }

    /// The count was already taken off under the pool lock (in the same critical section
    /// that granted the lease, so no plan ever sees both the grant and the demand).
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut pool = self.shared.pool();
        pool.remove_waiter(&self.class);
    }
}

fn presented_secret(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(LEASE_SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

fn no_such_lease() -> Failure {
    Failure::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such lease")
}

enum Attempt {
    Have(Lease),
    Conflict,
    Granted(Lease),
    Draining,
    Wait,
}

/// `POST /v1/leases`: [`acquire_lease`], cut short at shutdown.
async fn acquire(State(shared): State<Arc<Shared>>, Json(req): Json<AcquireRequest>) -> Response {
    let stop = stopping(shared.stop.clone());
    tokio::select! {
        // A grant happens inside one poll of `acquire_lease` (no await between the journal
        // write and the answer), so dropping it here never loses a granted lease.
        biased;
        r = acquire_lease(shared.clone(), req) => r.into_response(),
        _ = stop => shutting_down(),
    }
}

/// The answer to an acquire still waiting at shutdown: 503 `shutting_down`, which the
/// stages' client takes as "ask the next daemon" (a restart fails no job). The stop is
/// never held up by an acquire that may wait for hours.
fn shutting_down() -> Response {
    Failure::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::ShuttingDown,
        "the daemon is shutting down; ask again once it is back",
    )
    .into_response()
}

async fn acquire_lease(shared: Arc<Shared>, req: AcquireRequest) -> Result<Json<Lease>, Failure> {
    let class = req
        .class
        .clone()
        .unwrap_or_else(|| shared.config.default_class.clone());
    if !shared.config.classes.contains_key(&class) {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::UnknownClass,
            format!(
                "unknown machine class {class:?}; configured classes: {}",
                shared.config.class_names().join(", ")
            ),
        ));
    }
    if req.job_key.is_empty() {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "job_key is empty",
        ));
    }
    let wait = Duration::from_millis(req.timeout_ms).min(MAX_ACQUIRE_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let started = std::time::Instant::now();
    let mut waiting: Option<Waiting<'_>> = None;
    let mut first_try = true;
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let lease_id = new_id("l-");
        let counted = waiting.is_some();
        let attempt = shared.update_journaled(|pool| {
            if let Some(l) = pool.lease_for_job(&req.job_key) {
                // Idempotent for the job that holds it (a retried prepare), never a way
                // to take over another job's machine.
                if l.accepts(Some(&req.secret)) {
                    return (Attempt::Have(l.to_api()), None);
                }
                return (Attempt::Conflict, None);
            }
            if pool.is_draining() {
                return (Attempt::Draining, None);
            }
            if first_try {
                pool.record_arrival(&class, shared.now());
            }
            let secret_hash = if req.secret.is_empty() {
                String::new()
            } else {
                crate::pool::secret_hash(&req.secret)
            };
            let terms = crate::pool::LeaseTerms {
                secret_hash,
                // Time for after_script, uploads and cleanup beyond the job's own timeout.
                // Capped at lease_timeout: the config check keeps max_age plus
                // lease_timeout within a machine's certificate lifetime, so no job holds a
                // machine past its certificate (prepare warns the job when it is capped).
                expires_after_secs: req.job_timeout_secs.map(|t| {
                    t.saturating_add(LEASE_GRACE_SECS)
                        .min(shared.config.lease_timeout.0.as_secs())
                }),
                slots: shared.policy.classes.get(&class).map_or(1, |c| c.slots()),
            };
            let now = shared.now();
            // A shared machine at max_builds or max_age takes no further job (an idle one
            // was retired when it became idle).
            match pool.try_lease_where(&req.job_key, &class, lease_id.clone(), terms, now, |m| {
                shared.retire_reason(m, now).is_none()
            }) {
                Some(l) => {
                    let record = l.clone();
                    if counted {
                        pool.remove_waiter(&class);
                    }
                    (
                        Attempt::Granted(record.to_api()),
                        Some(JournalOp::Leased { lease: record }),
                    )
                }
                None => (Attempt::Wait, None),
            }
        });
        let attempt = match attempt {
            Ok(a) => a,
            Err(e) => {
                // Not on disk, so not granted: undo it in memory too.
                shared.update(|pool| pool.undo_lease(&lease_id));
                tracing::error!(error = %e, "could not journal a lease");
                return Err(Failure::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Internal,
                    "could not persist the lease; see the daemon log",
                ));
            }
        };
        match attempt {
            Attempt::Have(l) => return Ok(Json(l)),
            Attempt::Conflict => {
                tracing::warn!(job_key = %req.job_key, "acquire with the wrong secret for a held job key: refused");
                return Err(Failure::new(
                    StatusCode::CONFLICT,
                    ErrorCode::Conflict,
                    "another job holds a lease under this job key",
                ));
            }
            Attempt::Granted(lease) => {
                if let Some(w) = waiting.take() {
                    w.disarm();
                }
                shared
                    .metrics
                    .lease_wait
                    .observe(started.elapsed().as_secs_f64());
                tracing::info!(
                    lease = %lease.lease_id,
                    machine = %lease.machine_id,
                    class = %lease.class,
                    wait_ms = started.elapsed().as_millis() as u64,
                    "leased machine"
                );
                // Top the idle pool back up now rather than at the next tick.
                shared.wake.notify_one();
                return Ok(Json(lease));
            }
            Attempt::Draining => {
                return Err(Failure::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Draining,
                    "the daemon is draining and grants no new leases",
                ))
            }
            Attempt::Wait => {
                first_try = false;
                if waiting.is_none() {
                    waiting = Some(Waiting::new(&shared, &class));
                }
            }
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(deadline) => {
                return Err(Failure::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Timeout,
                    format!("no {class} machine became available within {}s", wait.as_secs()),
                ));
            }
        }
    }
}

fn lease_response(
    shared: &Shared,
    lease_id: Option<&str>,
    job_key: Option<&str>,
    secret: Option<&str>,
) -> Result<Json<Lease>, Failure> {
    let pool = shared.pool();
    let record = match (lease_id, job_key) {
        (Some(id), _) => pool.leases().get(id),
        (None, Some(key)) => pool.lease_for_job(key),
        (None, None) => None,
    };
    let Some(record) = record.filter(|r| r.accepts(secret)) else {
        return Err(no_such_lease());
    };
    if let Some(why) = &record.lost {
        return Err(Failure::new(
            StatusCode::GONE,
            ErrorCode::MachineLost,
            format!(
                "build machine {} ({}) was lost: {why}",
                record.machine_id, record.machine.instance_id
            ),
        ));
    }
    Ok(Json(record.to_api()))
}

async fn get_lease(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Lease>, Failure> {
    lease_response(&shared, Some(&id), None, presented_secret(&headers))
}

#[derive(Deserialize)]
struct FindLease {
    job_key: String,
}

async fn find_lease(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<FindLease>,
    headers: HeaderMap,
) -> Result<Json<Lease>, Failure> {
    lease_response(&shared, None, Some(&q.job_key), presented_secret(&headers))
}

async fn release(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(req): Json<ReleaseRequest>,
) -> Result<Json<ReleaseResponse>, Failure> {
    let now = shared.now();
    let secret = presented_secret(&headers);
    if shared
        .pool()
        .leases()
        .get(&id)
        .is_some_and(|l| !l.accepts(secret))
    {
        return Err(no_such_lease());
    }
    let released = shared.update_journaled(|pool| {
        let machine = pool.leases().get(&id).map(|l| l.machine_id.clone());
        if let Some(class) = machine
            .as_ref()
            .and_then(|m| pool.machines().get(m))
            .map(|m| m.class.clone())
        {
            pool.record_images(&class, &req.images, now);
        }
        // A machine at max_builds or max_age must not be leased by a waiter woken below
        // before the plan retires it: retired in the same critical section.
        let released = pool.release_retiring(&id, req.outcome, req.reason.clone(), now, |m| {
            shared.retire_reason(m, now)
        });
        let op = released.then(|| JournalOp::Released {
            lease_id: id.clone(),
            outcome: req.outcome,
            reason: req.reason.clone(),
            at: now,
        });
        ((released, machine), op)
    });
    let released = match released {
        Ok(r) => r,
        Err(e) => {
            // Released in memory; make sure a snapshot carries it.
            tracing::error!(error = %e, "could not journal a release; writing a snapshot");
            let gen = shared.update(|_| ()).1;
            shared.commit(gen).await;
            (true, None)
        }
    };
    if let (true, Some(machine)) = &released {
        tracing::info!(lease = %id, machine = %machine, outcome = ?req.outcome, "released");
        shared.changed.notify_waiters();
        shared.wake.notify_one();
    }
    Ok(Json(ReleaseResponse {
        released: released.0,
    }))
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<StatusResponse> {
    let pool = shared.pool();
    let classes = {
        let backoff = shared
            .launch_backoff
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        super::class_status::class_statuses(&shared.policy, &pool, &backoff, shared.now())
    };
    Json(StatusResponse {
        classes,
        fleet: shared.config.fleet.clone(),
        draining: pool.is_draining(),
        machines: pool.machines().values().map(|m| m.status(&pool)).collect(),
        waiting: pool.waiting_by_class().clone(),
        reconcile_passes: shared.passes.load(std::sync::atomic::Ordering::Relaxed),
    })
}

async fn drain(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(req): Json<DrainRequest>,
) -> Result<Json<StatusResponse>, Failure> {
    require_operator(&shared, peer, "changing drain mode")?;
    let gen = shared.update(|pool| pool.set_draining(req.draining)).1;
    shared.commit(gen).await;
    tracing::info!(draining = req.draining, "drain mode changed");
    // Waiting acquires must learn they will not be served.
    shared.changed.notify_waiters();
    shared.wake.notify_one();
    Ok(status(State(shared)).await)
}

/// What the daemon would reap, and why: orphans (with when), and machines it already
/// decided to terminate; and fleet-tagged instances that are not its own (another
/// daemon's, outside its subnets), listed with why and never reaped.
fn audit_entries(shared: &Shared) -> Vec<AuditEntry> {
    let grace = shared.config.orphan_grace.0;
    let mut entries: Vec<AuditEntry> = shared
        .unknown
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(id, u)| match &u.not_ours {
            // Reported, never reaped (no reap time: `--terminate` leaves it alone).
            Some(why) => AuditEntry {
                instance_id: id.clone(),
                machine_id: u.machine_id.clone(),
                reason: format!("not reaped: {why}"),
                reap_at: None,
            },
            None => AuditEntry {
                instance_id: id.clone(),
                machine_id: u.machine_id.clone(),
                reason: format!(
                    "orphan: tagged {}={} but unknown to this daemon (id {}), first seen {}",
                    flotilla_proto::tags::FLEET,
                    shared.config.fleet,
                    shared.ownership.daemon_id,
                    u.first_seen.format("%Y-%m-%d %H:%M:%S UTC")
                ),
                reap_at: Some(super::saturating_add(u.first_seen, grace)),
            },
        })
        .collect();
    let pool = shared.pool();
    for m in pool.machines().values() {
        let why = match m.state {
            MachineState::Broken => {
                format!("broken: {}", m.note.as_deref().unwrap_or("unknown reason"))
            }
            MachineState::Terminating => format!(
                "terminating: {}",
                m.terminate_reason.map_or("requested", |r| r.as_str())
            ),
            _ => continue,
        };
        if m.instance_id.is_empty() {
            continue;
        }
        entries.push(AuditEntry {
            instance_id: m.instance_id.clone(),
            machine_id: Some(m.id.clone()),
            reason: why,
            reap_at: None,
        });
    }
    entries
}

async fn audit(State(shared): State<Arc<Shared>>) -> Json<AuditResponse> {
    Json(AuditResponse {
        entries: audit_entries(&shared),
        terminated: false,
    })
}

/// Terminates the orphans now, without waiting out the grace (the operator asked).
async fn audit_terminate(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> Result<Json<AuditResponse>, Failure> {
    require_operator(&shared, peer, "terminating orphans")?;
    let entries = audit_entries(&shared);
    // Only orphans carry a reap time; instances not ours never do, so stay untouched.
    let orphans: Vec<String> = entries
        .iter()
        .filter(|e| e.reap_at.is_some() && e.reason.starts_with("orphan"))
        .map(|e| e.instance_id.clone())
        .collect();
    if !orphans.is_empty() {
        shared.ec2.terminate(&orphans).await.map_err(|e| {
            Failure::new(StatusCode::BAD_GATEWAY, ErrorCode::Internal, e.to_string())
        })?;
        shared.metrics.orphans(orphans.len() as u64);
        shared.metrics.terminated("orphan", orphans.len() as u64);
        let mut unknown = shared.unknown.lock().unwrap_or_else(|p| p.into_inner());
        for id in &orphans {
            unknown.remove(id);
        }
        tracing::warn!(instances = ?orphans, "terminated orphans on operator request");
    }
    shared.wake.notify_one();
    Ok(Json(AuditResponse {
        entries,
        terminated: true,
    }))
}

/// Prometheus scrape endpoint on its own TCP listener.
pub(super) async fn serve_metrics(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(shared): State<Arc<Shared>>| async move {
                let classes: Vec<(&str, u32)> = shared
                    .config
                    .classes
                    .iter()
                    .map(|(name, class)| (name.as_str(), class.jobs_per_machine))
                    .collect();
                let body = shared.metrics.render(&shared.pool(), &classes);
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    body,
                )
            }),
        )
        .with_state(shared);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "metrics endpoint stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn only_root_and_the_daemons_user_may_operate() {
        assert!(may_operate(Some(0), 1000));
        assert!(may_operate(Some(1000), 1000));
        assert!(!may_operate(Some(1001), 1000));
        assert!(!may_operate(None, 1000));
        assert!(may_operate(Some(0), 0));
        assert!(!may_operate(Some(1000), 0));
    }

    /// One raw HTTP/1.1 request on the socket; returns what came back until the
    /// connection closed.
    async fn raw(sock: &std::path::Path, method: &str, path: &str, body: &str) -> String {
        let mut s = tokio::net::UnixStream::connect(sock).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: flotilla\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_acquire_returns_at_shutdown_and_operators_are_let_through() {
        let dir = tempfile::tempdir().unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = crate::daemon::test_shared(dir.path(), stop_rx.clone()).await;
        let sock = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(serve(shared.clone(), listener, stop_rx));

        // The test runs as the daemon's own user: operator routes are allowed.
        let client = crate::control::ControlClient::new(&sock);
        let status = client.drain(false).await.unwrap();
        assert!(!status.draining);

        // No machine exists: the acquire waits (for up to an hour) ...
        let waiter = tokio::spawn({
            let sock = sock.clone();
            async move {
                raw(
                    &sock,
                    "POST",
                    LEASES_PATH,
                    r#"{"job_key":"j1","timeout_ms":3600000}"#,
                )
                .await
            }
        });
        for _ in 0..500 {
            if !shared.pool().waiting_by_class().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(shared.pool().waiting_by_class().get("c"), Some(&1));

        // ... until the daemon stops: then it is answered at once and the server ends.
        stop_tx.send(true).unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiting acquire returned promptly at shutdown")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("shutting down"), "{answer}");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the API stopped promptly")
            .unwrap();
        assert!(shared.pool().waiting_by_class().is_empty());
        assert!(shared.pool().leases().is_empty());
    }

    /// The stages' client takes the shutdown answer as the daemon going away and keeps
    /// asking (here until its own deadline, as no daemon comes back), rather than failing
    /// its job on a daemon restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_stage_client_keeps_asking_after_a_shutdown_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = crate::daemon::test_shared(dir.path(), stop_rx.clone()).await;
        let sock = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(serve(shared.clone(), listener, stop_rx));
        let waiter = tokio::spawn({
            let sock = sock.clone();
            async move {
                crate::control::ControlClient::new(&sock)
                    .acquire(&AcquireRequest {
                        job_key: "j1".into(),
                        class: None,
                        timeout_ms: 1500,
                        secret: String::new(),
                        job_timeout_secs: None,
                    })
                    .await
            }
        });
        for _ in 0..500 {
            if !shared.pool().waiting_by_class().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop_tx.send(true).unwrap();
        server.await.unwrap();
        let _ = std::fs::remove_file(&sock);
        let err = tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(
                err,
                crate::control::ControlError::Unreachable { .. }
                    | crate::control::ControlError::Interrupted(_)
            ),
            "the shutdown answer ended the acquire: {err}"
        );
    }
}
