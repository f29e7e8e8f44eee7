//! `flotilla simulate`: replays a job trace through Flotilla's own scaling decision
//! ([`crate::plan::plan`], the function the daemon runs) and through faithful models of
//! docker+machine and docker-autoscaler/taskscaler, on a simulated clock and simulated EC2,
//! and reports what each one costs in idle machines and in jobs waiting for a machine.
//!
//! Module map: `trace` (CSV readers), `engine` (clock, events, simulated EC2, metrics),
//! `daemon_policy` (the daemon's pool + plan), `docker_machine` and `taskscaler` (baselines),
//! `sweep` (knob grids and Pareto fronts), `plot` (hand-written SVG), `rng`, `periods`.

mod daemon_policy;
mod docker_machine;
mod engine;
mod periods;
mod plot;
mod rng;
mod sweep;
mod taskscaler;
mod trace;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use flotilla_proto::config::{ClassConfig, Config};

use self::engine::{Env, Outcome, Summary};
use self::rng::Dist;

/// Arguments of `flotilla simulate`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Job trace (CSV): the shared CI-builds format (started_at,duration_seconds,...,n_jobs)
    /// or one job per line as `arrival,duration_seconds[,class]`.
    #[arg(long, value_name = "FILE")]
    pub trace: PathBuf,
    /// Print `{"policies": [...]}` as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Walk each baseline's main knobs and report its Pareto front (idle machine-hours vs
    /// p95 wait) next to Flotilla's.
    #[arg(long)]
    pub sweep: bool,
    /// Write an SVG plot of demand, machines and idle machines over time.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Launch-to-ready time: fixed:S, uniform:MIN:MAX, normal:MEAN:SD or
    /// lognormal:MEDIAN:SIGMA (seconds).
    #[arg(long, default_value = "uniform:40:90", value_name = "DIST")]
    pub boot: String,
    /// Seed of the simulated EC2's random draws (boot times, reclaims).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Mean spot reclaims per machine-hour (0: none); a reclaimed job runs again.
    #[arg(long, default_value_t = 0.0, value_name = "RATE")]
    pub spot_reclaims_per_hour: f64,
}

/// Built-in on-demand prices (USD per hour, us-east-1, Linux) used for instance types the
/// config's `[prices]` table does not list.
const DEFAULT_PRICES: &[(&str, f64)] = &[
    ("t3.medium", 0.0416),
    ("t3.large", 0.0832),
    ("t3.xlarge", 0.1664),
    ("m5.large", 0.096),
    ("m5.xlarge", 0.192),
    ("m5.2xlarge", 0.384),
    ("m6i.large", 0.096),
    ("m6i.xlarge", 0.192),
    ("m7i.large", 0.1008),
    ("c5.large", 0.085),
    ("c5.xlarge", 0.17),
    ("c5.2xlarge", 0.34),
    ("c6i.large", 0.085),
    ("c6i.xlarge", 0.17),
    ("c7i.large", 0.0893),
];

/// The instance type and limits used when no config is given: one class, capacity that
/// never binds for the shared trace, so the comparison is about the autoscaling policy.
pub const SIM_INSTANCE_TYPE: &str = "m5.large";
const SIM_MAX_MACHINES: u32 = 300;

/// The configuration simulated without `--config`: Flotilla's defaults (the learned
/// policy on, idle_time 10 min) for every class in the trace.
pub fn default_config(classes: &[String]) -> Config {
    let mut c = Config {
        fleet: "simulated".into(),
        default_class: classes.first().cloned().unwrap_or_else(|| "default".into()),
        max_machines: SIM_MAX_MACHINES,
        max_growth_rate: SIM_MAX_MACHINES,
        ..Config::default()
    };
    for class in classes {
        c.classes.insert(
            class.clone(),
            ClassConfig {
                ami: "ami-simulated".into(),
                instance_types: vec![SIM_INSTANCE_TYPE.into()],
                subnets: vec!["subnet-simulated".into()],
                max_machines: SIM_MAX_MACHINES,
                ..ClassConfig::default()
            },
        );
    }
    c
}

fn prices(config: &Config) -> BTreeMap<String, f64> {
    let mut p: BTreeMap<String, f64> = DEFAULT_PRICES
        .iter()
        .map(|(t, v)| (t.to_string(), *v))
        .collect();
    p.extend(config.prices.iter().map(|(k, v)| (k.clone(), *v)));
    p
}

/// Everything one replay needs besides the policy.
pub struct Setup {
    pub config: Config,
    pub trace: trace::Trace,
    pub env: Env,
}

