//! `--sweep`: walks each baseline's main knobs (and Flotilla's), keeps each family's Pareto
//! front of idle machine-hours against p95 wait, and compares Flotilla's configured policy
//! with each baseline's best point at equal wait and at equal idle machine-hours.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use flotilla_proto::config::{ClassConfig, Config};

use super::engine::{Env, Outcome, Summary};
use super::report::{emit, outln, print_table, Report};
use super::runs::{
    check, docker_machine_from, run_docker_machine, run_flotilla, run_taskscaler, taskscaler_from,
};
use super::setup::{Args, Setup};
use super::trace::Trace;
use super::{docker_machine, plot, taskscaler};

/// One simulated configuration.
#[derive(Clone)]
pub(super) enum Task {
    Flotilla(String, Box<Config>),
    DockerMachine(String, BTreeMap<String, docker_machine::Config>),
    Taskscaler(String, BTreeMap<String, taskscaler::Config>),
}

impl Task {
    pub(super) fn family(&self) -> &'static str {
        match self {
            Self::Flotilla(..) => "flotilla",
            Self::DockerMachine(..) => "docker+machine",
            Self::Taskscaler(..) => "taskscaler",
        }
    }

    fn name(&self) -> &str {
        match self {
            Self::Flotilla(n, _) | Self::DockerMachine(n, _) | Self::Taskscaler(n, _) => n,
        }
    }

    pub(super) fn run(&self, trace: &Trace, env: &Env) -> Outcome {
        match self {
            Self::Flotilla(n, c) => run_flotilla(n, c, trace, env),
            Self::DockerMachine(n, c) => run_docker_machine(n, c.clone(), trace, env),
            Self::Taskscaler(n, c) => run_taskscaler(n, c.clone(), trace, env),
        }
    }
}

/// Stopped-pool bounds and sizing horizons walked by `--sweep`.
const STOPPED_SIZES: [u32; 4] = [10, 20, 40, 60];
const STOPPED_HORIZONS: [u64; 3] = [2 * 3600, 6 * 3600, 12 * 3600];

/// The busiest hours of the shared week (weekdays, 14:00-23:59 UTC), for the baselines'
/// working-hours periods.
const BUSY_HOURS: &str = "* 14-23 * * mon-fri";
const IDLE_COUNTS: [u32; 12] = [0, 1, 2, 3, 5, 8, 10, 15, 20, 30, 40, 50];
const IDLE_TIMES: [u64; 6] = [60, 300, 600, 1200, 1800, 3600];

/// docker+machine: IdleCount x IdleTime, and IdleScaleFactor with IdleCountMin under an
/// IdleCount cap. Other settings (limit, MaxBuilds, MaxGrowthRate, type) from the config.
pub(super) fn docker_machine_grid(config: &Config) -> Vec<Task> {
    let base = docker_machine_from(config);
    let with_periods = |k: docker_machine::Knobs, periods: Vec<docker_machine::Period>| {
        let configs: BTreeMap<_, _> = base
            .iter()
            .map(|(n, c)| {
                (
                    n.clone(),
                    docker_machine::Config {
                        knobs: k,
                        periods: periods.clone(),
                        ..c.clone()
                    },
                )
            })
            .collect();
        let label = configs
            .values()
            .next()
            .map(docker_machine::Config::label)
            .unwrap_or_default();
        Task::DockerMachine(format!("docker+machine {label}"), configs)
    };
    let with = |k: docker_machine::Knobs| with_periods(k, Vec::new());
    let mut tasks = Vec::new();
    for idle_count in IDLE_COUNTS {
        for idle_time_s in IDLE_TIMES {
            tasks.push(with(docker_machine::Knobs {
                idle_count,
                idle_count_min: 0,
                idle_scale_factor: 0.0,
                idle_time_s,
            }));
        }
    }
    // Working-hours periods (the shared week's busy hours, weekdays 14-24 UTC), on-demand
    // otherwise: docker+machine tuned with hindsight.
    for idle_time_s in [60, 300] {
        for busy_idle_count in [5, 10, 20] {
            let off = docker_machine::Knobs {
                idle_count: 0,
                idle_count_min: 0,
                idle_scale_factor: 0.0,
                idle_time_s,
            };
            let period = docker_machine::Period {
                periods: vec![BUSY_HOURS.into()],
                timezone: "UTC".into(),
                knobs: docker_machine::Knobs {
                    idle_count: busy_idle_count,
                    ..off
                },
            };
            tasks.push(with_periods(off, vec![period]));
        }
    }
    for idle_scale_factor in [0.25, 0.5, 1.0] {
        for idle_count_min in [1, 3] {
            for idle_count in [20, 50] {
                for idle_time_s in [300, 1800] {
                    tasks.push(with(docker_machine::Knobs {
                        idle_count,
                        idle_count_min,
                        idle_scale_factor,
                        idle_time_s,
                    }));
                }
            }
        }
    }
    tasks
}

