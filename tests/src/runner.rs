//! The runner emulator: calls the `flotilla` stages exactly as gitlab-runner's custom
//! executor does (see shared/reference/gitlab-custom-executor.md): a per-job
//! `custom-executor*` temp dir as cwd and TMPDIR, the documented environment (exit-code
//! variables, JOB_RESPONSE_FILE, `job_env` from `config`, `CUSTOM_ENV_*`), the stage order
//! and failure rules of `common/build.go`, every call a new process in its own process
//! group, cancellation as SIGTERM to that group, and `cleanup` always last.
//!
//! The predefined stages that need the runner binary (restore_cache, download_artifacts,
//! archive_cache*, upload_artifacts_*) are written from the job payload's `cache`,
//! `artifacts` and `dependencies` the way gitlab-runner's shells/abstract.go writes them
//! for the custom executor (whose runner command is `gitlab-runner`), with the distributed
//! cache's pre-signed S3 URLs ([`S3Cache`]) and the GitLab URL ([`RunnerOptions::server_url`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::gitlab_stub::GitLabJobs;
use crate::moto::{Presigned, S3Presigner};
use crate::script::{stage_script, user_command, BashWriter};

/// gitlab-runner's values today; the driver must read them from the environment.
pub const BUILD_FAILURE_EXIT_CODE: i32 = 1;
pub const SYSTEM_FAILURE_EXIT_CODE: i32 = 2;

/// One job as GitLab would send it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: u64,
    /// `image:`; `None` means the driver's default image.
    pub image: Option<String>,
    /// `services:` entries (`{name, alias, entrypoint, command, variables}`).
    pub services: Vec<serde_json::Value>,
    pub script: Vec<String>,
    pub after_script: Vec<String>,
    /// User variables (e.g. `FLOTILLA_CLASS`), passed as job variables.
    pub variables: Vec<(String, String)>,
    /// `group/project`.
    pub project_path: String,
    /// The job token (secret).
    pub token: String,
    /// Overrides the body of a stage (e.g. `archive_cache`), or enables a stage that is
    /// empty by default. An empty body skips the stage.
    pub stage_bodies: BTreeMap<String, Vec<String>>,
    /// Job timeout in seconds (CI_JOB_TIMEOUT).
    pub timeout_secs: u64,
    /// Top-level keys of the job payload (JOB_RESPONSE_FILE) that replace the generated
    /// ones: `image` with `entrypoint`/`pull_policy`, `credentials`, ...
    pub payload: serde_json::Map<String, serde_json::Value>,
}

impl Job {
    /// A job running `script` in the default image.
    pub fn new(id: u64, script: &[&str]) -> Self {
        Self {
            id,
            image: None,
            services: Vec::new(),
            script: script.iter().map(|s| s.to_string()).collect(),
            after_script: Vec::new(),
            variables: Vec::new(),
            project_path: "sandbox/project".into(),
            token: format!("glcbt-sandbox-secret-{id}-{}", crate::util::unique_token()),
            stage_bodies: BTreeMap::new(),
            timeout_secs: 3600,
            payload: serde_json::Map::new(),
        }
    }

    pub fn with_after_script(mut self, lines: &[&str]) -> Self {
        self.after_script = lines.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn with_image(mut self, image: &str) -> Self {
        self.image = Some(image.to_owned());
        self
    }

    pub fn with_variable(mut self, key: &str, value: &str) -> Self {
        self.variables.push((key.into(), value.into()));
        self
    }

    /// `artifacts: paths:` as GitLab sends it in the job payload (one `archive` artifact,
    /// zip, on success, no name).
    pub fn with_artifacts(mut self, paths: &[&str]) -> Self {
        self.payload.insert(
            "artifacts".into(),
            serde_json::json!([{
                "name": null, "untracked": false, "paths": paths, "exclude": [],
                "when": "on_success", "artifact_type": "archive", "artifact_format": "zip",
                "expire_in": "1 week",
            }]),
        );
        self
    }

    /// `cache: {key, paths}` as GitLab sends it (policy pull-push, on success).
    pub fn with_cache(mut self, key: &str, paths: &[&str]) -> Self {
        self.payload.insert(
            "cache".into(),
            serde_json::json!([{
                "key": key, "untracked": false, "policy": "pull-push", "paths": paths,
                "when": "on_success", "fallback_keys": [],
            }]),
        );
        self
    }

    /// One more entry of `dependencies` (a job whose artifacts this one downloads), as
    /// GitLab sends it: the token is this job's own.
    pub fn with_dependency(mut self, id: u64, name: &str, filename: &str, size: u64) -> Self {
        let dep = serde_json::json!({
            "id": id, "name": name, "token": self.token,
            "artifacts_file": {"filename": filename, "size": size},
        });
        match self.payload.get_mut("dependencies") {
            Some(serde_json::Value::Array(list)) => list.push(dep),
            _ => {
                self.payload
                    .insert("dependencies".into(), serde_json::Value::Array(vec![dep]));
            }
        }
        self
    }
}

/// `[runners.cache]` with `Type = "s3"`: the runner pre-signs the cache object's URLs.
#[derive(Debug, Clone)]
pub struct S3Cache {
    pub presigner: S3Presigner,
    /// `Shared`: no `runner/<short token>/` namespace in object names.
    pub shared: bool,
    /// `Path`: a prefix of every object name.
    pub path: String,
}

/// When to cancel a job, like a user pressing "Cancel" in the UI: on an event, never after
/// a guessed time.
#[derive(Debug, Clone)]
pub enum CancelWhen {
    /// When a line of the stage's stdout or stderr contains this text.
    OutputContains(String),
    /// When the test notifies (e.g. once it saw the script's process on the machine). A
    /// notification given before the stage starts (`notify_one` stores it) cancels the
    /// stage as soon as it runs.
    Notified(std::sync::Arc<tokio::sync::Notify>),
}

#[derive(Debug, Clone)]
pub struct Cancel {
    /// Stage (run stage name, or `prepare`) during which to cancel.
    pub stage: String,
    pub when: CancelWhen,
}

/// The gitlab-runner version and revision the emulator says it is (`CI_RUNNER_VERSION`,
/// `CI_RUNNER_REVISION`), as a real runner does in every job's variables.
pub const RUNNER_VERSION: &str = "18.6.0";
pub const RUNNER_REVISION: &str = "6d9a3d3e";

/// How the emulated runner calls the driver.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    pub flotilla_bin: PathBuf,
    /// Passed as `--config`; `None` leaves it to the driver (FLOTILLA_CONFIG / default).
    pub config_path: Option<PathBuf>,
    /// Extra environment for every call (the runner's own environment).
    pub env: Vec<(String, String)>,
    pub runner_short_token: String,
    pub concurrent_id: u32,
    /// The runner's configured builds_dir/cache_dir (used until `config` overrides them).
    pub builds_dir: String,
    pub cache_dir: String,
    /// Print each line of the driver's output to the terminal as it comes.
    pub echo: bool,
    pub cancel: Option<Cancel>,
    /// Time between SIGTERM and SIGKILL (gitlab-runner: graceful_kill_timeout).
    pub graceful_kill_timeout: Duration,
    /// Per call timeout (gitlab-runner: *_exec_timeout); acts like a cancel.
    pub stage_timeout: Duration,
    /// Config+prepare attempts (gitlab-runner: 3, 3 s apart).
    pub prepare_attempts: u32,
    pub prepare_retry_delay: Duration,
    /// Where the `custom-executor*` dirs are made (default: the system temp dir).
    pub work_dir: Option<PathBuf>,
    /// The GitLab URL: the runner's `url` (the artifacts commands' `--url`) and
    /// `CI_SERVER_URL`.
    pub server_url: String,
    /// The distributed cache; `None`: caches stay on the machine (`--file` only).
    pub cache: Option<S3Cache>,
    /// GitLab's job table (the sandbox's stub): a job's token is valid while it runs.
    pub gitlab: Option<GitLabJobs>,
}

