//! A machine lost under its job: the daemon saves its console output and its last
//! dockerd events (to moto's CloudWatch Logs, or the state directory when `[logs]` is
//! off), and the job's failure message says where.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use flotilla_proto::journal::{self, ShipperConfig};
use flotilla_sandbox::runner::{self, SYSTEM_FAILURE_EXIT_CODE};
use flotilla_sandbox::util::wait_until;
use flotilla_sandbox::{moto, Job, Outcome, Sandbox, SandboxOptions};

use crate::common::{bounded, wait_for_job_process, HELD, HOLD, POLL};

/// What the machine's cloud-init wrote for journal shipping: (program, configuration).
type JournalFiles = Option<(Vec<u8>, ShipperConfig)>;

/// Runs a job that holds its machine, terminates the instance behind the daemon's back,
/// and returns (machine id, the failed stage's stderr, the journal shipper's files as the
/// machine had them).
async fn lose_a_job_machine(sb: &Sandbox, job: u64) -> Result<(String, String, JournalFiles)> {
    let task = tokio::spawn(runner::run_job(
        sb.runner_options(),
        Job::new(job, &["echo started", HOLD]),
    ));
    let (m, _) = wait_for_job_process(sb, job, HELD, Duration::from_secs(90)).await?;
    let journal = match std::fs::read(m.file(journal::SHIPPER_PATH)) {
        Ok(program) => {
            let config = std::fs::read(m.file(journal::CONFIG_PATH))?;
            Some((program, serde_json::from_slice(&config)?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    sb.ec2()
        .terminate_instances()
        .instance_ids(&m.instance_id)
        .send()
        .await
        .context("terminating the job's instance in moto")?;
    let r = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .context("the job did not end after its machine was terminated")???;
    let Outcome::SystemFailure { stage, .. } = &r.outcome else {
        bail!(
            "expected a system failure\n{}\n{}",
            r.describe(),
            sb.diagnostics()
        );
    };
    let failed = r.stage(stage).context("no failed stage")?;
    ensure!(failed.exit_code == Some(SYSTEM_FAILURE_EXIT_CODE));
    let machine = m
        .machine_id
        .clone()
        .context("the machine has no machine tag")?;
    Ok((machine, failed.stderr.clone(), journal))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_machines_console_and_events_go_to_its_log_stream_named_in_the_job() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let group = "/flotilla/sandbox";
        let sb = Sandbox::start(SandboxOptions {
            idle_count: 1,
            max_machines: 1,
            logs_group: Some(group.into()),
            ..Default::default()
        })
        .await?;
        let (machine, stderr, journal) = lose_a_job_machine(&sb, 501).await?;
        // The machine ships its journal to its own streams of the group: the daemon's
        // user data carries the program (gzipped), the emulator decodes it as cloud-init.
        let (program, config) = journal.context("the machine has no journal shipper")?;
        ensure!(
            program == journal::SHIPPER.as_bytes(),
            "the shipper differs"
        );
        ensure!(
            config.group == group && config.stream_prefix == journal::BUILD_MACHINE_STREAMS,
            "{config:?}"
        );
        let stream = format!("machines/{machine}");
        ensure!(
            stderr.contains(&format!("CloudWatch Logs group {group}, stream {stream}")),
            "the failure message does not name the stream:\n{stderr}"
        );
        let events = wait_until(
            "the machine's report in moto",
            Duration::from_secs(60),
            POLL,
            || {
                let (url, stream) = (sb.moto_url().to_owned(), stream.clone());
                // The stream is created before its events are put.
                async move {
                    Ok(moto::log_events(&url, group, &stream)
                        .await?
                        .filter(|e| !e.is_empty()))
                }
            },
        )
        .await
        .with_context(|| sb.diagnostics())?;
        let text = events.join("\n");
        ensure!(
            text.contains("== console output (GetConsoleOutput) ==")
                && text.contains("Linux version"),
            "no console output in the stream:\n{text}"
        );
        ensure!(
            text.contains("== dockerd events from") && text.contains(&machine),
            "no events section in the stream:\n{text}"
        );
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_logs_off_a_lost_machines_report_is_a_private_file_named_in_the_job() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions {
            idle_count: 1,
            max_machines: 1,
            ..Default::default()
        })
        .await?;
        let (machine, stderr, journal) = lose_a_job_machine(&sb, 502).await?;
        ensure!(
            journal.is_none(),
            "no [logs] group, yet the machine ships its journal"
        );
        let path = sb
            .state_dir()
            .join("machines")
            .join(format!("{machine}.log"));
        ensure!(
            stderr.contains(&path.display().to_string()),
            "the failure message does not name {}:\n{stderr}",
            path.display()
        );
        let text = wait_until(
            "the machine's report file",
            Duration::from_secs(60),
            POLL,
            || {
                let path = path.clone();
                async move {
                    Ok(std::fs::read_to_string(&path)
                        .ok()
                        .filter(|t| t.contains("== dockerd events")))
                }
            },
        )
        .await
        .with_context(|| sb.diagnostics())?;
        ensure!(text.contains("Linux version"), "no console output:\n{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "report mode {mode:o}");
        sb.shutdown().await
    })
    .await
}
