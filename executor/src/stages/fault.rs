//! Who is to blame when Docker on a build machine refuses a request: the job (a build
//! failure, not retried), the infrastructure (a system failure gitlab-runner may retry), or
//! the machine itself (a system failure after which `cleanup` releases it as broken).
//!
//! A bollard error is first turned into a plain [`DockerFault`] (what Docker answered, or
//! that it did not); [`blame`] then decides from that alone, so the rules are table-tested
//! without a Docker daemon.

/// How a Docker request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Docker answered with this HTTP status.
    Status(u16),
    /// Docker accepted the request, then reported an error in its progress stream (a pull).
    Stream,
    /// No answer: the connection failed, broke, or timed out. The machine is at fault.
    Unreachable,
    /// Anything else (an answer bollard could not read).
    Other,
}

/// A failed Docker request as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerFault {
    pub kind: FaultKind,
    /// Docker's own message, or what went wrong on the way.
    pub message: String,
}

impl DockerFault {
    pub fn status(status: u16, message: impl Into<String>) -> Self {
        Self {
            kind: FaultKind::Status(status),
            message: message.into(),
        }
    }

    pub fn unreachable(message: impl Into<String>) -> Self {
        Self {
            kind: FaultKind::Unreachable,
            message: message.into(),
        }
    }

    pub fn from_bollard(err: &bollard::errors::Error) -> Self {
        use bollard::errors::Error as E;
        let (kind, message) = match err {
            E::DockerResponseServerError {
                status_code,
                message,
            } => (FaultKind::Status(*status_code), message.clone()),
            E::DockerStreamError { error } => (FaultKind::Stream, error.clone()),
            E::HyperLegacyError { err } => (
                FaultKind::Unreachable,
                format!("connection failed: {err:?}"),
            ),
            E::RequestTimeoutError => (
                FaultKind::Unreachable,
                "Docker did not answer in time".to_owned(),
            ),
            E::IOError { .. } | E::HyperResponseError { .. } => {
                (FaultKind::Unreachable, err.to_string())
            }
            other => (FaultKind::Other, other.to_string()),
        };
        Self { kind, message }
    }

    /// The fault as the job log says it (`HTTP 500: ...` when Docker answered).
    pub fn describe(&self) -> String {
        match self.kind {
            FaultKind::Status(code) => format!("HTTP {code}: {}", self.message),
            _ => self.message.clone(),
        }
    }

    pub fn is_unreachable(&self) -> bool {
        self.kind == FaultKind::Unreachable
    }

    /// Docker answered 404: the object asked about does not exist.
    pub fn is_not_found(&self) -> bool {
        self.kind == FaultKind::Status(404)
    }

    /// The container an exec was asked of is not running: 409, or another status whose
    /// message says so (`start_exec` answers 500 "is not running").
    pub fn is_not_running(&self) -> bool {
        match self.kind {
            FaultKind::Status(409) => true,
            FaultKind::Status(_) => self.message.contains("is not running"),
            _ => false,
        }
    }
}

/// Whose fault a failed Docker request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The job's: a build failure (its image, its credentials).
    Job,
    /// The infrastructure's, the machine not suspected: a system failure. Any refusal that
    /// is not about the job (a device the machine lacks, an option of the runner's
    /// `[job.container]`) is this, so a bad setting does not burn one machine per retry.
    Infrastructure,
    /// The machine's: it stopped answering, or a job object vanished under the job (404).
    /// A system failure, and `cleanup` releases the machine as broken.
    Machine,
}

/// What prepare (or run) was asking Docker for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Pulling an image from its registry.
    Pull,
    /// Looking for an image that must already be there (`pull_policy: never`).
    FindImage,
    /// Creating a job container (build, helper, service) from a pulled image.
    CreateContainer,
    /// Anything else on the job's objects (start, exec, network, volumes, inspect).
    Other,
}

