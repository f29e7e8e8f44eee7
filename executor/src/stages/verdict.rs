//! The run stage's verdict: whether a stage passed, failed by the job's fault (a build
//! failure: its exit code goes to gitlab-runner), or by the infrastructure's (a system
//! failure, which gitlab-runner may retry; the machine is released as broken when it is
//! to blame).
//!
//! Pure: `run.rs` does the Docker and daemon I/O and writes what happened into a
//! [`Report`] of plain facts; [`verdict`] holds every rule and answers with an [`Outcome`],
//! or with the one [`Probe`] it needs answered first (restart the container, look at it,
//! wait for proof that the machine is gone). Each rule was learnt from a job blamed
//! wrongly; the table test names them.

use std::time::Duration;

use super::fault::{blame, Blame, DockerFault, FaultKind, Request};
use super::StageError;

/// The machine and container a stage ran on: what every message names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub machine_id: String,
    pub instance_id: String,
    pub address: String,
    pub container: String,
}

/// What the daemon said about the job's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseCheck {
    Held,
    /// The daemon did not answer (restarting): the machine may well be fine.
    Unconfirmed,
    /// EC2 lost the machine; the daemon's message says how.
    Lost(String),
    /// Released, expired, or forgotten by a daemon that lost its state.
    NotHeld,
}

/// How one attempt to run the stage script ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Docker refused `create_exec` or `start_exec`.
    Refused(DockerFault),
    /// `start_exec` answered without an output stream.
    Detached,
    /// The output stream failed mid-stage.
    OutputBroke(String),
    /// The liveness watch gave the machine up, for this reason.
    MachineLost(String),
    /// The stage process could not set itself up (signal handlers).
    Local(String),
    /// The script ended with `code`; `cancelled` when gitlab-runner cancelled the stage.
    Exited { code: i32, cancelled: bool },
    /// Reading the exit code failed.
    ExitUnread(DockerFault),
    /// Docker answered, but never with an exit code.
    ExitNeverReported,
    /// Cancelled, and the machine did not answer while the stage's processes were stopped.
    CancelUnanswered,
}

/// The job container as one inspect saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Container {
    Running,
    /// Docker says it is not running.
    Stopped,
    /// Neither plainly running nor stopped (paused, restarting, no state).
    Other,
    /// No answer in time.
    Unanswered,
    Refused(DockerFault),
}

/// What a ping of the machine's Docker got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ping {
    Answered,
    Refused(DockerFault),
    Unanswered,
}

/// Why a failed stage's machine counts as lost: awaited (up to [`LOSS_PROOF_WAIT`]) once
/// its job container stopped or vanished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LossProof {
    /// The daemon says EC2 lost it (its message).
    DaemonSaysLost(String),
    /// Its Docker refused a ping with this fault.
    PingRefused(DockerFault),
    /// Its Docker did not answer a ping.
    PingUnanswered,
    /// Neither came within the wait.
    NoneInTime,
}

/// Everything the run stage found out, in the order it found it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub target: Target,
    pub lease: LeaseCheck,
    /// The first attempt, and the second one after the container was restarted.
    pub attempts: Vec<Attempt>,
    /// Restarting the job container, found not running by the first attempt.
    pub restart: Option<Result<(), DockerFault>>,
    /// The container after a failure that may be its entrypoint's ([`Probe::CheckStopped`]).
    pub after_failure: Option<Container>,
    /// The container looked at after the stage failed: at once, and for a killed script a
    /// moment later ([`Probe::Look`]).
    pub looks: Vec<Container>,
    pub loss: Option<LossProof>,
}

impl Report {
    pub fn new(target: Target, lease: LeaseCheck) -> Self {
        Self {
            target,
            lease,
            attempts: Vec::new(),
            restart: None,
            after_failure: None,
            looks: Vec::new(),
            loss: None,
        }
    }
}

