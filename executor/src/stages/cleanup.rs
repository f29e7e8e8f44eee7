//! `flotilla cleanup`: removes everything the job created on its machine (by the job
//! label) and hands the lease back. Idempotent: with nothing left to do it succeeds. A
//! machine that cannot be reached is released as broken, so it is terminated rather than
//! reused with unknown leftovers.

use std::collections::HashMap;
use std::time::Duration;

use bollard::query_parameters::{
    ListContainersOptions, ListNetworksOptions, ListVolumesOptions, PruneImagesOptions,
    PruneVolumesOptions, RemoveContainerOptions, RemoveVolumeOptions,
};
use bollard::Docker;
use flotilla_proto::api::{ErrorCode, Lease, ReleaseOutcome};
use flotilla_proto::config::Config;

use super::job::{JobNames, JOB_LABEL};

/// The label prepare puts on a project's cache volume (its project id).
const CACHE_PROJECT_LABEL: &str = "flotilla.cache.project";
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
            Err(e) => {
                return Err(StageError::system(format!(
                    "cannot look up this job's lease (job key {}) to hand its machine back: {e}",
                    env.job_key()
                )))
            }
        },
    };
    let Some(lease) = lease else {
        return Ok(());
    };

    // A stage of this job found the machine misbehaving: it is not handed to the next job.
    let suspect = std::fs::read_to_string(env.tmpdir.join(super::MACHINE_SUSPECT_FILE)).ok();
    // A machine that does not answer is asked nothing else (each call would wait the
    // whole docker_timeout): it is released as broken and replaced.
    let mut images = Vec::new();
    let removed = match answers(config, &lease).await {
        Ok(()) => {
            // Measured before the job's containers go: `df` runs in its helper container.
            let prune_at = measure_disk(config, &lease).await;
            let removed = remove_job_objects(config, &lease)
                .await
                .map(|used| images = used);
            if let (Ok(()), Some(percent)) = (&removed, prune_at) {
                prune_machine(config, &lease, percent).await;
            }
            removed
        }
        Err(why) => Err(why),
    };
    let (outcome, reason) = match (removed, suspect) {
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
        .release(&lease.lease_id, &secret, outcome, reason, images)
        .await
        .map_err(|e| {
            StageError::system(format!(
                "cannot hand back the lease on build machine {}: {e}",
                lease.machine_id
            ))
        })?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// How long cleanup waits for a ping, twice, before giving up on the machine.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the machine's Docker answers a ping (a refusal is an answer; only no answer,
/// or a connection that cannot be made, is not).
async fn answers(config: &Config, lease: &Lease) -> Result<(), String> {
    let docker = machine_docker(config, lease).map_err(|e| e.to_string())?;
    let mut why = String::new();
    for _ in 0..2 {
        match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
            Ok(Err(e)) if is_unreachable(&e) => why = describe_docker_error(&e),
            Ok(_) => return Ok(()),
            Err(_) => why = format!("no answer to a ping within {}s", PING_TIMEOUT.as_secs()),
        }
    }
    Err(why)
}

/// The machine's Docker disk use in percent when it is past the class's
/// `disk_high_water`, read with `df -P /` in the job's helper container (whose root
/// filesystem is on that disk). `None` when below, or when it cannot be measured (warned:
/// measuring never fails cleanup).
async fn measure_disk(config: &Config, lease: &Lease) -> Option<u8> {
    let high_water = match config.job_for(&lease.class) {
        Ok(job) => job.disk_high_water,
        Err(e) => {
            eprintln!(
                "flotilla: warning: disk use of build machine {} not checked ({e})",
                lease.machine_id
            );
            return None;
        }
    };
    let docker = machine_docker(config, lease).ok()?;
    let helper = JobNames::new(&lease.job_key).helper;
    let measured = tokio::time::timeout(DISK_CHECK_TIMEOUT, exec_output(&docker, &helper)).await;
    match measured {
        Ok(Ok(out)) => {
            let decision = should_prune(&out, high_water);
            if decision.is_none() && disk_use_percent(&out).is_none() {
                eprintln!(
                    "flotilla: warning: disk use of build machine {} not checked (unreadable df output: {:?})",
                    lease.machine_id,
                    out.chars().take(200).collect::<String>()
                );
            }
            decision
        }
        Ok(Err(e)) => {
            eprintln!(
                "flotilla: warning: disk use of build machine {} not checked ({})",
                lease.machine_id,
                describe_docker_error(&e)
            );
            None
        }
        Err(_) => {
            eprintln!(
                "flotilla: warning: disk use of build machine {} not checked (df did not answer in time)",
                lease.machine_id
            );
            None
        }
    }
}

