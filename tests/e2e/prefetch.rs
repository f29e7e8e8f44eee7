//! Images already there: a warm machine launched after the class's jobs used an image
//! pulls it (and the helper) while idle, so the first job on it finds them present. The
//! same test measures the prepare of a first job on a fresh machine without that (the
//! machine launched before anything was learned) and with it.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use flotilla_sandbox::util::wait_until;
use flotilla_sandbox::{docker_on, Job, JobResult, Outcome, Sandbox, SandboxOptions};

use crate::common::bounded;

/// The instance a job ran on, from prepare's "Running on build machine m (i-..., ...)".
fn instance_of(r: &JobResult) -> Option<String> {
    let out = &r.stage("prepare")?.stdout;
    let line = out
        .lines()
        .find(|l| l.contains("Running on build machine"))?;
    let inside = line.split_once('(')?.1;
    Some(inside.split(',').next()?.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_machine_pulls_the_images_the_class_uses_before_its_first_job() -> Result<()> {
    bounded(Duration::from_secs(420), async {
        let sb = Sandbox::start(SandboxOptions {
            idle_count: 1,
            max_builds: 1,
            metrics: true,
            ..Default::default()
        })
        .await?;
        let ctx = || sb.diagnostics();
        // A realistic job image: the docker CLI (tens of MB) on busybox.
        let image = sb.push_dind_images().await?.docker_cli;
        let job = |id: u64| Job::new(id, &["docker --version"]).with_image(&image);

        // Job 1 teaches the daemon what the class runs; the machine launched meanwhile
        // (to keep one idle) knew nothing yet.
        let r1 = sb.run_job(job(801)).await?;
        ensure!(r1.outcome == Outcome::Success, "{}\n{}", r1.describe(), ctx());
        let a = instance_of(&r1).context("job 1's machine")?;

        // Job 2: the first job of a fresh machine without prefetch.
        let r2 = sb.run_job(job(802)).await?;
        ensure!(r2.outcome == Outcome::Success, "{}\n{}", r2.describe(), ctx());
        let b = instance_of(&r2).context("job 2's machine")?;
        ensure!(a != b, "max_builds = 1: job 2 got a fresh machine");

        // The machine launched while job 2 ran prefetches job 1's images: the job image
        // and the helper.
        wait_until(
            "the new machine to prefetch two images",
            Duration::from_secs(240),
            Duration::from_millis(200),
            || async {
                let text = sb.metrics().await?;
                Ok(text
                    .contains(r#"flotilla_prefetch_pulls_total{result="pulled"} 2"#)
                    .then_some(()))
            },
        )
        .await
        .with_context(ctx)?;
        let c = sb
            .machines()
            .into_iter()
            .find(|m| m.instance_id != a && m.instance_id != b)
            .context("the third machine")?;
        let present = docker_on(&c, &["image", "inspect", "--format", "{{.Id}}", &image]).await;
        ensure!(present.is_ok(), "the image is on the machine before its first job");

        // Job 3: the first job of that machine, its images already there.
        let r3 = sb.run_job(job(803)).await?;
        ensure!(r3.outcome == Outcome::Success, "{}\n{}", r3.describe(), ctx());
        ensure!(
            instance_of(&r3).as_deref() == Some(c.instance_id.as_str()),
            "job 3 ran on the prefetched machine"
        );
        let prepare = |r: &JobResult| r.stage("prepare").map(|s| s.duration).unwrap_or_default();
        println!(
            "measured: prepare of a fresh machine's first job, {image}: without prefetch {:?}, with prefetch {:?}",
            prepare(&r2),
            prepare(&r3)
        );
        sb.shutdown().await
    })
    .await
}
