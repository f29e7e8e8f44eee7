//! Where a stage call's time goes: with `FLOTILLA_LOG=warn,flotilla::timing=debug` each
//! phase of a call is logged with its wall-clock time in microseconds, so a caller that
//! noted when it spawned the process sees the process start too (the compat benchmark
//! prints the breakdown). Off, a mark costs one level check.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// The log target the marks go to.
pub const TARGET: &str = "flotilla::timing";

static MAIN_ENTERED: OnceLock<SystemTime> = OnceLock::new();

/// Called first thing in `main`: the process start the first mark reports.
pub fn main_entered() {
    let _ = MAIN_ENTERED.set(SystemTime::now());
}

/// Logs `phase` as reached now (and, the first time, `main` as reached when
/// [`main_entered`] ran: logging starts only after the arguments are parsed).
pub fn mark(phase: &'static str) {
    if !tracing::enabled!(target: TARGET, tracing::Level::DEBUG) {
        return;
    }
    static MAIN_LOGGED: OnceLock<()> = OnceLock::new();
    if let (Some(t), None) = (MAIN_ENTERED.get(), MAIN_LOGGED.get()) {
        let _ = MAIN_LOGGED.set(());
        log("main", *t);
    }
    log(phase, SystemTime::now());
}

fn log(phase: &'static str, at: SystemTime) {
    let unix_us = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    tracing::debug!(target: TARGET, phase, unix_us, "timing");
}
