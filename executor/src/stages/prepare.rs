//! `flotilla prepare`: check the job against the runner's allow-lists, lease a machine,
//! pull the images, create the job's network, builds and per-job volumes, helper, services
//! and build container (privilege, volumes and options from [`super::containers`]). The lease is written to the job's temp dir before
//! anything else, so `cleanup` (which gitlab-runner runs after every failed prepare) can
//! always undo a half-done prepare.

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, NetworkCreateRequest, NetworkingConfig,
    VolumeCreateRequest,
};
use bollard::query_parameters::CreateContainerOptions;
use bollard::Docker;
use flotilla_proto::api::{AcquireRequest, ErrorCode, Lease};
use flotilla_proto::config::{Config, PullPolicy};

use super::containers::{self, JobVolumes};
use super::fault::DockerFault;
use super::job::{JobNames, JOB_LABEL};
use super::spec::{ImageSpec, JobSpec};
use super::{
    docker_failure, helper_image, images, lease_file, machine_docker, say, services, JobEnv,
    StageError, StageResult,
};
use crate::control::{ControlClient, ControlError};

/// Keeps a job container alive between stages; exits promptly on `docker stop`.
pub const KEEPALIVE: &str = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done";

pub async fn run(config: &Config, env: &JobEnv) -> StageResult {
    let class = env
        .var("FLOTILLA_CLASS")
        .map(str::to_owned)
        .unwrap_or_else(|| config.default_class.clone());
    if !config.classes.contains_key(&class) {
        return Err(StageError::build_message(format!(
            "FLOTILLA_CLASS={class:?} is not a machine class of this runner; available: {}",
            config.class_names().join(", ")
        )));
    }
    let mut job = config
        .job_for(&class)
        .map_err(|e| StageError::system(format!("flotilla.toml is invalid: {e}")))?;
    let spec = JobSpec::from_env(env, env.job_response_file.as_deref())?;
    let image = spec.image.clone().unwrap_or_else(|| ImageSpec {
        name: job.default_image.clone(),
        entrypoint: None,
        pull_policy: Vec::new(),
        user: None,
        platform: None,
    });
    // Everything the job may be refused for is decided before a machine is leased.
    containers::check_job(&job, &class, &spec, &image.name)?;
    let image_policies = images::policies_for(&job, &image.pull_policy, &image.name)?;
    for s in &spec.services {
        images::policies_for(&job, &s.image.pull_policy, &s.image.name)?;
    }
    let job_key = env.job_key();

    say(&format!(
        "Requesting a {class} machine from flotilla (fleet {})...",
        config.fleet
    ));
    // Written before asking, so a cleanup after a prepare killed mid-acquire can still
    // find (and prove it owns) the lease.
    let secret = super::create_secret(env)?;
    let client = ControlClient::new(&config.socket_path()).with_patience(job.acquire_timeout.0);
    let lease = client
        .acquire(&AcquireRequest {
            job_key: job_key.clone(),
            class: Some(class.clone()),
            timeout_ms: job.acquire_timeout.0.as_millis() as u64,
            secret,
            job_timeout_secs: spec.timeout_secs,
        })
        .await
        .map_err(|e| match e {
            ControlError::Api(api) if api.code == ErrorCode::UnknownClass => {
                StageError::build_message(api.message)
            }
            ControlError::Api(api) if api.code == ErrorCode::Conflict => {
                StageError::build_message(format!(
                    "job key {job_key} is held by another job's lease: {}",
                    api.message
                ))
            }
            other => StageError::system(format!("cannot lease a {class} machine: {other}")),
        })?;
    if let Some(t) = spec.timeout_secs {
        let limit = config.lease_timeout.0;
        if std::time::Duration::from_secs(t) > limit {
            say(&format!(
                "WARNING: this job's timeout ({}) is longer than flotilla's lease_timeout ({}): the daemon takes the machine back after {} whether or not the job has finished; raise lease_timeout in the flotilla config to run longer jobs",
                flotilla_proto::duration::HumanDuration::from_secs(t),
                config.lease_timeout,
                config.lease_timeout,
            ));
        }
    }
    let path = lease_file(env);
    let bytes = serde_json::to_vec(&lease).map_err(|e| {
        StageError::system(format!(
            "cannot write down the lease on build machine {}: {e}",
            lease.machine_id
        ))
    })?;
    super::write_private(&path, &bytes)?;
    say(&format!(
        "Running on build machine {} ({}, {}), job {} on this machine",
        lease.machine_id,
        lease.instance_id,
        lease.address,
        lease.previous_builds + 1
    ));

    let docker = machine_docker(config, &lease)?;
    let names = JobNames::new(&job_key);
    let volumes = containers::job_volumes(&job, &names, &spec)?;
    let helper_image = helper_image_for(&docker, &lease, &job.helper_image, env).await?;
    let helper_policies = [PullPolicy::IfNotPresent];
    let slots = config.classes.get(&class).map_or(1, |c| c.jobs_per_machine);
    let (a, b, c, share) = tokio::join!(
        images::ensure(
            &docker,
            &lease,
            &spec,
            &image.name,
            image.platform.as_deref(),
            &image_policies
        ),
        images::ensure(
            &docker,
            &lease,
            &spec,
            &helper_image,
            None,
            &helper_policies
        ),
        create_network_and_volumes(&docker, &lease, &names, &volumes),
        machine_share(&docker, &lease, slots),
    );
    a?;
    b?;
    c?;
    let share = share?;
    if let Some(s) = &share {
        s.limit(&mut job);
    }
    let helper = container_body(
        &names,
        &helper_image,
        &Some(vec![]),
        "helper",
        containers::helper_host_config(&job, &names, &volumes, share.as_ref()),
        None,
    );
    create_and_start(&docker, &lease, &names, &names.helper, helper, None).await?;
    let (linked, services) = tokio::join!(
        link_runner_command(&docker, &names.helper),
        services::start_all(&docker, &lease, &job, &names, &spec, &volumes),
    );
    let services = services?;
    if let Some(warning) = linked {
        say(&warning);
    }
    let privileged = containers::build_privileged(&job, &image.name);
    let build = container_body(
        &names,
        &image.name,
        &image.entrypoint,
        "build",
        containers::build_host_config(&job, &names, &volumes, privileged),
        containers::build_user(&job, image.user.as_deref()),
    );
    let ((), build_started) = tokio::join!(
        services::check_health(&docker, &names.helper, &services, job.service_wait.0),
        create_and_start(
            &docker,
            &lease,
            &names,
            &names.build,
            build,
            image.platform.as_deref()
        ),
    );
    build_started?;
    say(&format!(
        "Using image {} (helper {helper_image})",
        image.name
    ));
    Ok(())
}

