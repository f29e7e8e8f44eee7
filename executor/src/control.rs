//! Client side of the control API: one HTTP/1 request per connection over the daemon's
//! Unix socket. Used by the stages and the operator commands.
//!
//! A daemon restart (an upgrade, a crash and systemd's restart) must not fail jobs: the
//! stages use a client with [`ControlClient::with_patience`], which retries a request
//! whose daemon is unreachable or went away mid-request until the daemon is back or the
//! patience runs out. Every request it retries is idempotent (acquire per job key and
//! secret, release, lookups).

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_proto::api::{
    AcquireRequest, ApiError, AuditResponse, DrainRequest, Lease, ReleaseOutcome, ReleaseRequest,
    ReleaseResponse, StatusResponse, AUDIT_PATH, DRAIN_PATH, LEASES_PATH, LEASE_SECRET_HEADER,
    STATUS_PATH,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "flotilla daemon is not reachable on {socket}: {source} (is `flotilla daemon` running?)"
    )]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("flotilla daemon: {0}")]
    Api(ApiError),
    #[error("flotilla daemon answered unexpectedly: {0}")]
    Protocol(String),
    /// The connection broke before the answer arrived (the daemon stopped mid-request).
    #[error("flotilla daemon went away during the request: {0}")]
    Interrupted(String),
}

impl ControlError {
    /// Whether the daemon (not the request) is the problem, so the same request may be
    /// sent again once it is back.
    fn is_retryable(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Interrupted(_) => true,
            Self::Api(e) => e.code == flotilla_proto::api::ErrorCode::ShuttingDown,
            Self::Protocol(_) => false,
        }
    }
}

pub struct ControlClient {
    socket: PathBuf,
    /// How long to keep retrying while the daemon is unreachable.
    patience: Duration,
}

const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(1);

