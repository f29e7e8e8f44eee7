//! `flotilla run <script> <stage>`: feeds the stage script to the right container's shell
//! and streams its output back as it is produced.
//!
//! The script goes to the shell's stdin (as the docker executor does), read from the file
//! in chunks, so neither script nor output is ever held whole in memory. On SIGTERM or
//! SIGINT (gitlab-runner cancelling or timing out the job) every process the stage started
//! in the container is signalled, then killed after a short grace, and the stage exits.

use std::path::Path;
use std::time::Duration;

use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::Docker;
use flotilla_proto::api::{ErrorCode, Lease};
use flotilla_proto::config::Config;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};

use super::job::{runs_in_build_container, JobNames};
use super::{
    docker_failure, lease_file, machine_docker, read_lease, JobEnv, StageError, StageResult,
};
use crate::control::{ControlClient, ControlError};

/// gitlab-runner's shell detection: the first shell found, reading the script from stdin.
pub const DETECT_SHELL: &str = "if [ -x /usr/local/bin/bash ]; then exec /usr/local/bin/bash; \
elif [ -x /usr/bin/bash ]; then exec /usr/bin/bash; \
elif [ -x /bin/bash ]; then exec /bin/bash; \
elif [ -x /usr/local/bin/sh ]; then exec /usr/local/bin/sh; \
elif [ -x /usr/bin/sh ]; then exec /usr/bin/sh; \
elif [ -x /bin/sh ]; then exec /bin/sh; \
elif [ -x /busybox/sh ]; then exec /busybox/sh; \
else echo shell not found; exit 1; fi";

/// Signals every process in the container but PID 1 (the keep-alive) and itself.
const TERM_ALL: &str = "kill -TERM -1 2>/dev/null; exit 0";
const KILL_ALL: &str = "kill -KILL -1 2>/dev/null; exit 0";
/// How long a cancelled stage's processes get to exit before SIGKILL.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// Shell (builtins, /proc and `sleep` only) that returns once no process is left in the
/// container but PID 1, the keep-alive's `sleep` and this shell with its own children, or
/// after `grace`.
fn wait_quiet_script(grace: Duration) -> String {
    let quarters = (grace.as_millis() / 250).max(1);
    format!(
        "n=0; while [ $n -lt {quarters} ]; do busy=; \
         for d in /proc/[0-9]*; do p=${{d#/proc/}}; \
         [ \"$p\" = 1 ] || [ \"$p\" = $$ ] && continue; \
         read -r s 2>/dev/null < \"$d/stat\" || continue; set -- $s; \
         [ \"$4\" = $$ ] && continue; \
         [ \"$4\" = 1 ] && [ \"$2\" = '(sleep)' ] && continue; \
         busy=1; break; done; \
         [ -z \"$busy\" ] && exit 0; \
         sleep 0.25 2>/dev/null || sleep 1; n=$((n+1)); done; exit 1"
    )
}

pub async fn run(config: &Config, env: &JobEnv, script: &Path, stage: &str) -> StageResult {
    let secret = super::read_secret(env).unwrap_or_default();
    let lease = current_lease(config, env, &secret).await?;
    let names = JobNames::new(&lease.job_key);
    let container = if runs_in_build_container(stage) {
        names.build.clone()
    } else {
        names.helper.clone()
    };
    let file = tokio::fs::File::open(script).await.map_err(|e| {
        StageError::system(format!(
            "cannot read stage script {}: {e}",
            script.display()
        ))
    })?;
    let docker = machine_docker(config, &lease)?;
    // Predefined stages run with umask 0000 (gitlab-runner-helper's approach) so the build
    // container's user, whoever it is, can modify what they create.
    let shell = if runs_in_build_container(stage) {
        DETECT_SHELL.to_owned()
    } else {
        format!("umask 0000; {DETECT_SHELL}")
    };
    let shell = format!("{}{shell}", soft_nofile_prefix(config, &lease.class));
    let watch = Liveness {
        client: ControlClient::new(&config.socket_path()),
        secret: &secret,
    };
    let result = exec_script(&docker, &lease, &watch, &container, &shell, file, true).await;
    // Lost while the stage ran (the watch, or Docker unreachable): nothing more to ask it.
    if let Err(StageError::Machine(_)) = &result {
        return result.map(|_| ());
    }
    let failed = matches!(&result, Ok(code) if *code != 0)
        || matches!(result, Err(StageError::System(_) | StageError::Machine(_)));
    if failed {
        let killed = matches!(result, Ok(137 | 143));
        if let Some(why) = machine_lost(config, &docker, &lease, &secret, &container, killed).await
        {
            return Err(StageError::Machine(why));
        }
    }
    match result? {
        0 => Ok(()),
        code => Err(StageError::Build {
            code,
            message: None,
        }),
    }
}

