//! Issue 11: one job can never touch another. A job that claims another job's `CI_JOB_ID`
//! leaves the victim untouched; a project never sees another project's cache (nor an
//! unprotected ref the protected one's) on a shared machine; a machine on which a stage
//! failed for the machine's sake is not handed to the next job.

use std::time::Duration;

use anyhow::{ensure, Result};
use flotilla_sandbox::runner::StageDriver;
use flotilla_sandbox::{docker_on, Job, Outcome, Sandbox, SandboxOptions};
use serde_json::json;

use crate::common::bounded;
use crate::compat::{all_output, the_machine, LIMIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_claiming_another_jobs_id_leaves_the_victim_untouched() -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions {
            max_machines: 2,
            ..Default::default()
        })
        .await?;
        let victim = Job::new(2001, &["echo victim-ok"]);
        let mut d = StageDriver::prepare(sb.runner_options(), victim).await?;
        d.stage_ok("prepare_script").await?;

        // The attacker sets CI_JOB_ID to the victim's: before, it got the victim's lease
        // (acquire was idempotent per job id) and its cleanup removed the victim's
        // containers and handed the machine back mid-job.
        let attacker = Job::new(2002, &["echo attacker-ran"]).with_variable("CI_JOB_ID", "2001");
        let r = sb.run_job(attacker).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}\n{}", ctx(), d.describe());

        let machines = sb.machines();
        let mut victim_alive = false;
        for m in &machines {
            if let Ok(out) = docker_on(m, &["ps", "--format", "{{.Names}}"]).await {
                victim_alive |= out.lines().any(|l| l == d.build_container());
            }
        }
        ensure!(
            victim_alive,
            "the victim's build container is gone\n{}\n{}",
            ctx(),
            d.describe()
        );
        d.stage_ok("get_sources").await?;
        let out = all_output(&d.stage_ok("build_script").await?);
        ensure!(out.contains("victim-ok"), "{out}\n{}", ctx());
        d.cleanup().await?;
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_never_sees_another_projects_cache_on_a_shared_machine() -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions {
            max_machines: 1,
            ..Default::default()
        })
        .await?;
        // Jobs of projects 1 and 2 (from the payload, as gitlab-runner writes it), and a
        // protected ref of project 1, one after another on the one machine.
        let job = |id: u64, project: u64, protected: bool, script: &[&str]| {
            let mut j = Job::new(id, script).with_variable("CI_PROJECT_ID", "1");
            j.payload.insert(
                "job_info".into(),
                json!({"name": "j", "stage": "test", "project_id": project, "project_name": "p"}),
            );
            j.payload.insert(
                "git_info".into(),
                json!({"repo_url": "https://gitlab.sandbox.invalid/p.git", "ref": "main",
                       "sha": "0000000000000000000000000000000000000000", "depth": 1,
                       "protected": protected}),
            );
            j
        };
        let plant = "echo planted-by-1 > /cache/cache.zip";
        let look = "if [ -e /cache/cache.zip ]; then echo seen=$(cat /cache/cache.zip); else echo seen=none; fi";
        let mut seen = Vec::new();
        for (id, project, protected, script) in [
            (2101, 1, false, vec![plant]),
            (2102, 2, false, vec![look]),
            (2103, 1, true, vec![look]),
            (2104, 1, false, vec![look]),
        ] {
            let r = sb.run_job(job(id, project, protected, &script)).await?;
            let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
            ensure!(r.outcome == Outcome::Success, "{}", ctx());
            let out = r.stage("build_script").map(all_output).unwrap_or_default();
            if let Some(line) = out.lines().find(|l| l.starts_with("seen=")) {
                seen.push((id, line.to_owned()));
            }
        }
        ensure!(
            seen == vec![
                (2102, "seen=none".to_owned()),
                (2103, "seen=none".to_owned()),
                (2104, "seen=planted-by-1".to_owned()),
            ],
            "project 2 and project 1's protected ref must not see project 1's cache; project 1's next job must: {seen:?}\n{}",
            sb.diagnostics()
        );
        ensure!(sb.machines().len() == 1, "one machine served all four jobs");
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_that_failed_a_stage_is_not_handed_to_the_next_job() -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions {
            max_machines: 2,
            ..Default::default()
        })
        .await?;
        let mut d = StageDriver::prepare(sb.runner_options(), Job::new(2201, &["true"])).await?;
        let first = the_machine(&sb).await?;
        // The build container vanishes under the job (as when the machine's Docker
        // misbehaves): the stage is a system failure, and the machine is suspect.
        docker_on(&first, &["rm", "-f", &d.build_container()]).await?;
        let r = d.stage("build_script").await?;
        ensure!(
            r.exit_code == Some(flotilla_sandbox::runner::SYSTEM_FAILURE_EXIT_CODE),
            "{}",
            d.describe()
        );
        d.cleanup().await?;

        let next = sb.run_job(Job::new(2202, &["hostname"])).await?;
        let ctx = || format!("{}\n{}", next.describe(), sb.diagnostics());
        ensure!(next.outcome == Outcome::Success, "{}", ctx());
        let prepare = next.stage("prepare").map(all_output).unwrap_or_default();
        ensure!(
            !prepare.contains(&first.instance_id),
            "the suspect machine {} was leased again\n{}",
            first.instance_id,
            ctx()
        );
        let status = sb.status().await?;
        ensure!(
            !status
                .lines()
                .any(|l| l.contains(&first.instance_id) && l.contains("idle")),
            "the suspect machine went back to idle:\n{status}"
        );
        tokio::time::timeout(Duration::from_secs(60), sb.shutdown()).await?
    })
    .await
}
