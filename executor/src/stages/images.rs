//! Getting an image onto the machine the way gitlab-runner's docker executor does: a pull
//! policy (or a list tried in order) restricted by the runner's allow-list, and registry
//! credentials from the job (`DOCKER_AUTH_CONFIG`, the payload's `credentials`).

use bollard::auth::DockerCredentials;
use bollard::query_parameters::CreateImageOptions;
use bollard::Docker;
use flotilla_proto::api::Lease;
use flotilla_proto::config::{JobConfig, PullPolicy};
use futures_util::StreamExt;

use super::spec::JobSpec;
use super::{docker_failure, say, StageError};

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
            PullPolicy::Never | PullPolicy::IfNotPresent
                if docker.inspect_image(image).await.is_ok() =>
            {
                Ok(())
            }
            PullPolicy::Never => Err(StageError::build_message(format!(
                "image {image} is not on the build machine and pull_policy is never"
            ))),
            PullPolicy::IfNotPresent | PullPolicy::Always => {
                pull(docker, lease, spec, image, platform).await
            }
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| StageError::build_message(format!("no pull policy for {image}"))))
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
        match item {
            Ok(info) => {
                if let Some(err) = info.error_detail.and_then(|d| d.message) {
                    return Err(pull_error(lease, image, &err));
                }
            }
            Err(bollard::errors::Error::DockerStreamError { error }) => {
                return Err(pull_error(lease, image, &error))
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code,
                message,
            }) if status_code < 500 || looks_like_user_error(&message) => {
                return Err(pull_error(lease, image, &message))
            }
            Err(e) => {
                return Err(docker_failure(
                    lease,
                    &format!("pulling {image} failed"),
                    &e,
                ))
            }
        }
    }
    Ok(())
}

fn looks_like_user_error(message: &str) -> bool {
    let m = message.to_lowercase();
    [
        "not found",
        "manifest unknown",
        "unauthorized",
        "denied",
        "invalid reference",
        "no basic auth credentials",
        "authentication required",
        "does not exist",
    ]
    .iter()
    .any(|s| m.contains(s))
}

/// A missing image or refused credentials is the job's problem (a build failure, not
/// retried); a registry that is down is infrastructure.
fn pull_error(lease: &Lease, image: &str, message: &str) -> StageError {
    if looks_like_user_error(message) {
        StageError::build_message(format!("cannot pull image {image}: {message}"))
    } else {
        StageError::system(format!(
            "pulling {image} on build machine {} failed: {message}",
            lease.machine_id
        ))
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
}