impl Setup {
    pub fn load(config_path: Option<&Path>, args: &Args) -> anyhow::Result<Self> {
        let boot = Dist::parse(&args.boot).map_err(|e| anyhow::anyhow!("--boot {e}"))?;
        if !(args.spot_reclaims_per_hour.is_finite() && args.spot_reclaims_per_hour >= 0.0) {
            bail!("--spot-reclaims-per-hour must be a number >= 0");
        }
        let config = match config_path {
            Some(p) => Some(Config::load(p)?),
            None => None,
        };
        let text = std::fs::read_to_string(&args.trace)
            .with_context(|| format!("cannot read trace {}", args.trace.display()))?;
        let default_class = config
            .as_ref()
            .map_or_else(|| "default".to_string(), |c| c.default_class.clone());
        let trace = trace::parse(&text, &default_class)
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.trace.display()))?;
        let config = match config {
            Some(c) => {
                let unknown: Vec<String> = trace
                    .classes()
                    .into_iter()
                    .filter(|k| !c.classes.contains_key(k))
                    .collect();
                if !unknown.is_empty() {
                    bail!(
                        "{}: jobs ask for classes the config does not define: {} (configured: {})",
                        args.trace.display(),
                        unknown.join(", "),
                        c.class_names().join(", ")
                    );
                }
                c
            }
            None => default_config(&trace.classes()),
        };
        let prices = prices(&config);
        for (name, class) in &config.classes {
            let t = class.instance_types.first().cloned().unwrap_or_default();
            if !prices.contains_key(&t) {
                eprintln!(
                    "flotilla: warning: no price for instance type {t:?} (class {name}); add it to [prices] in the config — its cost counts as 0"
                );
            }
        }
        let env = Env {
            boot,
            seed: args.seed,
            reclaims_per_hour: args.spot_reclaims_per_hour,
            tick_ms: config.reconcile_interval.0.as_millis().max(1) as i64,
            prices,
            lead_ms: 15 * 60_000,
            timeline: args.plot.is_some() || !args.json,
        };
        Ok(Self { config, trace, env })
    }
}

/// Variations of Flotilla's policy knobs walked by `--sweep`, with their labels: the
/// forecast's look-ahead (its main knob), its idle time and cap, and the forecast off.
pub fn flotilla_variants(config: &Config) -> Vec<(String, Config)> {
    use flotilla_proto::duration::HumanDuration as D;
    let mut out = Vec::new();
    let with = |f: &dyn Fn(&mut ClassConfig)| {
        let mut c = config.clone();
        c.classes.values_mut().for_each(f);
        c
    };
    for lookahead in [120u64, 180, 300, 450, 600, 900, 1200, 1800] {
        for idle_time in [30u64, 60, 180] {
            for max_idle in [20u32, 40] {
                out.push((
                    format!("lookahead={lookahead}s idle_time={idle_time}s max_idle={max_idle}"),
                    with(&|k: &mut ClassConfig| {
                        k.forecast.lookahead = D::from_secs(lookahead);
                        k.forecast.idle_time = D::from_secs(idle_time);
                        k.forecast.max_idle = max_idle;
                    }),
                ));
            }
        }
    }
    for idle_time in [60u64, 300, 600] {
        out.push((
            format!("forecast off, idle_time={idle_time}s"),
            with(&|k: &mut ClassConfig| {
                k.forecast.enabled = false;
                k.idle_time = D::from_secs(idle_time);
            }),
        ));
    }
    out
}

/// Replays the trace through Flotilla's plan with `config`.
pub fn run_flotilla(name: &str, config: &Config, trace: &trace::Trace, env: &Env) -> Outcome {
    let policy = crate::plan::Policy::from_config(config);
    let types = config
        .classes
        .iter()
        .map(|(k, c)| {
            (
                k.clone(),
                c.instance_types.first().cloned().unwrap_or_default(),
            )
        })
        .collect();
    let mut s = daemon_policy::Flotilla::new(
        policy,
        types,
        config.default_class.clone(),
        crate::pool::Pool::default(),
    );
    engine::run(name, trace, &mut s, env)
}

pub fn run_docker_machine(
    name: &str,
    configs: BTreeMap<String, docker_machine::Config>,
    trace: &trace::Trace,
    env: &Env,
) -> Outcome {
    let mut s = docker_machine::DockerMachine::new(configs);
    engine::run(name, trace, &mut s, env)
}

pub fn run_taskscaler(
    name: &str,
    configs: BTreeMap<String, taskscaler::Config>,
    trace: &trace::Trace,
    env: &Env,
) -> Outcome {
    let mut s = taskscaler::Taskscaler::new(configs);
    engine::run(name, trace, &mut s, env)
}

