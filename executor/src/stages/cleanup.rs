//! `flotilla cleanup`: removes everything the job created on its machine (by the job
//! label) and hands the lease back. Idempotent: with nothing left to do it succeeds. A
//! machine that cannot be reached is released as broken, so it is terminated rather than
//! reused with unknown leftovers.

use std::collections::HashMap;
use std::time::Duration;

use bollard::query_parameters::{
    ListContainersOptions, ListNetworksOptions, ListVolumesOptions, RemoveContainerOptions,
    RemoveVolumeOptions,
};
use bollard::Docker;
use flotilla_proto::api::{ErrorCode, Lease, ReleaseOutcome};
use flotilla_proto::config::Config;

use super::job::JOB_LABEL;
use super::{
    describe_docker_error, is_unreachable, lease_file, machine_docker, read_lease, JobEnv,
    StageError, StageResult,
};
use crate::control::{ControlClient, ControlError};

/// How long cleanup waits for a daemon that is down (restarting) to take the release.
const DAEMON_PATIENCE: Duration = Duration::from_secs(300);

pub async fn run(config: &Config, env: &JobEnv) -> StageResult {
    let client = ControlClient::new(&config.socket_path()).with_patience(DAEMON_PATIENCE);
    let path = lease_file(env);
    // No secret: prepare never asked for a machine, so there is nothing to hand back.
    let Some(secret) = super::read_secret(env) else {
        return Ok(());
    };
    let lease = match read_lease(&path) {
        Some(l) => Some(l),
        // prepare may have been killed between the grant and writing the file.
        None => match client.lease_for_job(&env.job_key(), &secret).await {
            Ok(l) => Some(l),
            Err(ControlError::Api(e)) if e.code == ErrorCode::NotFound => None,
            Err(ControlError::Api(e)) if e.code == ErrorCode::MachineLost => {
                eprintln!("flotilla: {}", e.message);
                None
            }
            Err(e) => return Err(StageError::system(e.to_string())),
        },
    };
    let Some(lease) = lease else {
        return Ok(());
    };

    // A stage of this job found the machine misbehaving: it is not handed to the next job.
    let suspect = std::fs::read_to_string(env.tmpdir.join(super::MACHINE_SUSPECT_FILE)).ok();
    let (outcome, reason) = match (remove_job_objects(config, &lease).await, suspect) {
        (Err(why), _) => {
            eprintln!("flotilla: cleanup on build machine {} failed ({why}); the machine will be replaced", lease.machine_id);
            (
                ReleaseOutcome::Broken,
                Some("cleanup could not reach or clean the machine".to_string()),
            )
        }
        (Ok(()), Some(why)) => (
            ReleaseOutcome::Broken,
            Some(format!(
                "a stage failed on it: {}",
                why.chars().take(300).collect::<String>()
            )),
        ),
        (Ok(()), None) => (ReleaseOutcome::Healthy, None),
    };
    client
        .release(&lease.lease_id, &secret, outcome, reason)
        .await
        .map_err(|e| StageError::system(e.to_string()))?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn remove_job_objects(config: &Config, lease: &Lease) -> Result<(), String> {
    let docker = machine_docker(config, lease).map_err(|e| match e {
        StageError::System(m) | StageError::Machine(m) => m,
        StageError::Build { message, .. } => message.unwrap_or_default(),
    })?;
    let filter = HashMap::from([(
        "label".to_string(),
        vec![format!("{JOB_LABEL}={}", lease.job_key)],
    )]);
    let fail =
        |what: &str, e: bollard::errors::Error| format!("{what}: {}", describe_docker_error(&e));

    let containers = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filter.clone()),
            ..Default::default()
        }))
        .await
        .map_err(|e| fail("listing containers", e))?;
    let removals = containers.iter().filter_map(|c| c.id.clone()).map(|id| {
        let docker = docker.clone();
        async move {
            docker
                .remove_container(
                    &id,
                    Some(RemoveContainerOptions {
                        force: true,
                        v: true,
                        ..Default::default()
                    }),
                )
                .await
        }
    });
    for r in futures_util::future::join_all(removals).await {
        ignore_missing(r).map_err(|e| fail("removing a container", e))?;
    }
    remove_networks_and_volumes(&docker, filter)
        .await
        .map_err(|e| {
            if is_unreachable(&e) {
                fail("machine unreachable", e)
            } else {
                fail("removing networks and volumes", e)
            }
        })
}

async fn remove_networks_and_volumes(
    docker: &Docker,
    filter: HashMap<String, Vec<String>>,
) -> Result<(), bollard::errors::Error> {
    let networks = docker
        .list_networks(Some(ListNetworksOptions {
            filters: Some(filter.clone()),
        }))
        .await?;
    for n in networks {
        if let Some(id) = n.id {
            ignore_missing(docker.remove_network(&id).await)?;
        }
    }
    let volumes = docker
        .list_volumes(Some(ListVolumesOptions {
            filters: Some(filter),
        }))
        .await?;
    for v in volumes.volumes.unwrap_or_default() {
        ignore_missing(
            docker
                .remove_volume(&v.name, Some(RemoveVolumeOptions { force: true }))
                .await,
        )?;
    }
    Ok(())
}

fn ignore_missing<T>(r: Result<T, bollard::errors::Error>) -> Result<(), bollard::errors::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}