impl ControlClient {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
            patience: Duration::ZERO,
        }
    }

    /// Retries requests for up to `patience` while the daemon is down or restarting.
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// Sends the request produced by `attempt` (given the time left) until it gets an
    /// answer, or the daemon stayed unreachable for longer than the patience.
    async fn patiently<T, F, Fut>(&self, mut attempt: F) -> Result<T, ControlError>
    where
        F: FnMut(Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, ControlError>>,
    {
        let deadline = tokio::time::Instant::now() + self.patience;
        let mut delay = FIRST_RETRY;
        let mut told = false;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match attempt(left).await {
                Err(e) if e.is_retryable() && tokio::time::Instant::now() + delay < deadline => {
                    if !told {
                        eprintln!(
                            "flotilla: {e}; waiting up to {}s for the daemon to come back",
                            left.as_secs()
                        );
                        told = true;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY);
                }
                other => return other,
            }
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<T, ControlError> {
        self.call_with_secret(method, path, body, timeout, None)
            .await
    }

    async fn call_with_secret<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Duration,
        secret: Option<&str>,
    ) -> Result<T, ControlError> {
        let unreachable = |source| ControlError::Unreachable {
            socket: self.socket.clone(),
            source,
        };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(unreachable)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ControlError::Interrupted(e.to_string()))?;
        tokio::spawn(conn);
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ControlError::Protocol(e.to_string()))?,
            None => Vec::new(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "flotilla")
            .header("content-type", "application/json");
        if let Some(secret) = secret.filter(|s| !s.is_empty()) {
            req = req.header(LEASE_SECRET_HEADER, secret);
        }
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| ControlError::Protocol(e.to_string()))?;
        let resp = tokio::time::timeout(timeout, sender.send_request(req))
            .await
            .map_err(|_| {
                ControlError::Protocol(format!("no answer within {}s", timeout.as_secs()))
            })?
            .map_err(|e| ControlError::Interrupted(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ControlError::Interrupted(e.to_string()))?
            .to_bytes();
        if status == StatusCode::OK {
            serde_json::from_slice(&body).map_err(|e| ControlError::Protocol(e.to_string()))
        } else {
            match serde_json::from_slice::<ApiError>(&body) {
                Ok(e) => Err(ControlError::Api(e)),
                Err(_) => Err(ControlError::Protocol(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&body)
                ))),
            }
        }
    }

    /// Asks for a machine; with patience, a daemon restart while waiting only delays the
    /// grant (the request is sent again with the time that is left).
    pub async fn acquire(&self, req: &AcquireRequest) -> Result<Lease, ControlError> {
        let total = Duration::from_millis(req.timeout_ms);
        let started = tokio::time::Instant::now();
        let patient = Self {
            socket: self.socket.clone(),
            patience: self.patience.max(total),
        };
        patient
            .patiently(|_| {
                let left = total.saturating_sub(started.elapsed());
                let req = AcquireRequest {
                    timeout_ms: left.as_millis() as u64,
                    ..req.clone()
                };
                async move {
                    // The daemon enforces the wait; allow a little more for the answer.
                    let timeout = left + Duration::from_secs(10);
                    self.call(Method::POST, LEASES_PATH, Some(&req), timeout)
                        .await
                }
            })
            .await
    }

    /// The lease, if `secret` is the one it was acquired with.
    pub async fn lease(&self, lease_id: &str, secret: &str) -> Result<Lease, ControlError> {
        self.get_lease(&format!("{LEASES_PATH}/{lease_id}"), secret)
            .await
    }

    async fn get_lease(&self, path: &str, secret: &str) -> Result<Lease, ControlError> {
        self.patiently(|_| {
            self.call_with_secret(
                Method::GET,
                path,
                None::<&()>,
                Duration::from_secs(30),
                Some(secret),
            )
        })
        .await
    }

    pub async fn lease_for_job(&self, job_key: &str, secret: &str) -> Result<Lease, ControlError> {
        let q: String = job_key
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        self.get_lease(&format!("{LEASES_PATH}?job_key={q}"), secret)
            .await
    }

    pub async fn release(
        &self,
        lease_id: &str,
        secret: &str,
        outcome: ReleaseOutcome,
        reason: Option<String>,
        images: Vec<String>,
    ) -> Result<ReleaseResponse, ControlError> {
        let path = format!("{LEASES_PATH}/{lease_id}/release");
        let body = ReleaseRequest {
            outcome,
            reason,
            images,
        };
        self.patiently(|_| {
            self.call_with_secret(
                Method::POST,
                &path,
                Some(&body),
                Duration::from_secs(30),
                Some(secret),
            )
        })
        .await
    }

    pub async fn status(&self) -> Result<StatusResponse, ControlError> {
        self.call(
            Method::GET,
            STATUS_PATH,
            None::<&()>,
            Duration::from_secs(30),
        )
        .await
    }

    pub async fn drain(&self, draining: bool) -> Result<StatusResponse, ControlError> {
        self.call(
            Method::POST,
            DRAIN_PATH,
            Some(&DrainRequest { draining }),
            Duration::from_secs(30),
        )
        .await
    }

    pub async fn audit(&self, terminate: bool) -> Result<AuditResponse, ControlError> {
        if terminate {
            self.call(
                Method::POST,
                &format!("{AUDIT_PATH}/terminate"),
                Some(&()),
                Duration::from_secs(120),
            )
            .await
        } else {
            self.call(
                Method::GET,
                AUDIT_PATH,
                None::<&()>,
                Duration::from_secs(30),
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_daemon_that_comes_back_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("flotilla.sock");
        let client = ControlClient::new(&socket).with_patience(Duration::from_secs(20));
        // The daemon comes back (binds its socket) while the client waits.
        let serve = {
            let socket = socket.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let listener = tokio::net::UnixListener::bind(&socket).unwrap();
                let (stream, _) = listener.accept().await.unwrap();
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        r#"{"released": true}"#,
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        };
        let (released, ()) = tokio::join!(
            client.release("l-1", "s", ReleaseOutcome::Healthy, None, Vec::new()),
            serve
        );
        assert!(released.unwrap().released);
    }

    #[tokio::test]
    async fn without_patience_an_absent_daemon_is_an_error_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let client = ControlClient::new(&dir.path().join("none.sock"));
        let err = client.status().await.unwrap_err();
        assert!(matches!(err, ControlError::Unreachable { .. }), "{err}");
    }
}
