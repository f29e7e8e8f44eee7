//! What `flotilla simulate` prints: the `{"policies": [...]}` JSON ([`Report`]), the table
//! of policy summaries ([`print_table`]), the `outln!` macro that writes lines into the
//! output buffer, and [`emit`], which writes that buffer to stdout.

use super::engine::Summary;

/// The `--json` output.
#[derive(serde::Serialize)]
pub(super) struct Report<'a> {
    pub policies: &'a [Summary],
}

/// `writeln!` into the output buffer (formatting into a String cannot fail).
macro_rules! outln {
    ($buf:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($buf, $($arg)*);
    }};
}
pub(crate) use outln;

/// Writes the report to stdout; a closed pipe (`| head`) is not an error.
pub(super) fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// One line per policy: waits, idle and busy machine-hours, launches and cost.
pub(super) fn print_table(out: &mut String, rows: &[Summary]) {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(6).max(6);
    outln!(
        out,
        "{:<width$}  {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>8} {:>6} {:>10}",
        "policy",
        "p50 wait",
        "p95 wait",
        "max wait",
        "idle m-h",
        "busy m-h",
        "stopped m-h",
        "launches",
        "starts",
        "cost"
    );
    for r in rows {
        outln!(
            out,
            "{:<width$}  {:>8.1}s {:>8.1}s {:>8.1}s {:>10.1} {:>10.1} {:>10.1} {:>8} {:>6} {:>10}",
            r.name,
            r.p50_wait_s,
            r.p95_wait_s,
            r.max_wait_s,
            r.idle_machine_hours,
            r.busy_machine_hours,
            r.stopped_machine_hours,
            r.launches,
            r.starts,
            format!("${:.2}", r.cost),
        );
    }
    // Only with shared machines, so one-job-per-machine tables stay as they were.
    for r in rows {
        if let Some(idle) = r.idle_slot_hours {
            outln!(
                out,
                "{:<width$}  {idle:.1} idle slot-hours (job slots paid for, running no job)",
                r.name
            );
        }
    }
}