impl RunnerOptions {
    pub fn new(flotilla_bin: &Path, config_path: Option<&Path>) -> Self {
        Self {
            flotilla_bin: flotilla_bin.to_owned(),
            config_path: config_path.map(Path::to_owned),
            env: Vec::new(),
            runner_short_token: "sbxrnr01".into(),
            concurrent_id: 0,
            builds_dir: "/builds".into(),
            cache_dir: "/cache".into(),
            echo: false,
            cancel: None,
            graceful_kill_timeout: Duration::from_secs(30),
            stage_timeout: Duration::from_secs(600),
            prepare_attempts: 3,
            prepare_retry_delay: Duration::from_secs(3),
            work_dir: None,
            server_url: "https://gitlab.sandbox.invalid".into(),
            cache: None,
            gitlab: None,
        }
    }
}

/// What one call of the driver did.
#[derive(Debug, Clone)]
pub struct StageResult {
    /// `config`, `prepare`, a run stage name (`build_script`, ...) or `cleanup`.
    pub name: String,
    /// `None` when killed by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// When the call started: to order it against what the proxy or the emulator saw.
    pub started: Instant,
    pub duration: Duration,
    /// The first line of BUILD_EXIT_CODE_FILE after a build failure.
    pub build_exit_code: Option<i32>,
    /// Time from our SIGTERM to the process's exit, when we cancelled it.
    pub cancelled_after: Option<Duration>,
    /// Whether we had to SIGKILL it.
    pub killed: bool,
}

impl StageResult {
    pub fn ok(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// `config`'s JSON.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConfigOutput {
    pub driver: Option<Driver>,
    pub hostname: Option<String>,
    pub builds_dir: Option<String>,
    pub cache_dir: Option<String>,
    pub builds_dir_is_shared: Option<bool>,
    #[serde(default)]
    pub job_env: BTreeMap<String, String>,
    pub shell: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Driver {
    pub name: Option<String>,
    pub version: Option<String>,
}

/// How the job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A stage exited with BUILD_FAILURE_EXIT_CODE; the user's code from the file.
    BuildFailure {
        stage: String,
        exit_code: Option<i32>,
    },
    /// A stage exited with SYSTEM_FAILURE_EXIT_CODE (or `config` printed no JSON).
    SystemFailure {
        stage: String,
        detail: String,
    },
    /// A stage exited with some other code or a signal.
    UnknownFailure {
        stage: String,
        exit_code: Option<i32>,
    },
    Cancelled {
        stage: String,
    },
}

#[derive(Debug, Clone)]
pub struct JobResult {
    pub config: Option<ConfigOutput>,
    /// Every call in order, `config` to `cleanup`.
    pub stages: Vec<StageResult>,
    pub outcome: Outcome,
    pub cleanup_exit: Option<i32>,
    /// The job's `CI_PROJECT_DIR`.
    pub project_dir: String,
}

impl JobResult {
    /// The last call of that name.
    pub fn stage(&self, name: &str) -> Option<&StageResult> {
        self.stages.iter().rev().find(|s| s.name == name)
    }
    pub fn ran(&self, name: &str) -> bool {
        self.stage(name).is_some()
    }
    /// A readable trace of every call, for assertion messages.
    pub fn describe(&self) -> String {
        let mut s = format!("outcome: {:?}\n", self.outcome);
        for st in &self.stages {
            s.push_str(&format!(
                "--- {} exit={:?} signal={:?} in {:?}\n[stdout]\n{}\n[stderr]\n{}\n",
                st.name,
                st.exit_code,
                st.signal,
                st.duration,
                st.stdout.trim_end(),
                st.stderr.trim_end()
            ));
        }
        s
    }
}

/// One job's temp dir and environment: everything needed to call the driver like
/// gitlab-runner does. Also usable for single calls (e.g. a stage with a bad config).
pub struct JobContext {
    pub opts: RunnerOptions,
    pub job: Job,
    dir: tempfile::TempDir,
    /// From `config`.
    pub job_env: BTreeMap<String, String>,
    pub builds_dir: String,
    pub cache_dir: String,
    script_counter: u32,
    /// The job payload (JOB_RESPONSE_FILE) as written.
    payload: serde_json::Value,
    /// Pre-signed cache URLs by `"<METHOD> <object name>"` ([`JobContext::presign_cache`]).
    cache_urls: BTreeMap<String, Presigned>,
}

impl Drop for JobContext {
    fn drop(&mut self) {
        if let Some(g) = &self.opts.gitlab {
            g.finish_job(self.job.id);
        }
    }
}

impl JobContext {
    pub fn new(opts: RunnerOptions, job: Job) -> Result<Self> {
        let mut b = tempfile::Builder::new();
        b.prefix("custom-executor");
        let dir = match &opts.work_dir {
            Some(w) => {
                std::fs::create_dir_all(w)?;
                b.tempdir_in(w)
            }
            None => b.tempdir(),
        }
        .context("creating the custom-executor temp dir")?;
        let response = dir.path().join("job-response.json");
        let payload = job_response(&job, &opts, &opts.builds_dir);
        let body = serde_json::to_vec_pretty(&payload)?;
        crate::util::write_file(&response, &body, 0o600)?;
        let (builds_dir, cache_dir) = (opts.builds_dir.clone(), opts.cache_dir.clone());
        if let Some(g) = &opts.gitlab {
            g.start_job(job.id, &job.token);
        }
        Ok(Self {
            opts,
            job,
            dir,
            job_env: BTreeMap::new(),
            builds_dir,
            cache_dir,
            script_counter: 0,
            payload,
            cache_urls: BTreeMap::new(),
        })
    }

    /// The per-job temp dir (cwd and TMPDIR of every call).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn build_exit_code_file(&self) -> PathBuf {
        self.dir().join("build-exit-code")
    }

    pub fn project_dir(&self) -> String {
        format!(
            "{}/{}",
            self.builds_dir.trim_end_matches('/'),
            self.job.project_path
        )
    }

    /// The job's predefined and user variables.
    pub fn variables(&self) -> Vec<(String, String)> {
        let j = &self.job;
        let mut v: Vec<(String, String)> = vec![
            ("CI".into(), "true".into()),
            ("GITLAB_CI".into(), "true".into()),
            ("CI_JOB_ID".into(), j.id.to_string()),
            ("CI_JOB_NAME".into(), "sandbox-job".into()),
            ("CI_JOB_STAGE".into(), "test".into()),
            ("CI_JOB_TOKEN".into(), j.token.clone()),
            ("CI_PIPELINE_ID".into(), (j.id / 10 + 1).to_string()),
            ("CI_PROJECT_PATH".into(), j.project_path.clone()),
            ("CI_BUILDS_DIR".into(), self.builds_dir.clone()),
            ("CI_PROJECT_DIR".into(), self.project_dir()),
            (
                "CI_RUNNER_SHORT_TOKEN".into(),
                self.opts.runner_short_token.clone(),
            ),
            (
                "CI_CONCURRENT_ID".into(),
                self.opts.concurrent_id.to_string(),
            ),
            (
                "CI_CONCURRENT_PROJECT_ID".into(),
                self.opts.concurrent_id.to_string(),
            ),
            ("CI_JOB_TIMEOUT".into(), j.timeout_secs.to_string()),
            ("CI_SERVER_URL".into(), self.opts.server_url.clone()),
            ("CI_RUNNER_VERSION".into(), RUNNER_VERSION.into()),
            ("CI_RUNNER_REVISION".into(), RUNNER_REVISION.into()),
        ];
        if let Some(image) = &j.image {
            v.push(("CI_JOB_IMAGE".into(), image.clone()));
        }
        let services = if j.services.is_empty() {
            String::new()
        } else {
            serde_json::Value::Array(j.services.clone()).to_string()
        };
        v.push(("CI_JOB_SERVICES".into(), services));
        v.extend(j.variables.iter().cloned());
        v
    }

