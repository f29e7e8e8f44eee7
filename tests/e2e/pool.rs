//! The warm pool as moto sees it: reuse, max_builds and idle scale-down.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use flotilla_sandbox::{Job, Outcome, Sandbox, SandboxOptions};

use crate::common::{bounded, run_job_tracking_machine};

/// Runs a successful job (its containers live for 2 s at least); returns its machine.
async fn successful_job(sb: &Sandbox, id: u64) -> Result<String> {
    let job = Job::new(id, &["echo job-$CI_JOB_ID", "sleep 2"]);
    let (r, machine) = run_job_tracking_machine(sb, sb.runner_options(), job).await?;
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
    machine.with_context(|| {
        format!(
            "never saw job {id}'s containers on a machine\n{}",
            sb.diagnostics()
        )
    })
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
        let idle_time = Duration::from_secs(6);
        let sb = Sandbox::start(SandboxOptions {
            idle_time,
            ..Default::default()
        })
        .await?;
        let id = successful_job(&sb, 221).await?;
        let released = Instant::now();
        let now = sb.instances().await?;
        ensure!(
            now.iter().any(|i| i.instance_id == id && i.is_running()),
            "the job's machine {id} should idle right after the job: {now:#?}"
        );
        sb.wait_instances(
            "the idle machine to be terminated",
            idle_time + Duration::from_secs(60),
            |l| l.iter().all(|i| i.instance_id != id || i.is_terminated()),
        )
        .await
        .with_context(|| sb.diagnostics())?;
        let after = released.elapsed();
        ensure!(
            after + Duration::from_secs(1) >= idle_time,
            "terminated {after:?} after the job, before idle_time {idle_time:?}"
        );
        // The emulator stops the terminated machine's dockerd.
        let start = Instant::now();
        while !sb.machines().is_empty() && start.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(crate::common::POLL).await;
        }
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
        let grace = Duration::from_secs(5);
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
        let launched = Instant::now();
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
        ensure!(
            launched.elapsed() + Duration::from_secs(1) >= grace,
            "the orphan was terminated after {:?}, before orphan_grace {grace:?}",
            launched.elapsed()
        );
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
