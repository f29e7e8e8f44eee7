//! Jobs through every stage: output, exit codes, cancellation and what a job leaves behind.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use flotilla_sandbox::runner::BUILD_FAILURE_EXIT_CODE;
use flotilla_sandbox::{
    docker_on, Cancel, CancelWhen, EmulatedMachine, Job, Outcome, Sandbox, SandboxOptions,
};

use crate::common::{bounded, wait_for_job_process, JOB_ID_LABEL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passing_job_output_appears_in_build_script_stdout() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let job = Job::new(101, &[r#"echo "hello from $((6*7))""#, "id -u"]);
        let token = job.token.clone();
        let r = sb.run_job(job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        let build = r
            .stage("build_script")
            .with_context(|| format!("build_script did not run\n{}", ctx()))?;
        ensure!(build.stdout.contains("hello from 42\n"), "{}", ctx());
        ensure!(r.cleanup_exit == Some(0), "{}", ctx());
        // The job token is a secret: no stage output and no daemon log line carries it.
        for s in &r.stages {
            ensure!(
                !s.stdout.contains(&token) && !s.stderr.contains(&token),
                "{} leaked the job token",
                s.name
            );
        }
        let log = std::fs::read_to_string(sb.daemon_log()).unwrap_or_default();
        ensure!(
            !log.contains(&token),
            "the daemon log carries the job token"
        );
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predefined_stages_run_in_the_helper_image_and_share_the_builds_volume() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let mut job = Job::new(102, &["cat /etc/flotilla-image", "cat .flotilla-sources"]);
        job.stage_bodies.insert(
            "get_sources".into(),
            vec![
                r#"mkdir -p "$CI_PROJECT_DIR""#.into(),
                r#"cd "$CI_PROJECT_DIR""#.into(),
                r#"echo "sources of job $CI_JOB_ID" > .flotilla-sources"#.into(),
                "echo stage-image=$(cat /etc/flotilla-image)".into(),
            ],
        );
        let r = sb.run_job(job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        let sources = r
            .stage("get_sources")
            .with_context(|| format!("get_sources did not run\n{}", ctx()))?;
        ensure!(
            sources.stdout.contains("stage-image=helper"),
            "get_sources did not run in the helper image\n{}",
            ctx()
        );
        // `helper_image` names `${ARCH}-v${CI_RUNNER_VERSION}`: the machine's architecture
        // (amd64 -> GitLab's x86_64) and the runner's version chose this tag.
        let prepare = r.stage("prepare").context("no prepare")?;
        ensure!(
            prepare
                .stdout
                .contains(&format!("(helper {})", sb.helper_image))
                && sb.helper_image.ends_with(":x86_64-v18.6.0"),
            "prepare did not use {}\n{}",
            sb.helper_image,
            ctx()
        );
        let build = r
            .stage("build_script")
            .with_context(|| format!("build_script did not run\n{}", ctx()))?;
        ensure!(
            build.stdout.contains("job\n"),
            "build_script did not run in the job image\n{}",
            ctx()
        );
        ensure!(
            build.stdout.contains("sources of job 102"),
            "the builds volume is not shared\n{}",
            ctx()
        );
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_exiting_3_is_a_build_failure_with_3_in_the_exit_code_file_and_after_script_runs(
) -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let job = Job::new(
            103,
            &["echo before-failure", "exit 3", "echo never-printed"],
        )
        .with_after_script(&["echo after-script-ran"]);
        let r = sb.run_job(job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        let build = r
            .stage("build_script")
            .with_context(|| format!("build_script did not run\n{}", ctx()))?;
        ensure!(
            build.exit_code == Some(BUILD_FAILURE_EXIT_CODE),
            "build_script exit\n{}",
            ctx()
        );
        ensure!(
            build.build_exit_code == Some(3),
            "BUILD_EXIT_CODE_FILE did not hold 3\n{}",
            ctx()
        );
        ensure!(
            build.stdout.contains("before-failure") && !build.stdout.contains("never-printed\n"),
            "{}",
            ctx()
        );
        let after = r
            .stage("after_script")
            .with_context(|| format!("after_script did not run\n{}", ctx()))?;
        ensure!(
            after.ok() && after.stdout.contains("after-script-ran"),
            "{}",
            ctx()
        );
        ensure!(
            r.outcome
                == Outcome::BuildFailure {
                    stage: "build_script".into(),
                    exit_code: Some(3)
                },
            "{}",
            ctx()
        );
        ensure!(r.cleanup_exit == Some(0), "{}", ctx());
        sb.shutdown().await
    })
    .await
}

/// Docker objects on a machine that carry the job's id label (`flotilla.job_id=<id>`).
async fn job_objects(m: &EmulatedMachine, job_label: &str) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for (kind, args) in [
        (
            "container",
            vec!["ps", "-a", "--format", "{{.ID}} {{.Names}} {{.Labels}}"],
        ),
        (
            "network",
            vec!["network", "ls", "--format", "{{.ID}} {{.Name}} {{.Labels}}"],
        ),
        (
            "volume",
            vec!["volume", "ls", "--format", "{{.Name}} {{.Labels}}"],
        ),
    ] {
        let out = docker_on(m, &args).await?;
        for line in out.lines() {
            if line.contains(job_label) {
                found.push(format!("{kind}: {line}"));
            }
        }
    }
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_script_ends_the_run_stage_by_itself_and_cleanup_leaves_nothing_of_the_job(
) -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let cancel = Arc::new(tokio::sync::Notify::new());
        let mut opts = sb.runner_options();
        opts.graceful_kill_timeout = Duration::from_secs(30);
        opts.cancel = Some(Cancel {
            stage: "build_script".into(),
            when: CancelWhen::Notified(cancel.clone()),
        });
        let job_id = 104;
        let job_label = format!("{JOB_ID_LABEL}={job_id}");
        let job = Job::new(job_id, &["echo started", "while true; do sleep 1; done"])
            .with_after_script(&["echo after-cancel-ran"]);

        // Cancelled once its loop runs on a machine: the job's containers exist then, so
        // their absence afterwards means something.
        let task = tokio::spawn(flotilla_sandbox::runner::run_job(opts, job));
        let (machine, _) = wait_for_job_process(&sb, job_id, "sleep 1", Duration::from_secs(120))
            .await
            .with_context(|| format!("never saw a container labelled {job_label} run the loop"))?;
        cancel.notify_one();
        let r = task.await??;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        let build = r
            .stage("build_script")
            .with_context(|| format!("build_script did not run\n{}", ctx()))?;
        // The stage ends by itself after SIGTERM, before the runner's graceful_kill_timeout
        // would have to kill it.
        ensure!(
            build.cancelled_after.is_some() && !build.killed,
            "the run stage did not end by itself after SIGTERM (cancelled: {:?}, killed: {})\n{}",
            build.cancelled_after,
            build.killed,
            ctx()
        );
        ensure!(
            r.outcome
                == Outcome::Cancelled {
                    stage: "build_script".into()
                },
            "{}",
            ctx()
        );
        let after = r
            .stage("after_script")
            .with_context(|| format!("after_script did not run after the cancel\n{}", ctx()))?;
        ensure!(
            after.ok() && after.stdout.contains("after-cancel-ran"),
            "after_script after cancel\n{}",
            ctx()
        );
        ensure!(r.cleanup_exit == Some(0), "{}", ctx());
        let m = sb
            .emulator()
            .machine(&machine.instance_id)
            .with_context(|| format!("{} is gone\n{}", machine.instance_id, ctx()))?;
        let left = job_objects(&m, &job_label).await?;
        ensure!(
            left.is_empty(),
            "left on the machine after cleanup: {left:#?}\n{}",
            ctx()
        );
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_named_by_the_job_is_pulled_from_the_registry_and_runs_build_script() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let image = sb.push_image("team/custom", "custom")?;
        let job = Job::new(105, &["cat /etc/flotilla-image"]).with_image(&image);
        let r = sb.run_job(job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        let build = r
            .stage("build_script")
            .with_context(|| format!("build_script did not run\n{}", ctx()))?;
        ensure!(
            build.stdout.contains("custom\n"),
            "build_script did not run in {image}\n{}",
            ctx()
        );
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_machine_class_is_a_build_failure_and_launches_nothing() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let mut opts = sb.runner_options();
        opts.prepare_attempts = 3;
        opts.prepare_retry_delay = Duration::from_millis(100);
        let job =
            Job::new(106, &["echo should-not-run"]).with_variable("FLOTILLA_CLASS", "gpu-huge");
        let r = flotilla_sandbox::runner::run_job(opts, job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        let prepare = r
            .stage("prepare")
            .with_context(|| format!("prepare did not run\n{}", ctx()))?;
        ensure!(
            prepare.exit_code == Some(BUILD_FAILURE_EXIT_CODE),
            "prepare should fail the build\n{}",
            ctx()
        );
        ensure!(
            format!("{}{}", prepare.stdout, prepare.stderr).contains("gpu-huge"),
            "prepare's message does not name the class\n{}",
            ctx()
        );
        let prepares = r.stages.iter().filter(|s| s.name == "prepare").count();
        ensure!(
            prepares == 1,
            "a build failure in prepare must not be retried ({prepares} attempts)"
        );
        ensure!(!r.ran("build_script"), "{}", ctx());
        ensure!(r.cleanup_exit == Some(0), "{}", ctx());
        let all = sb.instances().await?;
        ensure!(
            all.is_empty(),
            "instances launched for an unknown class: {all:#?}"
        );
        sb.shutdown().await
    })
    .await
}
