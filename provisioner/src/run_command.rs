//! SSM Run Command on the runner hosts: the two shell scripts a rolling replacement
//! runs (the readiness check on a new host, the drain of an old one) and running one
//! script on one instance (`ssm:SendCommand` with `AWS-RunShellScript`, then
//! `ssm:GetCommandInvocation` until it ends, with backoff and a deadline).
//!
//! The scripts are fixed text plus the paths the user data installs; nothing from the
//! stack file is interpolated into them.

use std::time::{Duration, Instant};

use aws_sdk_ssm::types::CommandInvocationStatus;

use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::paths::{FLOTILLA_BIN, FLOTILLA_TOML_PATH, GITLAB_RUNNER_BIN};
use crate::plan::Go;
use crate::poll::{self, Backoff, Poll};

/// The SSM document every command runs.
const DOCUMENT: &str = "AWS-RunShellScript";
/// How long SSM may take to hand a command to the instance's agent.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a new host has to register its SSM agent, finish cloud-init and answer.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// Where the drain makes gitlab-runner's stop graceful (a runtime drop-in, so hosts
/// launched before it existed get it too).
const GRACEFUL_STOP_DROPIN: &str =
    "/run/systemd/system/gitlab-runner.service.d/flotilla-drain.conf";

/// The drain of a host that is about to be terminated: gitlab-runner stops taking jobs
/// and exits once the running ones have finished (the drop-in makes systemd stop it
/// with SIGQUIT, gitlab-runner's graceful shutdown, and wait for it), then the flotilla
/// daemon terminates its build machines and `--wait` returns when none is left.
pub(crate) fn drain_commands() -> Vec<String> {
    let dir = GRACEFUL_STOP_DROPIN
        .rsplit_once('/')
        .map_or(GRACEFUL_STOP_DROPIN, |(d, _)| d);
    vec![
        "set -eu".into(),
        format!("mkdir -p {dir}"),
        format!(
            "printf '[Service]\\nKillSignal=SIGQUIT\\nTimeoutStopSec=infinity\\n' > {GRACEFUL_STOP_DROPIN}"
        ),
        "systemctl daemon-reload".into(),
        "echo 'flotilla-provision: stopping gitlab-runner (running jobs finish first)'".into(),
        format!("{GITLAB_RUNNER_BIN} stop"),
        "echo 'flotilla-provision: draining the flotilla daemon'".into(),
        format!("{FLOTILLA_BIN} --config {FLOTILLA_TOML_PATH} drain --wait"),
    ]
}

/// The readiness check of a new host: cloud-init has finished and the flotilla daemon
/// answers on its control socket (it may take a few seconds after its start).
pub(crate) fn ready_commands() -> Vec<String> {
    vec![
        "set -u".into(),
        "cloud-init status --wait >/dev/null 2>&1 || true".into(),
        "for i in $(seq 1 60); do".into(),
        format!("  if {FLOTILLA_BIN} --config {FLOTILLA_TOML_PATH} status >/dev/null 2>&1; then"),
        "    echo 'flotilla daemon answers'; exit 0".into(),
        "  fi".into(),
        "  sleep 5".into(),
        "done".into(),
        "echo 'the flotilla daemon does not answer after 5 minutes' >&2".into(),
        "systemctl status --no-pager flotilla.service >&2 || true".into(),
        "exit 1".into(),
    ]
}

/// One script for one instance.
#[derive(Debug, Clone)]
pub(crate) struct Script<'a> {
    /// The host it is for (`host/0`), first on every progress line.
    pub(crate) host: &'a str,
    /// What it does, for progress lines and errors (`the drain of i-...`).
    pub(crate) what: &'a str,
    /// SendCommand's comment (at most 100 characters).
    pub(crate) comment: &'a str,
    pub(crate) commands: Vec<String>,
    /// The script's own time limit (`executionTimeout`).
    pub(crate) timeout: Duration,
    /// Keep resending while SSM does not know the instance yet (a new host whose agent
    /// has not registered), for up to this long.
    pub(crate) wait_for_agent: Option<Duration>,
}

/// Why an instance cannot be given commands: SSM's `InvalidInstanceId`.
pub(crate) fn is_unmanaged(e: &crate::aws::AwsError) -> bool {
    e.code_is(&["InvalidInstanceId"])
}

