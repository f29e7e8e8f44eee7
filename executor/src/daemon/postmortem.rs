//! Reports on machines the daemon marks broken or lost: the instance's console output
//! (`GetConsoleOutput`) and the last dockerd events, saved where `[logs]` says (a
//! CloudWatch Logs stream `machines/<machine-id>`, or `<state_dir>/machines/<id>.log`),
//! so an operator can see why a job's machine died after the job log is gone.
//!
//! Off the critical path: the pool keeps casualties (`Pool::casualties_to_report`),
//! [`Postmortems::submit`] spawns one task each (at most [`CONCURRENT`] at work), and
//! every call in it is bounded. A report that cannot be made is logged, never retried:
//! it must not hold up leasing, reconcile passes or shutdown. A finished report (saved or
//! given up) is handed back ([`Postmortems::take_finished`]) and only then leaves the
//! pool, so one under way when the daemon dies is made after its restart (at least once).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use flotilla_proto::config::Config;
use flotilla_proto::logs::{MachineLog, MACHINES_DIR};
use tokio::sync::{OnceCell, Semaphore};

use super::machine_api::MachineApi;
use crate::cwlogs::LogsClient;
use crate::ec2::Ec2Api;
use crate::pool::Casualty;

/// Reports made at once.
const CONCURRENT: usize = 4;
/// How far back a report reads dockerd's events.
const EVENTS_WINDOW: chrono::Duration = chrono::Duration::minutes(15);
/// Bound on one console output request (the EC2 client has its own, longer, bound).
const CONSOLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// Largest report file kept in the state directory.
pub(crate) const MAX_FILE_BYTES: usize = 256 * 1024;
/// Report files kept in the state directory (the oldest go first).
pub(crate) const MAX_FILES: usize = 200;

pub(crate) struct Postmortems {
    config: Config,
    ec2: Arc<dyn Ec2Api>,
    machines: Arc<dyn MachineApi>,
    permits: Arc<Semaphore>,
    logs: OnceCell<LogsClient>,
    /// Machines whose report is finished, for the pool to forget.
    finished: std::sync::Mutex<Vec<String>>,
}

