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
}

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
            let docker = crate::docker::connect(
                self.tls.clone(),
                address,
                DOCKER_TLS_PORT,
                &machine_dns_name(machine_id),
                CALL_TIMEOUT,
            )
            .map_err(|e| e.to_string())?;
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
}