/// Bound on the `df` exec at cleanup.
const DISK_CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// Bound on the prune at cleanup (a prune walks every image layer).
const PRUNE_TIMEOUT: Duration = Duration::from_secs(120);

/// `df -P /`, through busybox where the image links no `df` applet.
const DF_COMMAND: &str = "df -P / 2>/dev/null || busybox df -P /";

/// Runs [`DF_COMMAND`] in `container` and returns its output.
async fn exec_output(docker: &Docker, container: &str) -> Result<String, bollard::errors::Error> {
    use bollard::container::LogOutput;
    use bollard::exec::{CreateExecOptions, StartExecResults};
    use futures_util::StreamExt;
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions::<String> {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(vec!["sh".into(), "-c".into(), DF_COMMAND.into()]),
                ..Default::default()
            },
        )
        .await?;
    let mut out = Vec::new();
    if let StartExecResults::Attached { mut output, .. } = docker.start_exec(&exec.id, None).await?
    {
        while let Some(chunk) = output.next().await {
            if let LogOutput::StdOut { message } | LogOutput::StdErr { message } = chunk? {
                out.extend_from_slice(&message);
            }
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The use percent of the filesystem in `df -P` output (its first data line's
/// `Capacity` column, `42%`).
pub fn disk_use_percent(df_output: &str) -> Option<u8> {
    let mut lines = df_output.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next()?;
    if !header.trim_start().starts_with("Filesystem") {
        return None;
    }
    // POSIX: Filesystem, blocks, Used, Available, Capacity, Mounted on. The filesystem
    // name may hold spaces, so the capacity is found from the end, before the mount point.
    let line = lines.next()?;
    line.split_whitespace()
        .rev()
        .find_map(|w| w.strip_suffix('%'))
        .and_then(|p| p.parse::<u8>().ok())
        .filter(|p| *p <= 100)
}

/// The disk use percent when `df -P` output shows it at or past `high_water`: the machine
/// is pruned. Pure.
pub fn should_prune(df_output: &str, high_water: u8) -> Option<u8> {
    disk_use_percent(df_output).filter(|p| *p >= high_water)
}

/// Prunes the machine past its high-water mark, once the job's objects are gone: every
/// image no container uses (the next jobs pull what they need again) and the project cache
/// volumes no container uses. Warns on failure; never fails cleanup.
///
/// On a machine other jobs still run on (`jobs_per_machine`), another job's prepare may
/// have pulled an image or made its cache volume and not yet created the container that
/// uses it: only untagged images go then, which no prepare names.
async fn prune_machine(config: &Config, lease: &Lease, percent: u8) {
    let Ok(docker) = machine_docker(config, lease) else {
        return;
    };
    let prune = async {
        let shared = other_jobs_run(&docker).await;
        let images = docker
            .prune_images(Some(PruneImagesOptions {
                filters: Some(HashMap::from([(
                    "dangling".to_string(),
                    vec![shared.to_string()],
                )])),
            }))
            .await;
        if shared {
            eprintln!(
                "flotilla: build machine {} runs other jobs: pruning untagged images only",
                lease.machine_id
            );
            return (images, None);
        }
        let volume_filters = |all: bool| {
            let mut f =
                HashMap::from([("label".to_string(), vec![CACHE_PROJECT_LABEL.to_string()])]);
            if all {
                // Named volumes too (API 1.42+ prunes only anonymous ones without it).
                f.insert("all".to_string(), vec!["true".to_string()]);
            }
            Some(PruneVolumesOptions { filters: Some(f) })
        };
        let volumes = match docker.prune_volumes(volume_filters(true)).await {
            // Before API 1.42 there is no `all` filter, and named volumes are pruned anyway.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 400,
                message,
            }) if message.contains("all") => docker.prune_volumes(volume_filters(false)).await,
            r => r,
        };
        (images, Some(volumes))
    };
    let (images, volumes) = match tokio::time::timeout(PRUNE_TIMEOUT, prune).await {
        Ok(r) => r,
        Err(_) => {
            eprintln!(
                "flotilla: warning: build machine {} was {percent}% full; pruning it did not finish in time",
                lease.machine_id
            );
            return;
        }
    };
    let mut parts = Vec::new();
    match images {
        Ok(r) => parts.push(format!(
            "{} image tags ({})",
            r.images_deleted
                .unwrap_or_default()
                .iter()
                .filter(|d| d.untagged.is_some())
                .count(),
            human_bytes(r.space_reclaimed.unwrap_or(0))
        )),
        Err(e) => eprintln!(
            "flotilla: warning: pruning images on build machine {} failed: {}",
            lease.machine_id,
            describe_docker_error(&e)
        ),
    }
    // None: a machine other jobs share keeps its cache volumes (none were tried).
    match volumes {
        None => {}
        Some(Ok(r)) => parts.push(format!(
            "{} cache volume(s) ({})",
            r.volumes_deleted.unwrap_or_default().len(),
            human_bytes(r.space_reclaimed.unwrap_or(0))
        )),
        Some(Err(e)) => eprintln!(
            "flotilla: warning: pruning cache volumes on build machine {} failed: {}",
            lease.machine_id,
            describe_docker_error(&e)
        ),
    }
    if !parts.is_empty() {
        eprintln!(
            "flotilla: build machine {} disk {percent}% full; pruned {}",
            lease.machine_id,
            parts.join(" and ")
        );
    }
}

/// Whether any job's containers are left on the machine (this job's are removed by
/// now). Unknown counts as yes: the careful prune.
async fn other_jobs_run(docker: &bollard::Docker) -> bool {
    docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            limit: Some(1),
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![JOB_LABEL.to_string()],
            )])),
            ..Default::default()
        }))
        .await
        .map_or(true, |c| !c.is_empty())
}

