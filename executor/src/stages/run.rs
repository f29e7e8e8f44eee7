//! `flotilla run <script> <stage>`: feeds the stage script to the right container's shell
//! and streams its output back as it is produced.
//!
//! The script goes to the shell's stdin (as the docker executor does), read from the file
//! in chunks, so neither script nor output is ever held whole in memory. On SIGTERM or
//! SIGINT (gitlab-runner cancelling or timing out the job) every process the stage started
//! in the container is signalled, then killed after a short grace, and the stage exits.
//!
//! This module only does the I/O: what happened is written into a
//! [`super::verdict::Report`], and [`super::verdict::verdict`] decides whose fault a
//! failure is (and which fact it needs first).

use std::path::Path;
use std::time::Duration;

use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::Docker;
use flotilla_proto::api::{ErrorCode, Lease};
use flotilla_proto::config::Config;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};

use super::fault::DockerFault;
use super::job::{runs_in_build_container, JobNames};
use super::verdict::{
    verdict, Attempt, Container, LeaseCheck, Liveness, LossProof, Ping, Probe, Report, Target,
    Verdict, LOSS_PROOF_WAIT,
};
use super::{lease_file, machine_docker, read_lease, JobEnv, StageError, StageResult};
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

/// Most probes a stage can need (run, restart, check, run again, two looks, proof); more
/// would mean the verdict asks for a fact the probes do not record.
const MAX_PROBES: usize = 12;

pub async fn run(config: &Config, env: &JobEnv, script: &Path, stage: &str) -> StageResult {
    let secret = super::read_secret(env).unwrap_or_default();
    let lease = read_lease_file(env)?;
    let names = JobNames::new(&lease.job_key);
    let container = if runs_in_build_container(stage) {
        names.build.clone()
    } else {
        names.helper.clone()
    };
    let target = Target {
        machine_id: lease.machine_id.clone(),
        instance_id: lease.instance_id.clone(),
        address: lease.address.clone(),
        container: container.clone(),
    };
    let docker = machine_docker(config, &lease)?;
    // The TLS handshakes of the exec's connections (create, then the attach and the
    // inspect, which cannot share it) happen while the daemon confirms the lease: not
    // awaited, so a lost machine that never answers delays nothing.
    warm_connections(&docker);
    // Confirmed with the daemon first, so a lost machine fails the stage at once.
    let confirmed = ControlClient::new(&config.socket_path())
        .with_patience(DAEMON_PATIENCE)
        .lease(&lease.lease_id, &secret)
        .await;
    if let Err(e) = &confirmed {
        if lease_check(&confirmed) == LeaseCheck::Unconfirmed {
            tracing::warn!(error = %e, "could not confirm the lease with the daemon; continuing");
        }
    }
    super::timing::mark("lease_checked");
    let mut report = Report::new(target, lease_check(&confirmed));
    if let Verdict::Done(outcome) = verdict(&report) {
        return outcome.into();
    }
    let file = tokio::fs::File::open(script).await.map_err(|e| {
        StageError::system(format!(
            "cannot read stage script {}: {e}",
            script.display()
        ))
    })?;
    // Predefined stages run with umask 0000 (gitlab-runner-helper's approach) so the build
    // container's user, whoever it is, can modify what they create.
    let shell = if runs_in_build_container(stage) {
        DETECT_SHELL.to_owned()
    } else {
        format!("umask 0000; {DETECT_SHELL}")
    };
    let shell = format!("{}{shell}", soft_nofile_prefix(config, &lease.class));
    let mut io = StageIo {
        docker,
        lease,
        client: ControlClient::new(&config.socket_path()),
        secret,
        target: report.target.clone(),
        shell,
        script: Some(file),
    };
    for _ in 0..MAX_PROBES {
        match verdict(&report) {
            Verdict::Done(outcome) => return outcome.into(),
            Verdict::Need(probe) => io.probe(probe, &mut report).await,
        }
    }
    Err(StageError::system(format!(
        "the stage on build machine {} ended undecided after {MAX_PROBES} probes (a flotilla bug): {report:?}",
        report.target.machine_id
    )))
}

/// Connections a stage's exec needs at once: the attach takes its connection over, so the
/// inspect after it needs another.
const WARM_CONNECTIONS: usize = 2;

/// Opens [`WARM_CONNECTIONS`] connections to the machine (a `/_ping` each) in the
/// background; hyper's pool hands them to the exec's requests.
fn warm_connections(docker: &Docker) {
    for _ in 0..WARM_CONNECTIONS {
        let docker = docker.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(LOST_PROBE_TIMEOUT, docker.ping()).await;
        });
    }
}

/// The lease `prepare` wrote to the job's temp dir.
fn read_lease_file(env: &JobEnv) -> Result<Lease, StageError> {
    let path = lease_file(env);
    read_lease(&path).ok_or_else(|| {
        StageError::system(format!(
            "this job holds no build machine ({} is missing or unreadable): did prepare succeed?",
            path.display()
        ))
    })
}

