//! Issue 11, item 10: a daemon restart (SIGKILL, then back on its socket) fails no job and
//! leaks no lease: stages wait for the daemon to come back instead of failing, and
//! cleanup's release is retried until it is taken.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use flotilla::control::ControlClient;
use flotilla_proto::api::MachineState;
use flotilla_sandbox::{Job, Outcome, Sandbox, SandboxOptions};
use nix::sys::signal::Signal;

use crate::common::bounded;

const JOBS: u64 = 12;
const AT_ONCE: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_and_restarted_mid_pipeline_fails_no_job_and_leaks_no_lease() -> Result<()> {
    bounded(Duration::from_secs(420), async {
        let mut sb = Sandbox::start(SandboxOptions {
            max_machines: 3,
            idle_count: 1,
            ..Default::default()
        })
        .await?;
        let opts = sb.runner_options();
        let done = Arc::new(AtomicUsize::new(0));
        let changed = Arc::new(tokio::sync::Notify::new());
        let next = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..AT_ONCE {
            let (opts, done, changed, next) =
                (opts.clone(), done.clone(), changed.clone(), next.clone());
            workers.push(tokio::spawn(async move {
                let mut results = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst) as u64;
                    if i >= JOBS {
                        return anyhow::Ok(results);
                    }
                    let job = Job::new(3000 + i, &["echo started", "sleep 1", "echo done"]);
                    let r = flotilla_sandbox::runner::run_job(opts.clone(), job).await?;
                    results.push(r);
                    done.fetch_add(1, Ordering::SeqCst);
                    changed.notify_waiters();
                }
            }));
        }
        // Kill the daemon after every few finished jobs, while others are mid-flight.
        let mut restarts = 0;
        for after in [2, 5, 8] {
            loop {
                let notified = changed.notified();
                if done.load(Ordering::SeqCst) >= after {
                    break;
                }
                notified.await;
            }
            sb.kill_daemon(Signal::SIGKILL).await?;
            sb.start_daemon().await?;
            restarts += 1;
        }
        let mut results = Vec::new();
        for w in workers {
            results.extend(w.await.context("job worker")??);
        }
        let failed: Vec<String> = results
            .iter()
            .filter(|r| r.outcome != Outcome::Success)
            .map(|r| r.describe())
            .collect();
        ensure!(
            failed.is_empty(),
            "{} of {} jobs failed across {restarts} daemon restarts:\n{}\n{}",
            failed.len(),
            results.len(),
            failed.join("\n"),
            sb.diagnostics()
        );
        ensure!(results.len() == JOBS as usize);
        let status = ControlClient::new(&sb.config.socket_path()).status().await?;
        let leased: Vec<_> = status
            .machines
            .iter()
            .filter(|m| m.state == MachineState::Leased)
            .collect();
        ensure!(leased.is_empty(), "leases left behind: {leased:#?}");
        eprintln!(
            "restart test: {} jobs, {AT_ONCE} at a time, {restarts} SIGKILL restarts: 0 failed, 0 leases left",
            results.len()
        );
        sb.shutdown().await
    })
    .await
}