fn human_bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else {
        format!("{:.1} MB", n / 1e6)
    }
}

/// Removes the job's containers, networks and volumes; returns the images its
/// containers ran (what the daemon learns to prefetch).
async fn remove_job_objects(config: &Config, lease: &Lease) -> Result<Vec<String>, String> {
    let docker = machine_docker(config, lease).map_err(|e| e.to_string())?;
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
    // A bare image id (the image was re-tagged or removed since) cannot be pulled.
    let mut images: Vec<String> = containers
        .iter()
        .filter_map(|c| c.image.clone())
        .filter(|i| !i.starts_with("sha256:"))
        .collect();
    images.sort_unstable();
    images.dedup();
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
        })?;
    Ok(images)
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

#[cfg(test)]
mod tests {
    use super::*;

    const DF: &str = "Filesystem     1024-blocks     Used Available Capacity Mounted on\n\
                      overlay           20466256 17396320   3069936      86% /\n";

    #[test]
    fn df_output_is_read_and_compared_with_the_high_water_mark() {
        assert_eq!(disk_use_percent(DF), Some(86));
        assert_eq!(should_prune(DF, 85), Some(86));
        assert_eq!(should_prune(DF, 86), Some(86));
        assert_eq!(should_prune(DF, 87), None);
        assert_eq!(should_prune(DF, 1), Some(86));
        let busybox = "Filesystem           1024-blocks    Used Available Capacity Mounted on\n\
                       overlay                 61202244   3144204  54913416   5% /\n";
        assert_eq!(should_prune(busybox, 85), None);
        assert_eq!(should_prune(busybox, 5), Some(5));
        let spaced = "Filesystem 1024-blocks Used Available Capacity Mounted on\n\
                      my disk 100 99 1 99% /\n";
        assert_eq!(should_prune(spaced, 85), Some(99));
    }

    #[test]
    fn unreadable_df_output_never_prunes() {
        for out in [
            "",
            "df: /: No such file or directory\n",
            "Filesystem 1024-blocks Used Available Capacity Mounted on\n",
            "Filesystem 1024-blocks Used Available Capacity Mounted on\noverlay 1 1 0 x% /\n",
            "Filesystem 1024-blocks Used Available Capacity Mounted on\noverlay 1 1 0 300% /\n",
        ] {
            assert_eq!(should_prune(out, 1), None, "{out:?}");
        }
    }
}
