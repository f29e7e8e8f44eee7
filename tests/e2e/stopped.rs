//! The stopped warm pool (issue 15, item 1) against moto and real dockerd: an idle machine
//! beyond the hot target is stopped (StopInstances; the emulator stops its dockerd and
//! keeps its disk), and the next job is served by the same instance started again
//! (StartInstances; same data root, same certificate), its image already there: no pull.
//! Reports the end-to-end time of a job on a started machine against a cold launch and a
//! hot idle machine (emulated delays, so a ratio, never asserted).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use flotilla::control::ControlClient;
use flotilla_proto::api::MachineState;
use flotilla_proto::config::PullPolicy;
use flotilla_sandbox::{
    docker_on, EmulatedMachine, Job, JobResult, Outcome, Sandbox, SandboxOptions,
};

use crate::common::{bounded, machines_used};
use crate::compat::runner_with_job_config;

/// The image pulls dockerd has logged since it (re)started: its events live in memory,
/// so after a start they are exactly the pulls of the started machine.
async fn pulls_since_dockerd_start(m: &EmulatedMachine) -> Result<Vec<String>> {
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 1;
    let out = docker_on(
        m,
        &[
            "events",
            "--since",
            "0",
            "--until",
            &until.to_string(),
            "--filter",
            "type=image",
            "--filter",
            "event=pull",
            "--format",
            "{{.Actor.ID}}",
        ],
    )
    .await?;
    Ok(out.lines().map(str::to_owned).collect())
}

fn the_instance(r: &JobResult, sb: &Sandbox) -> Result<String> {
    ensure!(
        r.outcome == Outcome::Success,
        "{}\n{}",
        r.describe(),
        sb.diagnostics()
    );
    let used = machines_used(r);
    ensure!(used.len() == 1, "ran on {used:?}:\n{}", r.describe());
    used.into_iter().next().context("no machine named")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_machine_is_started_for_the_next_job_with_its_image_already_there() -> Result<()>
{
    bounded(Duration::from_secs(420), async {
        // One machine at most: the job after the stop can only be served by starting it.
        // Delays in the ratio of EC2's (launch ~65 s, start ~22 s; the defaults).
        let idle_time = Duration::from_secs(10);
        let sb = Sandbox::start(SandboxOptions {
            max_machines: 1,
            max_stopped: 1,
            idle_time,
            boot_delay: Duration::from_secs(6),
            start_delay: Duration::from_secs(2),
            ec2_proxy: true,
            // No prefetch: the image the started machine has must be the one its own
            // disk kept, and any pull after the start would be the job's.
            prefetch_images: Some(0),
            ..Default::default()
        })
        .await?;
        // if-not-present: a pull only when the image is not on the machine.
        let opts = runner_with_job_config(&sb, "stopped", |job| {
            job.pull_policy = vec![PullPolicy::IfNotPresent];
        })?;
        let run = |id: u64| {
            let opts = opts.clone();
            async move {
                let t = Instant::now();
                let r = flotilla_sandbox::runner::run_job(opts, Job::new(id, &["echo job-$CI_JOB_ID"]))
                    .await?;
                Ok::<_, anyhow::Error>((r, t.elapsed()))
            }
        };

        // A cold launch: the machine boots, the job pulls its image.
        let (r, cold) = run(1501).await?;
        let instance = the_instance(&r, &sb)?;
        let m = sb
            .machines()
            .into_iter()
            .find(|m| m.instance_id == instance)
            .context("the machine is not emulated")?;
        let first_pulls = pulls_since_dockerd_start(&m).await?;
        ensure!(
            !first_pulls.is_empty(),
            "the cold machine's dockerd logged no pull: the no-pull check below would prove nothing"
        );
        let image_before = docker_on(&m, &["image", "inspect", "-f", "{{.Id}}", &sb.job_image])
            .await?
            .trim()
            .to_owned();

        // A hot idle machine: the same one, at once.
        let (r, hot) = run(1502).await?;
        ensure!(the_instance(&r, &sb)? == instance, "{}", r.describe());

        // Past its idle time the machine is stopped, not terminated: the emulator keeps
        // its disk, and the daemon's next passes see it stopped.
        let stop = sb
            .emulator()
            .wait_stopped(&instance, idle_time + Duration::from_secs(90))
            .await
            .with_context(|| sb.diagnostics())?;
        ensure!(stop.kept, "the instance was terminated, not stopped: {stop:?}\n{}", sb.diagnostics());
        let moto_state = sb
            .instances()
            .await?
            .into_iter()
            .find(|i| i.instance_id == instance)
            .map(|i| i.state);
        ensure!(moto_state.as_deref() == Some("stopped"), "moto says {moto_state:?}");
        sb.wait_reconciles(2).await?;
        let status = ControlClient::new(&sb.config.socket_path()).status().await?;
        ensure!(
            status
                .machines
                .iter()
                .any(|s| s.instance_id == instance && s.state == MachineState::Stopped),
            "the daemon does not have {instance} stopped: {:#?}",
            status.machines
        );

        // The next job starts it: same instance, its image already on its disk.
        let (r, started) = run(1503).await?;
        ensure!(
            the_instance(&r, &sb)? == instance,
            "not served by the started machine {instance}:\n{}",
            r.describe()
        );
        let m = sb
            .machines()
            .into_iter()
            .find(|m| m.instance_id == instance)
            .context("the started machine is not emulated")?;
        ensure!(m.starts == 1, "started {} times", m.starts);
        let pulls = pulls_since_dockerd_start(&m).await?;
        ensure!(
            pulls.is_empty(),
            "the started machine pulled {pulls:?}\n{}",
            r.describe()
        );
        let image_after = docker_on(&m, &["image", "inspect", "-f", "{{.Id}}", &sb.job_image])
            .await?
            .trim()
            .to_owned();
        ensure!(image_before == image_after, "{image_before} became {image_after}");

        // EC2 saw one stop and one start, of this fleet's instance only.
        let faults = sb.faults().context("no fault proxy")?;
        let fleet: Vec<String> = sb.instances().await?.into_iter().map(|i| i.instance_id).collect();
        for action in ["StopInstances", "StartInstances"] {
            let calls: Vec<_> = faults
                .calls()
                .into_iter()
                .filter(|c| c.action == action && c.injected.is_none())
                .collect();
            ensure!(!calls.is_empty(), "no {action} call: {:?}", faults.counts());
            for c in &calls {
                let ids: Vec<&String> = c
                    .params
                    .iter()
                    .filter(|(k, _)| k.starts_with("InstanceId."))
                    .map(|(_, v)| v)
                    .collect();
                ensure!(
                    !ids.is_empty() && ids.iter().all(|id| **id == instance && fleet.contains(id)),
                    "{action} named {ids:?}, not only the fleet's {instance}"
                );
            }
        }
        ensure!(
            sb.instances().await?.len() == 1,
            "a second instance was launched: {:#?}",
            sb.instances().await?
        );
        let ratio = |d: Duration| d.as_secs_f64() / cold.as_secs_f64();
        println!(
            "stopped pool, end-to-end job time (emulated boot 6 s, start 2 s): cold launch {cold:.2?} (1.00), \
             started machine {started:.2?} ({:.2}), hot idle machine {hot:.2?} ({:.2})",
            ratio(started),
            ratio(hot)
        );
        sb.shutdown().await
    })
    .await
}
