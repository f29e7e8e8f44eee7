//! Several jobs per machine (`jobs_per_machine`, docker-autoscaler's
//! `capacity_per_instance`): two jobs prepared at once share the fleet's one machine, each
//! container limited to half its CPUs and memory; one job's cleanup leaves the other's
//! containers alone, and the other runs on to its end. `flotilla_job_slots` counts them.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use flotilla_sandbox::runner::StageDriver;
use flotilla_sandbox::sandbox::CLASS;
use flotilla_sandbox::{docker_on, prom, Job, Sandbox, SandboxOptions};

use crate::common::bounded;
use crate::compat::{all_output, the_machine};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_share_one_machine_each_limited_to_half_of_it() -> Result<()> {
    bounded(Duration::from_secs(420), async {
        let sb = Sandbox::start(SandboxOptions {
            max_machines: 1,
            jobs_per_machine: 2,
            metrics: true,
            prefetch_images: Some(0),
            ..Default::default()
        })
        .await?;
        let opts = sb.runner_options();
        let script = [
            "echo memory=$(cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes)",
        ];
        let (a, b) = tokio::join!(
            StageDriver::prepare(opts.clone(), Job::new(1101, &script)),
            StageDriver::prepare(opts.clone(), Job::new(1102, &script)),
        );
        let (mut a, mut b) = (a?, b?);
        // max_machines = 1: both jobs hold a slot of the one machine.
        let m = the_machine(&sb).await?;
        let status = sb.status().await?;
        ensure!(
            status.contains("(+1 more)"),
            "status shows two jobs on the machine:\n{status}"
        );
        ensure_slots(&sb, 2, 0).await?;

        let info = docker_on(&m, &["info", "--format", "{{.NCPU}} {{.MemTotal}}"]).await?;
        let (ncpu, mem) = info
            .trim()
            .split_once(' ')
            .and_then(|(c, m)| Some((c.parse::<i64>().ok()?, m.parse::<i64>().ok()?)))
            .with_context(|| format!("docker info: {info}"))?;
        let (half_cpu, half_mem) = (ncpu * 1_000_000_000 / 2, mem / 2);
        for d in [&a, &b] {
            let names = docker_on(
                &m,
                &[
                    "ps",
                    "--filter",
                    &format!("label=flotilla.job={}", d.job_key()),
                    "--format",
                    "{{.Names}}",
                ],
            )
            .await?;
            let names: Vec<&str> = names.lines().filter(|l| !l.is_empty()).collect();
            ensure!(names.len() == 2, "a build and a helper container: {names:?}");
            for name in names {
                let limits = docker_on(
                    &m,
                    &["inspect", "-f", "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}", name],
                )
                .await?;
                ensure!(
                    limits.trim() == format!("{half_cpu} {half_mem}"),
                    "{name}: half of {ncpu} CPUs and {mem} bytes, got {limits}"
                );
            }
        }

        // Job a runs and ends; b's containers are untouched by its cleanup.
        for stage in ["prepare_script", "get_sources"] {
            a.stage_ok(stage).await?;
        }
        let out = all_output(&a.stage_ok("build_script").await?);
        ensure!(
            out.contains(&format!("memory={half_mem}")),
            "the job's cgroup has half the memory:\n{out}"
        );
        a.cleanup().await?;
        let running = docker_on(&m, &["inspect", "-f", "{{.State.Running}}", &b.build_container()])
            .await?;
        ensure!(running.trim() == "true", "b's build container runs on: {running}");
        for stage in ["prepare_script", "get_sources", "build_script"] {
            b.stage_ok(stage).await?;
        }
        b.cleanup().await?;
        let left = docker_on(&m, &["ps", "-a", "--filter", "label=flotilla.job", "-q"]).await?;
        ensure!(left.trim().is_empty(), "both jobs' containers are gone: {left}");
        let status = sb.status().await?;
        ensure!(
            status.lines().any(|l| l.contains(&m.instance_id) && l.contains("idle")),
            "the machine is idle after its last job:\n{status}"
        );
        ensure_slots(&sb, 0, 2).await?;
        sb.shutdown().await
    })
    .await
}

/// `flotilla_job_slots` of the class says `busy` and `free` slots.
async fn ensure_slots(sb: &Sandbox, busy: u32, free: u32) -> Result<()> {
    let text = sb.metrics().await?;
    let m = prom::parse(&text).context("/metrics")?;
    let slots = |state| m.get("flotilla_job_slots", &[("class", CLASS), ("state", state)]);
    ensure!(
        (slots("busy"), slots("free")) == (Some(f64::from(busy)), Some(f64::from(free))),
        "flotilla_job_slots: {busy} busy and {free} free expected:\n{text}"
    );
    Ok(())
}