/// Registry and Docker messages that mean the job named an image that does not exist or
/// that its credentials may not read.
fn names_a_job_mistake(message: &str) -> bool {
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

/// Whose fault `fault` is, for a `request` of the job's. Pure.
pub fn blame(request: Request, fault: &DockerFault) -> Blame {
    let any_request = || {
        if fault.is_unreachable() || fault.is_not_found() {
            Blame::Machine
        } else {
            Blame::Infrastructure
        }
    };
    let job_if_its_mistake = || {
        if names_a_job_mistake(&fault.message) {
            Blame::Job
        } else {
            Blame::Infrastructure
        }
    };
    match (request, fault.kind) {
        // The registry's verdict, relayed by Docker: a missing image or refused credentials
        // are the job's; a registry that is down is infrastructure, never the machine.
        (Request::Pull, FaultKind::Stream) => job_if_its_mistake(),
        (Request::Pull, FaultKind::Status(code))
            if code < 500 || names_a_job_mistake(&fault.message) =>
        {
            job_if_its_mistake()
        }
        // `never`: the image is not there, and the job said not to pull it.
        (Request::FindImage, FaultKind::Status(404)) => Blame::Job,
        (Request::CreateContainer, _) if fault.message.contains("No such image") => Blame::Job,
        _ => any_request(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blame_table() {
        use Blame::{Infrastructure as Infra, Job, Machine};
        use Request::*;
        let stream = |m: &str| DockerFault {
            kind: FaultKind::Stream,
            message: m.into(),
        };
        let http = DockerFault::status;
        let down = || DockerFault::unreachable("connection failed: connect timed out");
        let other = DockerFault {
            kind: FaultKind::Other,
            message: "invalid JSON".into(),
        };
        #[rustfmt::skip]
        let rows: Vec<(&str, Request, DockerFault, Blame)> = vec![
            ("pull: registry says the tag does not exist", Pull,
             stream("manifest for r/app:nope not found: manifest unknown"), Job),
            ("pull: registry refuses the job's credentials", Pull,
             stream("unauthorized: authentication required"), Job),
            ("pull: image name the registry refuses to parse", Pull,
             http(400, "invalid reference format"), Job),
            ("pull: Docker answers 404 for a repository that does not exist", Pull,
             http(404, "pull access denied for nope, repository does not exist"), Job),
            ("pull: Docker relays a registry 401 as a 500", Pull,
             http(500, "Head https://r/v2/app/manifests/1: unauthorized"), Job),
            ("pull: the registry is down (stream)", Pull,
             stream("Get https://r/v2/: dial tcp 10.0.0.9:443: connection refused"), Infra),
            ("pull: another 4xx that names no mistake of the job", Pull,
             http(429, "toomanyrequests: rate limit exceeded"), Infra),
            ("pull: the registry is down (5xx)", Pull,
             http(500, "Get https://r/v2/: net/http: TLS handshake timeout"), Infra),
            ("pull: the machine does not answer", Pull, down(), Machine),
            ("pull: an answer bollard cannot read", Pull, other.clone(), Infra),
            ("never: the image is not on the machine", FindImage,
             http(404, "No such image: app:1"), Job),
            ("never: the machine does not answer (was the job's fault before)", FindImage,
             down(), Machine),
            ("never: Docker fails the lookup", FindImage, http(500, "boom"), Infra),
            ("create: the image vanished after the pull", CreateContainer,
             http(404, "No such image: app:1"), Job),
            ("create: a device the machine lacks", CreateContainer,
             http(400, "error gathering device information: no such file"), Infra),
            ("create: an invalid option of the runner's", CreateContainer,
             http(400, "invalid mount config"), Infra),
            ("create: the daemon fails", CreateContainer, http(500, "boom"), Infra),
            ("create: the machine does not answer", CreateContainer, down(), Machine),
            ("start: the container vanished under the job", Other,
             http(404, "No such container: job-1-build"), Machine),
            ("start: the daemon fails", Other, http(500, "OCI runtime create failed"), Infra),
            ("start: refused", Other, http(409, "conflict"), Infra),
            ("network: the machine does not answer", Other, down(), Machine),
            ("anything: an unreadable answer", Other, other, Infra),
        ];
        for (case, request, fault, expected) in rows {
            assert_eq!(blame(request, &fault), expected, "{case}: {fault:?}");
        }
    }

    #[test]
    fn not_running_is_a_409_or_a_message_saying_so() {
        assert!(DockerFault::status(409, "is paused").is_not_running());
        assert!(DockerFault::status(500, "container abc is not running").is_not_running());
        assert!(!DockerFault::status(500, "boom").is_not_running());
        assert!(!DockerFault::unreachable("is not running").is_not_running());
    }

    #[test]
    fn faults_from_bollard_keep_what_docker_said() {
        use bollard::errors::Error as E;
        let f = DockerFault::from_bollard(&E::DockerResponseServerError {
            status_code: 404,
            message: "No such container: x".into(),
        });
        assert_eq!(f.describe(), "HTTP 404: No such container: x");
        assert!(f.is_not_found());
        let f = DockerFault::from_bollard(&E::RequestTimeoutError);
        assert!(f.is_unreachable());
        assert_eq!(f.describe(), "Docker did not answer in time");
        let f = DockerFault::from_bollard(&E::DockerStreamError {
            error: "manifest unknown".into(),
        });
        assert_eq!(f.kind, FaultKind::Stream);
    }
}
