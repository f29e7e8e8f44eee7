//! `flotilla daemon --adopt` after an unreadable pool state (see `executor/src/observe.rs`
//! `adopt`/`drain_adopted` and `daemon::open_state`).
//!
//! With one idle machine and one running a job, the daemon is killed and both snapshots
//! (`state.json`, `state.json.prev`) are overwritten in the middle with garbage. Then:
//! - a plain start refuses, naming the files and the way out (`--adopt`), and changes
//!   nothing (no file moved, no instance touched);
//! - `--adopt` starts, moves the unreadable state into `unreadable-<time>/` untouched, and
//!   adopts both running instances instead of reaping them as orphans (the orphan grace is
//!   3 s here): they are held leased without a lease, so never handed to a new job;
//! - adopted machines are health-checked by listing their job containers: the idle one is
//!   drained (terminated, reason `drained`) at once; the busy one is not terminated while
//!   its job's containers are on it, its build script runs to its end, and it is drained
//!   once the job's cleanup removed them;
//! - the fleet keeps serving: new jobs run, on newly launched machines only.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use flotilla::control::ControlClient;
use flotilla::stages::job::JOB_LABEL;
use flotilla::state_store::{PREV_STATE_FILE, STATE_FILE, UNREADABLE_PREFIX};
use flotilla_proto::api::{MachineState, StatusResponse};
use flotilla_proto::duration::HumanDuration;
use flotilla_sandbox::faults::Call;
use flotilla_sandbox::prom;
use flotilla_sandbox::runner::{self, BUILD_FAILURE_EXIT_CODE};
use flotilla_sandbox::util::wait_until;
use flotilla_sandbox::{docker_on, Job, Outcome, Sandbox, SandboxOptions};
use nix::sys::signal::Signal;

use crate::common::{bounded, let_go, machines_used, wait_for_job_process, HELD, HOLD, POLL};

async fn status(sb: &Sandbox) -> Result<StatusResponse> {
    Ok(ControlClient::new(&sb.config.socket_path())
        .status()
        .await?)
}

/// Instance ids a TerminateInstances call names.
fn terminated_ids(c: &Call) -> Vec<&str> {
    c.params
        .iter()
        .filter(|(k, _)| k.starts_with("InstanceId."))
        .map(|(_, v)| v.as_str())
        .collect()
}

fn terminate_calls_naming<'a>(calls: &'a [Call], instance: &str) -> Vec<&'a Call> {
    calls
        .iter()
        .filter(|c| c.action == "TerminateInstances" && terminated_ids(c).contains(&instance))
        .collect()
}

/// Overwrites 48 bytes in the middle of `path` with garbage (NULs, invalid UTF-8, text);
/// returns the file's new content.
fn garble_middle(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        bytes.len() > 64,
        "{} is too short to garble",
        path.display()
    );
    let garbage: Vec<u8> =
        b"\x00\xff\xfe GARBAGE \x00 not json at all {{{ \x01\x02\x03 ]]] \xff\x00"
            .iter()
            .copied()
            .cycle()
            .take(48)
            .collect();
    let at = bytes.len() / 2 - garbage.len() / 2;
    bytes[at..at + garbage.len()].copy_from_slice(&garbage);
    std::fs::write(path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(bytes)
}