    /// The environment of a driver call, in gitlab-runner's order (later wins).
    pub fn env(&self) -> Vec<(String, String)> {
        let dir = self.dir().display().to_string();
        let mut env: Vec<(String, String)> = self.opts.env.clone();
        env.extend([
            ("TMPDIR".into(), dir.clone()),
            (
                "BUILD_FAILURE_EXIT_CODE".into(),
                BUILD_FAILURE_EXIT_CODE.to_string(),
            ),
            (
                "SYSTEM_FAILURE_EXIT_CODE".into(),
                SYSTEM_FAILURE_EXIT_CODE.to_string(),
            ),
            (
                "BUILD_EXIT_CODE_FILE".into(),
                self.build_exit_code_file().display().to_string(),
            ),
            (
                "JOB_RESPONSE_FILE".into(),
                self.dir().join("job-response.json").display().to_string(),
            ),
        ]);
        env.extend(self.job_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend(
            self.variables()
                .into_iter()
                .map(|(k, v)| (format!("CUSTOM_ENV_{k}"), v)),
        );
        env
    }

    /// Calls `flotilla [--config F] <args>` like gitlab-runner, applying the cancel rule
    /// when it names `stage`.
    pub async fn call(&self, stage: &str, args: &[&str]) -> Result<StageResult> {
        let mut cmd = tokio::process::Command::new(&self.opts.flotilla_bin);
        if let Some(c) = &self.opts.config_path {
            cmd.arg("--config").arg(c);
        }
        cmd.args(args)
            .current_dir(self.dir())
            .envs(self.env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let cancel = self
            .opts
            .cancel
            .as_ref()
            .filter(|c| c.stage == stage)
            .map(|c| c.when.clone());
        if self.opts.echo {
            eprintln!("\x1b[1m==> flotilla {}\x1b[0m", args.join(" "));
        }
        let mut result = run_process(
            cmd,
            stage,
            cancel,
            self.opts.graceful_kill_timeout,
            self.opts.stage_timeout,
            self.opts.echo,
        )
        .await
        .with_context(|| {
            format!(
                "running {} {}",
                self.opts.flotilla_bin.display(),
                args.join(" ")
            )
        })?;
        if self.opts.echo {
            eprintln!(
                "\x1b[1m<== {stage}: exit {} in {:.1}s\x1b[0m",
                result
                    .exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| format!("signal {:?}", result.signal)),
                result.duration.as_secs_f64()
            );
        }
        if result.exit_code == Some(BUILD_FAILURE_EXIT_CODE) {
            let file = self.build_exit_code_file();
            if let Ok(text) = std::fs::read_to_string(&file) {
                result.build_exit_code = text.lines().next().and_then(|l| l.trim().parse().ok());
                let _ = std::fs::remove_file(&file);
            }
        }
        Ok(result)
    }

    /// Writes a stage's script into the temp dir (as gitlab-runner does) and returns its path.
    pub fn write_script(&mut self, stage: &str, body: &[String]) -> Result<PathBuf> {
        self.script_counter += 1;
        let path = self
            .dir()
            .join(format!("script{}-{stage}", self.script_counter));
        let exports = self.variables();
        crate::util::write_file(&path, stage_script(&exports, body).as_bytes(), 0o700)?;
        Ok(path)
    }

    /// The body of a stage, as gitlab-runner's bash shell would generate it (minus git,
    /// which the sandbox does not have). Empty: the stage is skipped.
    pub fn stage_body(&self, stage: &str) -> Vec<String> {
        if let Some(b) = self.job.stage_bodies.get(stage) {
            return b.clone();
        }
        let cd = r#"cd "$CI_PROJECT_DIR""#.to_owned();
        let user = |lines: &[String]| -> Vec<String> {
            if lines.is_empty() {
                return Vec::new();
            }
            let mut v = vec![cd.clone()];
            v.extend(lines.iter().flat_map(|l| user_command(l)));
            v
        };
        match stage {
            "prepare_script" => {
                vec![r#"echo "Running on $(hostname) via flotilla-sandbox...""#.into()]
            }
            "get_sources" => vec![
                r#"echo "Fetching changes (sandbox: no git)...""#.into(),
                r#"mkdir -p "$CI_PROJECT_DIR""#.into(),
                cd.clone(),
                r#"echo "sources of job $CI_JOB_ID" > .flotilla-sources"#.into(),
            ],
            "build_script" => user(&self.job.script),
            "after_script" => user(&self.job.after_script),
            "restore_cache" => self.restore_cache_body(),
            "download_artifacts" => self.download_artifacts_body(),
            "archive_cache" => self.archive_cache_body(true),
            "archive_cache_on_failure" => self.archive_cache_body(false),
            "upload_artifacts_on_success" => self.upload_artifacts_body(true),
            "upload_artifacts_on_failure" => self.upload_artifacts_body(false),
            "cleanup_file_variables" => vec![r#"rm -rf "$CI_PROJECT_DIR.tmp""#.into()],
            _ => Vec::new(),
        }
    }
}

/// The command gitlab-runner's custom executor writes into stage scripts (its
/// `RunnerCommand`, main.go: `custom.NewProvider("gitlab-runner")`).
pub const RUNNER_COMMAND: &str = "gitlab-runner";

/// `cache:` entry of the job payload (spec.Cache).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct CacheSpec {
    key: Option<String>,
    untracked: Option<bool>,
    policy: Option<String>,
    paths: Option<Vec<String>>,
    when: Option<String>,
    fallback_keys: Option<Vec<String>>,
}

/// `artifacts:` entry of the job payload (spec.Artifact).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct ArtifactSpec {
    name: Option<String>,
    untracked: Option<bool>,
    paths: Option<Vec<String>>,
    exclude: Option<Vec<String>>,
    when: Option<String>,
    artifact_type: Option<String>,
    artifact_format: Option<String>,
    expire_in: Option<String>,
}

/// `dependencies:` entry of the job payload (spec.Dependency).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct DependencySpec {
    id: i64,
    token: Option<String>,
    name: Option<String>,
    artifacts_file: Option<ArtifactsFile>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct ArtifactsFile {
    filename: Option<String>,
}

/// One cache key as shells/abstract.go's newCacheConfig forms it (FF_HASH_CACHE_KEYS
/// off: the sanitized key names both the local file and the object).
#[derive(Debug, Clone)]
struct CacheKey {
    human: String,
    /// `--file`: `<cache_dir>/<project path>/<key>/cache.zip`, relative to the project dir.
    file: String,
    /// The other naming scheme's key (sha256 of the key) and file.
    alternate_key: String,
    alternate_file: String,
}

/// `path.Clean("/" + key)` without the leading `/`, with trailing whitespace trimmed off
/// the last segments (cache/cachekey.Sanitize); `None` when nothing is left.
fn sanitize_cache_key(key: &str) -> Option<String> {
    let normalised = key
        .replace("%2f", "/")
        .replace("%2F", "/")
        .replace("%2e", ".")
        .replace("%2E", ".")
        .replace('\\', "/");
    let mut parts: Vec<String> = Vec::new();
    for seg in normalised.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s.to_owned()),
        }
    }
    while let Some(last) = parts.last_mut() {
        let trimmed = last.trim_end().to_owned();
        if trimmed.is_empty() {
            parts.pop();
        } else {
            *last = trimmed;
            break;
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// `filepath.Rel(from, to)` for clean absolute paths.
fn rel_path(from: &str, to: &str) -> String {
    let a: Vec<&str> = from.split('/').filter(|s| !s.is_empty()).collect();
    let b: Vec<&str> = to.split('/').filter(|s| !s.is_empty()).collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out: Vec<&str> = vec![".."; a.len() - common];
    out.extend(&b[common..]);
    if out.is_empty() {
        ".".into()
    } else {
        out.join("/")
    }
}

/// `http.CanonicalHeaderKey`: `x-amz-meta-cachekey` -> `X-Amz-Meta-Cachekey`.
fn canonical_header(key: &str) -> String {
    key.split('-')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + &c.as_str().to_ascii_lowercase(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

impl JobContext {
    fn payload_list<T: serde::de::DeserializeOwned>(&self, key: &str) -> Vec<T> {
        self.payload
            .get(key)
            .and_then(|v| serde_json::from_value::<Vec<T>>(v.clone()).ok())
            .unwrap_or_default()
    }

    /// `ExpandValue`: `$NAME` and `${NAME}` from the job's variables (unknown: empty).
    fn expand(&self, text: &str) -> String {
        let vars: BTreeMap<String, String> = self.variables().into_iter().collect();
        let mut out = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '$' {
                out.push(c);
                continue;
            }
            let mut name = String::new();
            if chars.peek() == Some(&'{') {
                chars.next();
                for c in chars.by_ref() {
                    if c == '}' {
                        break;
                    }
                    name.push(c);
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        name.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if name.is_empty() {
                    out.push('$');
                    continue;
                }
            }
            out.push_str(vars.get(&name).map(String::as_str).unwrap_or(""));
        }
        out
    }

    fn variable(&self, name: &str) -> Option<String> {
        self.variables()
            .into_iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// `<cache_dir>/<project path>` (build.CacheDir).
    fn project_cache_dir(&self) -> String {
        format!(
            "{}/{}",
            self.cache_dir.trim_end_matches('/'),
            self.job.project_path.trim_matches('/')
        )
    }

    fn project_tmp_dir(&self) -> String {
        format!("{}.tmp", self.project_dir())
    }

    /// newCacheConfig: `None` (with the notice gitlab-runner writes) when the key is empty.
    fn cache_key(&self, user_key: &str, w: &mut BashWriter, what: &str) -> Option<CacheKey> {
        let raw = if user_key.is_empty() {
            "sandbox-job/main".to_owned()
        } else {
            self.expand(user_key)
        };
        let Some(human) = sanitize_cache_key(&raw) else {
            if !raw.is_empty() {
                w.warning(&format!("cache key {raw:?} could not be sanitized"));
            }
            w.notice(&format!("Skipping cache {what} due to empty cache key"));
            return None;
        };
        if human != raw {
            w.warning(&format!("cache key {raw:?} sanitized to {human:?}"));
        }
        let alternate_key = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(human.as_bytes()));
        let file_for = |key: &str| {
            rel_path(
                &self.project_dir(),
                &format!("{}/{key}/cache.zip", self.project_cache_dir()),
            )
        };
        Some(CacheKey {
            file: file_for(&human),
            alternate_file: file_for(&alternate_key),
            human,
            alternate_key,
        })
    }

    /// cache.GetAdapter's object name: `[<Path>/][runner/<short token>/]project/<id>/<key>`,
    /// with `<key[:2]>/` before the key when `sharded`.
    fn cache_object(&self, key: &str, sharded: bool) -> Option<String> {
        let cache = self.opts.cache.as_ref()?;
        let project_id = self
            .payload
            .pointer("/job_info/project_id")
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        let mut parts: Vec<String> = Vec::new();
        if !cache.path.is_empty() {
            parts.push(cache.path.trim_matches('/').to_owned());
        }
        if !cache.shared {
            parts.push(format!("runner/{}", self.opts.runner_short_token));
        }
        parts.push(format!("project/{project_id}"));
        if sharded {
            parts.push(key.get(..2)?.to_owned());
        }
        parts.push(key.to_owned());
        Some(parts.join("/"))
    }

    fn presigned(&self, method: &str, object: Option<&String>) -> Option<&Presigned> {
        self.cache_urls.get(&format!("{method} {}", object?))
    }

    /// Pre-signs the URLs the cache stages need (GET/HEAD/PUT of every cache key's object
    /// and its alternate), as gitlab-runner does when it writes those stages. A no-op
    /// without [`RunnerOptions::cache`].
    pub async fn presign_cache(&mut self) -> Result<()> {
        let Some(cache) = self.opts.cache.clone() else {
            return Ok(());
        };
        // The URLs live as long as the job may (build.GetBuildTimeout).
        let expires = Duration::from_secs(self.job.timeout_secs.clamp(1, 7 * 86_400));
        let mut keys: Vec<String> = Vec::new();
        for c in self.payload_list::<CacheSpec>("cache") {
            keys.push(c.key.unwrap_or_default());
            keys.extend(c.fallback_keys.unwrap_or_default());
        }
        if let Some(k) = self.variable("CACHE_FALLBACK_KEY") {
            keys.push(k);
        }
        let mut scratch = BashWriter::new();
        for user_key in keys {
            let Some(k) = self.cache_key(&user_key, &mut scratch, "") else {
                continue;
            };
            for (object, primary) in [
                (self.cache_object(&k.human, false), true),
                (self.cache_object(&k.alternate_key, true), false),
            ] {
                let Some(object) = object else { continue };
                let get = cache.presigner.get(&object, expires).await?;
                let head = cache.presigner.head(&object, expires).await?;
                self.cache_urls.insert(format!("GET {object}"), get);
                self.cache_urls.insert(format!("HEAD {object}"), head);
                if primary {
                    let put = cache
                        .presigner
                        .put(&object, expires, &[("cachekey", &k.human)])
                        .await?;
                    self.cache_urls.insert(format!("PUT {object}"), put);
                }
            }
        }
        Ok(())
    }

    /// writeExports' tail (GITLAB_ENV, sourced) and writeCdBuildDir: how every cache and
    /// artifacts stage starts (the variables themselves are in the script's frame).
    fn helper_preamble(&self, w: &mut BashWriter) {
        let tmp = self.project_tmp_dir();
        let env_file = format!("{tmp}/gitlab_runner_env");
        w.export("GITLAB_ENV", &env_file);
        w.source_env(&tmp, &env_file);
        w.cd(&self.project_dir());
    }

    /// guardRunnerCommand: `if gitlab-runner --version ...; then <body> else echo "Missing
    /// gitlab-runner. <action> is disabled." fi`.
    fn guard(&self, w: &mut BashWriter, action: &str, body: impl FnOnce(&mut BashWriter)) {
        w.if_cmd(RUNNER_COMMAND, &["--version".into()]);
        body(w);
        w.else_();
        w.warning(&format!("Missing {RUNNER_COMMAND}. {action} is disabled."));
        w.end_if();
    }

    /// changeFilesOwnership (only acts when the build uid/gid file exists).
    fn change_files_ownership(&self, w: &mut BashWriter) {
        let uid_gid = format!(
            "{}/.gitlab-build-uid-gid",
            self.builds_dir.trim_end_matches('/')
        );
        w.if_file(&uid_gid);
        for d in [self.project_cache_dir(), self.builds_dir.clone()] {
            w.if_directory(&d);
            w.line(&format!(
                "chown -R \"$(stat -c '%u:%g' '{uid_gid}')\" '{d}'"
            ));
            w.end_if();
        }
        w.end_if();
    }

    fn cache_timeout(&self) -> String {
        self.variable("CACHE_REQUEST_TIMEOUT")
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|v| *v > 0)
            .unwrap_or(10)
            .to_string()
    }

    /// writeRestoreCacheScript / cacheExtractor.
    fn restore_cache_body(&self) -> Vec<String> {
        let mut w = BashWriter::new();
        self.helper_preamble(&mut w);
        let mut any = false;
        for c in self.payload_list::<CacheSpec>("cache") {
            if c.paths.as_ref().is_none_or(|p| p.is_empty()) && !c.untracked.unwrap_or(false) {
                continue;
            }
            any = true;
            let Some(key) = self.cache_key(c.key.as_deref().unwrap_or(""), &mut w, "extraction")
            else {
                continue;
            };
            match self.expand(c.policy.as_deref().unwrap_or("")).as_str() {
                "" | "pull-push" | "pull" => {}
                "push" => {
                    w.notice(&format!(
                        "Not downloading cache {} due to policy",
                        key.human
                    ));
                    continue;
                }
                other => {
                    w.line(&format!(
                        "echo {}",
                        crate::script::shell_escape(&format!(
                            "unknown cache policy {other} for {}",
                            key.human
                        ))
                    ));
                    w.line("exit 1");
                    continue;
                }
            }
            let mut keys = vec![key];
            let mut add = |w: &mut BashWriter, k: &str| {
                if !k.is_empty() {
                    if let Some(k) = self.cache_key(k, w, "extraction") {
                        keys.push(k);
                    }
                }
            };
            for fk in c.fallback_keys.unwrap_or_default() {
                let fk = self.expand(&fk);
                add(&mut w, &fk);
            }
            if let Some(fk) = self.variable("CACHE_FALLBACK_KEY") {
                if fk.trim_end_matches(['.', ' ']).ends_with("-protected") {
                    w.warning(&format!(
                        "CACHE_FALLBACK_KEY {fk:?} not allowed to end in \"-protected\""
                    ));
                } else {
                    add(&mut w, &fk);
                }
            }
            self.guard(&mut w, "Extracting cache", |w| {
                self.extract_command(w, &keys)
            });
        }
        if !any {
            return Vec::new();
        }
        self.change_files_ownership(&mut w);
        w.finish()
    }

    /// addExtractCacheCommand: the key, then each fallback key in the `else` branch.
    fn extract_command(&self, w: &mut BashWriter, keys: &[CacheKey]) {
        let Some((k, rest)) = keys.split_first() else {
            return;
        };
        let mut args: Vec<String> = vec![
            "cache-extractor".into(),
            "--file".into(),
            k.file.clone(),
            "--timeout".into(),
            self.cache_timeout(),
        ];
        w.notice(&format!("Checking cache for {}...", k.human));
        let primary = self.cache_object(&k.human, false);
        if let (Some(get), Some(head)) = (
            self.presigned("GET", primary.as_ref()),
            self.presigned("HEAD", primary.as_ref()),
        ) {
            args.extend(["--url".into(), get.url.clone()]);
            args.extend(["--head-url".into(), head.url.clone()]);
        }
        let alternate = self.cache_object(&k.alternate_key, true);
        if let (Some(get), Some(head)) = (
            self.presigned("GET", alternate.as_ref()),
            self.presigned("HEAD", alternate.as_ref()),
        ) {
            args.extend(["--alternate-url".into(), get.url.clone()]);
            args.extend(["--alternate-head-url".into(), head.url.clone()]);
        }
        w.if_cmd_with_output(RUNNER_COMMAND, &args);
        w.notice("Successfully extracted cache");
        w.else_();
        w.warning("Failed to extract cache");
        self.extract_command(w, rest);
        w.end_if();
    }

    /// writeArchiveCacheOnSuccessScript / OnFailure: cacheArchiver.
    fn archive_cache_body(&self, on_success: bool) -> Vec<String> {
        let mut w = BashWriter::new();
        self.helper_preamble(&mut w);
        let mut any = false;
        for c in self.payload_list::<CacheSpec>("cache") {
            let when = self.expand(c.when.as_deref().unwrap_or(""));
            let caches = if on_success {
                matches!(when.as_str(), "" | "on_success" | "always")
            } else {
                matches!(when.as_str(), "on_failure" | "always")
            };
            if !caches {
                continue;
            }
            let mut archiver: Vec<String> = Vec::new();
            for p in c.paths.clone().unwrap_or_default() {
                archiver.extend(["--path".into(), p]);
            }
            if c.untracked.unwrap_or(false) {
                archiver.push("--untracked".into());
            }
            if archiver.is_empty() {
                continue;
            }
            any = true;
            let Some(key) = self.cache_key(c.key.as_deref().unwrap_or(""), &mut w, "archiving")
            else {
                continue;
            };
            match self.expand(c.policy.as_deref().unwrap_or("")).as_str() {
                "" | "pull-push" | "push" => {}
                "pull" => {
                    w.notice(&format!("Not uploading cache {} due to policy", key.human));
                    continue;
                }
                other => {
                    w.line(&format!(
                        "echo {}",
                        crate::script::shell_escape(&format!(
                            "unknown cache policy {other} for {}",
                            key.human
                        ))
                    ));
                    w.line("exit 1");
                    continue;
                }
            }
            let mut args: Vec<String> = vec![
                "cache-archiver".into(),
                "--file".into(),
                key.file.clone(),
                "--alternate-file".into(),
                key.alternate_file.clone(),
                "--timeout".into(),
                self.cache_timeout(),
            ];
            args.extend(archiver);
            let object = self.cache_object(&key.human, false);
            if let Some(put) = self.presigned("PUT", object.as_ref()) {
                args.extend(["--url".into(), put.url.clone()]);
                for (k, v) in &put.headers {
                    args.extend(["--header".into(), format!("{}: {v}", canonical_header(k))]);
                }
                if let Some(head) = self.presigned("HEAD", object.as_ref()) {
                    args.extend(["--check-url".into(), head.url.clone()]);
                }
            }
            let metadata = serde_json::json!({"cachekey": key.human}).to_string();
            let env_file = format!("{}/gitlab_runner_cache_env", self.project_tmp_dir());
            self.guard(&mut w, "Creating cache", |w| {
                w.notice(&format!("Creating cache {}...", key.human));
                w.dot_env(&env_file, &[("CACHE_METADATA".into(), metadata)]);
                args.extend(["--env-file".into(), env_file.clone()]);
                w.if_cmd_with_output(RUNNER_COMMAND, &args);
                w.notice("Created cache");
                w.else_();
                w.warning("Failed to create cache");
                w.end_if();
                w.rm_file(&env_file);
            });
        }
        if any {
            w.finish()
        } else {
            Vec::new()
        }
    }

    /// writeDownloadArtifactsScript / downloadAllArtifacts.
    fn download_artifacts_body(&self) -> Vec<String> {
        let deps: Vec<DependencySpec> = self
            .payload_list::<DependencySpec>("dependencies")
            .into_iter()
            .filter(|d| {
                d.artifacts_file
                    .as_ref()
                    .and_then(|f| f.filename.as_deref())
                    .is_some_and(|f| !f.is_empty())
            })
            .collect();
        if deps.is_empty() {
            return Vec::new();
        }
        let mut w = BashWriter::new();
        self.helper_preamble(&mut w);
        self.guard(&mut w, "Artifacts downloading", |w| {
            for d in &deps {
                w.notice(&format!(
                    "Downloading artifacts for {} ({})...",
                    d.name.as_deref().unwrap_or(""),
                    d.id
                ));
                w.command(
                    RUNNER_COMMAND,
                    &[
                        "artifacts-downloader".into(),
                        "--url".into(),
                        self.opts.server_url.clone(),
                        "--token".into(),
                        d.token.clone().unwrap_or_default(),
                        "--id".into(),
                        d.id.to_string(),
                    ],
                );
            }
        });
        self.change_files_ownership(&mut w);
        w.finish()
    }

    /// writeUploadArtifactsOnSuccessScript / OnFailure: writeUploadArtifact per artifact.
    fn upload_artifacts_body(&self, on_success: bool) -> Vec<String> {
        if self.opts.server_url.is_empty() {
            return Vec::new();
        }
        let mut w = BashWriter::new();
        self.helper_preamble(&mut w);
        let mut any = false;
        for a in self.payload_list::<ArtifactSpec>("artifacts") {
            let when = a.when.as_deref().unwrap_or("");
            let wanted = if on_success {
                matches!(when, "" | "on_success" | "always")
            } else {
                matches!(when, "on_failure" | "always")
            };
            if !wanted {
                continue;
            }
            let mut args: Vec<String> = vec![
                "artifacts-uploader".into(),
                "--url".into(),
                self.opts.server_url.clone(),
                "--token".into(),
                self.job.token.clone(),
                "--id".into(),
                self.job.id.to_string(),
                "--timeout".into(),
                "1h0m0s".into(),
                "--response-header-timeout".into(),
                "10m0s".into(),
            ];
            let mut archiver: Vec<String> = Vec::new();
            for p in a.paths.unwrap_or_default() {
                archiver.extend(["--path".into(), p]);
            }
            for p in a.exclude.unwrap_or_default() {
                archiver.extend(["--exclude".into(), p]);
            }
            if a.untracked.unwrap_or(false) {
                archiver.push("--untracked".into());
            }
            if archiver.is_empty() {
                continue;
            }
            any = true;
            args.extend(archiver);
            for (flag, value) in [
                ("--name", a.name),
                ("--expire-in", a.expire_in),
                ("--artifact-format", a.artifact_format),
                ("--artifact-type", a.artifact_type),
            ] {
                if let Some(v) = value.filter(|v| !v.is_empty()) {
                    args.extend([flag.into(), v]);
                }
            }
            self.guard(&mut w, "Uploading artifacts", |w| {
                w.notice("Uploading artifacts...");
                w.command(RUNNER_COMMAND, &args);
            });
        }
        if any {
            w.finish()
        } else {
            Vec::new()
        }
    }
}

fn job_response(job: &Job, opts: &RunnerOptions, builds_dir: &str) -> serde_json::Value {
    let vars: Vec<serde_json::Value> = job
        .variables
        .iter()
        .map(|(k, v)| serde_json::json!({"key": k, "value": v, "public": true, "masked": false}))
        .chain([
            serde_json::json!({"key": "CI_JOB_ID", "value": job.id.to_string(), "public": true, "masked": false}),
            serde_json::json!({"key": "CI_JOB_TOKEN", "value": job.token, "public": false, "masked": true}),
            serde_json::json!({"key": "CI_PROJECT_DIR", "value": format!("{builds_dir}/{}", job.project_path), "public": true, "masked": false}),
        ])
        .collect();
    let mut steps = vec![serde_json::json!({
        "name": "script", "script": job.script, "timeout": job.timeout_secs,
        "when": "on_success", "allow_failure": false,
    })];
    if !job.after_script.is_empty() {
        steps.push(serde_json::json!({
            "name": "after_script", "script": job.after_script, "timeout": 300,
            "when": "always", "allow_failure": true,
        }));
    }
    let mut payload = serde_json::json!({
        "id": job.id,
        "token": job.token,
        "allow_git_fetch": true,
        "job_info": {"name": "sandbox-job", "stage": "test", "project_id": 1, "project_name": job.project_path},
        "git_info": {"repo_url": "https://gitlab.sandbox.invalid/sandbox/project.git", "ref": "main", "sha": "0000000000000000000000000000000000000000", "depth": 1},
        "runner_info": {"timeout": job.timeout_secs, "runner_session_url": null},
        "variables": vars,
        "steps": steps,
        "image": job.image.as_ref().map(|i| serde_json::json!({"name": i, "entrypoint": null, "pull_policy": null})),
        "services": job.services,
        "artifacts": [],
        "cache": [],
        "credentials": [],
        "dependencies": [],
        "features": {"trace_sections": true},
        "runner": {"short_token": opts.runner_short_token},
    });
    if let Some(map) = payload.as_object_mut() {
        map.extend(job.payload.clone());
    }
    payload
}

/// Runs one driver process to completion, collecting its output, applying cancellation.
async fn run_process(
    mut cmd: tokio::process::Command,
    stage: &str,
    cancel: Option<CancelWhen>,
    graceful: Duration,
    timeout: Duration,
    echo: bool,
) -> Result<StageResult> {
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let pgid = Pid::from_raw(child.id().context("child has no pid")? as i32);
    let (tx, mut rx) = mpsc::unbounded_channel::<(bool, String)>();
    for (is_err, pipe) in [
        (
            false,
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ),
        (
            true,
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ),
    ] {
        let Some(pipe) = pipe else { continue };
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if tx
                            .send((is_err, String::from_utf8_lossy(&buf).into_owned()))
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        });
    }
    drop(tx);

    let (mut stdout, mut stderr) = (String::new(), String::new());
    let marker = match &cancel {
        Some(CancelWhen::OutputContains(m)) => Some(m.clone()),
        _ => None,
    };
    let cancel_notify = match &cancel {
        Some(CancelWhen::Notified(n)) => Some(n.clone()),
        _ => None,
    };
    let timeout_at = start + timeout;
    let mut term_at: Option<Instant> = None;
    let mut killed = false;
    let mut status = None;
    let mut exited_at: Option<Instant> = None;
    let mut pipes_open = true;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);

    let send_term = |term_at: &mut Option<Instant>| {
        if term_at.is_none() {
            let _ = killpg(pgid, Signal::SIGTERM);
            *term_at = Some(Instant::now());
        }
    };

    loop {
        if status.is_some() && !pipes_open {
            break;
        }
        let armed = term_at.is_none();
        let cancelled = async {
            match &cancel_notify {
                Some(n) if armed => n.notified().await,
                _ => std::future::pending().await,
            }
        };
        let timeout_sleep = match term_at {
            None => tokio::time::Instant::from_std(timeout_at),
            Some(_) => far,
        };
        let kill_sleep = match (term_at, killed, status.is_some()) {
            (Some(t), false, false) => tokio::time::Instant::from_std(t + graceful),
            _ => far,
        };
        tokio::select! {
            line = rx.recv(), if pipes_open => match line {
                Some((is_err, text)) => {
                    if echo {
                        if is_err { eprint!("{text}") } else { print!("{text}") }
                    }
                    if let Some(m) = &marker {
                        if text.contains(m.as_str()) {
                            send_term(&mut term_at);
                        }
                    }
                    if is_err { stderr.push_str(&text) } else { stdout.push_str(&text) }
                }
                None => pipes_open = false,
            },
            s = child.wait(), if status.is_none() => {
                status = Some(s?);
                exited_at = Some(Instant::now());
                // Grandchildren may hold the pipes open; do not wait for them forever.
                drain_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(2));
            },
            _ = tokio::time::sleep_until(drain_deadline.unwrap_or(far)), if drain_deadline.is_some() && pipes_open => {
                pipes_open = false;
            },
            () = cancelled => send_term(&mut term_at),
            _ = tokio::time::sleep_until(timeout_sleep) => {
                stderr.push_str(&format!("[runner emulator] {stage} timed out after {timeout:?}: SIGTERM\n"));
                send_term(&mut term_at);
            },
            _ = tokio::time::sleep_until(kill_sleep) => {
                let _ = killpg(pgid, Signal::SIGKILL);
                killed = true;
            },
        }
    }
    use std::os::unix::process::ExitStatusExt;
    let status = status.context("no exit status")?;
    // Whatever is left of the group after the driver exited belongs to nobody.
    let _ = killpg(pgid, Signal::SIGKILL);
    let exited_at = exited_at.unwrap_or_else(Instant::now);
    Ok(StageResult {
        name: stage.to_owned(),
        exit_code: status.code(),
        signal: status.signal(),
        stdout,
        stderr,
        started: start,
        duration: exited_at.duration_since(start),
        build_exit_code: None,
        cancelled_after: term_at.map(|t| exited_at.saturating_duration_since(t)),
        killed,
    })
}

