//! The GitLab custom-executor stages. Each is a short-lived process started by
//! gitlab-runner with the job's environment; see `gitlab-custom-executor.md`.
//!
//! Every failure is classified: the user's script failing is a build failure (its exit code
//! goes to `BUILD_EXIT_CODE_FILE`); anything about machines, Docker or the daemon is a
//! system failure, which gitlab-runner may retry; one the machine is to blame for also
//! retires the machine. The rules are pure and table-tested: [`fault::blame`] for a Docker
//! error (prepare's pulls and creates, and every other request), [`verdict::verdict`] for
//! the run stage.

pub mod cleanup;
pub mod config;
pub mod containers;
pub mod credentials;
pub mod expand;
pub mod fault;
pub mod glob;
mod helper_image;
pub mod images;
pub mod job;
pub mod prepare;
pub mod run;
pub mod services;
pub mod spec;
pub mod timing;
pub mod verdict;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::api::Lease;
use flotilla_proto::config::Config;

pub use job::JobEnv;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The job's own fault: script exit code, unknown image or class.
    #[error("{}", message.clone().unwrap_or_else(|| format!("the script exited with {code}")))]
    Build { code: i32, message: Option<String> },
    /// Infrastructure: no machine, registry down, daemon down.
    #[error("{0}")]
    System(String),
    /// Infrastructure, and the build machine is to blame (its Docker failed or vanished):
    /// a system failure after which `cleanup` releases the machine as broken rather than
    /// handing it to the next job (see [`MACHINE_SUSPECT_FILE`]).
    #[error("{0}")]
    Machine(String),
}

impl StageError {
    pub fn system(msg: impl Into<String>) -> Self {
        Self::System(msg.into())
    }
    pub fn build_message(msg: impl Into<String>) -> Self {
        Self::Build {
            code: 1,
            message: Some(msg.into()),
        }
    }
}

pub type StageResult = Result<(), StageError>;