impl Postmortems {
    pub(crate) fn new(
        config: &Config,
        ec2: Arc<dyn Ec2Api>,
        machines: Arc<dyn MachineApi>,
    ) -> Self {
        Self {
            config: config.clone(),
            ec2,
            machines,
            permits: Arc::new(Semaphore::new(CONCURRENT)),
            logs: OnceCell::new(),
            finished: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Machines whose report finished since the last call.
    pub(crate) fn take_finished(&self) -> Vec<String> {
        std::mem::take(&mut *self.finished.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn finish(&self, machine_id: &str) {
        self.finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(machine_id.to_owned());
    }

    /// Starts one report per casualty and returns at once (outside a runtime there is
    /// nothing to report with: they are finished unreported). Each report names the time
    /// of the casualty (`at`, else `now`).
    pub(crate) fn submit(self: &Arc<Self>, casualties: Vec<Casualty>, now: DateTime<Utc>) {
        if casualties.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            for c in &casualties {
                self.finish(&c.machine_id);
            }
            return;
        };
        for c in casualties {
            let this = Arc::clone(self);
            rt.spawn(async move {
                let Ok(_permit) = this.permits.clone().acquire_owned().await else {
                    return;
                };
                this.report(&c, c.at.unwrap_or(now)).await;
                this.finish(&c.machine_id);
            });
        }
    }

    /// Gathers and saves one machine's report.
    async fn report(&self, c: &Casualty, now: DateTime<Utc>) {
        let (console, events) = tokio::join!(self.console(c), self.events(c, now));
        let header = format!(
            "flotilla {}: build machine {} (instance {}, address {}) marked broken or lost at {}: {}",
            self.config.fleet,
            c.machine_id,
            or_none(&c.instance_id),
            or_none(&c.address),
            now.to_rfc3339(),
            c.why
        );
        let sections = [
            format!("{header}\n== console output (GetConsoleOutput) ==\n{console}"),
            format!(
                "== dockerd events from {} to {} ==\n{events}",
                (now - EVENTS_WINDOW).to_rfc3339(),
                now.to_rfc3339()
            ),
        ];
        let place = self
            .config
            .logs
            .machine_log(&self.config.state_dir, &c.machine_id);
        let saved = match &place {
            MachineLog::Stream { group, stream } => {
                let client = self
                    .logs
                    .get_or_init(|| {
                        LogsClient::new(&self.config.aws, &self.config.logs, group.clone())
                    })
                    .await;
                client
                    .put(stream, now.timestamp_millis(), &sections)
                    .await
                    .map_err(|e| e.to_string())
            }
            MachineLog::File(path) => {
                let path = path.clone();
                let text = sections.join("\n");
                tokio::task::spawn_blocking(move || write_report(&path, &text))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
            }
        };
        match saved {
            Ok(()) => tracing::info!(
                machine = %c.machine_id,
                instance = %c.instance_id,
                location = %place,
                "saved the machine's console output and dockerd events"
            ),
            Err(e) => tracing::warn!(
                machine = %c.machine_id,
                location = %place,
                error = %e,
                "could not save the machine's console output and dockerd events"
            ),
        }
    }

    async fn console(&self, c: &Casualty) -> String {
        if c.instance_id.is_empty() {
            return "(no instance: the launch never answered)".into();
        }
        match tokio::time::timeout(CONSOLE_TIMEOUT, self.ec2.console_output(&c.instance_id)).await {
            Ok(Ok(text)) if text.trim().is_empty() => "(EC2 has no console output yet)".into(),
            Ok(Ok(text)) => text,
            Ok(Err(e)) => format!("(GetConsoleOutput failed: {e})"),
            Err(_) => format!(
                "(GetConsoleOutput did not answer within {}s)",
                CONSOLE_TIMEOUT.as_secs()
            ),
        }
    }

    async fn events(&self, c: &Casualty, now: DateTime<Utc>) -> String {
        if c.address.is_empty() {
            return "(no address: dockerd was never reachable)".into();
        }
        let since = (now - EVENTS_WINDOW).timestamp();
        match self
            .machines
            .events(&c.machine_id, &c.address, since, now.timestamp())
            .await
        {
            Ok(lines) if lines.is_empty() => "(no events in the window)".into(),
            Ok(lines) => lines.join("\n"),
            Err(e) => format!("(dockerd did not answer: {e})"),
        }
    }
}

fn or_none(s: &str) -> &str {
    if s.is_empty() {
        "none"
    } else {
        s
    }
}

/// Writes one report (mode 0600, at most [`MAX_FILE_BYTES`]) and prunes the directory
/// to the newest [`MAX_FILES`].
pub(crate) fn write_report(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = path.parent().unwrap_or(Path::new(MACHINES_DIR));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let text = crate::cwlogs::cut(text, MAX_FILE_BYTES);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    prune(dir, MAX_FILES)
}

/// Removes the oldest `*.log` files of `dir` beyond `keep`.
fn prune(dir: &Path, keep: usize) -> std::io::Result<()> {
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if files.len() <= keep {
        return Ok(());
    }
    files.sort();
    for (_, p) in &files[..files.len() - keep] {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn report_files_are_private_bounded_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MACHINES_DIR).join("m-1.log");
        write_report(&path, &"x".repeat(MAX_FILE_BYTES * 2)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(meta.len() as usize <= MAX_FILE_BYTES);
        let machines = dir.path().join(MACHINES_DIR);
        for i in 0..5 {
            std::fs::write(machines.join(format!("old-{i}.log")), "x").unwrap();
        }
        prune(&machines, 3).unwrap();
        assert_eq!(std::fs::read_dir(&machines).unwrap().count(), 3);
    }
}