/// This job's share of a machine that runs `slots` jobs at once (`None` with one): the
/// machine's CPUs and memory as its dockerd reports them, divided evenly.
async fn machine_share(
    docker: &Docker,
    lease: &Lease,
    slots: u32,
) -> Result<Option<containers::MachineShare>, StageError> {
    if slots <= 1 {
        return Ok(None);
    }
    let info = docker
        .info()
        .await
        .map_err(|e| docker_failure(lease, "asking the machine its CPUs and memory failed", &e))?;
    Ok(containers::MachineShare::of(
        info.ncpu.unwrap_or(0),
        info.mem_total.unwrap_or(0),
        slots,
    ))
}

/// `helper_image` with its placeholders expanded (asking the machine its architecture only
/// when the image names `${ARCH}`).
async fn helper_image_for(
    docker: &Docker,
    lease: &Lease,
    template: &str,
    env: &JobEnv,
) -> Result<String, StageError> {
    let arch = if helper_image::needs_arch(template) {
        let version = docker
            .version()
            .await
            .map_err(|e| docker_failure(lease, "asking the machine its architecture", &e))?;
        version.arch
    } else {
        None
    };
    let runner = helper_image::Runner {
        version: env.var("CI_RUNNER_VERSION"),
        revision: env.var("CI_RUNNER_REVISION"),
    };
    let resolved =
        helper_image::resolve(template, arch.as_deref(), runner).map_err(|e| match e {
            helper_image::HelperError::Job(m) => {
                StageError::build_message(format!("cannot choose the helper image: {m}"))
            }
            helper_image::HelperError::System(m) => {
                StageError::system(format!("cannot choose the helper image: {m}"))
            }
        })?;
    if let Some(note) = &resolved.note {
        say(note);
    }
    Ok(resolved.image)
}

/// Stage scripts of the custom executor call `gitlab-runner` for cache and artifacts
/// (its `RunnerCommand`), but the stock helper image ships only `gitlab-runner-helper`:
/// without this, gitlab-runner's guard prints "Missing gitlab-runner" and silently skips
/// them. Links the name inside the helper container (never the image) when it is missing.
/// Returns a warning for the job log when the helper has neither.
const LINK_RUNNER_COMMAND: &str = "command -v gitlab-runner >/dev/null 2>&1 && exit 0; \
h=$(command -v gitlab-runner-helper 2>/dev/null) || exit 3; \
for d in /usr/local/bin /usr/bin /bin; do ln -s \"$h\" \"$d/gitlab-runner\" 2>/dev/null && exit 0; done; exit 4";

async fn link_runner_command(docker: &Docker, helper: &str) -> Option<String> {
    match super::exec_as_root(docker, helper, LINK_RUNNER_COMMAND).await {
        Ok(Some(0)) => None,
        Ok(Some(3)) => Some(
            "\x1b[0;33mWARNING:\x1b[0m the helper image has neither gitlab-runner nor gitlab-runner-helper: cache and artifacts are skipped"
                .into(),
        ),
        Ok(other) => Some(format!(
            "\x1b[0;33mWARNING:\x1b[0m could not make gitlab-runner available in the helper container (exit {other:?}): cache and artifacts may be skipped"
        )),
        Err(e) => Some(format!(
            "\x1b[0;33mWARNING:\x1b[0m could not make gitlab-runner available in the helper container ({}): cache and artifacts may be skipped",
            super::describe_docker_error(&e)
        )),
    }
}

