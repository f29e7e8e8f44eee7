//! The part of GitLab the helper container talks to, and the address it is reached on.
//!
//! [`GitLabStub`] serves the jobs artifacts API as gitlab-runner's `artifacts-uploader` and
//! `artifacts-downloader` use it: `POST /api/v4/jobs/:id/artifacts` (multipart field
//! `file`, `JOB-TOKEN` of that job, `artifact_format`/`artifact_type`/`expire_in` in the
//! query) stores the archive; `GET /api/v4/jobs/:id/artifacts` (`JOB-TOKEN` of any running
//! job) returns it. Tokens are valid while the job runs, as on GitLab: the runner emulator
//! starts and finishes jobs through [`GitLabJobs`]. Uploads are kept for tests to compare.
//!
//! [`ServiceAddress`]: containers on a build machine's bridge networks cannot reach
//! 127.0.0.1 (that is their own loopback). The sandbox gives the host one private address,
//! `10.254.<slot>.1/32`, on an empty bridge interface of its own (`fltsvc<slot>`; the
//! machines' pools are 10.<slot>.<k>.0/24 with slots 100..=199, so 10.254/16 is never
//! one of them), and serves the stub and the S3 forwarder there only. Containers reach it
//! through their bridge's gateway (host INPUT); nothing listens on other interfaces.
//!
//! Invariant: the interface lives as long as [`ServiceAddress`] (removed on drop); it is
//! noted in `<sandbox>/links` so a later start in the same directory, or the next sandbox
//! holding the same slot, removes what a crashed run left.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

/// One artifacts archive as the stub received it.
#[derive(Clone)]
pub struct Upload {
    pub job_id: u64,
    /// The multipart part's filename (`artifacts.zip` unless `--name` was given).
    pub filename: String,
    pub bytes: Arc<Vec<u8>>,
    /// Hex sha256 of `bytes`.
    pub sha256: String,
    /// The query (`artifact_format`, `artifact_type`, `expire_in`).
    pub query: BTreeMap<String, String>,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("job_id", &self.job_id)
            .field("filename", &self.filename)
            .field("size", &self.bytes.len())
            .field("sha256", &self.sha256)
            .field("query", &self.query)
            .finish()
    }
}

#[derive(Default)]
struct Jobs {
    /// Running jobs and their tokens.
    running: BTreeMap<u64, String>,
    artifacts: BTreeMap<u64, Upload>,
    /// `METHOD path -> status`, in order (no tokens).
    requests: Vec<String>,
}

/// The stub's job table, shared with the runner emulator (which starts and finishes jobs
/// like GitLab hands them out). Cloning shares it.
#[derive(Clone, Default)]
pub struct GitLabJobs(Arc<Mutex<Jobs>>);

impl std::fmt::Debug for GitLabJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let j = self.lock();
        f.debug_struct("GitLabJobs")
            .field("running", &j.running.keys().collect::<Vec<_>>())
            .field("artifacts", &j.artifacts.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl GitLabJobs {
    fn lock(&self) -> MutexGuard<'_, Jobs> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The runner picked up job `id`: its token is valid from now on.
    pub fn start_job(&self, id: u64, token: &str) {
        self.lock().running.insert(id, token.to_owned());
    }

    /// Job `id` ended: its token is no longer accepted.
    pub fn finish_job(&self, id: u64) {
        self.lock().running.remove(&id);
    }

    /// The artifacts job `id` uploaded, if any.
    pub fn artifacts(&self, id: u64) -> Option<Upload> {
        self.lock().artifacts.get(&id).cloned()
    }

    /// Every request so far (`POST /api/v4/jobs/7/artifacts -> 201`).
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    fn note(&self, line: String) {
        self.lock().requests.push(line);
    }
}

/// The running stub; stops when dropped.
pub struct GitLabStub {
    addr: SocketAddr,
    jobs: GitLabJobs,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for GitLabStub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitLabStub")
            .field("addr", &self.addr)
            .finish()
    }
}

/// Biggest archive accepted (GitLab's default maximum artifacts size is 100 MB).
const MAX_ARTIFACTS: usize = 256 << 20;