/// The daemon's answer about a lease, as a fact.
fn lease_check(answer: &Result<Lease, ControlError>) -> LeaseCheck {
    match answer {
        Ok(_) => LeaseCheck::Held,
        Err(ControlError::Api(e)) if e.code == ErrorCode::MachineLost => {
            LeaseCheck::Lost(e.message.clone())
        }
        Err(ControlError::Api(e)) if e.code == ErrorCode::NotFound => LeaseCheck::NotHeld,
        Err(_) => LeaseCheck::Unconfirmed,
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

/// Bound on each look at a failed stage's container and machine.
const LOST_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// How often a running stage checks that its machine is still there.
const LIVENESS_INTERVAL: Duration = Duration::from_secs(5);
const LIVENESS_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a stage waits for a restarting daemon before going on unconfirmed.
const DAEMON_PATIENCE: Duration = Duration::from_secs(10);

/// The Docker and daemon I/O of one stage: each probe records what it found in the report.
struct StageIo {
    docker: Docker,
    lease: Lease,
    /// The daemon, without patience: a liveness check or a proof poll does not wait for it.
    client: ControlClient,
    secret: String,
    target: Target,
    shell: String,
    /// Taken by the attempt that feeds it (an attempt refused before that leaves it).
    script: Option<tokio::fs::File>,
}

impl StageIo {
    async fn probe(&mut self, probe: Probe, report: &mut Report) {
        let container = self.target.container.as_str();
        match probe {
            Probe::Run => {
                let attempt = self.attempt().await;
                report.attempts.push(attempt);
            }
            Probe::Restart => {
                let started = self.docker.start_container(container, None).await;
                report.restart = Some(started.map_err(|e| DockerFault::from_bollard(&e)));
            }
            Probe::CheckStopped => {
                let inspected = self.docker.inspect_container(container, None).await;
                report.after_failure = Some(container_seen(inspected));
            }
            Probe::Look { delay } => {
                tokio::time::sleep(delay).await;
                let inspected = tokio::time::timeout(
                    LOST_PROBE_TIMEOUT,
                    self.docker.inspect_container(container, None),
                )
                .await;
                report.looks.push(match inspected {
                    Ok(r) => container_seen(r),
                    Err(_) => Container::Unanswered,
                });
            }
            Probe::AwaitLossProof => report.loss = Some(self.loss_proof().await),
        }
    }

    /// Polls the daemon and the machine until one says the machine is gone, or
    /// [`LOSS_PROOF_WAIT`] passes.
    async fn loss_proof(&self) -> LossProof {
        let deadline = tokio::time::Instant::now() + LOSS_PROOF_WAIT;
        loop {
            let daemon = lease_check(&self.client.lease(&self.lease.lease_id, &self.secret).await);
            if let Some(proof) = LossProof::from_daemon(&daemon) {
                return proof;
            }
            if let Some(proof) = LossProof::from_ping(&ping(&self.docker, LOST_PROBE_TIMEOUT).await)
            {
                return proof;
            }
            if tokio::time::Instant::now() >= deadline {
                return LossProof::NoneInTime;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Returns (with the reason) once the machine is lost; runs as long as it lives. A
    /// machine that stops answering mid-stage (frozen, network cut, shut down without a
    /// word to EC2 yet) would otherwise keep the stage's output stream open until
    /// gitlab-runner's job timeout.
    async fn until_lost(&self) -> String {
        let mut watch = Liveness::default();
        let mut tick = tokio::time::interval(LIVENESS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let daemon = lease_check(&self.client.lease(&self.lease.lease_id, &self.secret).await);
            if let Some(why) = watch.daemon_says(&daemon) {
                return why;
            }
            let answer = ping(&self.docker, LIVENESS_PING_TIMEOUT).await;
            if let Some(why) = watch.ping(&self.target, &answer) {
                return why;
            }
        }
    }

    /// One run of the stage script: exec the shell, feed it the script, stream its output
    /// (cancelled on SIGTERM/SIGINT, ended if the machine is lost), read its exit code.
    async fn attempt(&mut self) -> Attempt {
        let docker = &self.docker;
        let container = self.target.container.as_str();
        let exec = docker
            .create_exec(
                container,
                CreateExecOptions::<String> {
                    attach_stdin: Some(true),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(vec!["sh".into(), "-c".into(), self.shell.clone()]),
                    ..Default::default()
                },
            )
            .await;
        // The container may also stop between the two calls (an entrypoint that exits at
        // once after a restart): Docker then refuses start_exec with "is not running".
        super::timing::mark("exec_created");
        let started = match exec {
            Ok(exec) => docker
                .start_exec(&exec.id, None)
                .await
                .map(|started| (exec, started)),
            Err(e) => Err(e),
        };
        let (exec, started) = match started {
            Ok(e) => e,
            Err(e) => return Attempt::Refused(DockerFault::from_bollard(&e)),
        };
        super::timing::mark("exec_started");
        let StartExecResults::Attached {
            mut output,
            mut input,
        } = started
        else {
            return Attempt::Detached;
        };
        let Some(mut script) = self.script.take() else {
            return Attempt::Local(format!(
                "the stage script for {container} was already fed to an earlier attempt (a flotilla bug)"
            ));
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
        // Each frame is written and flushed before the next is read: output reaches the job
        // log as it is produced, and memory stays one frame whatever the output's size.
        // Written in place, not through tokio's stdout (a blocking-pool hop per write and
        // per flush halved the throughput); gitlab-runner drains the pipe as it fills.
        let pump = async {
            use std::io::Write;
            while let Some(item) = output.next().await {
                match item {
                    Ok(bollard::container::LogOutput::StdErr { message }) => {
                        let mut stderr = std::io::stderr().lock();
                        stderr.write_all(&message)?;
                        stderr.flush()?;
                    }
                    Ok(bollard::container::LogOutput::StdOut { message })
                    | Ok(bollard::container::LogOutput::Console { message }) => {
                        let mut stdout = std::io::stdout().lock();
                        stdout.write_all(&message)?;
                        stdout.flush()?;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Err(std::io::Error::other(
                            DockerFault::from_bollard(&e).describe(),
                        ))
                    }
                }
            }
            Ok::<(), std::io::Error>(())
        };

        let signals = signal(SignalKind::terminate())
            .and_then(|term| signal(SignalKind::interrupt()).map(|int| (term, int)));
        let (mut term, mut int) = match signals {
            Ok(s) => s,
            Err(e) => {
                return Attempt::Local(format!(
                    "cannot watch for gitlab-runner's SIGTERM/SIGINT while the stage runs on build machine {}: {e}",
                    self.target.machine_id
                ))
            }
        };
        tokio::pin!(pump);
        let feed = tokio::spawn(feed);
        let cancelled = tokio::select! {
            r = &mut pump => {
                if let Err(e) = r {
                    return Attempt::OutputBroke(e.to_string());
                }
                false
            }
            _ = term.recv() => true,
            _ = int.recv() => true,
            lost = self.until_lost() => {
                feed.abort();
                return Attempt::MachineLost(lost);
            }
        };
        if cancelled {
            eprintln!(
                "flotilla: stage cancelled; stopping its processes on build machine {}",
                self.target.machine_id
            );
            // Bounded: a machine that stopped answering must not hold the cancellation past
            // gitlab-runner's grace period.
            let _ =
                tokio::time::timeout(LOST_PROBE_TIMEOUT, run_quick(docker, container, TERM_ALL))
                    .await;
            // The stage's shell exits at once on SIGTERM and its output stream ends, but
            // what it started may live on (it handles or ignores SIGTERM, or was orphaned)
            // beside the next stages: give that the grace period, then SIGKILL whatever is
            // left, always.
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
                tokio::time::timeout(LOST_PROBE_TIMEOUT, run_quick(docker, container, KILL_ALL))
                    .await;
            if !pumped {
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut pump).await;
            }
        }
        feed.abort();
        super::timing::mark("output_ended");
        let attempt = if cancelled {
            tokio::time::timeout(LOST_PROBE_TIMEOUT, exit_code(docker, &exec.id, true))
                .await
                .unwrap_or(Attempt::CancelUnanswered)
        } else {
            exit_code(docker, &exec.id, false).await
        };
        super::timing::mark("exit_code_read");
        attempt
    }
}

/// A job container as an inspect found it.
fn container_seen(
    inspected: Result<bollard::models::ContainerInspectResponse, bollard::errors::Error>,
) -> Container {
    use bollard::models::ContainerStateStatusEnum as Status;
    match inspected {
        Ok(c) => match c.state {
            Some(s) if s.running == Some(true) && s.status == Some(Status::RUNNING) => {
                Container::Running
            }
            Some(s) if s.running == Some(false) => Container::Stopped,
            _ => Container::Other,
        },
        Err(e) => Container::Refused(DockerFault::from_bollard(&e)),
    }
}

async fn ping(docker: &Docker, timeout: Duration) -> Ping {
    match tokio::time::timeout(timeout, docker.ping()).await {
        Ok(Ok(_)) => Ping::Answered,
        Ok(Err(e)) => Ping::Refused(DockerFault::from_bollard(&e)),
        Err(_) => Ping::Unanswered,
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
async fn exit_code(docker: &Docker, exec_id: &str, cancelled: bool) -> Attempt {
    let mut delay = Duration::from_millis(5);
    for _ in 0..40 {
        let info = match docker.inspect_exec(exec_id).await {
            Ok(info) => info,
            Err(e) => return Attempt::ExitUnread(DockerFault::from_bollard(&e)),
        };
        if info.running != Some(true) {
            if let Some(code) = info.exit_code {
                return Attempt::Exited {
                    code: code as i32,
                    cancelled,
                };
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
    Attempt::ExitNeverReported
}