/// Runs the script on `instance` and waits for it to end; its standard output on
/// success. A failure names the command id, its status and the end of its stderr.
pub(crate) async fn run(
    ctx: &Ctx<'_>,
    go: Go,
    instance: &str,
    script: &Script<'_>,
) -> Result<String> {
    let started = Instant::now();
    let command_id = send(ctx, go, instance, script).await?;
    let limit = script.timeout + DELIVERY_TIMEOUT;
    let backoff = Backoff {
        first: Duration::from_secs(2),
        max: Duration::from_secs(30),
        limit,
    };
    let ssm = &ctx.aws.ssm;
    let what = format!("{}: {}", script.host, script.what);
    poll::until(&what, backoff, || async {
        let out = ctx
            .aws
            .read(
                "ssm:GetCommandInvocation",
                ssm.get_command_invocation()
                    .command_id(&command_id)
                    .instance_id(instance)
                    .send(),
            )
            .await;
        let elapsed = human(started.elapsed());
        let out = match out {
            Ok(out) => out,
            // Right after SendCommand the invocation may not be listed yet.
            Err(e) if e.code_is(&["InvocationDoesNotExist"]) => {
                return Ok(Poll::Wait(format!(
                    "{}: waiting for {} (command {command_id} not listed yet, {elapsed})",
                    script.host, script.what
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let status = out
            .status()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_else(|| "Unknown".into());
        match out.status() {
            Some(CommandInvocationStatus::Success) => Ok(Poll::Done(
                out.standard_output_content().unwrap_or_default().to_owned(),
            )),
            Some(
                CommandInvocationStatus::Pending
                | CommandInvocationStatus::InProgress
                | CommandInvocationStatus::Delayed,
            )
            | None => Ok(Poll::Wait(format!(
                "{}: waiting for {} (command {command_id}: {status}, {elapsed})",
                script.host, script.what
            ))),
            Some(_) => Err(Error::Refused(format!(
                "{}: {} failed: SSM command {command_id} on {instance} ended {status} ({}, \
                 exit code {}){}",
                script.host,
                script.what,
                out.status_details().unwrap_or("no details"),
                out.response_code(),
                tail(out.standard_error_content().unwrap_or_default()),
            ))),
        }
    })
    .await
}

/// SendCommand, resent while the instance is not known to SSM when the script says so.
async fn send(ctx: &Ctx<'_>, go: Go, instance: &str, script: &Script<'_>) -> Result<String> {
    let ssm = &ctx.aws.ssm;
    let request = || {
        ssm.send_command()
            .document_name(DOCUMENT)
            .instance_ids(instance)
            .comment(script.comment.chars().take(100).collect::<String>())
            .timeout_seconds(DELIVERY_TIMEOUT.as_secs() as i32)
            .parameters("commands", script.commands.clone())
            .parameters(
                "executionTimeout",
                vec![script.timeout.as_secs().to_string()],
            )
            .send()
    };
    let sent = match script.wait_for_agent {
        None => ctx.aws.write(go, "ssm:SendCommand", request()).await?,
        Some(limit) => {
            let what = format!("{}: {instance} to register with SSM", script.host);
            let backoff = Backoff {
                first: Duration::from_secs(5),
                max: Duration::from_secs(20),
                limit,
            };
            poll::until(&what, backoff, || async {
                match ctx.aws.write(go, "ssm:SendCommand", request()).await {
                    Ok(out) => Ok(Poll::Done(out)),
                    Err(e) if is_unmanaged(&e) => Ok(Poll::Wait(format!(
                        "{}: waiting for {instance} to register with SSM (its agent starts \
                         at boot)",
                        script.host
                    ))),
                    Err(e) => Err(e.into()),
                }
            })
            .await?
        }
    };
    sent.command()
        .and_then(|c| c.command_id())
        .map(str::to_owned)
        .ok_or_else(|| Error::Refused(format!("SendCommand to {instance} returned no command id")))
}

/// The last lines of a command's stderr, for an error message.
fn tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let from = lines.len().saturating_sub(5);
    format!(": {}", lines[from..].join(" | "))
}

/// `1h02m`, `1h`, `20m`, `3m05s`, `42s`.
pub(crate) fn human(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, 0, _) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_stops_gitlab_runner_then_drains_and_waits() {
        let c = drain_commands();
        assert_eq!(c[0], "set -eu");
        let text = c.join("\n");
        assert!(
            text.contains("KillSignal=SIGQUIT")
                && text
                    .contains("> /run/systemd/system/gitlab-runner.service.d/flotilla-drain.conf"),
            "{text}"
        );
        let reload = c.iter().position(|l| l == "systemctl daemon-reload");
        let stop = c
            .iter()
            .position(|l| l == "/usr/local/bin/gitlab-runner stop");
        let drain = c.iter().position(|l| {
            l == "/usr/local/bin/flotilla --config /etc/flotilla/flotilla.toml drain --wait"
        });
        assert!(stop.is_some() && drain.is_some(), "{c:?}");
        assert!(reload < stop, "the graceful stop is in force: {c:?}");
        assert!(stop < drain, "jobs finish before the machines go: {c:?}");
    }

    #[test]
    fn the_readiness_check_asks_the_daemon() {
        let text = ready_commands().join("\n");
        assert!(text.contains("cloud-init status --wait"), "{text}");
        assert!(
            text.contains("/usr/local/bin/flotilla --config /etc/flotilla/flotilla.toml status")
        );
        assert!(text.ends_with("exit 1"), "{text}");
    }

    #[test]
    fn durations_and_stderr_tails_read_well() {
        assert_eq!(human(Duration::from_secs(42)), "42s");
        assert_eq!(human(Duration::from_secs(185)), "3m05s");
        assert_eq!(human(Duration::from_secs(3720)), "1h02m");
        assert_eq!(human(Duration::from_secs(1200)), "20m");
        assert_eq!(human(Duration::from_secs(7200)), "2h");
        assert_eq!(tail(""), "");
        assert_eq!(tail("a\nb\nc\nd\ne\nf\n"), ": b | c | d | e | f");
    }
}