fn unreadable_dirs(state_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(state_dir)? {
        let e = e?;
        if e.file_name()
            .to_string_lossy()
            .starts_with(UNREADABLE_PREFIX)
        {
            out.push(e.path());
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_after_an_unreadable_state_drains_the_running_fleet_and_keeps_serving() -> Result<()>
{
    bounded(Duration::from_secs(420), async {
        let mut sb = Sandbox::start(SandboxOptions {
            start_daemon: false,
            ec2_proxy: true,
            metrics: true,
            idle_count: 1,
            max_machines: 4,
            // Unknown instances would be reaped 3 s after they are first seen: adopting
            // them is what keeps them.
            orphan_grace: Duration::from_secs(3),
            ..Default::default()
        })
        .await?;
        sb.config.health_interval = HumanDuration::from_secs(1);
        std::fs::write(&sb.config_path, sb.config.to_toml()?)?;
        sb.start_daemon().await?;

        // One machine runs a job (L), one waits idle (I). The job runs until the test lets
        // it go (a file it waits for), so it spans the whole adoption whatever the host's
        // speed.
        let job = Job::new(
            801,
            &[
                "echo adopt-start",
                HOLD,
                "echo \"adopt-$((20 + 22))\"",
            ],
        );
        let task = tokio::spawn(runner::run_job(sb.runner_options(), job));
        let (busy_machine, build_container) =
            wait_for_job_process(&sb, 801, HELD, Duration::from_secs(90)).await?;
        let busy = busy_machine.instance_id.clone();
        let before = wait_until(
            "one leased and one idle machine",
            Duration::from_secs(90),
            POLL,
            || async {
                let s = status(&sb).await?;
                let leased = s.machines.iter().any(|m| {
                    m.instance_id == busy && m.state == MachineState::Leased && m.job_key.is_some()
                });
                let idle = s
                    .machines
                    .iter()
                    .filter(|m| m.state == MachineState::Idle)
                    .count();
                Ok((leased && idle == 1 && s.machines.len() == 2).then_some(s))
            },
        )
        .await
        .with_context(|| sb.diagnostics())?;
        let idle = before
            .machines
            .iter()
            .find(|m| m.state == MachineState::Idle)
            .map(|m| m.instance_id.clone())
            .context("no idle machine")?;
        let old: BTreeSet<String> = [busy.clone(), idle.clone()].into();
        eprintln!("adopt: busy machine {busy} (job 801), idle machine {idle}");

        // Crash, then both snapshots garbled: no usable pool state.
        sb.kill_daemon(Signal::SIGKILL).await?;
        let state_dir = sb.state_dir().to_owned();
        let state = state_dir.join(STATE_FILE);
        let prev = state_dir.join(PREV_STATE_FILE);
        ensure!(
            state.is_file() && prev.is_file(),
            "expected {} and {} after a few reconciles",
            state.display(),
            prev.display()
        );
        let garbled_state = garble_middle(&state)?;
        let garbled_prev = garble_middle(&prev)?;
        let calls_before = sb.faults().context("no fault proxy")?.calls().len();

        // A plain start refuses, says which files and what to do, and changes nothing.
        let (code, out) = sb.run_daemon_to_exit(&[], Duration::from_secs(60)).await?;
        eprintln!("adopt: a plain start exited {code:?}:\n{out}");
        ensure!(
            code.is_some_and(|c| c != 0),
            "a daemon on an unreadable state must refuse to start; it exited {code:?}:\n{out}"
        );
        for must in [
            state.display().to_string(),
            prev.display().to_string(),
            "corrupt".to_string(),
            "--adopt".to_string(),
        ] {
            ensure!(
                out.contains(&must),
                "the refusal does not mention {must:?}:\n{out}"
            );
        }
        ensure!(
            std::fs::read(&state)? == garbled_state
                && std::fs::read(&prev)? == garbled_prev
                && unreadable_dirs(&state_dir)?.is_empty(),
            "the refusing daemon changed the state directory"
        );
        let live = sb
            .instances()
            .await?
            .into_iter()
            .filter(|i| old.contains(&i.instance_id) && i.is_running())
            .count();
        ensure!(live == 2, "the refusal touched the fleet: {:?}", sb.instances().await?);

        // --adopt: the state moved aside as it was, the running fleet adopted.
        let adopt_started = Instant::now();
        let log_from = std::fs::metadata(sb.daemon_log()).map_or(0, |m| m.len() as usize);
        sb.start_daemon_with(&["--adopt"]).await?;
        let aside = unreadable_dirs(&state_dir)?;
        ensure!(
            aside.len() == 1,
            "expected one {UNREADABLE_PREFIX}* directory in {}, found {aside:?}",
            state_dir.display()
        );
        ensure!(
            std::fs::read(aside[0].join(STATE_FILE))? == garbled_state
                && std::fs::read(aside[0].join(PREV_STATE_FILE))? == garbled_prev,
            "{} does not hold the unreadable snapshots as they were",
            aside[0].display()
        );
        let log = adopting_log(&sb, log_from);
        ensure!(
            log.contains("unreadable pool state moved aside"),
            "the daemon did not say it moved the state aside:\n{}",
            sb.diagnostics()
        );
        eprintln!("adopt: unreadable state moved to {}", aside[0].display());

        // The busy machine is adopted: held, no lease, never a job's.
        wait_until(
            "the busy machine to be adopted",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || async {
                let s = status(&sb).await?;
                Ok(s.machines
                    .iter()
                    .any(|m| {
                        m.instance_id == busy
                            && m.state == MachineState::Leased
                            && m.job_key.is_none()
                    })
                    .then_some(()))
            },
        )
        .await
        .with_context(|| sb.diagnostics())?;
        // The idle one has no job containers: drained (terminated) by the health watcher.
        sb.wait_instances("the idle adopted machine drained", Duration::from_secs(60), |l| {
            l.iter()
                .any(|i| i.instance_id == idle && !i.is_running() && i.state != "pending")
        })
        .await
        .with_context(|| sb.diagnostics())?;

        // New jobs meanwhile run on new machines, never on an adopted one.
        let fresh = tokio::spawn(runner::run_job(
            sb.runner_options(),
            Job::new(802, &["echo \"fresh-$((40 + 2))\""]),
        ));
        // Past the orphan grace, several times over, while the job still runs.
        sb.wait_reconciles(6).await?;
        let filter = format!("label={JOB_LABEL}");
        let containers = docker_on(&busy_machine, &["ps", "-aq", "--filter", &filter]).await?;
        ensure!(
            !task.is_finished() && !containers.trim().is_empty(),
            "job 801 is not running on the adopted machine any more (adopted {:?} after the \
             daemon restart)\n{}",
            adopt_started.elapsed(),
            sb.diagnostics()
        );
        let s = status(&sb).await?;
        ensure!(
            s.machines.iter().any(|m| m.instance_id == busy
                && m.state == MachineState::Leased
                && m.job_key.is_none()),
            "the busy adopted machine is no longer held while its job runs: {:#?}\n{}",
            s.machines,
            sb.diagnostics()
        );
        ensure!(
            sb.instances()
                .await?
                .iter()
                .any(|i| i.instance_id == busy && i.is_running()),
            "the busy adopted machine was terminated while its job runs\n{}",
            sb.diagnostics()
        );

        // Job 801 goes on to its end.
        let_go(&busy_machine, &build_container).await?;
        let r = task.await??;
        let build = r.stage("build_script").context("job 801 ran no build_script")?;
        ensure!(
            build.ok() && build.stdout.contains("adopt-42"),
            "job 801's build script did not run to its end on the adopted machine:\n{}",
            r.describe()
        );
        let failed_as_build = r
            .stages
            .iter()
            .any(|s| s.exit_code == Some(BUILD_FAILURE_EXIT_CODE));
        ensure!(
            matches!(
                r.outcome,
                Outcome::Success | Outcome::SystemFailure { .. }
            ) && !failed_as_build,
            "job 801 across the adoption: {:?}\n{}",
            r.outcome,
            r.describe()
        );
        let said = match &r.outcome {
            Outcome::SystemFailure { stage, .. } => r
                .stage(stage)
                .map(|s| s.stderr.trim().to_owned())
                .unwrap_or_default(),
            _ => String::new(),
        };
        eprintln!(
            "adopt: job 801 (running across the adoption) ended {:?} {said:?}, cleanup exit {:?}",
            r.outcome, r.cleanup_exit
        );

        // Its cleanup removed its containers: the busy machine is drained too, only now.
        sb.wait_instances("the busy adopted machine drained", Duration::from_secs(60), |l| {
            l.iter()
                .any(|i| i.instance_id == busy && !i.is_running() && i.state != "pending")
        })
        .await
        .with_context(|| sb.diagnostics())?;
        let calls = sb.faults().context("no fault proxy")?.calls();
        for inst in [&busy, &idle] {
            let early: Vec<_> = terminate_calls_naming(&calls[..calls_before], inst);
            ensure!(
                early.is_empty(),
                "{inst} was terminated before --adopt: {early:#?}"
            );
        }
        // Its containers were there until its cleanup removed them: every termination of
        // the busy machine came after the cleanup started, and the machine had no container
        // left when it went.
        let busy_terminations = terminate_calls_naming(&calls, &busy);
        let cleanup = r
            .stage("cleanup")
            .context("job 801 ran no cleanup")?
            .started;
        ensure!(
            !busy_terminations.is_empty() && busy_terminations.iter().all(|c| c.at >= cleanup),
            "the busy adopted machine was terminated before job 801's cleanup started \
             (cleanup {:?} after the adopt start; terminations at {:?})\n{}",
            cleanup.saturating_duration_since(adopt_started),
            busy_terminations
                .iter()
                .map(|c| c.at.saturating_duration_since(adopt_started))
                .collect::<Vec<_>>(),
            sb.diagnostics()
        );
        let stopped = sb
            .emulator()
            .wait_stopped(&busy, Duration::from_secs(60))
            .await?;
        ensure!(
            stopped.leftover_containers.is_empty(),
            "the busy adopted machine went with containers on it: {:?}",
            stopped.leftover_containers
        );

        let fresh = fresh.await??;
        ensure!(
            fresh.outcome == Outcome::Success
                && fresh
                    .stage("build_script")
                    .is_some_and(|s| s.stdout.contains("fresh-42")),
            "a new job during the adoption:\n{}",
            fresh.describe()
        );
        let mut used = machines_used(&fresh);
        for id in [803, 804] {
            let r = sb
                .run_job(Job::new(id, &["echo \"after-$((40 + 2))\""]))
                .await?;
            ensure!(
                r.outcome == Outcome::Success
                    && r.stage("build_script")
                        .is_some_and(|s| s.stdout.contains("after-42")),
                "job {id} after the adoption:\n{}",
                r.describe()
            );
            used.extend(machines_used(&r));
        }
        ensure!(
            !used.is_empty() && used.is_disjoint(&old),
            "new jobs ran on {used:?}; adopted machines were {old:?}"
        );

        // Both drained, neither reaped as an orphan; nothing adopted or leased is left.
        sb.wait_reconciles(3).await?;
        let m = prom::parse(&sb.metrics().await?)?;
        let reasons = m.by_label("flotilla_terminations_total", "reason");
        ensure!(
            m.get("flotilla_terminations_total", &[("reason", "drained")]) == Some(2.0)
                && m.get("flotilla_orphans_reaped_total", &[]).unwrap_or(0.0) == 0.0,
            "terminations by reason: {reasons:?}, orphans reaped {:?}",
            m.get("flotilla_orphans_reaped_total", &[])
        );
        let s = status(&sb).await?;
        let left: Vec<_> = s
            .machines
            .iter()
            .filter(|m| old.contains(&m.instance_id) || m.state == MachineState::Leased)
            .collect();
        ensure!(left.is_empty(), "still held after the drain: {left:#?}");
        let orphan_lines: Vec<_> = adopting_log(&sb, log_from)
            .lines()
            .filter(|l| l.contains("terminating orphaned instances"))
            .map(str::to_owned)
            .collect();
        ensure!(
            orphan_lines.is_empty(),
            "the adopting daemon reaped orphans: {orphan_lines:?}"
        );
        eprintln!(
            "adopt: both adopted machines drained (terminations {reasons:?}); new jobs ran on {used:?}"
        );
        sb.shutdown().await
    })
    .await
}

/// What the daemon logged from byte `from` of its log on (the `--adopt` daemon's part).
fn adopting_log(sb: &Sandbox, from: usize) -> String {
    let log = std::fs::read(sb.daemon_log()).unwrap_or_default();
    String::from_utf8_lossy(log.get(from..).unwrap_or_default()).into_owned()
}
