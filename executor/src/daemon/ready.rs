//! A class's `ready_command` on a booting machine: a throwaway container over the machine's
//! dockerd (mTLS), the host's `/` read-only at `/host`, pulled, run, waited for and removed.
//! What its run means is [`verdict`], pure; the probe acts on it.

use std::sync::Arc;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, LogsOptions, RemoveContainerOptions,
    WaitContainerOptions,
};
use flotilla_proto::boot_hooks::{ReadyCommand, HOST_MOUNT};
use flotilla_proto::bootstrap::{machine_dns_name, DOCKER_TLS_PORT};
use futures_util::StreamExt;

/// Last lines of the command's output kept for the log.
const TAIL_LINES: &str = "20";
/// At most this much of them.
const TAIL_BYTES: usize = 2048;

/// How a ready command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyRun {
    pub exit_code: i64,
    /// Its last output lines (stdout and stderr), capped.
    pub output_tail: String,
}

/// Whether the machine passed: `Err(why)` is a failed boot. Pure.
pub(crate) fn verdict(run: &Result<ReadyRun, String>) -> Result<(), String> {
    match run {
        Ok(r) if r.exit_code == 0 => Ok(()),
        Ok(r) => Err(format!(
            "ready_command exited with {}; last output: {}",
            r.exit_code,
            r.output_tail.trim_end()
        )),
        Err(e) => Err(format!("ready_command did not run: {e}")),
    }
}

/// Runs `cmd` on machine `machine_id` at `address`, within `timeout` (pull included); the
/// container is removed whatever happened.
pub(crate) async fn run(
    tls: Arc<rustls::ClientConfig>,
    machine_id: &str,
    address: &str,
    cmd: &ReadyCommand,
    timeout: Duration,
) -> Result<ReadyRun, String> {
    let docker = crate::docker::connect(
        tls,
        address,
        DOCKER_TLS_PORT,
        &machine_dns_name(machine_id),
        timeout,
    )
    .map_err(|e| e.to_string())?;
    let name = format!("flotilla-ready-{machine_id}");
    let result = tokio::time::timeout(timeout, run_in(&docker, &name, cmd))
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {}s", timeout.as_secs())));
    let remove = docker.remove_container(
        &name,
        Some(RemoveContainerOptions {
            force: true,
            ..Default::default()
        }),
    );
    // Best effort: a machine that failed is terminated anyway.
    let _ = tokio::time::timeout(Duration::from_secs(10), remove).await;
    result
}

async fn run_in(
    docker: &bollard::Docker,
    name: &str,
    cmd: &ReadyCommand,
) -> Result<ReadyRun, String> {
    let mut pull = docker.create_image(
        Some(CreateImageOptions {
            from_image: Some(cmd.image.clone()),
            ..Default::default()
        }),
        None,
        None,
    );
    while let Some(item) = pull.next().await {
        let info = item.map_err(|e| format!("pulling {}: {e}", cmd.image))?;
        if let Some(message) = info.error_detail.and_then(|d| d.message) {
            return Err(format!("pulling {}: {message}", cmd.image));
        }
    }
    let body = ContainerCreateBody {
        image: Some(cmd.image.clone()),
        cmd: (!cmd.command.is_empty()).then(|| cmd.command.clone()),
        host_config: Some(HostConfig {
            binds: Some(vec![format!("/:{HOST_MOUNT}:ro")]),
            ..Default::default()
        }),
        ..Default::default()
    };
    docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.to_owned()),
                ..Default::default()
            }),
            body,
        )
        .await
        .map_err(|e| format!("creating its container: {e}"))?;
    docker
        .start_container(name, None)
        .await
        .map_err(|e| format!("starting its container: {e}"))?;
    let mut wait = docker.wait_container(name, None::<WaitContainerOptions>);
    let exit_code = match wait.next().await {
        Some(Ok(r)) => r.status_code,
        // bollard reports a non-zero exit as this error.
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
        Some(Err(e)) => return Err(format!("waiting for its container: {e}")),
        None => return Err("its container's wait ended without a status".into()),
    };
    Ok(ReadyRun {
        exit_code,
        output_tail: output_tail(docker, name).await,
    })
}

async fn output_tail(docker: &bollard::Docker, name: &str) -> String {
    let mut logs = docker.logs(
        name,
        Some(LogsOptions {
            stdout: true,
            stderr: true,
            tail: TAIL_LINES.into(),
            ..Default::default()
        }),
    );
    let mut out = Vec::new();
    while let Some(Ok(chunk)) = logs.next().await {
        out.extend_from_slice(&chunk.into_bytes());
    }
    let start = out.len().saturating_sub(TAIL_BYTES);
    String::from_utf8_lossy(&out[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_zero_exit_passes_and_a_failure_says_why() {
        let run = |exit_code| {
            Ok(ReadyRun {
                exit_code,
                output_tail: "no /host/etc/ready\n".into(),
            })
        };
        assert_eq!(verdict(&run(0)), Ok(()));
        let failed = verdict(&run(3)).unwrap_err();
        assert!(failed.contains("exited with 3") && failed.contains("no /host/etc/ready"));
        assert!(verdict(&Err("timed out after 5s".into()))
            .unwrap_err()
            .contains("timed out"));
    }
}