impl GitLabStub {
    /// Serves the API on `ip`, a free port.
    pub async fn start(ip: Ipv4Addr) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .with_context(|| format!("binding the GitLab stub on {ip}"))?;
        let addr = listener.local_addr()?;
        let jobs = GitLabJobs::default();
        let app = Router::new()
            .route(
                "/api/v4/jobs/{id}/artifacts",
                get(download_artifacts).post(upload_artifacts),
            )
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(MAX_ARTIFACTS))
            .with_state(jobs.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!("GitLab stub stopped: {e}");
            }
        });
        Ok(Self { addr, jobs, task })
    }

    /// `http://10.254.<slot>.1:<port>`: the runner's `url` and `CI_SERVER_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn jobs(&self) -> &GitLabJobs {
        &self.jobs
    }
}

impl Drop for GitLabStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn reply(jobs: &GitLabJobs, method: &str, id: u64, status: StatusCode, body: &str) -> Response {
    jobs.note(format!(
        "{method} /api/v4/jobs/{id}/artifacts -> {}",
        status.as_u16()
    ));
    (
        status,
        [("content-type", "application/json")],
        format!("{{\"message\":\"{body}\"}}"),
    )
        .into_response()
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "{\"error\":\"404 Not Found\"}").into_response()
}

async fn upload_artifacts(
    State(jobs): State<GitLabJobs>,
    UrlPath(id): UrlPath<u64>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = headers.get("job-token").and_then(|v| v.to_str().ok());
    let expected = jobs.lock().running.get(&id).cloned();
    match (token, expected) {
        (None, _) => {
            return reply(
                &jobs,
                "POST",
                id,
                StatusCode::UNAUTHORIZED,
                "401 Unauthorized",
            )
        }
        (Some(t), Some(e)) if t == e => {}
        _ => return reply(&jobs, "POST", id, StatusCode::FORBIDDEN, "403 Forbidden"),
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let Some((filename, bytes)) = multipart_file(content_type, &body) else {
        return reply(
            &jobs,
            "POST",
            id,
            StatusCode::BAD_REQUEST,
            "400 Bad request - file is missing",
        );
    };
    let sha256 = hex::encode(Sha256::digest(&bytes));
    jobs.lock().artifacts.insert(
        id,
        Upload {
            job_id: id,
            filename,
            bytes: Arc::new(bytes),
            sha256,
            query,
        },
    );
    reply(&jobs, "POST", id, StatusCode::CREATED, "201 Created")
}

async fn download_artifacts(
    State(jobs): State<GitLabJobs>,
    UrlPath(id): UrlPath<u64>,
    headers: HeaderMap,
) -> Response {
    let token = headers.get("job-token").and_then(|v| v.to_str().ok());
    let allowed = token.is_some_and(|t| jobs.lock().running.values().any(|r| r == t));
    if !allowed {
        return reply(
            &jobs,
            "GET",
            id,
            StatusCode::UNAUTHORIZED,
            "401 Unauthorized",
        );
    }
    let Some(upload) = jobs.artifacts(id) else {
        return reply(&jobs, "GET", id, StatusCode::NOT_FOUND, "404 Not found");
    };
    jobs.note(format!("GET /api/v4/jobs/{id}/artifacts -> 200"));
    (
        StatusCode::OK,
        [
            ("content-type", "application/octet-stream".to_owned()),
            (
                "content-disposition",
                format!("attachment; filename=\"{}\"", upload.filename),
            ),
        ],
        upload.bytes.as_ref().clone(),
    )
        .into_response()
}

/// The `file` part of a multipart/form-data body: (filename, content).
fn multipart_file(content_type: &str, body: &[u8]) -> Option<(String, Vec<u8>)> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))?
        .trim_matches('"');
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let mut rest = body;
    loop {
        let start = find(rest, delimiter)? + delimiter.len();
        rest = &rest[start..];
        if rest.starts_with(b"--") {
            return None;
        }
        let rest_part = rest.strip_prefix(b"\r\n")?;
        let head_end = find(rest_part, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&rest_part[..head_end]).into_owned();
        let content = &rest_part[head_end + 4..];
        let end = find(content, &[b"\r\n", delimiter].concat())?;
        let disposition = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))?
            .to_owned();
        let param = |name: &str| {
            disposition.split(';').map(str::trim).find_map(|p| {
                p.strip_prefix(&format!("{name}="))
                    .map(|v| v.trim_matches('"').to_owned())
            })
        };
        if param("name").as_deref() == Some("file") {
            return Some((
                param("filename").unwrap_or_default(),
                content[..end].to_vec(),
            ));
        }
        rest = &content[end..];
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        match hay[i..=hay.len() - needle.len()]
            .iter()
            .position(|b| *b == first)
        {
            Some(p) => i += p,
            None => return None,
        }
        if hay[i..].starts_with(needle) {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// The host's private address for one sandbox slot, on an empty bridge interface.
#[derive(Debug)]
pub struct ServiceAddress {
    pub ip: Ipv4Addr,
    pub link: String,
    removed: bool,
}

/// Interface name of a slot's service address.
pub fn link_name(slot: u8) -> String {
    format!("fltsvc{slot}")
}

impl ServiceAddress {
    /// Creates `fltsvc<slot>` with `10.254.<slot>.1/32` (replacing a leftover of a crashed
    /// run: the caller holds the slot, so an interface of that name is no one else's) and
    /// notes it in `<dir>/links`.
    pub fn create(slot: u8, dir: &Path) -> Result<Self> {
        let ip = Ipv4Addr::new(10, 254, slot, 1);
        let link = link_name(slot);
        remove_link(&link);
        let holders = ip_cmd(&["-o", "-4", "addr", "show", "to", &format!("{ip}/32")])?;
        if !holders.trim().is_empty() {
            bail!("{ip} is already assigned on this host: {}", holders.trim());
        }
        record_link(dir, &link);
        ip_cmd(&["link", "add", &link, "type", "bridge"])
            .with_context(|| format!("creating the sandbox service interface {link}"))?;
        let me = Self {
            ip,
            link: link.clone(),
            removed: false,
        };
        ip_cmd(&["addr", "add", &format!("{ip}/32"), "dev", &link])?;
        ip_cmd(&["link", "set", &link, "up"])?;
        warn_if_input_closed(ip);
        Ok(me)
    }

    /// Removes the interface (also done on drop).
    pub fn remove(&mut self) {
        if !self.removed {
            remove_link(&self.link);
            self.removed = true;
        }
    }
}

impl Drop for ServiceAddress {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Containers reach the service address through the host's INPUT chain (local delivery
/// from their bridge); Docker's rules only touch FORWARD and nat. A closed INPUT policy
/// would make every cache and artifacts transfer time out: say so up front.
fn warn_if_input_closed(ip: Ipv4Addr) {
    let Ok(out) = Command::new("iptables")
        .args(["-w", "-S", "INPUT"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    else {
        return;
    };
    let rules = String::from_utf8_lossy(&out.stdout);
    if let Some(policy) = rules.lines().find_map(|l| l.strip_prefix("-P INPUT ")) {
        if policy.trim() != "ACCEPT" {
            eprintln!(
                "sandbox: warning: the host's iptables INPUT policy is {}: containers on the \
                 machines' bridges may not reach {ip} (GitLab stub, S3) unless a rule accepts it",
                policy.trim()
            );
        }
    }
}

fn links_file(dir: &Path) -> PathBuf {
    dir.join("links")
}

fn record_link(dir: &Path, link: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(links_file(dir))
    {
        let _ = writeln!(f, "{link}");
    }
}

/// Deletes the interface if it exists and is one of ours (`fltsvc*`).
pub fn remove_link(link: &str) {
    if link.starts_with("fltsvc") && Path::new("/sys/class/net").join(link).exists() {
        let _ = ip_cmd(&["link", "delete", link]);
    }
}

/// Removes the interfaces a previous run in `dir` noted in `<dir>/links`.
pub fn remove_leftover_links(dir: &Path) {
    let Ok(text) = std::fs::read_to_string(links_file(dir)) else {
        return;
    };
    for link in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if Path::new("/sys/class/net").join(link).exists() {
            eprintln!("sandbox: removing leftover interface {link} of a previous run");
            remove_link(link);
        }
    }
}

fn ip_cmd(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_file_part() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n\
--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"artifacts.zip\"\r\n\
Content-Type: application/octet-stream\r\n\r\nPK\r\n\x00\x01\r\n--XyZ--\r\n";
        let (name, bytes) = multipart_file("multipart/form-data; boundary=XyZ", body).unwrap();
        assert_eq!(name, "artifacts.zip");
        assert_eq!(bytes, b"PK\r\n\x00\x01");
        assert!(multipart_file("multipart/form-data; boundary=Q", body).is_none());
    }
}
