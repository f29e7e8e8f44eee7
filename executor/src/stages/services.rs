//! Job services (`services:` in .gitlab-ci.yml): containers on the job network with the
//! aliases gitlab-runner derives, their variables, entrypoint and command; then a TCP
//! check of their exposed ports from inside the job network. A service that never opens
//! its port is a warning with its logs, never a failure (the docker executor's behaviour).
//! Privilege, volumes and options come from [`super::containers`].

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, EndpointSettings, NetworkingConfig};
use bollard::query_parameters::{CreateContainerOptions, LogsOptions};
use bollard::Docker;
use flotilla_proto::api::Lease;
use flotilla_proto::config::JobConfig;
use futures_util::StreamExt;

use super::containers::{self, JobVolumes};
use super::images;
use super::job::JobNames;
use super::spec::{JobSpec, ServiceSpec};
use super::{docker_failure, say, StageError};

/// One started service and the ports to check.
pub struct Started {
    pub container: String,
    pub host: String,
    pub image: String,
    pub ports: Vec<u16>,
}

/// Entrypoint for the create call: `None` keeps the image's, `[""]` clears it.
pub fn entrypoint_override(entrypoint: &Option<Vec<String>>) -> Option<Vec<String>> {
    match entrypoint {
        None => None,
        Some(e) if e.is_empty() => Some(vec![String::new()]),
        Some(e) => Some(e.clone()),
    }
}

pub async fn start_all(
    docker: &Docker,
    lease: &Lease,
    job: &JobConfig,
    names: &JobNames,
    spec: &JobSpec,
    volumes: &JobVolumes,
) -> Result<Vec<Started>, StageError> {
    let mut started = Vec::new();
    for (i, svc) in spec.services.iter().enumerate() {
        started.push(start_one(docker, lease, job, names, spec, volumes, i, svc).await?);
    }
    Ok(started)
}

#[allow(clippy::too_many_arguments)]
async fn start_one(
    docker: &Docker,
    lease: &Lease,
    job: &JobConfig,
    names: &JobNames,
    spec: &JobSpec,
    volumes: &JobVolumes,
    index: usize,
    svc: &ServiceSpec,
) -> Result<Started, StageError> {
    let image = &svc.image.name;
    let platform = svc.image.platform.as_deref();
    let policies = images::policies_for(job, &svc.image.pull_policy, image)?;
    images::ensure(docker, lease, spec, image, platform, &policies).await?;
    // gitlab-runner's rule: the service's HEALTHCHECK_TCP_PORT variable names the port to
    // wait for; otherwise the service is up once any exposed TCP port answers
    // (docker:dind exposes 2375 and 2376 and listens on one of them).
    let chosen = svc
        .variables
        .iter()
        .rev()
        .find(|(k, _)| k == HEALTHCHECK_TCP_PORT)
        .and_then(|(_, v)| v.trim().parse::<u16>().ok());
    let ports = match chosen {
        Some(port) => vec![port],
        None => docker
            .inspect_image(image)
            .await
            .ok()
            .and_then(|i| i.config)
            .and_then(|c| c.exposed_ports)
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.strip_suffix("/tcp").and_then(|n| n.parse().ok()))
            .collect(),
    };
    let name = format!("{}-svc-{index}", names.network);
    let mut env: Vec<String> = spec
        .variables
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    env.extend(svc.variables.iter().map(|(k, v)| format!("{k}={v}")));
    let body = ContainerCreateBody {
        image: Some(image.clone()),
        entrypoint: entrypoint_override(&svc.image.entrypoint),
        cmd: (!svc.command.is_empty()).then(|| svc.command.clone()),
        env: Some(env),
        user: svc.image.user.clone(),
        labels: Some(names.labels("service")),
        host_config: Some(containers::service_host_config(job, names, volumes, image)),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                names.network.clone(),
                EndpointSettings {
                    aliases: Some(svc.aliases.clone()),
                    ..Default::default()
                },
            )])),
        }),
        ..Default::default()
    };
    docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                platform: platform.unwrap_or_default().to_owned(),
            }),
            body,
        )
        .await
        .map_err(|e| {
            super::create_failure(lease, &name, &super::fault::DockerFault::from_bollard(&e))
        })?;
    docker
        .start_container(&name, None)
        .await
        .map_err(|e| docker_failure(lease, &format!("starting service {image} failed"), &e))?;
    say(&format!(
        "Started service {image} as {}",
        svc.aliases.join(", ")
    ));
    Ok(Started {
        // Docker's DNS on the job network always resolves the container's own name; an
        // alias derived from `registry:port/...` is no valid host name.
        host: name.clone(),
        container: name,
        image: image.clone(),
        ports,
    })
}

