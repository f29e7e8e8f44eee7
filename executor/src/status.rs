//! `flotilla status`: the pool as a table for humans, or the daemon's JSON.

use std::fmt::Write;

use chrono::Utc;
use flotilla_proto::api::StatusResponse;

pub fn render_table(s: &StatusResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "fleet {}{}: {} machines, waiting {}",
        s.fleet,
        if s.draining { " (draining)" } else { "" },
        s.machines.len(),
        if s.waiting.is_empty() {
            "none".to_string()
        } else {
            s.waiting
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        }
    );
    if !s.classes.is_empty() {
        let _ = writeln!(
            out,
            "{:<10} {:>4} {:>6} {:>4} {:>7} {:>8} {:>9} {:>7}  WAITING FOR",
            "CLASS", "IDLE", "LEASED", "JOBS", "BOOTING", "STOPPED", "LIVE/MAX", "WAITING"
        );
        for (name, c) in &s.classes {
            let _ = writeln!(
                out,
                "{:<10} {:>4} {:>6} {:>4} {:>7} {:>8} {:>9} {:>7}  {}",
                name,
                c.idle,
                c.leased,
                c.jobs,
                c.booting + c.starting,
                c.stopped,
                format!("{}/{}", c.live, c.max_machines),
                c.waiting,
                c.waiting_for.as_deref().unwrap_or("-")
            );
            if let (None, Some(e)) = (&c.waiting_for, &c.last_launch_error) {
                let _ = writeln!(out, "{:<10} last launch failed: {e}", "");
            }
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "{:<16} {:<20} {:<10} {:<12} {:<11} {:<16} {:>6} {:>8}  JOB",
        "MACHINE", "INSTANCE", "CLASS", "TYPE", "STATE", "ADDRESS", "BUILDS", "AGE"
    );
    let now = Utc::now();
    for m in &s.machines {
        let age = (now - m.launched_at).num_seconds().max(0);
        let _ = writeln!(
            out,
            "{:<16} {:<20} {:<10} {:<12} {:<11} {:<16} {:>6} {:>7}s  {}",
            m.machine_id,
            m.instance_id,
            m.class,
            m.instance_type,
            m.state.as_str(),
            m.address,
            m.builds,
            age,
            job_column(m)
        );
    }
    out
}

/// The job on the machine, and how many more share it (`jobs_per_machine`).
fn job_column(m: &flotilla_proto::api::MachineStatus) -> String {
    match (&m.job_key, m.jobs) {
        (None, _) => "-".to_string(),
        (Some(k), 0 | 1) => k.clone(),
        (Some(k), n) => format!("{k} (+{} more)", n - 1),
    }
}