/// taskscaler: idle_count x idle_time, and scale_factor x scale_factor_limit.
pub(super) fn taskscaler_grid(config: &Config) -> Vec<Task> {
    let base = taskscaler_from(config);
    let with_policies = |k: taskscaler::Knobs, policies: Vec<taskscaler::Policy>| {
        let configs: BTreeMap<_, _> = base
            .iter()
            .map(|(n, c)| {
                (
                    n.clone(),
                    taskscaler::Config {
                        knobs: k,
                        policies: policies.clone(),
                        ..c.clone()
                    },
                )
            })
            .collect();
        let label = configs
            .values()
            .next()
            .map(taskscaler::Config::label)
            .unwrap_or_default();
        Task::Taskscaler(format!("taskscaler {label}"), configs)
    };
    let with = |k: taskscaler::Knobs| with_policies(k, Vec::new());
    let mut tasks = Vec::new();
    for idle_count in IDLE_COUNTS {
        for idle_time_s in IDLE_TIMES {
            tasks.push(with(taskscaler::Knobs {
                idle_count,
                idle_time_s,
                scale_factor: 0.0,
                scale_factor_limit: 0,
            }));
        }
    }
    for idle_time_s in [60, 300] {
        for busy_idle_count in [2, 5, 10] {
            let off = taskscaler::Knobs {
                idle_count: 0,
                idle_time_s,
                scale_factor: 0.0,
                scale_factor_limit: 0,
            };
            let policy = taskscaler::Policy {
                periods: vec![BUSY_HOURS.into()],
                timezone: "UTC".into(),
                knobs: taskscaler::Knobs {
                    idle_count: busy_idle_count,
                    ..off
                },
            };
            tasks.push(with_policies(off, vec![policy]));
        }
    }
    for scale_factor in [0.25, 0.5, 1.0, 2.0] {
        for scale_factor_limit in [10, 30] {
            for idle_count in [0, 2] {
                for idle_time_s in [300, 1800] {
                    tasks.push(with(taskscaler::Knobs {
                        idle_count,
                        idle_time_s,
                        scale_factor,
                        scale_factor_limit,
                    }));
                }
            }
        }
    }
    tasks
}

/// Flotilla: the configured policy first, then variations of its learned-policy knobs.
pub(super) fn flotilla_grid(config: &Config) -> Vec<Task> {
    let mut tasks = vec![Task::Flotilla("flotilla".into(), Box::new(config.clone()))];
    for (label, c) in flotilla_variants(config) {
        tasks.push(Task::Flotilla(format!("flotilla {label}"), Box::new(c)));
    }
    tasks
}

/// Variations of Flotilla's policy knobs walked by `--sweep`, with their labels: the
/// forecast's look-ahead (its main knob), its idle time and cap, the forecast off, and the
/// stopped pool (`max_stopped`, the forecast's `stopped_horizon` sizing it, with shorter
/// look-aheads: stopped machines cover bursts, so fewer need to be hot).
pub(super) fn flotilla_variants(config: &Config) -> Vec<(String, Config)> {
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
    for max_stopped in STOPPED_SIZES {
        for horizon in STOPPED_HORIZONS {
            for lookahead in [0u64, 60, 120, 300] {
                for idle_time in [30u64, 60] {
                    out.push((
                        format!(
                            "max_stopped={max_stopped} stopped_horizon={}h lookahead={lookahead}s idle_time={idle_time}s",
                            horizon / 3600
                        ),
                        with(&|k: &mut ClassConfig| {
                            k.max_stopped = max_stopped.min(k.max_machines);
                            k.forecast.stopped_horizon = D::from_secs(horizon);
                            k.forecast.lookahead = D::from_secs(lookahead);
                            k.forecast.idle_time = D::from_secs(idle_time);
                        }),
                    ));
                }
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

/// Runs tasks on every core; results in task order.
pub(super) fn run_all(tasks: &[Task], trace: &Trace, env: &Env) -> Vec<Outcome> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(tasks.len().max(1));
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Outcome>>> = tasks.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(task) = tasks.get(i) else { break };
                let out = task.run(trace, env);
                if let Ok(mut slot) = results[i].lock() {
                    *slot = Some(out);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|m| m.into_inner().ok().flatten().unwrap_or_default())
        .collect()
}

/// The points no other point beats on both idle machine-hours and p95 wait, cheapest first.
pub(super) fn pareto(points: &[Summary]) -> Vec<Summary> {
    front_by(points, |p| p.idle_machine_hours)
}

/// Flotilla's points no other beats on both cost and p95 wait, cheapest first: with a
/// stopped pool, idle machine-hours no longer say what a policy costs (disks do too).
pub(super) fn cost_pareto(points: &[Summary]) -> Vec<Summary> {
    front_by(points, |p| p.cost)
}

/// The points no other beats on both `price` and p95 wait, lowest price first.
fn front_by(points: &[Summary], price: impl Fn(&Summary) -> f64) -> Vec<Summary> {
    let mut sorted: Vec<&Summary> = points.iter().collect();
    sorted.sort_by(|a, b| {
        price(a)
            .total_cmp(&price(b))
            .then(a.p95_wait_s.total_cmp(&b.p95_wait_s))
    });
    let mut front: Vec<Summary> = Vec::new();
    for p in sorted {
        if front.last().is_none_or(|l| p.p95_wait_s < l.p95_wait_s) {
            front.push(p.clone());
        }
    }
    front
}

/// The cheapest point with a p95 wait of at most `p95_s`.
pub(super) fn cheapest_within(points: &[Summary], p95_s: f64) -> Option<&Summary> {
    points
        .iter()
        .filter(|p| p.p95_wait_s <= p95_s)
        .min_by(|a, b| a.cost.total_cmp(&b.cost))
}

/// The baseline point with the fewest idle machine-hours among those waiting no longer
/// (p95) than `reference`.
pub(super) fn best_at_wait<'a>(points: &'a [Summary], reference: &Summary) -> Option<&'a Summary> {
    points
        .iter()
        .filter(|p| p.p95_wait_s <= reference.p95_wait_s)
        .min_by(|a, b| a.idle_machine_hours.total_cmp(&b.idle_machine_hours))
}

/// The baseline point with the lowest p95 wait among those idling no more than `reference`.
pub(super) fn best_at_idle<'a>(points: &'a [Summary], reference: &Summary) -> Option<&'a Summary> {
    points
        .iter()
        .filter(|p| p.idle_machine_hours <= reference.idle_machine_hours)
        .min_by(|a, b| {
            a.p95_wait_s
                .total_cmp(&b.p95_wait_s)
                .then(a.idle_machine_hours.total_cmp(&b.idle_machine_hours))
        })
}