/// What the run stage ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// The job's fault: `code` goes to gitlab-runner (`BUILD_FAILURE_EXIT_CODE`).
    Build {
        code: i32,
        message: Option<String>,
    },
    /// The infrastructure's; the machine is not suspected.
    System(String),
    /// The machine's: released as broken at cleanup.
    Machine(String),
}

impl From<Outcome> for Result<(), StageError> {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Passed => Ok(()),
            Outcome::Build { code, message } => Err(StageError::Build { code, message }),
            Outcome::System(m) => Err(StageError::System(m)),
            Outcome::Machine(m) => Err(StageError::Machine(m)),
        }
    }
}

/// A fact [`verdict`] needs before it can decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Run the stage script (again): record an [`Attempt`].
    Run,
    /// Start the stopped job container: record [`Report::restart`].
    Restart,
    /// Inspect the job container: record [`Report::after_failure`].
    CheckStopped,
    /// After `delay`, inspect the job container (bounded): record one of [`Report::looks`].
    Look { delay: Duration },
    /// Wait for proof that the machine is gone: record [`Report::loss`].
    AwaitLossProof,
}

/// What [`verdict`] makes of a report so far: an outcome, or the fact to find out next
/// (the I/O runs it, records the answer, and asks again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Done(Outcome),
    Need(Probe),
}

/// A script killed by a signal (137, 143) is looked at again this much later: Docker
/// reports its container running until it has reaped it.
pub const SECOND_LOOK_DELAY: Duration = Duration::from_secs(1);
/// How long a failed stage whose job container vanished waits for proof that the machine
/// is gone (the daemon marking the lease lost, or Docker no longer answering).
pub const LOSS_PROOF_WAIT: Duration = Duration::from_secs(15);
/// Unanswered liveness pings in a row after which a running stage's machine is lost.
pub const LIVENESS_MISSES: u32 = 3;

/// `Err` carries the fact still missing.
type Needs<T> = Result<T, Probe>;

/// The verdict on `r`, or the probe to run before asking again. Pure.
pub fn verdict(r: &Report) -> Verdict {
    match stage_verdict(r) {
        Ok(o) => Verdict::Done(o),
        Err(p) => Verdict::Need(p),
    }
}

fn stage_verdict(r: &Report) -> Needs<Outcome> {
    let t = &r.target;
    // Checked before the stage starts, so a lost machine fails it at once with the
    // daemon's word for it; a daemon that does not answer does not fail the job.
    match &r.lease {
        LeaseCheck::Lost(why) => return Ok(Outcome::Machine(why.clone())),
        LeaseCheck::NotHeld => {
            return Ok(Outcome::System(format!(
                "the lease on build machine {} is no longer held: released, expired, or forgotten by a daemon that lost its state and adopted the machine (see the daemon's log)",
                t.machine_id
            )))
        }
        LeaseCheck::Held | LeaseCheck::Unconfirmed => {}
    }
    let result = script_result(r)?;
    let code = match result {
        Ok(0) => return Ok(Outcome::Passed),
        Ok(code) => code,
        // A system failure may still be the machine going away: look at its container.
        Err(Outcome::System(_)) => 0,
        // The job's fault, or the machine already known lost: nothing more to ask it.
        Err(o) => return Ok(o),
    };
    if machine_went_away(r, code)? {
        let Some(proof) = &r.loss else {
            return Err(Probe::AwaitLossProof);
        };
        return Ok(Outcome::Machine(lost_message(t, proof)));
    }
    Ok(match result {
        Ok(code) => Outcome::Build {
            code,
            message: None,
        },
        Err(o) => o,
    })
}

