//! What the daemon itself asks of a build machine's dockerd: is it up (boot probe, health
//! check), and how many job containers does it hold (the drain check of an adopted
//! machine, the reclaim check of a long lease). Behind a trait so the probe and health
//! logic run as unit tests against a scripted fake; [`MtlsMachines`] is the real one.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::boot_hooks::ReadyCommand;
use flotilla_proto::bootstrap::{machine_dns_name, DOCKER_TLS_PORT};
use futures_util::future::BoxFuture;

use super::ready::ReadyRun;

/// Bound on one Docker call the daemon makes to a machine.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

pub trait MachineApi: Send + Sync {
    /// `/_ping` over mutual TLS to machine `machine_id` at `address`.
    fn ping<'a>(
        &'a self,
        machine_id: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<(), String>>;

    /// How many job containers (labelled by the stages, running or not) the machine has,
    /// only `job_key`'s when given, counting that job's network too: prepare creates it
    /// first, while the images are still pulling, so a job that pulls for longer than the
    /// reclaim grace still shows up. Answering at all also proves its dockerd is alive.
    fn job_containers<'a>(
        &'a self,
        machine_id: &'a str,
        address: &'a str,
        job_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<usize, String>>;

    /// Runs a class's `ready_command` on a booting machine, within `timeout`.
    fn ready_command<'a>(
        &'a self,
        machine_id: &'a str,
        address: &'a str,
        cmd: &'a ReadyCommand,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<ReadyRun, String>>;
    /// The machine's dockerd events between two Unix times, one line each, oldest first
    /// (at most [`MAX_EVENTS`]): for the report saved when it is marked broken or lost.
    /// Fakes need not answer.
    fn events<'a>(
        &'a self,
        machine_id: &'a str,
        address: &'a str,
        since: i64,
        until: i64,
    ) -> BoxFuture<'a, Result<Vec<String>, String>> {
        let _ = (machine_id, address, since, until);
        Box::pin(async { Err("not available here".to_string()) })
    }

    /// Pulls `image` (anonymously: no job's credentials are the daemon's to use) onto the
    /// machine, within `timeout`: a prefetch before its first job. Fakes need not answer.
    fn pull<'a>(
        &'a self,
        machine_id: &'a str,
        address: &'a str,
        image: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), String>> {
        let _ = (machine_id, address, image, timeout);
        Box::pin(async { Err("not available here".to_string()) })
    }
}

/// Most dockerd events kept in a machine's report (the newest win).
pub const MAX_EVENTS: usize = 500;
/// Bound on reading a machine's events: a frozen dockerd must not hold a report up.
pub const EVENTS_TIMEOUT: Duration = Duration::from_secs(10);

/// The machines' dockerd over mutual TLS with the fleet CA (server name: the machine's
/// DNS name).
pub struct MtlsMachines {
    pub tls: Arc<rustls::ClientConfig>,
}