/// Stage order after `prepare`, from gitlab-runner's common/build.go.
pub const PRE_BUILD_STAGES: &[&str] = &["get_sources", "restore_cache", "download_artifacts"];

/// Drives one job's calls like gitlab-runner, keeping every call in its trace. The one
/// stage driver: [`run_job`] runs a whole job with it, and tests that look at the machine
/// between two stages, or read a stage's raw output, call the stages one by one.
pub struct StageDriver {
    pub ctx: JobContext,
    /// Every call so far, in order.
    pub trace: Vec<StageResult>,
    /// `config`'s output (of the last attempt).
    pub config: Option<ConfigOutput>,
}

impl StageDriver {
    pub fn new(opts: RunnerOptions, job: Job) -> Result<Self> {
        Ok(Self {
            ctx: JobContext::new(opts, job)?,
            trace: Vec::new(),
            config: None,
        })
    }

    /// `config` then `prepare`, as gitlab-runner does: after a failed prepare `cleanup`
    /// runs and both are tried again (`prepare_attempts`, `prepare_retry_delay` apart,
    /// gitlab-runner's own pause between attempts) unless it failed the build or was
    /// cancelled. `None` once prepared; else the job's outcome.
    pub async fn config_and_prepare(&mut self) -> Result<Option<Outcome>> {
        let attempts = self.ctx.opts.prepare_attempts.max(1);
        let mut outcome = None;
        for attempt in 1..=attempts {
            if attempt > 1 {
                tokio::time::sleep(self.ctx.opts.prepare_retry_delay).await;
            }
            let cfg = self.ctx.call("config", &["config"]).await?;
            let parsed = match cfg.exit_code {
                Some(0) => serde_json::from_str::<ConfigOutput>(cfg.stdout.trim())
                    .map_err(|e| format!("config printed no valid JSON: {e}")),
                other => Err(format!("config exited with {other:?}")),
            };
            self.trace.push(cfg);
            let parsed = match parsed {
                Ok(p) => p,
                Err(detail) => {
                    return Ok(Some(Outcome::SystemFailure {
                        stage: "config".into(),
                        detail,
                    }))
                }
            };
            if let Some(b) = &parsed.builds_dir {
                self.ctx.builds_dir = b.clone();
            }
            if let Some(c) = &parsed.cache_dir {
                self.ctx.cache_dir = c.clone();
            }
            self.ctx.job_env = parsed.job_env.clone();
            self.config = Some(parsed);

            let prep = self.ctx.call("prepare", &["prepare"]).await?;
            let code = prep.exit_code;
            let cancelled = prep.cancelled_after.is_some();
            self.trace.push(prep);
            if code == Some(0) && !cancelled {
                self.ctx.presign_cache().await?;
                return Ok(None);
            }
            outcome = Some(classify("prepare", code, None, cancelled));
            if cancelled || code == Some(BUILD_FAILURE_EXIT_CODE) || attempt == attempts {
                break;
            }
            let c = self.ctx.call("cleanup", &["cleanup"]).await?;
            self.trace.push(c);
        }
        Ok(outcome)
    }

