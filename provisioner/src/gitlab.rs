//! GitLab's REST API, as much as runner registration needs: create a runner
//! (`POST /api/v4/user/runners`), check one exists, find one by description, reset its
//! authentication token, delete it. Authenticated with an access token from the
//! environment (`PRIVATE-TOKEN` header).
//!
//! Invariant: tokens live in [`Secret`], whose Debug and Display print `***`; errors
//! carry the HTTP status and GitLab's error text, never a request or a success body.

use std::fmt;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::stack::RunnerType;

/// A token that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("GitLab {op} failed: {message}{}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
pub struct GitlabError {
    pub(crate) op: &'static str,
    pub(crate) status: Option<u16>,
    pub(crate) message: String,
}

/// What `POST /api/v4/user/runners` is given.
#[derive(Debug, Clone)]
pub(crate) struct NewRunner {
    pub(crate) runner_type: RunnerType,
    pub(crate) group_id: Option<u64>,
    pub(crate) project_id: Option<u64>,
    pub(crate) description: String,
    pub(crate) tags: Vec<String>,
    pub(crate) run_untagged: bool,
    pub(crate) locked: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct CreatedRunner {
    pub(crate) id: u64,
    pub(crate) token: Secret,
}

pub(crate) struct GitlabClient {
    base: String,
    token: Secret,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl fmt::Debug for GitlabClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitlabClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

const TIMEOUT: Duration = Duration::from_secs(30);

impl GitlabClient {
    pub(crate) fn new(base: &str, token: Secret) -> Result<Self, GitlabError> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::aws_lc_rs::default_provider())
            .map_err(|e| GitlabError {
                op: "connect",
                status: None,
                message: format!("cannot load the system's CA certificates: {e}"),
            })?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    async fn request(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), GitlabError> {
        let fail = |status: Option<u16>, message: String| GitlabError {
            op,
            status,
            message,
        };
        let url = format!("{}/api/v4{path}", self.base);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(&url)
            .header("PRIVATE-TOKEN", self.token.expose())
            .header("Accept", "application/json");
        let bytes = match body {
            Some(b) => {
                req = req.header("Content-Type", "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| fail(None, format!("bad request for {url}: {e}")))?;
        tracing::debug!(%method, url, "gitlab call");
        let resp = tokio::time::timeout(TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| {
                fail(
                    None,
                    format!("{url} did not answer in {}s", TIMEOUT.as_secs()),
                )
            })?
            .map_err(|e| fail(None, format!("cannot reach {url}: {e}")))?;
        let status = resp.status();
        let body = tokio::time::timeout(TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| fail(Some(status.as_u16()), "response body timed out".into()))?
            .map_err(|e| fail(Some(status.as_u16()), format!("reading response: {e}")))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status.is_success() || status == StatusCode::NOT_FOUND {
            return Ok((status, value));
        }
        // GitLab's error bodies are {"message": ...} or {"error": ...}; never echo more.
        let text = value
            .get("message")
            .or_else(|| value.get("error"))
            .map(|m| m.to_string())
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
        let text: String = text.chars().take(300).collect();
        Err(fail(
            Some(status.as_u16()),
            format!("{method} {path}: {text}"),
        ))
    }

    pub(crate) async fn create_runner(&self, r: &NewRunner) -> Result<CreatedRunner, GitlabError> {
        let mut body = json!({
            "runner_type": r.runner_type.as_str(),
            "description": r.description,
            "tag_list": r.tags.join(","),
            "run_untagged": r.run_untagged,
            "locked": r.locked,
        });
        if let Some(g) = r.group_id {
            body["group_id"] = json!(g);
        }
        if let Some(p) = r.project_id {
            body["project_id"] = json!(p);
        }
        let (status, v) = self
            .request("create runner", Method::POST, "/user/runners", Some(body))
            .await?;
        #[derive(Deserialize)]
        struct Created {
            id: u64,
            token: String,
        }
        if status == StatusCode::NOT_FOUND {
            return Err(GitlabError {
                op: "create runner",
                status: Some(404),
                message: "POST /user/runners: not found (GitLab 15.10 or later is needed, \
                          and the group or project must exist)"
                    .into(),
            });
        }
        let c: Created = serde_json::from_value(v).map_err(|_| GitlabError {
            op: "create runner",
            status: Some(status.as_u16()),
            message: "response has no runner id and token".into(),
        })?;
        Ok(CreatedRunner {
            id: c.id,
            token: Secret(c.token),
        })
    }

    pub(crate) async fn runner_exists(&self, id: u64) -> Result<bool, GitlabError> {
        let (status, _) = self
            .request("get runner", Method::GET, &format!("/runners/{id}"), None)
            .await?;
        Ok(status != StatusCode::NOT_FOUND)
    }

    /// The id of a runner this token can see with exactly this description.
    pub(crate) async fn find_by_description(
        &self,
        description: &str,
        runner_type: RunnerType,
    ) -> Result<Option<u64>, GitlabError> {
        for page in 1..=20 {
            let path = format!(
                "/runners?type={}&per_page=100&page={page}",
                runner_type.as_str()
            );
            let (_, v) = self
                .request("list runners", Method::GET, &path, None)
                .await?;
            let Some(list) = v.as_array() else {
                return Ok(None);
            };
            if let Some(id) = list
                .iter()
                .find(|r| r["description"].as_str() == Some(description))
                .and_then(|r| r["id"].as_u64())
            {
                return Ok(Some(id));
            }
            if list.len() < 100 {
                break;
            }
        }
        Ok(None)
    }

    pub(crate) async fn reset_token(&self, id: u64) -> Result<Secret, GitlabError> {
        let (status, v) = self
            .request(
                "reset runner token",
                Method::POST,
                &format!("/runners/{id}/reset_authentication_token"),
                None,
            )
            .await?;
        match v.get("token").and_then(Value::as_str) {
            Some(t) if status.is_success() => Ok(Secret(t.to_owned())),
            _ => Err(GitlabError {
                op: "reset runner token",
                status: Some(status.as_u16()),
                message: format!("runner {id}: no token in the response"),
            }),
        }
    }

    /// Deletes a runner; false when it was already gone.
    pub(crate) async fn delete_runner(&self, id: u64) -> Result<bool, GitlabError> {
        let (status, _) = self
            .request(
                "delete runner",
                Method::DELETE,
                &format!("/runners/{id}"),
                None,
            )
            .await?;
        Ok(status != StatusCode::NOT_FOUND)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("glrt-very-secret");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        let c = CreatedRunner { id: 1, token: s };
        assert!(!format!("{c:?}").contains("very-secret"));
    }
}