/// runc before 1.1.12 (Debian 12 ships 1.1.5) starts `docker exec` processes with the
/// soft `nofile` limit raised to the hard one (Go's runtime raises its own, and the exec
/// inherits it), while the docker executor's stages, started as containers, get the soft
/// limit the job's `ulimits` set. The stage's shell lowers it back first (lowering a soft
/// limit is always allowed).
fn soft_nofile_prefix(config: &Config, class: &str) -> String {
    let Ok(job) = config.job_for(class) else {
        return String::new();
    };
    match job.container.ulimits.get("nofile") {
        Some(u) if u.soft >= 0 && u.soft != u.hard => {
            format!("ulimit -S -n {} 2>/dev/null; ", u.soft)
        }
        _ => String::new(),
    }
}

/// How long a failed stage whose job container vanished waits for proof that the machine
/// is gone (the daemon marking the lease lost, or Docker no longer answering).
const LOST_VERDICT_WAIT: Duration = Duration::from_secs(15);
const LOST_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the stage really failed, when its machine went away under it (terminated, spot
/// reclaim): a shutting-down machine kills the stage's processes first, so the script
/// "fails" with 137 and Docker still answers for a moment. That must be a system failure
/// saying the machine was lost (gitlab-runner retries `runner_system_failure`), not a
/// build failure. A script cannot stop its own job container (PID 1 of the container
/// ignores signals from inside it), so a container that stopped or vanished under the
/// stage means the machine did; then the verdict is awaited briefly. A script killed by a
/// signal (`killed`: 137, 143) gets a second look a moment later: Docker reports the
/// container running until it has reaped it.
async fn machine_lost(
    config: &Config,
    docker: &Docker,
    lease: &Lease,
    secret: &str,
    container: &str,
    killed: bool,
) -> Option<String> {
    use bollard::models::ContainerStateStatusEnum as Status;
    for look in 0..2 {
        let inspected = tokio::time::timeout(
            LOST_PROBE_TIMEOUT,
            docker.inspect_container(container, None),
        )
        .await;
        match inspected {
            Ok(Ok(c))
                if c.state.as_ref().is_some_and(|s| {
                    s.running == Some(true) && s.status == Some(Status::RUNNING)
                }) =>
            {
                if killed && look == 0 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                return None;
            }
            Ok(Ok(_)) | Err(_) => break,
            Ok(Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            })) => break,
            Ok(Err(e)) if super::is_unreachable(&e) => break,
            Ok(Err(_)) => return None,
        }
    }
    let client = ControlClient::new(&config.socket_path());
    let deadline = tokio::time::Instant::now() + LOST_VERDICT_WAIT;
    loop {
        if let Err(ControlError::Api(e)) = client.lease(&lease.lease_id, secret).await {
            if e.code == ErrorCode::MachineLost {
                return Some(e.message);
            }
        }
        match tokio::time::timeout(LOST_PROBE_TIMEOUT, docker.ping()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Some(format!(
                    "build machine {} ({}, {}) was lost: its Docker daemon stopped answering while the stage ran ({})",
                    lease.machine_id,
                    lease.instance_id,
                    lease.address,
                    super::describe_docker_error(&e)
                ))
            }
            Err(_) => {
                return Some(format!(
                    "build machine {} ({}, {}) was lost: its Docker daemon stopped answering while the stage ran",
                    lease.machine_id, lease.instance_id, lease.address
                ))
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Some(format!(
                "the job container {container} on build machine {} ({}) stopped while the stage ran: the machine was lost (shutting down or reclaimed) or ran out of memory",
                lease.machine_id, lease.instance_id
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How often a running stage checks that its machine is still there, and how many checks
/// in a row may go unanswered before the machine counts as lost.
const LIVENESS_INTERVAL: Duration = Duration::from_secs(5);
const LIVENESS_MISSES: u32 = 3;
const LIVENESS_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// The stage's own check that its machine lives (the daemon's health checks leave a
/// leased machine to its job): a machine that stops answering mid-stage (frozen, network
/// cut, shut down without a word to EC2 yet) would otherwise keep the stage's output
/// stream open until gitlab-runner's job timeout. A quiet stage on a live machine is
/// never disturbed: only unanswered pings, or the daemon saying EC2 lost the machine,
/// end it.
struct Liveness<'a> {
    client: ControlClient,
    secret: &'a str,
}

impl Liveness<'_> {
    /// Returns (with the reason) once the machine is lost; runs as long as it lives.
    async fn until_lost(&self, docker: &Docker, lease: &Lease) -> String {
        let mut misses = 0;
        let mut tick = tokio::time::interval(LIVENESS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(ControlError::Api(e)) = self.client.lease(&lease.lease_id, self.secret).await
            {
                if e.code == ErrorCode::MachineLost {
                    return e.message;
                }
            }
            match tokio::time::timeout(LIVENESS_PING_TIMEOUT, docker.ping()).await {
                Ok(Err(e)) if super::is_unreachable(&e) => misses += 1,
                Ok(_) => misses = 0,
                Err(_) => misses += 1,
            }
            if misses >= LIVENESS_MISSES {
                return format!(
                    "build machine {} ({}, {}) was lost: its Docker daemon stopped answering while the stage ran ({LIVENESS_MISSES} checks in a row went unanswered)",
                    lease.machine_id, lease.instance_id, lease.address
                );
            }
        }
    }
}

/// How long a stage waits for a restarting daemon before going on unconfirmed.
const DAEMON_PATIENCE: Duration = Duration::from_secs(10);

/// The lease `prepare` wrote, confirmed with the daemon so a lost machine fails the stage
/// at once with a message saying so. A daemon that is down (restarting) does not fail the
/// job: the machine may well be fine.
async fn current_lease(config: &Config, env: &JobEnv, secret: &str) -> Result<Lease, StageError> {
    let path = lease_file(env);
    let lease = read_lease(&path).ok_or_else(|| {
        StageError::system(format!(
            "this job holds no build machine ({} is missing): did prepare succeed?",
            path.display()
        ))
    })?;
    match ControlClient::new(&config.socket_path())
        .with_patience(DAEMON_PATIENCE)
        .lease(&lease.lease_id, secret)
        .await
    {
        Ok(_) => Ok(lease),
        Err(ControlError::Api(e)) if e.code == ErrorCode::MachineLost => {
            Err(StageError::Machine(e.message))
        }
        Err(ControlError::Api(e)) if e.code == ErrorCode::NotFound => {
            Err(StageError::system(format!(
                "the lease on build machine {} is no longer held: released, expired, or forgotten by a daemon that lost its state and adopted the machine (see the daemon's log)",
                lease.machine_id
            )))
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not confirm the lease with the daemon; continuing");
            Ok(lease)
        }
    }
}

async fn exec_script(
    docker: &Docker,
    lease: &Lease,
    watch: &Liveness<'_>,
    container: &str,
    shell: &str,
    mut script: tokio::fs::File,
    may_restart: bool,
) -> Result<i32, StageError> {
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions::<String> {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(vec!["sh".into(), "-c".into(), shell.into()]),
                ..Default::default()
            },
        )
        .await;
    // The container may also stop between the two calls (an entrypoint that exits at once
    // after a restart): Docker then refuses start_exec with "is not running".
    let started = match exec {
        Ok(exec) => docker
            .start_exec(&exec.id, None)
            .await
            .map(|started| (exec, started)),
        Err(e) => Err(e),
    };
    let (exec, started) = match started {
        Ok(e) => e,
        Err(e) if is_not_running(&e) && may_restart => {
            // The container stopped (machine reboot, OOM kill): start it again so the
            // remaining stages (after_script, uploads) still run.
            docker.start_container(container, None).await.map_err(|e| {
                docker_failure(lease, &format!("restarting {container} failed"), &e)
            })?;
            let retried = Box::pin(exec_script(
                docker, lease, watch, container, shell, script, false,
            ))
            .await;
            // Restarted by us and stopped again on its own, whatever Docker reported on the
            // way (404 for the exec, 126, a broken stream): its entrypoint exits at once.
            let failed = matches!(retried, Err(_) | Ok(1..));
            if failed && has_stopped(docker, container).await {
                return Err(exits_at_once(container));
            }
            return retried;
        }
        Err(e) if is_not_running(&e) => return Err(exits_at_once(container)),
        Err(e) => {
            return Err(docker_failure(
                lease,
                &format!("starting the stage in {container} failed"),
                &e,
            ))
        }
    };
    let StartExecResults::Attached {
        mut output,
        mut input,
    } = started
    else {
        return Err(StageError::system(format!(
            "Docker on build machine {} started the stage detached (no output stream to attach to)",
            lease.machine_id
        )));
    };

    let feed = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = script.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            input.write_all(&buf[..n]).await?;
        }
        input.flush().await?;
        // The half-close is what gives the shell EOF.
        input.shutdown().await
    };
    let pump = async {
        let mut stdout = tokio::io::stdout();
        let mut stderr = tokio::io::stderr();
        while let Some(item) = output.next().await {
            match item {
                Ok(bollard::container::LogOutput::StdErr { message }) => {
                    stderr.write_all(&message).await?;
                    stderr.flush().await?;
                }
                Ok(bollard::container::LogOutput::StdOut { message })
                | Ok(bollard::container::LogOutput::Console { message }) => {
                    stdout.write_all(&message).await?;
                    stdout.flush().await?;
                }
                Ok(_) => {}
                Err(e) => return Err(std::io::Error::other(super::describe_docker_error(&e))),
            }
        }
        Ok::<(), std::io::Error>(())
    };

    let mut term =
        signal(SignalKind::terminate()).map_err(|e| StageError::system(e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| StageError::system(e.to_string()))?;
    tokio::pin!(pump);
    let feed = tokio::spawn(feed);
    let cancelled = tokio::select! {
        r = &mut pump => {
            r.map_err(|e| StageError::system(format!("stage output from build machine {} broke off: {e}", lease.machine_id)))?;
            false
        }
        _ = term.recv() => true,
        _ = int.recv() => true,
        lost = watch.until_lost(docker, lease) => {
            feed.abort();
            return Err(StageError::Machine(lost));
        }
    };
    if cancelled {
        eprintln!(
            "flotilla: stage cancelled; stopping its processes on build machine {}",
            lease.machine_id
        );
        // Bounded: a machine that stopped answering must not hold the cancellation past
        // gitlab-runner's grace period.
        let _ =
            tokio::time::timeout(LOST_PROBE_TIMEOUT, run_quick(docker, container, TERM_ALL)).await;
        // The stage's shell exits at once on SIGTERM and its output stream ends, but what it
        // started may live on (it handles or ignores SIGTERM, or was orphaned) beside the
        // next stages: give that the grace period, then SIGKILL whatever is left, always.
        let mut pumped = false;
        let quiet = wait_quiet_script(CANCEL_GRACE);
        let settle = run_quick(docker, container, &quiet);
        let _ = tokio::time::timeout(CANCEL_GRACE + Duration::from_secs(1), async {
            let _ = tokio::join!(settle, async {
                let _ = (&mut pump).await;
                pumped = true;
            });
        })
        .await;
        let _ =
            tokio::time::timeout(LOST_PROBE_TIMEOUT, run_quick(docker, container, KILL_ALL)).await;
        if !pumped {
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut pump).await;
        }
    }
    feed.abort();
    let code = if cancelled {
        tokio::time::timeout(LOST_PROBE_TIMEOUT, exit_code(docker, lease, &exec.id))
            .await
            .map_err(|_| {
                StageError::Machine(format!(
                    "build machine {} ({}) did not answer while the cancelled stage was stopped",
                    lease.machine_id, lease.instance_id
                ))
            })??
    } else {
        exit_code(docker, lease, &exec.id).await?
    };
    // The container can also stop after start_exec, before Docker runs anything: runc then
    // reports "cannot exec in a stopped state" and 126.
    if code == 126 && !cancelled && has_stopped(docker, container).await {
        return Err(exits_at_once(container));
    }
    Ok(code)
}

