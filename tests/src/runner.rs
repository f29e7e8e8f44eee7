//! The runner emulator: calls the `flotilla` stages exactly as gitlab-runner's custom
//! executor does (see shared/reference/gitlab-custom-executor.md): a per-job
//! `custom-executor*` temp dir as cwd and TMPDIR, the documented environment (exit-code
//! variables, JOB_RESPONSE_FILE, `job_env` from `config`, `CUSTOM_ENV_*`), the stage order
//! and failure rules of `common/build.go`, every call a new process in its own process
//! group, cancellation as SIGTERM to that group, and `cleanup` always last.

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

use crate::script::{stage_script, user_command};

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
}

/// When to cancel a job, like a user pressing "Cancel" in the UI.
#[derive(Debug, Clone)]
pub enum CancelWhen {
    /// When a line of the stage's stdout or stderr contains this text.
    OutputContains(String),
    /// This long after the stage started.
    After(Duration),
}

#[derive(Debug, Clone)]
pub struct Cancel {
    /// Stage (run stage name, or `prepare`) during which to cancel.
    pub stage: String,
    pub when: CancelWhen,
}

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
        let body = serde_json::to_vec_pretty(&job_response(&job, &opts, &opts.builds_dir))?;
        crate::util::write_file(&response, &body, 0o600)?;
        let (builds_dir, cache_dir) = (opts.builds_dir.clone(), opts.cache_dir.clone());
        Ok(Self {
            opts,
            job,
            dir,
            job_env: BTreeMap::new(),
            builds_dir,
            cache_dir,
            script_counter: 0,
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
            (
                "CI_SERVER_URL".into(),
                "https://gitlab.sandbox.invalid".into(),
            ),
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
    /// cache and artifacts tooling, which the sandbox does not have).
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
            "cleanup_file_variables" => vec![r#"rm -rf "$CI_PROJECT_DIR.tmp""#.into()],
            _ => Vec::new(),
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
    let cancel_at = match &cancel {
        Some(CancelWhen::After(d)) => Some(start + *d),
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
        let cancel_sleep = match (cancel_at, term_at) {
            (Some(at), None) => tokio::time::Instant::from_std(at),
            _ => far,
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
            _ = tokio::time::sleep_until(cancel_sleep) => send_term(&mut term_at),
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
        duration: exited_at.duration_since(start),
        build_exit_code: None,
        cancelled_after: term_at.map(|t| exited_at.saturating_duration_since(t)),
        killed,
    })
}

/// Stage order after `prepare`, from gitlab-runner's common/build.go.
pub const PRE_BUILD_STAGES: &[&str] = &["get_sources", "restore_cache", "download_artifacts"];

/// Runs one job through config, prepare, every stage and cleanup.
pub async fn run_job(opts: RunnerOptions, job: Job) -> Result<JobResult> {
    let mut ctx = JobContext::new(opts, job)?;
    let mut stages = Vec::new();
    let mut config_out = None;
    let attempts = ctx.opts.prepare_attempts.max(1);
    let mut outcome: Option<Outcome> = None;
    let mut cleanup_exit = None;

    // config + prepare, retried with cleanup after each failed attempt.
    let mut prepared = false;
    for attempt in 1..=attempts {
        if attempt > 1 {
            tokio::time::sleep(ctx.opts.prepare_retry_delay).await;
        }
        let cfg = ctx.call("config", &["config"]).await?;
        let parsed = match cfg.exit_code {
            Some(0) => serde_json::from_str::<ConfigOutput>(cfg.stdout.trim())
                .map_err(|e| format!("config printed no valid JSON: {e}")),
            other => Err(format!("config exited with {other:?}")),
        };
        stages.push(cfg);
        let parsed = match parsed {
            Ok(p) => p,
            Err(detail) => {
                outcome = Some(Outcome::SystemFailure {
                    stage: "config".into(),
                    detail,
                });
                break;
            }
        };
        if let Some(b) = &parsed.builds_dir {
            ctx.builds_dir = b.clone();
        }
        if let Some(c) = &parsed.cache_dir {
            ctx.cache_dir = c.clone();
        }
        ctx.job_env = parsed.job_env.clone();
        config_out = Some(parsed);

        let prep = ctx.call("prepare", &["prepare"]).await?;
        let code = prep.exit_code;
        let cancelled = prep.cancelled_after.is_some();
        stages.push(prep);
        if code == Some(0) && !cancelled {
            prepared = true;
            outcome = None;
            break;
        }
        outcome = Some(classify("prepare", code, None, cancelled));
        if cancelled || code == Some(BUILD_FAILURE_EXIT_CODE) || attempt == attempts {
            break;
        }
        let c = ctx.call("cleanup", &["cleanup"]).await?;
        stages.push(c);
    }

    if prepared {
        outcome = run_stages(&mut ctx, &mut stages).await?;
    }

    let c = ctx.call("cleanup", &["cleanup"]).await?;
    cleanup_exit = c.exit_code.or(cleanup_exit);
    stages.push(c);

    Ok(JobResult {
        config: config_out,
        stages,
        outcome: outcome.unwrap_or(Outcome::Success),
        cleanup_exit,
        project_dir: ctx.project_dir(),
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
