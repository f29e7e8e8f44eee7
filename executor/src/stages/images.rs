//! Getting an image onto the machine the way gitlab-runner's docker executor does: a pull
//! policy (or a list tried in order) restricted by the runner's allow-list, and registry
//! credentials from the job (`DOCKER_AUTH_CONFIG`, the payload's `credentials`).

use bollard::auth::DockerCredentials;
use bollard::query_parameters::CreateImageOptions;
use bollard::Docker;
use flotilla_proto::api::Lease;
use flotilla_proto::config::{JobConfig, PullPolicy};
use futures_util::StreamExt;

use super::fault::{blame, Blame, DockerFault, FaultKind, Request};
use super::spec::JobSpec;
use super::{blamed_failure, say, StageError};

/// The policies to try for an image: the job's own (each must be allowed), else the
/// runner's configured list.
pub fn policies_for(
    job: &JobConfig,
    requested: &[String],
    image: &str,
) -> Result<Vec<PullPolicy>, StageError> {
    if requested.is_empty() {
        return Ok(job.pull_policy.clone());
    }
    let allowed: &[PullPolicy] = if job.allowed_pull_policies.is_empty() {
        &job.pull_policy
    } else {
        &job.allowed_pull_policies
    };
    requested
        .iter()
        .map(|name| {
            let policy = PullPolicy::parse(name).ok_or_else(|| {
                StageError::build_message(format!(
                    "pull_policy {name:?} of {image} is not one of always, if-not-present, never"
                ))
            })?;
            if allowed.contains(&policy) {
                Ok(policy)
            } else {
                Err(StageError::build_message(format!(
                    "pull_policy {name:?} of {image} is not allowed by this runner (allowed: {})",
                    allowed
                        .iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        })
        .collect()
}

/// Makes `image` present on the machine following `policies` in order; the first policy
/// that succeeds wins, the last failure is reported.
pub async fn ensure(
    docker: &Docker,
    lease: &Lease,
    spec: &JobSpec,
    image: &str,
    platform: Option<&str>,
    policies: &[PullPolicy],
) -> Result<(), StageError> {
    let mut last = None;
    for policy in policies {
        let result = match policy {
            PullPolicy::Never => match docker.inspect_image(image).await {
                Ok(_) => Ok(()),
                Err(e) => Err(not_pulled(lease, image, &DockerFault::from_bollard(&e))),
            },
            PullPolicy::IfNotPresent if docker.inspect_image(image).await.is_ok() => Ok(()),
            PullPolicy::IfNotPresent | PullPolicy::Always => {
                pull(docker, lease, spec, image, platform).await
            }
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        StageError::build_message(format!(
            "no pull policy for {image}: set pull_policy on the image or in the runner's [job]"
        ))
    }))
}

/// An image `pull_policy: never` looked for: missing is the job's fault, a machine that
/// does not answer is not (it was blamed on the job before).
fn not_pulled(lease: &Lease, image: &str, fault: &DockerFault) -> StageError {
    match blame(Request::FindImage, fault) {
        Blame::Job => StageError::build_message(format!(
            "image {image} is not on the build machine {} and pull_policy is never: pull it in an earlier job, or allow if-not-present",
            lease.machine_id
        )),
        _ => blamed_failure(
            lease,
            &format!("looking for image {image} (pull_policy never) failed"),
            Request::FindImage,
            fault,
        ),
    }
}

async fn pull(
    docker: &Docker,
    lease: &Lease,
    spec: &JobSpec,
    image: &str,
    platform: Option<&str>,
) -> Result<(), StageError> {
    say(&format!("Pulling image {image} ..."));
    let credentials = spec.credentials.for_image(image).await?.map(|c| {
        // docker-credential helpers answer `<token>` for an identity token.
        if c.username == "<token>" {
            DockerCredentials {
                identitytoken: Some(c.password),
                serveraddress: Some(c.registry),
                ..Default::default()
            }
        } else {
            DockerCredentials {
                username: Some(c.username),
                password: Some(c.password),
                serveraddress: Some(c.registry),
                ..Default::default()
            }
        }
    });
    let options = CreateImageOptions {
        from_image: Some(image.to_owned()),
        platform: platform.unwrap_or_default().to_owned(),
        ..Default::default()
    };
    let mut stream = docker.create_image(Some(options), None, credentials);
    while let Some(item) = stream.next().await {
        let fault = match item {
            Ok(info) => match info.error_detail.and_then(|d| d.message) {
                Some(message) => DockerFault {
                    kind: FaultKind::Stream,
                    message,
                },
                None => continue,
            },
            Err(e) => DockerFault::from_bollard(&e),
        };
        return Err(pull_failure(lease, image, &fault));
    }
    Ok(())
}

/// A failed pull as the job log says it: a missing image or refused credentials are the
/// job's problem (a build failure, not retried); a registry that is down is
/// infrastructure; a machine that does not answer is the machine's ([`blame`]).
fn pull_failure(lease: &Lease, image: &str, fault: &DockerFault) -> StageError {
    match blame(Request::Pull, fault) {
        Blame::Job => StageError::build_message(format!(
            "cannot pull image {image} on build machine {}: {}",
            lease.machine_id, fault.message
        )),
        _ => blamed_failure(
            lease,
            &format!("pulling {image} failed"),
            Request::Pull,
            fault,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_policy_must_be_allowed() {
        let mut job = JobConfig {
            pull_policy: vec![PullPolicy::IfNotPresent],
            ..JobConfig::default()
        };
        assert_eq!(
            policies_for(&job, &[], "i").unwrap(),
            vec![PullPolicy::IfNotPresent]
        );
        assert!(policies_for(&job, &["always".into()], "i").is_err());
        job.allowed_pull_policies = vec![PullPolicy::Always, PullPolicy::Never];
        assert_eq!(
            policies_for(&job, &["never".into(), "always".into()], "i").unwrap(),
            vec![PullPolicy::Never, PullPolicy::Always]
        );
        assert!(policies_for(&job, &["sometimes".into()], "i").is_err());
    }

    fn lease() -> Lease {
        Lease {
            lease_id: "l".into(),
            job_key: "job-1-0".into(),
            machine_id: "m-7".into(),
            instance_id: "i-07".into(),
            class: "c".into(),
            address: "10.0.0.7".into(),
            docker_port: 2376,
            server_name: "m-7.machine".into(),
            acquired_at: chrono::Utc::now(),
            previous_builds: 0,
        }
    }

    #[test]
    fn a_pull_the_job_got_wrong_fails_the_build_and_says_so_an_unreachable_machine_is_blamed() {
        let l = lease();
        let missing = DockerFault {
            kind: FaultKind::Stream,
            message: "manifest unknown".into(),
        };
        let StageError::Build {
            message: Some(m), ..
        } = pull_failure(&l, "app:1", &missing)
        else {
            panic!("a missing tag is the job's fault");
        };
        assert!(
            m.starts_with("cannot pull image app:1") && m.contains("m-7"),
            "{m}"
        );
        let down = DockerFault::unreachable("connection failed");
        let StageError::Machine(m) = pull_failure(&l, "app:1", &down) else {
            panic!("an unreachable machine is the machine's fault");
        };
        assert!(
            m.contains("pulling app:1 failed on build machine m-7 (i-07, 10.0.0.7)"),
            "{m}"
        );
        let registry_down = DockerFault::status(500, "dial tcp: connection refused");
        assert!(matches!(
            pull_failure(&l, "app:1", &registry_down),
            StageError::System(_)
        ));
    }

    #[test]
    fn pull_policy_never_blames_the_job_only_for_a_missing_image() {
        let l = lease();
        let StageError::Build {
            message: Some(m), ..
        } = not_pulled(
            &l,
            "app:1",
            &DockerFault::status(404, "No such image: app:1"),
        )
        else {
            panic!("a missing image under `never` is the job's fault");
        };
        assert!(
            m.contains("pull_policy is never") && m.contains("m-7"),
            "{m}"
        );
        // It used to be a build failure too, so gitlab-runner did not retry elsewhere.
        assert!(matches!(
            not_pulled(&l, "app:1", &DockerFault::unreachable("connection failed")),
            StageError::Machine(_)
        ));
    }
}