/// What the script's attempts came to: its exit code, or a failure already decided.
fn script_result(r: &Report) -> Needs<Result<i32, Outcome>> {
    let t = &r.target;
    let Some(first) = r.attempts.first() else {
        return Err(Probe::Run);
    };
    let Attempt::Refused(refusal) = first else {
        return attempt_result(r, first);
    };
    if !refusal.is_not_running() {
        return attempt_result(r, first);
    }
    // The container stopped (machine reboot, OOM kill, a cancelled earlier stage): it is
    // started again, once, so the remaining stages (after_script, uploads) still run.
    match &r.restart {
        None => Err(Probe::Restart),
        Some(Err(fault)) => Ok(Err(failure(
            t,
            &format!("restarting {} failed", t.container),
            fault,
        ))),
        Some(Ok(())) => {
            let Some(second) = r.attempts.get(1) else {
                return Err(Probe::Run);
            };
            // Not running again at once after our restart: the image's entrypoint exits.
            if matches!(second, Attempt::Refused(f) if f.is_not_running()) {
                return Ok(Err(exits_at_once(t)));
            }
            let result = attempt_result(r, second)?;
            // Restarted by us and stopped again on its own, whatever Docker reported on
            // the way (404 for the exec, 126, a broken stream): the entrypoint again.
            if matches!(result, Err(_) | Ok(1..)) && stopped_after_failure(r)? {
                return Ok(Err(exits_at_once(t)));
            }
            Ok(result)
        }
    }
}

fn attempt_result(r: &Report, attempt: &Attempt) -> Needs<Result<i32, Outcome>> {
    let t = &r.target;
    Ok(match attempt {
        Attempt::Refused(fault) => Err(failure(
            t,
            &format!("starting the stage in {} failed", t.container),
            fault,
        )),
        Attempt::Detached => Err(Outcome::System(format!(
            "Docker on build machine {} ({}) started the stage in {} detached (no output stream to attach to)",
            t.machine_id, t.instance_id, t.container
        ))),
        Attempt::OutputBroke(why) => Err(Outcome::System(format!(
            "stage output from build machine {} ({}) broke off: {why}",
            t.machine_id, t.instance_id
        ))),
        Attempt::MachineLost(why) => Err(Outcome::Machine(why.clone())),
        Attempt::Local(why) => Err(Outcome::System(why.clone())),
        // The container can stop after start_exec, before Docker runs anything: runc then
        // reports "cannot exec in a stopped state" and 126.
        Attempt::Exited {
            code: 126,
            cancelled: false,
        } if stopped_after_failure(r)? => Err(exits_at_once(t)),
        Attempt::Exited { code, .. } => Ok(*code),
        Attempt::ExitUnread(fault) => Err(failure(
            t,
            "reading the stage's exit code failed",
            fault,
        )),
        Attempt::ExitNeverReported => Err(Outcome::System(format!(
            "build machine {} ({}) did not report the stage's exit code",
            t.machine_id, t.instance_id
        ))),
        Attempt::CancelUnanswered => Err(Outcome::Machine(format!(
            "build machine {} ({}) did not answer while the cancelled stage was stopped",
            t.machine_id, t.instance_id
        ))),
    })
}

fn stopped_after_failure(r: &Report) -> Needs<bool> {
    match &r.after_failure {
        None => Err(Probe::CheckStopped),
        Some(c) => Ok(*c == Container::Stopped),
    }
}

/// Whether a failed stage's job container stopped or vanished under it, which a script
/// cannot do (PID 1 of the container ignores signals from inside it): then the machine
/// did (terminated, spot reclaim; its shutdown kills the script first, so it "fails" with
/// 137 while Docker still answers for a moment). `code` is the script's exit code, 0 when
/// the stage failed otherwise.
fn machine_went_away(r: &Report, code: i32) -> Needs<bool> {
    let killed = matches!(code, 137 | 143);
    let last = match r.looks.as_slice() {
        [] => {
            return Err(Probe::Look {
                delay: Duration::ZERO,
            })
        }
        [Container::Running] if killed => {
            return Err(Probe::Look {
                delay: SECOND_LOOK_DELAY,
            })
        }
        [.., last] => last,
    };
    Ok(match last {
        Container::Running => false,
        Container::Stopped | Container::Other | Container::Unanswered => true,
        // 409: Docker is removing it.
        Container::Refused(f) => {
            f.is_unreachable() || matches!(f.kind, FaultKind::Status(404 | 409))
        }
    })
}