    /// A driver whose `config` and `prepare` succeeded; fails with the trace otherwise.
    pub async fn prepare(opts: RunnerOptions, job: Job) -> Result<Self> {
        let mut d = Self::new(opts, job)?;
        if let Some(o) = d.config_and_prepare().await? {
            anyhow::bail!("prepare failed: {o:?}\n{}", d.describe());
        }
        Ok(d)
    }

    /// Runs a stage (its body from the job, which must not be empty), recording it.
    pub async fn stage(&mut self, stage: &str) -> Result<StageResult> {
        let script = self.script(stage)?;
        let r = self
            .ctx
            .call(stage, &["run", &script.display().to_string(), stage])
            .await?;
        self.trace.push(r.clone());
        Ok(r)
    }

    /// Runs a stage that must succeed.
    pub async fn stage_ok(&mut self, stage: &str) -> Result<StageResult> {
        let r = self.stage(stage).await?;
        anyhow::ensure!(r.ok(), "stage {stage} failed\n{}", self.describe());
        Ok(r)
    }

    fn script(&mut self, stage: &str) -> Result<PathBuf> {
        let body = self.ctx.stage_body(stage);
        anyhow::ensure!(!body.is_empty(), "stage {stage} has no body");
        self.ctx.write_script(stage, &body)
    }