impl MachineApi for MtlsMachines {
    fn ready_command<'a>(
        &'a self,
        machine_id: &'a str,
        address: &'a str,
        cmd: &'a ReadyCommand,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<ReadyRun, String>> {
        Box::pin(super::ready::run(
            self.tls.clone(),
            machine_id,
            address,
            cmd,
            timeout,
        ))
    }

    fn ping<'a>(
        &'a self,
        machine_id: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            crate::docker::ping(
                self.tls.clone(),
                address,
                DOCKER_TLS_PORT,
                &machine_dns_name(machine_id),
                CALL_TIMEOUT,
            )
            .await
        })
    }

    fn job_containers<'a>(
        &'a self,
        machine_id: &'a str,
        address: &'a str,
        job_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<usize, String>> {
        Box::pin(async move {
            use bollard::query_parameters::ListContainersOptions;
            let docker = self.docker(machine_id, address, CALL_TIMEOUT)?;
            let filters = std::collections::HashMap::from([(
                "label".to_string(),
                vec![match job_key {
                    Some(key) => format!("{}={key}", crate::stages::job::JOB_LABEL),
                    None => crate::stages::job::JOB_LABEL.to_string(),
                }],
            )]);
            let list = tokio::time::timeout(
                CALL_TIMEOUT,
                docker.list_containers(Some(ListContainersOptions {
                    all: true,
                    filters: Some(filters),
                    ..Default::default()
                })),
            )
            .await
            .map_err(|_| "timed out listing job containers".to_string())?
            .map_err(|e| e.to_string())?;
            let networks = match job_key {
                None => 0,
                Some(key) => {
                    use bollard::query_parameters::ListNetworksOptions;
                    let filters = std::collections::HashMap::from([(
                        "label".to_string(),
                        vec![format!("{}={key}", crate::stages::job::JOB_LABEL)],
                    )]);
                    tokio::time::timeout(
                        CALL_TIMEOUT,
                        docker.list_networks(Some(ListNetworksOptions {
                            filters: Some(filters),
                        })),
                    )
                    .await
                    .map_err(|_| "timed out listing job networks".to_string())?
                    .map_err(|e| e.to_string())?
                    .len()
                }
            };
            Ok(list.len() + networks)
        })
    }

    fn events<'a>(
        &'a self,
        machine_id: &'a str,
        address: &'a str,
        since: i64,
        until: i64,
    ) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move {
            use bollard::query_parameters::EventsOptions;
            use futures_util::StreamExt;
            let docker = self.docker(machine_id, address, EVENTS_TIMEOUT)?;
            let mut stream = docker.events(Some(EventsOptions {
                since: Some(since.to_string()),
                until: Some(until.to_string()),
                filters: None,
            }));
            let mut lines = std::collections::VecDeque::new();
            let read = tokio::time::timeout(EVENTS_TIMEOUT, async {
                while let Some(e) = stream.next().await {
                    let e = e.map_err(|e| e.to_string())?;
                    if lines.len() == MAX_EVENTS {
                        lines.pop_front();
                    }
                    lines.push_back(event_line(&e));
                }
                Ok::<(), String>(())
            })
            .await;
            match read {
                Ok(Ok(())) => Ok(lines.into()),
                Ok(Err(e)) if lines.is_empty() => Err(e),
                Ok(Err(e)) => {
                    lines.push_back(format!("(stream ended early: {e})"));
                    Ok(lines.into())
                }
                Err(_) if lines.is_empty() => {
                    Err(format!("no answer within {}s", EVENTS_TIMEOUT.as_secs()))
                }
                Err(_) => {
                    lines.push_back(format!("(cut off after {}s)", EVENTS_TIMEOUT.as_secs()));
                    Ok(lines.into())
                }
            }
        })
    }

    fn pull<'a>(
        &'a self,
        machine_id: &'a str,
        address: &'a str,
        image: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.pull_image(machine_id, address, image, timeout))
    }
}

impl MtlsMachines {
    /// A client for one machine's dockerd (verified by its DNS name), calls bounded by
    /// `timeout`.
    fn docker(
        &self,
        machine_id: &str,
        address: &str,
        timeout: Duration,
    ) -> Result<bollard::Docker, String> {
        crate::docker::connect(
            self.tls.clone(),
            address,
            DOCKER_TLS_PORT,
            &machine_dns_name(machine_id),
            timeout,
        )
        .map_err(|e| e.to_string())
    }

    async fn pull_image(
        &self,
        machine_id: &str,
        address: &str,
        image: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        use bollard::query_parameters::CreateImageOptions;
        use futures_util::StreamExt;
        let docker = self.docker(machine_id, address, timeout)?;
        let options = CreateImageOptions {
            from_image: Some(image.to_owned()),
            ..Default::default()
        };
        let pulled = tokio::time::timeout(timeout, async {
            let mut stream = docker.create_image(Some(options), None, None);
            while let Some(item) = stream.next().await {
                let info = item.map_err(|e| e.to_string())?;
                if let Some(message) = info.error_detail.and_then(|d| d.message) {
                    return Err(message);
                }
            }
            Ok(())
        })
        .await;
        pulled.unwrap_or_else(|_| Err(format!("not pulled within {}s", timeout.as_secs())))
    }
}

/// One event as a report line: time, type, action, object (its name when it has one).
fn event_line(e: &bollard::models::EventMessage) -> String {
    let time = e
        .time
        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .map_or_else(|| "?".to_string(), |t| t.to_rfc3339());
    let typ = e.typ.map_or_else(|| "?".to_string(), |t| t.to_string());
    let actor = e.actor.as_ref();
    let id: String = actor
        .and_then(|a| a.id.as_deref())
        .unwrap_or("")
        .chars()
        .take(12)
        .collect();
    let name = actor
        .and_then(|a| a.attributes.as_ref())
        .and_then(|a| a.get("name"))
        .map(|n| format!(" name={n}"))
        .unwrap_or_default();
    format!(
        "{time} {typ} {} {id}{name}",
        e.action.as_deref().unwrap_or("?")
    )
}