/// A job container that is not running when a stage starts, even after a restart.
fn exits_at_once(container: &str) -> StageError {
    StageError::build_message(format!(
        "the job container {container} exits as soon as it starts: the image's entrypoint must run the command it is given (exec \"$@\"), or set `entrypoint: [\"\"]` on the image"
    ))
}

async fn has_stopped(docker: &Docker, container: &str) -> bool {
    matches!(
        docker.inspect_container(container, None).await,
        Ok(c) if c.state.as_ref().and_then(|s| s.running) == Some(false)
    )
}

fn is_not_running(e: &bollard::errors::Error) -> bool {
    match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code,
            message,
        } => *status_code == 409 || message.contains("is not running"),
        _ => false,
    }
}

/// Runs a tiny command in the container and waits for it (used to signal the stage).
async fn run_quick(
    docker: &Docker,
    container: &str,
    script: &str,
) -> Result<(), bollard::errors::Error> {
    super::exec_quiet(docker, container, script)
        .await
        .map(|_| ())
}

/// The exec's exit code; Docker may report it a moment after the stream ends.
async fn exit_code(docker: &Docker, lease: &Lease, exec_id: &str) -> Result<i32, StageError> {
    let mut delay = Duration::from_millis(5);
    for _ in 0..40 {
        let info = docker
            .inspect_exec(exec_id)
            .await
            .map_err(|e| docker_failure(lease, "reading the stage's exit code failed", &e))?;
        if info.running != Some(true) {
            if let Some(code) = info.exit_code {
                return Ok(code as i32);
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
    Err(StageError::system(format!(
        "build machine {} did not report the stage's exit code",
        lease.machine_id
    )))
}