    /// `flotilla run <script> <stage>` exactly as [`JobContext::call`] starts it, for the
    /// caller to spawn with its own stdio (not recorded in the trace).
    pub fn run_command(&mut self, stage: &str) -> Result<std::process::Command> {
        let script = self.script(stage)?;
        let opts = &self.ctx.opts;
        let mut cmd = std::process::Command::new(&opts.flotilla_bin);
        if let Some(c) = &opts.config_path {
            cmd.arg("--config").arg(c);
        }
        cmd.arg("run")
            .arg(&script)
            .arg(stage)
            .current_dir(self.ctx.dir())
            .envs(self.ctx.env())
            .stdin(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        Ok(cmd)
    }

    /// Calls `cleanup`, recording it; returns what it did.
    pub async fn call_cleanup(&mut self) -> Result<StageResult> {
        let r = self.ctx.call("cleanup", &["cleanup"]).await?;
        self.trace.push(r.clone());
        Ok(r)
    }

    /// Calls `cleanup`, which must succeed.
    pub async fn cleanup(&mut self) -> Result<()> {
        let r = self.call_cleanup().await?;
        anyhow::ensure!(r.ok(), "cleanup failed\n{}", self.describe());
        Ok(())
    }

    /// The job's key, as the stages derive it (payload job id and temp dir).
    pub fn job_key(&self) -> String {
        flotilla::stages::job::job_key_for(Some(self.ctx.job.id), self.ctx.dir())
    }

    /// The build container's name on the machine.
    pub fn build_container(&self) -> String {
        format!("flotilla-{}-build", self.job_key())
    }

    /// A readable trace of every call so far, for assertion messages.
    pub fn describe(&self) -> String {
        JobResult {
            config: None,
            stages: self.trace.clone(),
            outcome: Outcome::Success,
            cleanup_exit: None,
            project_dir: self.ctx.project_dir(),
        }
        .describe()
    }
}

/// Runs one job through config, prepare, every stage and cleanup.
pub async fn run_job(opts: RunnerOptions, job: Job) -> Result<JobResult> {
    let mut d = StageDriver::new(opts, job)?;
    let mut outcome = d.config_and_prepare().await?;
    if outcome.is_none() {
        outcome = run_stages(&mut d.ctx, &mut d.trace).await?;
    }
    let cleanup_exit = d.call_cleanup().await?.exit_code;
    Ok(JobResult {
        config: d.config.take(),
        stages: std::mem::take(&mut d.trace),
        outcome: outcome.unwrap_or(Outcome::Success),
        cleanup_exit,
        project_dir: d.ctx.project_dir(),
    })
}

fn classify(stage: &str, code: Option<i32>, build_code: Option<i32>, cancelled: bool) -> Outcome {
    if cancelled {
        return Outcome::Cancelled {
            stage: stage.into(),
        };
    }
    match code {
        Some(BUILD_FAILURE_EXIT_CODE) => Outcome::BuildFailure {
            stage: stage.into(),
            exit_code: build_code,
        },
        Some(SYSTEM_FAILURE_EXIT_CODE) => Outcome::SystemFailure {
            stage: stage.into(),
            detail: "exited with SYSTEM_FAILURE_EXIT_CODE".into(),
        },
        other => Outcome::UnknownFailure {
            stage: stage.into(),
            exit_code: other,
        },
    }
}

/// Runs one `run` stage if its script is not empty. Returns `None` on success (or skip).
async fn run_stage(
    ctx: &mut JobContext,
    stages: &mut Vec<StageResult>,
    stage: &str,
) -> Result<Option<Outcome>> {
    let body = ctx.stage_body(stage);
    if body.is_empty() {
        return Ok(None);
    }
    let script = ctx.write_script(stage, &body)?;
    let script = script.display().to_string();
    let r = ctx.call(stage, &["run", &script, stage]).await?;
    let out = if r.ok() && r.cancelled_after.is_none() {
        None
    } else {
        Some(classify(
            stage,
            r.exit_code,
            r.build_exit_code,
            r.cancelled_after.is_some(),
        ))
    };
    stages.push(r);
    Ok(out)
}

fn is_fatal(o: &Outcome) -> bool {
    matches!(
        o,
        Outcome::SystemFailure { .. } | Outcome::UnknownFailure { .. }
    )
}

/// gitlab-runner's executeScript: prepare_script; get_sources, restore_cache,
/// download_artifacts; build_script and after_script; archive_cache(_on_failure);
/// upload_artifacts_on_success/failure; cleanup_file_variables.
async fn run_stages(
    ctx: &mut JobContext,
    stages: &mut Vec<StageResult>,
) -> Result<Option<Outcome>> {
    if let Some(o) = run_stage(ctx, stages, "prepare_script").await? {
        return Ok(Some(o));
    }
    let mut failure: Option<Outcome> = None;
    for s in PRE_BUILD_STAGES {
        failure = run_stage(ctx, stages, s).await?;
        if failure.is_some() {
            break;
        }
    }
    if failure.as_ref().is_some_and(is_fatal) {
        return Ok(failure);
    }
    if failure.is_none() {
        failure = run_stage(ctx, stages, "build_script").await?;
        if failure.as_ref().is_some_and(is_fatal) {
            return Ok(failure);
        }
        // after_script runs whatever build_script did; its own failure does not fail the job.
        if let Some(o) = run_stage(ctx, stages, "after_script").await? {
            if is_fatal(&o) {
                return Ok(failure.or(Some(o)));
            }
        }
    }
    let (cache, upload) = if failure.is_none() {
        ("archive_cache", "upload_artifacts_on_success")
    } else {
        ("archive_cache_on_failure", "upload_artifacts_on_failure")
    };
    for s in [cache, upload] {
        if let Some(o) = run_stage(ctx, stages, s).await? {
            if is_fatal(&o) {
                return Ok(failure.or(Some(o)));
            }
            if failure.is_none() {
                failure = Some(o);
            }
        }
    }
    if let Some(o) = run_stage(ctx, stages, "cleanup_file_variables").await? {
        if failure.is_none() && is_fatal(&o) {
            failure = Some(o);
        }
    }
    Ok(failure)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(job: Job) -> JobContext {
        JobContext::new(RunnerOptions::new(Path::new("/bin/true"), None), job).unwrap()
    }

    const HELPER_STAGES: &[&str] = &[
        "restore_cache",
        "download_artifacts",
        "archive_cache",
        "archive_cache_on_failure",
        "upload_artifacts_on_success",
        "upload_artifacts_on_failure",
    ];

    #[test]
    fn a_job_without_cache_or_artifacts_has_no_such_stages() {
        let c = ctx(Job::new(7, &["true"]));
        for s in HELPER_STAGES {
            assert!(c.stage_body(s).is_empty(), "{s}: {:?}", c.stage_body(s));
        }
    }

    #[test]
    fn restore_and_archive_cache_are_gitlab_runners_guarded_commands() {
        let c = ctx(Job::new(7, &["true"]).with_cache("deps-$CI_JOB_ID", &["vendor/"]));
        let restore = c.stage_body("restore_cache").join("\n");
        assert!(restore.contains(
            "if gitlab-runner --version >/dev/null 2>&1 ; then\n  \
             echo $'\\x1b[32;1mChecking cache for deps-7...\\x1b[0;m'\n  \
             if gitlab-runner cache-extractor --file ../../../cache/sandbox/project/deps-7/cache.zip \
             --timeout 10 ; then"
        ));
        assert!(restore.contains("Missing gitlab-runner. Extracting cache is disabled."));
        assert!(restore.starts_with(
            "export GITLAB_ENV=/builds/sandbox/project.tmp/gitlab_runner_env\n\
             mkdir -p \"/builds/sandbox/project.tmp\""
        ));
        let archive = c.stage_body("archive_cache").join("\n");
        assert!(archive.contains(
            "gitlab-runner cache-archiver --file ../../../cache/sandbox/project/deps-7/cache.zip \
             --alternate-file ../../../cache/sandbox/project/"
        ));
        assert!(archive.contains("--timeout 10 --path vendor/ --env-file "));
        assert!(archive.contains("CACHE_METADATA=\"{\\\"cachekey\\\":\\\"deps-7\\\"}\""));
        assert!(c.stage_body("archive_cache_on_failure").is_empty());
    }

    #[test]
    fn artifacts_stages_carry_gitlab_runners_arguments() {
        let job = Job::new(7, &["true"])
            .with_artifacts(&["out/"])
            .with_dependency(5, "build", "artifacts.zip", 10);
        let token = job.token.clone();
        let c = ctx(job);
        let upload = c.stage_body("upload_artifacts_on_success").join("\n");
        assert!(upload.contains(&format!(
            "  gitlab-runner artifacts-uploader --url $'https://gitlab.sandbox.invalid' --token \
             {token} --id 7 --timeout 1h0m0s --response-header-timeout 10m0s --path out/ \
             --expire-in $'1 week' --artifact-format zip --artifact-type archive"
        )));
        assert!(upload.contains("Missing gitlab-runner. Uploading artifacts is disabled."));
        assert!(c.stage_body("upload_artifacts_on_failure").is_empty());
        let download = c.stage_body("download_artifacts").join("\n");
        assert!(download.contains(&format!(
            "  gitlab-runner artifacts-downloader --url $'https://gitlab.sandbox.invalid' --token \
             {token} --id 5"
        )));
    }

    #[test]
    fn cache_keys_and_paths_like_gitlab_runner() {
        assert_eq!(sanitize_cache_key("a/../b/ ").as_deref(), Some("b"));
        assert_eq!(sanitize_cache_key("%2e%2e/x%2Fy").as_deref(), Some("x/y"));
        assert_eq!(sanitize_cache_key("../.."), None);
        assert_eq!(
            rel_path("/builds/g/p", "/cache/g/p/k/cache.zip"),
            "../../../cache/g/p/k/cache.zip"
        );
        assert_eq!(
            canonical_header("x-amz-meta-cachekey"),
            "X-Amz-Meta-Cachekey"
        );
    }
}