fn lost_message(t: &Target, proof: &LossProof) -> String {
    match proof {
        LossProof::DaemonSaysLost(why) => why.clone(),
        LossProof::PingRefused(f) => format!(
            "build machine {} ({}, {}) was lost: its Docker daemon stopped answering while the stage ran ({})",
            t.machine_id,
            t.instance_id,
            t.address,
            f.describe()
        ),
        LossProof::PingUnanswered => format!(
            "build machine {} ({}, {}) was lost: its Docker daemon stopped answering while the stage ran",
            t.machine_id, t.instance_id, t.address
        ),
        LossProof::NoneInTime => format!(
            "the job container {} on build machine {} ({}) stopped while the stage ran: the machine was lost (shutting down or reclaimed) or ran out of memory",
            t.container, t.machine_id, t.instance_id
        ),
    }
}

impl LossProof {
    /// One answer of the daemon while proof is awaited.
    pub fn from_daemon(lease: &LeaseCheck) -> Option<Self> {
        match lease {
            LeaseCheck::Lost(why) => Some(Self::DaemonSaysLost(why.clone())),
            _ => None,
        }
    }

    /// One ping while proof is awaited: any failure is proof (Docker was answering a
    /// moment ago, and the container is gone).
    pub fn from_ping(ping: &Ping) -> Option<Self> {
        match ping {
            Ping::Answered => None,
            Ping::Refused(f) => Some(Self::PingRefused(f.clone())),
            Ping::Unanswered => Some(Self::PingUnanswered),
        }
    }
}

/// A job container that is not running when a stage starts, even after a restart.
fn exits_at_once(t: &Target) -> Outcome {
    Outcome::Build {
        code: 1,
        message: Some(format!(
            "the job container {} on build machine {} exits as soon as it starts: the image's entrypoint must run the command it is given (exec \"$@\"), or set `entrypoint: [\"\"]` on the image",
            t.container, t.machine_id
        )),
    }
}

/// A Docker fault the job is not to blame for, naming the machine.
fn failure(t: &Target, what: &str, fault: &DockerFault) -> Outcome {
    let message = format!(
        "{what} on build machine {} ({}, {}): {}",
        t.machine_id,
        t.instance_id,
        t.address,
        fault.describe()
    );
    match blame(Request::Other, fault) {
        Blame::Machine => Outcome::Machine(message),
        Blame::Job | Blame::Infrastructure => Outcome::System(message),
    }
}

/// The running stage's own check that its machine lives (the daemon's health checks leave
/// a leased machine to its job). A quiet stage on a live machine is never disturbed: only
/// [`LIVENESS_MISSES`] unanswered pings in a row, or the daemon saying EC2 lost the
/// machine, end it. Pure: fed one check at a time.
#[derive(Debug, Default)]
pub struct Liveness {
    misses: u32,
}

impl Liveness {
    /// The daemon's answer at one check: the reason, once EC2 lost the machine.
    pub fn daemon_says(&self, lease: &LeaseCheck) -> Option<String> {
        match lease {
            LeaseCheck::Lost(why) => Some(why.clone()),
            _ => None,
        }
    }