/// Tells the job log what is happening (prepare's and run's stdout go to the job log).
pub fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Where `prepare` leaves the lease for the later stages of the same job (the per-job
/// temp dir gitlab-runner gives every stage as cwd and TMPDIR).
pub const LEASE_FILE: &str = "flotilla-lease.json";

pub fn lease_file(env: &JobEnv) -> PathBuf {
    env.tmpdir.join(LEASE_FILE)
}

/// The job's lease secret (random, mode 0600, in the per-job temp dir that only this job's
/// stage processes are given): the daemon hands the lease only to whoever presents it.
pub const LEASE_SECRET_FILE: &str = "flotilla-lease-secret";

/// Written by a stage whose machine misbehaved ([`StageError::Machine`]), with the reason;
/// `cleanup` then releases the machine as broken.
pub const MACHINE_SUSPECT_FILE: &str = "flotilla-machine-suspect";

/// The job's lease secret, if `prepare` made one.
pub fn read_secret(env: &JobEnv) -> Option<String> {
    std::fs::read_to_string(env.tmpdir.join(LEASE_SECRET_FILE))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The job's lease secret, made on first use (a retried `prepare` reuses it, so it gets
/// its own lease back).
pub fn create_secret(env: &JobEnv) -> Result<String, StageError> {
    if let Some(s) = read_secret(env) {
        return Ok(s);
    }
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = hex::encode(bytes);
    let path = env.tmpdir.join(LEASE_SECRET_FILE);
    write_private(&path, secret.as_bytes())?;
    Ok(secret)
}

/// Writes a file only the runner's user can read (mode 0600 from creation).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StageError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|e| StageError::system(format!("cannot write {}: {e}", path.display())))
}

/// A stage that failed for its machine's sake says where that machine's console output
/// and last dockerd events are saved: the daemon saves them when it marks the machine
/// broken or lost (EC2 observation, or this job's cleanup releasing it as broken), at a
/// place known from the machine id alone, so the stage need not wait for it.
pub fn name_machine_log(config: &Config, env: &JobEnv, result: StageResult) -> StageResult {
    match result {
        Err(StageError::Machine(m)) => match read_lease(&lease_file(env)) {
            Some(lease) => Err(StageError::Machine(format!(
                "{m}\nflotilla: console output and dockerd events of build machine {} are saved to {}",
                lease.machine_id,
                config.logs.machine_log(&config.state_dir, &lease.machine_id)
            ))),
            None => Err(StageError::Machine(m)),
        },
        other => other,
    }
}

pub fn read_lease(path: &Path) -> Option<Lease> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A Docker client for the leased machine, over mTLS with the fleet's client certificate.
pub fn machine_docker(config: &Config, lease: &Lease) -> Result<bollard::Docker, StageError> {
    let tls: Arc<rustls::ClientConfig> = crate::tls::machine_client_config(&config.state_dir)
        .map_err(|e| {
            StageError::system(format!(
                "cannot load flotilla's client certificate for build machine {} from {}: {e} (the daemon writes it there at start: is it running with this state_dir, and may this user read it?)",
                lease.machine_id,
                config.state_dir.display()
            ))
        })?;
    crate::docker::connect(
        tls,
        &lease.address,
        lease.docker_port,
        &lease.server_name,
        config.job.docker_timeout.0.max(Duration::from_secs(1)),
    )
    .map_err(|e| {
        StageError::system(format!(
            "cannot connect to build machine {} ({}): {e}",
            lease.machine_id, lease.instance_id
        ))
    })
}

/// A Docker error the job is not to blame for, as the job log should say it: naming the
/// machine, and blaming it ([`StageError::Machine`]: released as broken at cleanup) only
/// when [`fault::blame`] does (it stopped answering, or a job object vanished under the
/// job).
pub fn docker_failure(lease: &Lease, what: &str, err: &bollard::errors::Error) -> StageError {
    blamed_failure(
        lease,
        what,
        fault::Request::Other,
        &fault::DockerFault::from_bollard(err),
    )
}

/// [`docker_failure`] for a fault already described, blamed as a `request` of that kind.
/// A fault that is the job's is a build failure with the same message.
pub fn blamed_failure(
    lease: &Lease,
    what: &str,
    request: fault::Request,
    fault: &fault::DockerFault,
) -> StageError {
    let message = format!(
        "{what} on build machine {} ({}, {}): {}",
        lease.machine_id,
        lease.instance_id,
        lease.address,
        fault.describe()
    );
    match fault::blame(request, fault) {
        fault::Blame::Job => StageError::build_message(message),
        fault::Blame::Infrastructure => StageError::System(message),
        fault::Blame::Machine => StageError::Machine(message),
    }
}

/// A job container Docker would not create: an image gone missing after the pull is the
/// job's problem; otherwise [`fault::blame`] decides between the machine and the infrastructure.
pub fn create_failure(lease: &Lease, name: &str, refusal: &fault::DockerFault) -> StageError {
    match fault::blame(fault::Request::CreateContainer, refusal) {
        fault::Blame::Job => StageError::build_message(format!(
            "image for {name} is missing on build machine {}: {}",
            lease.machine_id,
            refusal.describe()
        )),
        _ => blamed_failure(
            lease,
            &format!("creating container {name} failed"),
            fault::Request::CreateContainer,
            refusal,
        ),
    }
}

pub fn describe_docker_error(err: &bollard::errors::Error) -> String {
    fault::DockerFault::from_bollard(err).describe()
}

/// True when the error means the machine (not the request) is at fault.
pub fn is_unreachable(err: &bollard::errors::Error) -> bool {
    fault::DockerFault::from_bollard(err).is_unreachable()
}

/// Quotes `s` as one word for `sh -c` (single quotes; `'` as `'\''`): anything that came
/// from a job (a service alias) goes through this before it is put into a shell script.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Runs `sh -c <script>` in the container, discards its output and returns its exit code
/// (signalling a stage, checking a service port).
pub async fn exec_quiet(
    docker: &bollard::Docker,
    container: &str,
    script: &str,
) -> Result<Option<i64>, bollard::errors::Error> {
    exec_quiet_as(docker, container, script, None).await
}

/// [`exec_quiet`] as root, whatever user the image runs as.
pub async fn exec_as_root(
    docker: &bollard::Docker,
    container: &str,
    script: &str,
) -> Result<Option<i64>, bollard::errors::Error> {
    exec_quiet_as(docker, container, script, Some("0")).await
}

async fn exec_quiet_as(
    docker: &bollard::Docker,
    container: &str,
    script: &str,
    user: Option<&str>,
) -> Result<Option<i64>, bollard::errors::Error> {
    use bollard::exec::{CreateExecOptions, StartExecResults};
    use futures_util::StreamExt;
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions::<String> {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(vec!["sh".into(), "-c".into(), script.into()]),
                user: user.map(str::to_owned),
                ..Default::default()
            },
        )
        .await?;
    if let StartExecResults::Attached { mut output, .. } = docker.start_exec(&exec.id, None).await?
    {
        while output.next().await.is_some() {}
    }
    Ok(docker.inspect_exec(&exec.id).await?.exit_code)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_an_unreachable_machine_or_a_vanished_object_blames_the_machine() {
        use super::{docker_failure, StageError};
        use bollard::errors::Error as E;
        let lease = flotilla_proto::api::Lease {
            lease_id: "l".into(),
            job_key: "job-1-0".into(),
            machine_id: "m".into(),
            instance_id: "i-1".into(),
            class: "c".into(),
            address: "10.0.0.1".into(),
            docker_port: 2376,
            server_name: "m.machine".into(),
            acquired_at: chrono::Utc::now(),
            previous_builds: 0,
        };
        let server = |status_code: u16| E::DockerResponseServerError {
            status_code,
            message: "x".into(),
        };
        assert!(matches!(
            docker_failure(&lease, "w", &E::RequestTimeoutError),
            StageError::Machine(_)
        ));
        assert!(matches!(
            docker_failure(&lease, "w", &server(404)),
            StageError::Machine(_)
        ));
        for code in [400, 409, 500] {
            assert!(matches!(
                docker_failure(&lease, "w", &server(code)),
                StageError::System(_)
            ));
        }
    }

    #[test]
    fn shell_quote_keeps_hostile_text_one_word() {
        assert_eq!(super::shell_quote("db"), "'db'");
        assert_eq!(super::shell_quote("a'; rm -rf / #"), "'a'\\''; rm -rf / #'");
    }
}