/// The service variable that picks the one port to wait for (gitlab-runner's name).
pub const HEALTHCHECK_TCP_PORT: &str = "HEALTHCHECK_TCP_PORT";

/// Shell that waits until `host` accepts TCP connections on any of `ports`, with whatever
/// the helper image has: bash's /dev/tcp, `nc -z`, or busybox `nc ... -e true`.
fn port_check_script(host: &str, ports: &[u16], wait: Duration) -> String {
    let tries = (wait.as_millis() / 250).max(1);
    let host = super::shell_quote(host);
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "i=0; while [ $i -lt {tries} ]; do for p in {}; do \
         if (exec 3<>\"/dev/tcp/\"{host}\"/$p\") 2>/dev/null; then exit 0; fi; \
         if nc -z -w 1 {host} $p >/dev/null 2>&1; then exit 0; fi; \
         if nc -w 1 {host} $p -e true >/dev/null 2>&1; then exit 0; fi; \
         done; sleep 0.25 2>/dev/null || sleep 1; i=$((i+1)); done; exit 1",
        ports.join(" ")
    )
}

/// Waits, for every service in parallel, until one of its ports answers (checked from the
/// helper container); prints a warning with the service's logs for any that never did.
pub async fn check_health(docker: &Docker, helper: &str, services: &[Started], wait: Duration) {
    let checks = services
        .iter()
        .filter(|s| !s.ports.is_empty())
        .map(|s| async move {
            let script = port_check_script(&s.host, &s.ports, wait);
            (s, run_check(docker, helper, &script, wait).await)
        });
    for (s, ok) in futures_util::future::join_all(checks).await {
        if ok {
            continue;
        }
        let ports: Vec<String> = s.ports.iter().map(|p| format!("{p}/tcp")).collect();
        let logs = service_logs(docker, &s.container).await;
        say(&format!(
            "\x1b[0;33m*** WARNING:\x1b[0m Service {} probably didn't start properly: none of {} of {} accepted connections within {}s.\nService container logs:\n{logs}\n*********",
            s.image,
            ports.join(", "),
            s.host,
            wait.as_secs()
        ));
    }
}

async fn run_check(docker: &Docker, container: &str, script: &str, wait: Duration) -> bool {
    let check = super::exec_quiet(docker, container, script);
    matches!(
        tokio::time::timeout(wait + Duration::from_secs(5), check).await,
        Ok(Ok(Some(0)))
    )
}

/// At most this much of a failed service's log reaches the job log: its last 100 lines
/// can still be gigabytes, and prepare runs on the runner host.
const SERVICE_LOG_CAP: usize = 64 * 1024;

async fn service_logs(docker: &Docker, container: &str) -> String {
    let mut stream = docker.logs(
        container,
        Some(LogsOptions {
            stdout: true,
            stderr: true,
            tail: "100".into(),
            ..Default::default()
        }),
    );
    let mut out = Vec::new();
    let mut truncated = false;
    while let Some(Ok(chunk)) = stream.next().await {
        let bytes = chunk.into_bytes();
        let room = SERVICE_LOG_CAP.saturating_sub(out.len());
        out.extend_from_slice(&bytes[..bytes.len().min(room)]);
        if bytes.len() > room {
            truncated = true;
            break;
        }
    }
    let mut text = String::from_utf8_lossy(&out).into_owned();
    if truncated {
        text.push_str(&format!("\n[... cut at {} KiB]", SERVICE_LOG_CAP / 1024));
    }
    text
}