pub(super) fn run(setup: &Setup, args: &Args) -> anyhow::Result<()> {
    let mut env = setup.env.clone();
    env.timeline = false;
    let mut tasks = flotilla_grid(&setup.config);
    tasks.extend(docker_machine_grid(&setup.config));
    tasks.extend(taskscaler_grid(&setup.config));
    let started = Instant::now();
    let outcomes = run_all(&tasks, &setup.trace, &env);
    let elapsed = started.elapsed().as_secs_f64();
    check(&outcomes)?;
    let jobs = setup.trace.jobs.len();
    let mut by_family: BTreeMap<&str, Vec<Summary>> = BTreeMap::new();
    for (t, o) in tasks.iter().zip(&outcomes) {
        by_family.entry(t.family()).or_default().push(o.summary());
    }
    let flotilla = outcomes[0].summary();
    let mut report: Vec<Summary> = vec![flotilla.clone()];
    let mut comparison: Vec<Summary> = vec![flotilla.clone()];
    let mut plotted: Vec<Task> = vec![tasks[0].clone()];
    let mut notes = Vec::new();
    for family in ["docker+machine", "taskscaler"] {
        let points = by_family.get(family).cloned().unwrap_or_default();
        report.extend(pareto(&points));
        if let Some(b) = best_at_wait(&points, &flotilla) {
            let fewer =
                100.0 * (1.0 - flotilla.idle_machine_hours / b.idle_machine_hours.max(1e-9));
            let verdict = if fewer >= 0.0 {
                format!("{fewer:.0}% fewer")
            } else {
                format!("{:.0}% more", -fewer)
            };
            notes.push(format!(
                "vs {family}: its cheapest point with p95 wait <= {:.1} s idles {:.1} machine-h; Flotilla {:.1} ({verdict})",
                flotilla.p95_wait_s, b.idle_machine_hours, flotilla.idle_machine_hours
            ));
            comparison.push(b.clone());
            if let Some(t) = tasks.iter().find(|t| t.name() == b.name) {
                plotted.push(t.clone());
            }
        } else {
            notes.push(format!(
                "vs {family}: no point reaches Flotilla's p95 wait of {:.1} s",
                flotilla.p95_wait_s
            ));
        }
        if let Some(b) = best_at_idle(&points, &flotilla) {
            notes.push(format!(
                "vs {family}: its lowest p95 wait with <= {:.1} idle machine-h is {:.1} s; Flotilla {:.1} s ({:.2}x)",
                flotilla.idle_machine_hours,
                b.p95_wait_s,
                flotilla.p95_wait_s,
                flotilla.p95_wait_s / b.p95_wait_s.max(1e-9)
            ));
            if !comparison.iter().any(|c| c.name == b.name) {
                comparison.push(b.clone());
            }
        }
    }
    if let Some(path) = &args.plot {
        let mut penv = setup.env.clone();
        penv.timeline = true;
        let outs = run_all(&plotted, &setup.trace, &penv);
        plot::write(path, &outs)
            .with_context(|| format!("cannot write the plot to {}", path.display()))?;
    }
    if args.json {
        let json = serde_json::to_string_pretty(&Report { policies: &report })?;
        return emit(&(json + "\n"));
    }
    let mut out = String::new();
    for (family, points) in &by_family {
        outln!(
            out,
            "\n{family}: {} configurations, Pareto front (idle machine-hours vs p95 wait):",
            points.len()
        );
        print_table(&mut out, &pareto(points));
    }
    if let Some(points) = by_family.get("flotilla") {
        outln!(
            out,
            "\nflotilla: Pareto front of cost vs p95 wait (the stopped pool's disks included):"
        );
        print_table(&mut out, &cost_pareto(points));
        let half = flotilla.p95_wait_s / 2.0;
        match cheapest_within(points, half) {
            Some(b) => outln!(
                out,
                "  cheapest with p95 wait <= {half:.1} s (half the configured policy's): {} at ${:.2} ({:+.1}% vs ${:.2})",
                b.name,
                b.cost,
                100.0 * (b.cost / flotilla.cost.max(1e-9) - 1.0),
                flotilla.cost
            ),
            None => outln!(out, "  no configuration reaches a p95 wait of {half:.1} s"),
        }
    }
    outln!(
        out,
        "\nComparison: Flotilla as configured vs each baseline's best points"
    );
    print_table(&mut out, &comparison);
    for n in notes {
        outln!(out, "  {n}");
    }
    outln!(
        out,
        "\nswept {} configurations x {jobs} jobs in {elapsed:.1} s ({:.0} jobs/s)",
        tasks.len(),
        (tasks.len() * jobs) as f64 / elapsed.max(1e-9)
    );
    if let Some(path) = &args.plot {
        outln!(out, "plot: {}", path.display());
    }
    emit(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str, idle: f64, p95: f64) -> Summary {
        Summary {
            name: name.into(),
            p50_wait_s: 0.0,
            p95_wait_s: p95,
            max_wait_s: p95,
            idle_machine_hours: idle,
            busy_machine_hours: 0.0,
            stopped_machine_hours: 0.0,
            idle_slot_hours: None,
            launches: 0,
            starts: 0,
            cost: 0.0,
        }
    }

    #[test]
    fn pareto_keeps_only_undominated_points() {
        let pts = [
            s("a", 10.0, 90.0),
            s("b", 20.0, 95.0),
            s("c", 30.0, 40.0),
            s("d", 30.0, 50.0),
            s("e", 50.0, 0.0),
        ];
        let names: Vec<String> = pareto(&pts).into_iter().map(|p| p.name).collect();
        assert_eq!(names, vec!["a", "c", "e"]);
    }

    #[test]
    fn cost_front_and_cheapest_within_a_wait() {
        let mut pts = vec![s("a", 10.0, 90.0), s("b", 5.0, 40.0), s("c", 50.0, 20.0)];
        for (p, cost) in pts.iter_mut().zip([100.0, 120.0, 110.0]) {
            p.cost = cost;
        }
        let names: Vec<String> = cost_pareto(&pts).into_iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            vec!["a", "c"],
            "b costs more and waits longer than c"
        );
        assert_eq!(cheapest_within(&pts, 45.0).unwrap().name, "c");
        assert!(cheapest_within(&pts, 10.0).is_none());
    }

    #[test]
    fn best_points_at_equal_wait_and_equal_idle() {
        let pts = [s("a", 10.0, 90.0), s("c", 30.0, 40.0), s("e", 50.0, 0.0)];
        let me = s("me", 20.0, 45.0);
        assert_eq!(best_at_wait(&pts, &me).unwrap().name, "c");
        assert_eq!(best_at_idle(&pts, &me).unwrap().name, "a");
        assert!(best_at_wait(&pts[..1], &me).is_none());
    }

    #[test]
    fn grids_cover_the_documented_knobs() {
        let c = super::super::setup::default_config(&["default".to_string()]);
        let dm = docker_machine_grid(&c);
        assert!(dm.iter().any(|t| t.name().contains("IdleScaleFactor=0.5")));
        assert!(dm
            .iter()
            .any(|t| t.name().contains("IdleCount=50 IdleTime=3600s")));
        let ts = taskscaler_grid(&c);
        assert!(ts
            .iter()
            .any(|t| t.name().contains("scale_factor_limit=30")));
        let fl = flotilla_grid(&c);
        assert_eq!(fl[0].name(), "flotilla");
        assert!(fl.iter().any(|t| t
            .name()
            .contains("max_stopped=40 stopped_horizon=6h lookahead=0s")));
    }
}