fn labels(names: &JobNames, role: &str) -> HashMap<String, String> {
    names.labels(role)
}

fn is_conflict(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 409,
            ..
        }
    )
}

async fn create_network_and_volumes(
    docker: &Docker,
    lease: &Lease,
    names: &JobNames,
    volumes: &JobVolumes,
) -> StageResult {
    let network = NetworkCreateRequest {
        name: names.network.clone(),
        driver: Some("bridge".into()),
        labels: Some(labels(names, "network")),
        ..Default::default()
    };
    let volume = VolumeCreateRequest {
        name: Some(names.builds_volume.clone()),
        labels: Some(labels(names, "builds")),
        ..Default::default()
    };
    let cache = VolumeCreateRequest {
        name: Some(volumes.cache.name.clone()),
        labels: Some(match volumes.cache.project_id {
            Some(p) => HashMap::from([("flotilla.cache.project".to_owned(), p.to_string())]),
            // Without a project the cache is the job's own, removed with it.
            None => labels(names, "cache"),
        }),
        ..Default::default()
    };
    let per_job = volumes.create.iter().map(|v| {
        docker.create_volume(VolumeCreateRequest {
            name: Some(v.name.clone()),
            labels: Some(labels(names, "volume")),
            ..Default::default()
        })
    });
    let (n, v, c, per_job) = tokio::join!(
        docker.create_network(network),
        docker.create_volume(volume),
        docker.create_volume(cache),
        futures_util::future::join_all(per_job),
    );
    for (r, spec) in per_job.into_iter().zip(&volumes.create) {
        r.map_err(|e| {
            docker_failure(
                lease,
                &format!("creating the job's volume for {} failed", spec.target),
                &e,
            )
        })?;
    }
    match n {
        Ok(_) => {}
        // A retried prepare finds the network of its first attempt.
        Err(e) if is_conflict(&e) => {}
        Err(e) => return Err(docker_failure(lease, "creating the job network failed", &e)),
    }
    v.map_err(|e| docker_failure(lease, "creating the builds volume failed", &e))?;
    c.map_err(|e| docker_failure(lease, "creating the cache volume failed", &e))?;
    Ok(())
}

/// A job container kept alive between stages by [`KEEPALIVE`] as its command, behind the
/// image's entrypoint (or the job's `entrypoint:`; `[""]` for none), so an entrypoint that
/// prepares the environment and `exec "$@"`s runs as it would on the docker executor.
///
/// Stdin is kept open (never attached, never written): with the common
/// `entrypoint: ["/bin/sh", "-c"]` the command's first word `sh` becomes the whole script,
/// a shell reading stdin, as on the docker executor (where stdin brings the job script).
/// That shell then waits on stdin and keeps the container up instead of exiting on EOF.
fn container_body(
    names: &JobNames,
    image: &str,
    entrypoint: &Option<Vec<String>>,
    role: &str,
    host_config: HostConfig,
    user: Option<String>,
) -> ContainerCreateBody {
    ContainerCreateBody {
        image: Some(image.to_owned()),
        entrypoint: services::entrypoint_override(entrypoint),
        cmd: Some(vec!["sh".into(), "-c".into(), KEEPALIVE.into()]),
        open_stdin: Some(true),
        user,
        labels: Some(labels(names, role)),
        host_config: Some(host_config),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                names.network.clone(),
                EndpointSettings {
                    aliases: Some(vec![role.to_owned()]),
                    ..Default::default()
                },
            )])),
        }),
        ..Default::default()
    }
}

async fn create_and_start(
    docker: &Docker,
    lease: &Lease,
    names: &JobNames,
    name: &str,
    body: ContainerCreateBody,
    platform: Option<&str>,
) -> StageResult {
    let options = CreateContainerOptions {
        name: Some(name.to_owned()),
        platform: platform.unwrap_or_default().to_owned(),
    };
    match docker.create_container(Some(options), body).await {
        Ok(_) => {}
        Err(e) if is_conflict(&e) => {
            // Left by an earlier prepare attempt of this job: replace it. Never touch a
            // container that is not labelled as this job's.
            let owner = docker
                .inspect_container(name, None)
                .await
                .ok()
                .and_then(|c| c.config)
                .and_then(|c| c.labels)
                .and_then(|l| l.get(JOB_LABEL).cloned());
            if owner.as_deref() != Some(names.key.as_str()) {
                return Err(StageError::system(format!(
                    "a container named {name} that is not this job's exists on build machine {}",
                    lease.machine_id
                )));
            }
            let _ = docker
                .remove_container(
                    name,
                    Some(bollard::query_parameters::RemoveContainerOptions {
                        force: true,
                        v: true,
                        ..Default::default()
                    }),
                )
                .await;
            return Err(StageError::system(format!(
                "container {name} already existed on build machine {}; removed it, retry",
                lease.machine_id
            )));
        }
        Err(e) => {
            return Err(super::create_failure(
                lease,
                name,
                &DockerFault::from_bollard(&e),
            ))
        }
    }
    docker
        .start_container(name, None)
        .await
        .map_err(|e| docker_failure(lease, &format!("starting container {name} failed"), &e))
}
