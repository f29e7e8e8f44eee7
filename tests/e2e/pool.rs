//! The warm pool as moto sees it: reuse, max_builds and idle scale-down.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use flotilla::control::ControlClient;
use flotilla_proto::api::MachineState;
use flotilla_sandbox::util::wait_until;
use flotilla_sandbox::{Job, Outcome, Sandbox, SandboxOptions};

use crate::common::{bounded, machines_used, POLL};

/// Runs a successful job; returns the instance it ran on (as its prepare stage says).
async fn successful_job(sb: &Sandbox, id: u64) -> Result<String> {
    let job = Job::new(id, &["echo job-$CI_JOB_ID"]);
    let r = sb.run_job(job).await?;
    ensure!(
        r.outcome == Outcome::Success,
        "job {id}:\n{}\n{}",
        r.describe(),
        sb.diagnostics()
    );
    ensure!(
        r.cleanup_exit == Some(0),
        "job {id} cleanup:\n{}",
        r.describe()
    );
    let used = machines_used(&r);
    ensure!(
        used.len() == 1,
        "job {id} should name the one machine it ran on, it names {used:?}:\n{}",
        r.describe()
    );
    used.into_iter()
        .next()
        .context("no machine named by the job")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_in_a_row_reuse_one_machine() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let first = successful_job(&sb, 201).await?;
        let second = successful_job(&sb, 202).await?;
        ensure!(
            first == second,
            "job 201 ran on {first}, job 202 on {second}"
        );
        let all = sb.instances().await?;
        ensure!(
            all.len() == 1,
            "expected exactly one instance launched, moto has {all:#?}\n{}",
            sb.diagnostics()
        );
        ensure!(all[0].is_running(), "the machine is {}", all[0].state);
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_builds_1_gives_each_job_a_fresh_machine_and_terminates_the_used_one() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions {
            max_builds: 1,
            ..Default::default()
        })
        .await?;
        let first_id = successful_job(&sb, 211).await?;
        let second_id = successful_job(&sb, 212).await?;
        ensure!(first_id != second_id, "both jobs ran on {first_id}");
        let all = sb
            .wait_instances(
                "the first machine to be terminated",
                Duration::from_secs(60),
                |l| {
                    l.iter()
                        .any(|i| i.instance_id == first_id && i.is_terminated())
                },
            )
            .await
            .with_context(|| sb.diagnostics())?;
        ensure!(
            all.len() == 2,
            "expected two instances launched (one per job), moto has {all:#?}\n{}",
            sb.diagnostics()
        );
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_machine_is_terminated_after_idle_time() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        // Long against a reconcile pass (1 s), so the passes right after the release are
        // well inside it. (The exact threshold is `plan`'s unit test, on a fake clock.)
        let idle_time = Duration::from_secs(10);
        let sb = Sandbox::start(SandboxOptions {
            idle_time,
            ..Default::default()
        })
        .await?;
        let id = successful_job(&sb, 221).await?;
        // Not scaled down at once: the reconcile passes after the release keep it, idle.
        sb.wait_reconciles(2).await?;
        let now = sb.instances().await?;
        ensure!(
            now.iter().any(|i| i.instance_id == id && i.is_running()),
            "the job's machine {id} was not kept idle after the job: {now:#?}\n{}",
            sb.diagnostics()
        );
        let status = ControlClient::new(&sb.config.socket_path())
            .status()
            .await?;
        ensure!(
            status
                .machines
                .iter()
                .any(|m| m.instance_id == id && m.state == MachineState::Idle),
            "the job's machine {id} is not idle: {:#?}",
            status.machines
        );
        sb.wait_instances(
            "the idle machine to be terminated",
            idle_time + Duration::from_secs(60),
            |l| l.iter().all(|i| i.instance_id != id || i.is_terminated()),
        )
        .await
        .with_context(|| sb.diagnostics())?;
        // The emulator stops the terminated machine's dockerd.
        sb.emulator()
            .wait_stopped(&id, Duration::from_secs(60))
            .await
            .with_context(|| sb.diagnostics())?;
        ensure!(
            sb.machines().is_empty(),
            "still emulated: {:?}",
            sb.machines()
        );
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_with_the_fleet_tag_is_reaped_and_instances_of_other_fleets_are_never_touched(
) -> Result<()> {
    use flotilla_proto::tags;
    use flotilla_sandbox::moto::{instance_state, launch_instance};
    bounded(Duration::from_secs(300), async {
        // Long against a reconcile pass (1 s): the passes right after the daemon first sees
        // the orphan are well inside it.
        let grace = Duration::from_secs(8);
        let sb = Sandbox::start(SandboxOptions {
            orphan_grace: grace,
            ..Default::default()
        })
        .await?;
        let ec2 = sb.ec2();
        let orphan = launch_instance(
            ec2,
            &sb.network,
            &[(tags::FLEET, &sb.fleet), (tags::MACHINE, "m-orphan")],
            None,
        )
        .await?;
        let other = launch_instance(
            ec2,
            &sb.network,
            &[
                (tags::FLEET, "someone-elses-fleet"),
                (tags::MACHINE, "m-other"),
            ],
            None,
        )
        .await?;
        let untagged = launch_instance(ec2, &sb.network, &[("Name", "not-flotilla")], None).await?;
        // The daemon sees it (audit names it, with when it will be reaped) and does not
        // reap it on sight: the next reconcile passes leave it running.
        let control = ControlClient::new(&sb.config.socket_path());
        wait_until(
            "the daemon to list the orphan",
            Duration::from_secs(60),
            POLL,
            || async {
                let audit = control.audit(false).await?;
                Ok(audit
                    .entries
                    .iter()
                    .any(|e| e.instance_id == orphan && e.reap_at.is_some())
                    .then_some(()))
            },
        )
        .await
        .with_context(|| sb.diagnostics())?;
        sb.wait_reconciles(2).await?;
        let state = instance_state(ec2, &orphan).await?;
        ensure!(
            state == "running",
            "the orphan was reaped on sight, before orphan_grace {grace:?}: {state}\n{}",
            sb.diagnostics()
        );
        sb.wait_instances(
            "the orphan to be terminated",
            grace + Duration::from_secs(60),
            |l| {
                l.iter()
                    .any(|i| i.instance_id == orphan && i.is_terminated())
            },
        )
        .await
        .with_context(|| sb.diagnostics())?;
        // A few more reconcile rounds: the others must still be running.
        sb.wait_reconciles(3).await?;
        for id in [&other, &untagged] {
            let state = instance_state(ec2, id).await?;
            ensure!(
                state == "running",
                "{id} (not of this fleet) is {state}\n{}",
                sb.diagnostics()
            );
        }
        sb.shutdown().await?;
        // Teardown terminates only the sandbox fleet; the others are left as they are.
        Ok(())
    })
    .await
}
