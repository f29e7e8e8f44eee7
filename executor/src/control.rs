//! Client side of the control API: one HTTP/1 request per connection over the daemon's
//! Unix socket. Used by the stages and the operator commands.

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
}

pub struct ControlClient {
    socket: PathBuf,
}

impl ControlClient {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
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
            .map_err(|e| ControlError::Protocol(e.to_string()))?;
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
            .map_err(|e| ControlError::Protocol(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ControlError::Protocol(e.to_string()))?
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

    pub async fn acquire(&self, req: &AcquireRequest) -> Result<Lease, ControlError> {
        // The daemon enforces the wait; allow a little more for the answer to arrive.
        let timeout = Duration::from_millis(req.timeout_ms) + Duration::from_secs(10);
        self.call(Method::POST, LEASES_PATH, Some(req), timeout)
            .await
    }

    /// The lease, if `secret` is the one it was acquired with.
    pub async fn lease(&self, lease_id: &str, secret: &str) -> Result<Lease, ControlError> {
        self.call_with_secret(
            Method::GET,
            &format!("{LEASES_PATH}/{lease_id}"),
            None::<&()>,
            Duration::from_secs(30),
            Some(secret),
        )
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
        self.call_with_secret(
            Method::GET,
            &format!("{LEASES_PATH}?job_key={q}"),
            None::<&()>,
            Duration::from_secs(30),
            Some(secret),
        )
        .await
    }

    pub async fn release(
        &self,
        lease_id: &str,
        secret: &str,
        outcome: ReleaseOutcome,
        reason: Option<String>,
    ) -> Result<ReleaseResponse, ControlError> {
        self.call_with_secret(
            Method::POST,
            &format!("{LEASES_PATH}/{lease_id}/release"),
            Some(&ReleaseRequest { outcome, reason }),
            Duration::from_secs(30),
            Some(secret),
        )
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