/// docker+machine with the config's knobs under docker+machine's semantics (schedules
/// become `[[runners.machine.autoscaling]]` periods, unset fields taking the class value).
pub fn docker_machine_from(config: &Config) -> BTreeMap<String, docker_machine::Config> {
    config
        .classes
        .iter()
        .map(|(name, k)| {
            let base = docker_machine::Knobs {
                idle_count: k.idle_count,
                idle_count_min: k.idle_count_min,
                idle_scale_factor: k.idle_scale_factor,
                idle_time_s: k.idle_time.0.as_secs(),
            };
            let periods = k
                .schedules
                .iter()
                .map(|s| docker_machine::Period {
                    periods: s.periods.clone(),
                    timezone: s.timezone.clone(),
                    knobs: docker_machine::Knobs {
                        idle_count: s.idle_count.unwrap_or(base.idle_count),
                        idle_count_min: s.idle_count_min.unwrap_or(base.idle_count_min),
                        idle_scale_factor: s.idle_scale_factor.unwrap_or(base.idle_scale_factor),
                        idle_time_s: s.idle_time.map_or(base.idle_time_s, |d| d.0.as_secs()),
                    },
                })
                .collect();
            (
                name.clone(),
                docker_machine::Config {
                    knobs: base,
                    max_builds: k.max_builds,
                    limit: k.max_machines.min(config.max_machines),
                    max_growth_rate: config.max_growth_rate,
                    periods,
                    instance_type: k.instance_types.first().cloned().unwrap_or_default(),
                },
            )
        })
        .collect()
}

/// taskscaler with the config's knobs: `idle_count` (or with a scale factor, `idle_count_min`
/// as the floor and `idle_count` as `scale_factor_limit`), `idle_time`, `max_builds` as
/// `max_use_count`, `max_machines` as `max_instances`.
pub fn taskscaler_from(config: &Config) -> BTreeMap<String, taskscaler::Config> {
    let knobs = |count: u32, min: u32, factor: f64, idle_time_s: u64| taskscaler::Knobs {
        idle_count: if factor > 0.0 { min } else { count },
        idle_time_s,
        scale_factor: factor,
        scale_factor_limit: if factor > 0.0 { count } else { 0 },
    };
    config
        .classes
        .iter()
        .map(|(name, k)| {
            let time = k.idle_time.0.as_secs();
            let policies = k
                .schedules
                .iter()
                .map(|s| taskscaler::Policy {
                    periods: s.periods.clone(),
                    timezone: s.timezone.clone(),
                    knobs: knobs(
                        s.idle_count.unwrap_or(k.idle_count),
                        s.idle_count_min.unwrap_or(k.idle_count_min),
                        s.idle_scale_factor.unwrap_or(k.idle_scale_factor),
                        s.idle_time.map_or(time, |d| d.0.as_secs()),
                    ),
                })
                .collect();
            (
                name.clone(),
                taskscaler::Config {
                    knobs: knobs(k.idle_count, k.idle_count_min, k.idle_scale_factor, time),
                    policies,
                    max_instances: k.max_machines.min(config.max_machines),
                    max_use_count: k.max_builds,
                    instance_type: k.instance_types.first().cloned().unwrap_or_default(),
                },
            )
        })
        .collect()
}

#[derive(serde::Serialize)]
struct Report<'a> {
    policies: &'a [Summary],
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
pub fn emit(text: &str) -> anyhow::Result<()> {
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

pub fn print_table(out: &mut String, rows: &[Summary]) {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(6).max(6);
    outln!(
        out,
        "{:<width$}  {:>9} {:>9} {:>9} {:>10} {:>10} {:>8} {:>10}",
        "policy",
        "p50 wait",
        "p95 wait",
        "max wait",
        "idle m-h",
        "busy m-h",
        "launches",
        "cost"
    );
    for r in rows {
        outln!(
            out,
            "{:<width$}  {:>8.1}s {:>8.1}s {:>8.1}s {:>10.1} {:>10.1} {:>8} {:>10}",
            r.name,
            r.p50_wait_s,
            r.p95_wait_s,
            r.max_wait_s,
            r.idle_machine_hours,
            r.busy_machine_hours,
            r.launches,
            format!("${:.2}", r.cost),
        );
    }
}

/// A policy that tried to terminate a busy machine or run a job twice is a bug, not a
/// result.
pub fn check(outcomes: &[Outcome]) -> anyhow::Result<()> {
    for o in outcomes {
        if o.violations > 0 {
            bail!(
                "{}: {} invalid actions (terminating a busy machine or leasing one twice)",
                o.name,
                o.violations
            );
        }
    }
    Ok(())
}

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
        "{} jobs over {:.1} h ({:.1} job-hours), boot {}, seed {}, reconcile every {} ms",
        jobs,
        setup.trace.span_hours(),
        setup.trace.job_hours(),
        setup.env.boot,
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
