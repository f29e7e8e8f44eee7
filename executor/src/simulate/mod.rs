//! `flotilla simulate`: replays a job trace through Flotilla's own scaling decision
//! ([`crate::plan::plan`], the function the daemon runs) and through faithful models of
//! docker+machine and docker-autoscaler/taskscaler, on a simulated clock and simulated EC2,
//! and reports what each one costs in idle machines and in jobs waiting for a machine.
//!
//! This module only declares the others and holds [`run`], the single run (the three
//! policies side by side); `--sweep` hands over to `sweep`. Module map, each depending only
//! on those after it: `sweep` (knob grids and Pareto fronts), `setup` (arguments, config,
//! trace and simulated EC2 read once), `runs` (each policy over a trace, the config's knobs
//! translated for the baselines), `report` (table, JSON, stdout), `plot` (hand-written
//! SVG, sparklines), `daemon_policy` (the daemon's pool + plan), `docker_machine` and
//! `taskscaler` (baselines), `engine` (clock, events, simulated EC2, metrics), `trace`
//! (CSV readers), `periods`, `rng`.

mod daemon_policy;
mod docker_machine;
mod engine;
mod periods;
mod plot;
mod report;
mod rng;
mod runs;
mod setup;
mod sweep;
mod taskscaler;
mod trace;

use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use self::engine::{Outcome, Summary};
use self::report::{emit, outln, print_table, Report};
use self::runs::{
    check, docker_machine_from, run_docker_machine, run_flotilla, run_taskscaler, taskscaler_from,
};
use self::setup::Setup;

pub use self::setup::Args;

/// Entry point of `flotilla simulate`.
pub fn run(config_path: Option<&Path>, args: &Args) -> anyhow::Result<()> {
    let setup = Setup::load(config_path, args)?;
    if args.sweep {
        return sweep::run(&setup, args);
    }
    let started = Instant::now();
    let outcomes = vec![
        run_flotilla("flotilla", &setup.config, &setup.trace, &setup.env),
        run_docker_machine(
            "docker+machine",
            docker_machine_from(&setup.config),
            &setup.trace,
            &setup.env,
        ),
        run_taskscaler(
            "taskscaler",
            taskscaler_from(&setup.config),
            &setup.trace,
            &setup.env,
        ),
    ];
    let elapsed = started.elapsed().as_secs_f64();
    check(&outcomes)?;
    let rows: Vec<Summary> = outcomes.iter().map(Outcome::summary).collect();
    if let Some(path) = &args.plot {
        plot::write(path, &outcomes)
            .with_context(|| format!("cannot write the plot to {}", path.display()))?;
    }
    if args.json {
        let json = serde_json::to_string_pretty(&Report { policies: &rows })?;
        return emit(&(json + "\n"));
    }
    let jobs = setup.trace.jobs.len();
    let mut out = String::new();
    outln!(
        out,
        "{} jobs over {:.1} h ({:.1} job-hours), launch {}, start {}, seed {}, reconcile every {} ms",
        jobs,
        setup.trace.span_hours(),
        setup.trace.job_hours(),
        setup.env.launch,
        setup.env.start,
        setup.env.seed,
        setup.env.tick_ms
    );
    print_table(&mut out, &rows);
    if let Some(o) = outcomes.first() {
        outln!(out, "{:<16} {}", "demand", plot::demand_sparkline(o, 72));
    }
    for o in &outcomes {
        outln!(out, "{:<16} {}", o.name, plot::sparkline(o, 72));
        if o.reclaims > 0 {
            outln!(out, "{:<16} {} spot reclaims", "", o.reclaims);
        }
    }
    outln!(
        out,
        "replayed {} policies x {jobs} jobs in {elapsed:.2} s ({:.0} jobs/s)",
        outcomes.len(),
        (outcomes.len() * jobs) as f64 / elapsed.max(1e-9)
    );
    if let Some(path) = &args.plot {
        outln!(out, "plot: {}", path.display());
    }
    emit(&out)
}
