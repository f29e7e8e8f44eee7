//! Issue 11: a long-lived machine does not fill up. Past `[job] disk_high_water` cleanup
//! prunes the images no container uses (and unused project caches) and says what it
//! reclaimed; below it nothing is pruned.

use anyhow::{ensure, Result};
use flotilla_sandbox::{
    docker_on, EmulatedMachine, Job, JobResult, Outcome, Sandbox, SandboxOptions,
};

use crate::common::bounded;
use crate::compat::{runner_with_job_config, the_machine, LIMIT};

async fn images(machine: &EmulatedMachine) -> Result<String> {
    docker_on(
        machine,
        &["image", "ls", "--format", "{{.Repository}}:{{.Tag}}"],
    )
    .await
}

fn cleanup_log(r: &JobResult) -> String {
    r.stages
        .iter()
        .rev()
        .find(|s| s.name == "cleanup")
        .map(|s| format!("{}{}", s.stdout, s.stderr))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_high_water_mark_cleanup_prunes_unused_images() -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions {
            max_machines: 1,
            ..Default::default()
        })
        .await?;
        let kept = sb.push_image("team/kept", "kept")?;
        let pruned = sb.push_image("team/pruned", "pruned")?;

        // The default mark (85%): the emulated machine's disk is below it.
        let r = sb
            .run_job(Job::new(3101, &["echo kept"]).with_image(&kept))
            .await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        ensure!(r.cleanup_exit == Some(0), "{}", ctx());
        let machine = the_machine(&sb).await?;
        let listed = images(&machine).await?;
        ensure!(
            listed.contains("team/kept"),
            "pruned below the high-water mark: {listed}\n{}",
            ctx()
        );
        ensure!(!cleanup_log(&r).contains("pruned"), "{}", ctx());

        // A mark of 1%: any disk is past it.
        let opts = runner_with_job_config(&sb, "disk", |job| job.disk_high_water = 1)?;
        let job = Job::new(3102, &["echo pruned"]).with_image(&pruned);
        let r = flotilla_sandbox::runner::run_job(opts, job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        ensure!(r.cleanup_exit == Some(0), "{}", ctx());
        let log = cleanup_log(&r);
        eprintln!("cleanup past the mark: {log}");
        ensure!(
            log.contains("pruned") && log.contains("image tags ("),
            "cleanup does not say what it reclaimed: {log:?}\n{}",
            ctx()
        );
        let listed = images(&machine).await?;
        ensure!(
            !listed.contains("team/pruned") && !listed.contains("team/kept"),
            "unused images left past the high-water mark: {listed}\n{}",
            ctx()
        );
        sb.shutdown().await
    })
    .await
}