    /// One ping's result: the reason, once the machine counts as lost. Any answer (even a
    /// refusal) resets the count; no connection or no answer in time is a miss.
    pub fn ping(&mut self, t: &Target, ping: &Ping) -> Option<String> {
        match ping {
            Ping::Refused(f) if f.is_unreachable() => self.misses += 1,
            Ping::Unanswered => self.misses += 1,
            Ping::Answered | Ping::Refused(_) => self.misses = 0,
        }
        (self.misses >= LIVENESS_MISSES).then(|| {
            format!(
                "build machine {} ({}, {}) was lost: its Docker daemon stopped answering while the stage ran ({LIVENESS_MISSES} checks in a row went unanswered)",
                t.machine_id, t.instance_id, t.address
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            machine_id: "m-7".into(),
            instance_id: "i-07".into(),
            address: "10.0.0.7".into(),
            container: "job-1-build".into(),
        }
    }

    fn held() -> Report {
        Report::new(target(), LeaseCheck::Held)
    }

    /// The report after `attempts`, the container then seen as `looks`.
    fn ran(attempts: Vec<Attempt>, looks: Vec<Container>) -> Report {
        Report {
            attempts,
            looks,
            ..held()
        }
    }

    fn exited(code: i32) -> Attempt {
        Attempt::Exited {
            code,
            cancelled: false,
        }
    }

    fn http(code: u16, message: &str) -> DockerFault {
        DockerFault::status(code, message)
    }

    fn down() -> DockerFault {
        DockerFault::unreachable("connection failed: connect timed out")
    }

    /// After a restart (first exec refused: not running) and the second `attempt`.
    fn restarted(
        second: Attempt,
        after_failure: Option<Container>,
        looks: Vec<Container>,
    ) -> Report {
        Report {
            attempts: vec![
                Attempt::Refused(http(409, "container is not running")),
                second,
            ],
            restart: Some(Ok(())),
            after_failure,
            looks,
            ..held()
        }
    }

    const DAEMON_LOST: &str = "build machine m-7 (i-07) was lost: EC2 reports it terminated";

    #[derive(Debug, Clone)]
    enum Want {
        Pass,
        Build(i32),
        /// The build failure that says to fix the image's entrypoint.
        Entrypoint,
        System(&'static str),
        Machine(&'static str),
        Need(Probe),
    }

    fn look(delay: Duration) -> Want {
        Want::Need(Probe::Look { delay })
    }

    #[test]
    fn verdict_table() {
        use Container::{Refused, Running, Stopped, Unanswered};
        let at_once = look(Duration::ZERO);
        let again = look(SECOND_LOOK_DELAY);
        let proof = || Want::Need(Probe::AwaitLossProof);
        let with_proof = |mut r: Report, p: LossProof| {
            r.loss = Some(p);
            r
        };
        #[rustfmt::skip]
        let rows: Vec<(&str, Report, Want)> = vec![
            // The lease, confirmed before the stage starts.
            ("a job on a machine EC2 lost fails at once, blaming the machine (ca3d530, 4621d6e)",
             Report::new(target(), LeaseCheck::Lost(DAEMON_LOST.into())), Want::Machine("EC2 reports it terminated")),
            ("a lease no longer held is a system failure, the machine not blamed",
             Report::new(target(), LeaseCheck::NotHeld), Want::System("no longer held")),
            ("a restarting daemon does not fail the job: the script runs (34d5d5c)",
             Report::new(target(), LeaseCheck::Unconfirmed), Want::Need(Probe::Run)),
            ("first, the script runs", held(), Want::Need(Probe::Run)),
            // The script's own exit code.
            ("exit 0 passes without another look", ran(vec![exited(0)], vec![]), Want::Pass),
            ("a failed script's container is looked at before the job is blamed (ca3d530)",
             ran(vec![exited(3)], vec![]), at_once.clone()),
            ("exit 3, container running: the job's failure with its code",
             ran(vec![exited(3)], vec![Running]), Want::Build(3)),
            ("137, container running: looked at again a second later, Docker reports it running until reaped (ca3d530)",
             ran(vec![exited(137)], vec![Running]), again.clone()),
            ("143 gets the second look too", ran(vec![exited(143)], vec![Running]), again),
            ("137, running both times: the script was killed (kill -9, OOM of one process): the job's 137",
             ran(vec![exited(137)], vec![Running, Running]), Want::Build(137)),
            ("137 and the container stopped on the second look: the machine is shutting down (ca3d530)",
             ran(vec![exited(137)], vec![Running, Stopped]), proof()),
            ("exit 1 and the container stopped at once: awaiting proof the machine is gone",
             ran(vec![exited(1)], vec![Stopped]), proof()),
            ("the container gone (404) under the stage", ran(vec![exited(1)], vec![Refused(http(404, "No such container"))]), proof()),
            ("the container being removed (409) under the stage", ran(vec![exited(1)], vec![Refused(http(409, "removal in progress"))]), proof()),
            ("the inspect not answered in time", ran(vec![exited(1)], vec![Unanswered]), proof()),
            ("the inspect refused by an unreachable machine", ran(vec![exited(1)], vec![Refused(down())]), proof()),
            ("the container neither running nor stopped (paused, restarting)", ran(vec![exited(1)], vec![Container::Other]), proof()),
            ("an inspect refused otherwise (500) proves nothing: the job's exit code stands",
             ran(vec![exited(1)], vec![Refused(http(500, "boom"))]), Want::Build(1)),
            ("machine terminated under the stage: the daemon's word is the message (ca3d530)",
             with_proof(ran(vec![exited(137)], vec![Running, Stopped]), LossProof::DaemonSaysLost(DAEMON_LOST.into())),
             Want::Machine("EC2 reports it terminated")),
            ("machine terminated under the stage: its Docker refused the ping",
             with_proof(ran(vec![exited(137)], vec![Stopped]), LossProof::PingRefused(down())),
             Want::Machine("stopped answering while the stage ran (connection failed")),
            ("machine terminated under the stage: its Docker did not answer the ping",
             with_proof(ran(vec![exited(1)], vec![Stopped]), LossProof::PingUnanswered),
             Want::Machine("stopped answering while the stage ran")),
            ("no proof within 15 s: the container stopped all the same, the machine was lost or ran out of memory",
             with_proof(ran(vec![exited(1)], vec![Stopped]), LossProof::NoneInTime),
             Want::Machine("ran out of memory")),
            // Cancelled by gitlab-runner (SIGTERM).
            ("a cancelled stage's 143 on a live machine stays the job's (4fea186)",
             ran(vec![Attempt::Exited { code: 143, cancelled: true }], vec![Running, Running]), Want::Build(143)),
            ("a cancelled stage on a machine that no longer answers: the machine's fault (640912d)",
             ran(vec![Attempt::CancelUnanswered], vec![]), Want::Machine("did not answer while the cancelled stage was stopped")),
            ("a cancelled stage's 126 is not the entrypoint's: no check, straight to the look",
             ran(vec![Attempt::Exited { code: 126, cancelled: true }], vec![]), at_once.clone()),
            // The entrypoint that exits at once, in its three forms.
            ("126 from start_exec: did the container just stop? (cd6835b)",
             ran(vec![exited(126)], vec![]), Want::Need(Probe::CheckStopped)),
            ("126 from a container that has just stopped: the entrypoint (cd6835b); a machine shutting down at that instant looks the same and is blamed on the image too",
             Report { after_failure: Some(Stopped), ..ran(vec![exited(126)], vec![]) }, Want::Entrypoint),
            ("126 from a running container is the script's own 126 (not executable)",
             Report { after_failure: Some(Running), ..ran(vec![exited(126)], vec![Running]) }, Want::Build(126)),
            ("a container not running at the first exec is restarted once, after_script must run (4fc6ce7)",
             ran(vec![Attempt::Refused(http(409, "Container abc is not running"))], vec![]), Want::Need(Probe::Restart)),
            ("start_exec's 500 \"is not running\" is the same: restart (7ed533b)",
             ran(vec![Attempt::Refused(http(500, "container abc is not running"))], vec![]), Want::Need(Probe::Restart)),
            ("restarted: the script runs again",
             Report { restart: Some(Ok(())), ..ran(vec![Attempt::Refused(http(409, "x"))], vec![]) }, Want::Need(Probe::Run)),
            ("restarted and passing", restarted(exited(0), None, vec![]), Want::Pass),
            ("restarted and refused again: the entrypoint exits at once (4fc6ce7)",
             restarted(Attempt::Refused(http(409, "is not running")), None, vec![]), Want::Entrypoint),
            ("restarted, then start_exec 500 \"is not running\": the entrypoint (7ed533b)",
             restarted(Attempt::Refused(http(500, "container abc is not running")), None, vec![]), Want::Entrypoint),
            ("restarted, then the exec vanished (404): did the container stop again? (ea0dbd7)",
             restarted(Attempt::Refused(http(404, "No such exec instance")), None, vec![]), Want::Need(Probe::CheckStopped)),
            ("restarted, then the exec vanished and the container stopped again: the entrypoint (ea0dbd7)",
             restarted(Attempt::Refused(http(404, "No such exec instance")), Some(Stopped), vec![]), Want::Entrypoint),
            ("restarted, then a broken stream and the container stopped: the entrypoint (ea0dbd7)",
             restarted(Attempt::OutputBroke("unexpected EOF".into()), Some(Stopped), vec![]), Want::Entrypoint),
            ("restarted, then 126 and the container stopped: the entrypoint (ea0dbd7, cd6835b)",
             restarted(exited(126), Some(Stopped), vec![]), Want::Entrypoint),
            ("restarted, the script fails with the container up: the job's code",
             restarted(exited(2), Some(Running), vec![Running]), Want::Build(2)),
            ("restarting refused by an unreachable machine: the machine's fault",
             Report { restart: Some(Err(down())), ..ran(vec![Attempt::Refused(http(409, "x"))], vec![]) },
             Want::Machine("restarting job-1-build failed")),
            ("restarting refused otherwise: a system failure once the container is seen up",
             Report { restart: Some(Err(http(500, "boom"))), ..ran(vec![Attempt::Refused(http(409, "x"))], vec![Running]) },
             Want::System("restarting job-1-build failed")),
            // Docker failing the stage.
            ("exec refused by an unreachable machine: the machine's fault, asked nothing more",
             ran(vec![Attempt::Refused(down())], vec![]), Want::Machine("starting the stage in job-1-build failed")),
            ("the job container vanished (404 on the exec): the machine's fault",
             ran(vec![Attempt::Refused(http(404, "No such container: job-1-build"))], vec![]), Want::Machine("HTTP 404")),
            ("exec refused with a 500: a system failure, the container first looked at",
             ran(vec![Attempt::Refused(http(500, "boom"))], vec![]), at_once.clone()),
            ("exec refused with a 500, container up: a system failure",
             ran(vec![Attempt::Refused(http(500, "boom"))], vec![Running]), Want::System("HTTP 500: boom")),
            ("exec refused with a 500, container gone: the machine may be going, await proof",
             ran(vec![Attempt::Refused(http(500, "boom"))], vec![Stopped]), proof()),
            ("Docker started the stage detached: a system failure naming the machine (c0eb7db)",
             ran(vec![Attempt::Detached], vec![Running]), Want::System("detached")),
            ("the output stream broke off, container up: a system failure",
             ran(vec![Attempt::OutputBroke("unexpected EOF".into())], vec![Running]), Want::System("broke off: unexpected EOF")),
            ("the output stream broke off with the container gone: the machine went away",
             with_proof(ran(vec![Attempt::OutputBroke("unexpected EOF".into())], vec![Refused(http(404, "gone"))]), LossProof::NoneInTime),
             Want::Machine("was lost")),
            ("frozen machine: three liveness pings unanswered end the stage at once (640912d)",
             ran(vec![Attempt::MachineLost("build machine m-7 was lost: 3 checks".into())], vec![]), Want::Machine("3 checks")),
            ("the exit code unreadable on an unreachable machine: the machine's fault",
             ran(vec![Attempt::ExitUnread(down())], vec![]), Want::Machine("reading the stage's exit code failed")),
            ("the exit code refused with a 500: a system failure once the container is seen up",
             ran(vec![Attempt::ExitUnread(http(500, "boom"))], vec![Running]), Want::System("reading the stage's exit code failed")),
            ("no exit code reported: a system failure",
             ran(vec![Attempt::ExitNeverReported], vec![Running]), Want::System("did not report the stage's exit code")),
            ("the stage process could not watch for signals: a system failure",
             ran(vec![Attempt::Local("cannot watch for SIGTERM on build machine m-7".into())], vec![Running]), Want::System("cannot watch")),
        ];
        for (case, report, want) in rows {
            let got = verdict(&report);
            let ok = match (&want, &got) {
                (Want::Pass, Verdict::Done(Outcome::Passed)) => true,
                (
                    Want::Build(c),
                    Verdict::Done(Outcome::Build {
                        code,
                        message: None,
                    }),
                ) => c == code,
                (
                    Want::Entrypoint,
                    Verdict::Done(Outcome::Build {
                        code: 1,
                        message: Some(m),
                    }),
                ) => m.contains("entrypoint: [\"\"]") && m.contains("job-1-build"),
                (Want::System(needle), Verdict::Done(Outcome::System(m)))
                | (Want::Machine(needle), Verdict::Done(Outcome::Machine(m))) => m.contains(needle),
                (Want::Need(p), Verdict::Need(q)) => p == q,
                _ => false,
            };
            assert!(ok, "{case}:\n  want {want:?}\n  got  {got:?}");
            // Every failure names the machine it happened on.
            if let Verdict::Done(
                Outcome::System(m)
                | Outcome::Machine(m)
                | Outcome::Build {
                    message: Some(m), ..
                },
            ) = &got
            {
                assert!(
                    m.contains("m-7"),
                    "{case}: the message does not name the machine: {m}"
                );
            }
        }
    }

    #[test]
    fn a_machine_is_lost_after_three_unanswered_pings_in_a_row_only() {
        let t = target();
        let mut watch = Liveness::default();
        let refused = Ping::Refused(http(500, "boom"));
        // A slow or refusing Docker still answers: the count starts again.
        for ping in [
            Ping::Unanswered,
            Ping::Refused(down()),
            Ping::Answered,
            Ping::Unanswered,
            refused,
        ] {
            assert_eq!(watch.ping(&t, &ping), None, "{ping:?}");
        }
        assert_eq!(watch.ping(&t, &Ping::Unanswered), None);
        assert_eq!(watch.ping(&t, &Ping::Refused(down())), None);
        let lost = watch.ping(&t, &Ping::Unanswered).unwrap();
        assert!(
            lost.contains("m-7") && lost.contains("3 checks in a row"),
            "{lost}"
        );
    }

    #[test]
    fn the_daemon_saying_lost_ends_the_stage_at_once_and_nothing_else_does() {
        let watch = Liveness::default();
        assert_eq!(
            watch
                .daemon_says(&LeaseCheck::Lost(DAEMON_LOST.into()))
                .as_deref(),
            Some(DAEMON_LOST)
        );
        for quiet in [
            LeaseCheck::Held,
            LeaseCheck::Unconfirmed,
            LeaseCheck::NotHeld,
        ] {
            assert_eq!(watch.daemon_says(&quiet), None);
            assert_eq!(LossProof::from_daemon(&quiet), None);
        }
    }

    #[test]
    fn once_the_container_is_gone_any_failed_ping_proves_the_machine_lost() {
        assert_eq!(LossProof::from_ping(&Ping::Answered), None);
        // Unlike the liveness watch: a refusal counts, Docker answered a moment ago.
        let refused = http(500, "boom");
        assert_eq!(
            LossProof::from_ping(&Ping::Refused(refused.clone())),
            Some(LossProof::PingRefused(refused))
        );
        assert_eq!(
            LossProof::from_ping(&Ping::Unanswered),
            Some(LossProof::PingUnanswered)
        );
    }
}
