//! Each policy replayed over a trace on the engine: Flotilla's own decision (the daemon's
//! `Policy` and `Pool`), and the docker+machine and taskscaler models with the config's
//! knobs under their semantics ([`docker_machine_from`], [`taskscaler_from`]); [`check`]
//! refuses outcomes with invalid actions. Shared by the single run and the sweep.

use std::collections::BTreeMap;

use anyhow::bail;
use flotilla_proto::config::Config;

use super::engine::{self, Env, Outcome};
use super::trace::Trace;
use super::{daemon_policy, docker_machine, taskscaler};

/// Replays the trace through Flotilla's plan with `config`.
pub(super) fn run_flotilla(name: &str, config: &Config, trace: &Trace, env: &Env) -> Outcome {
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
    let root_gb = config
        .classes
        .iter()
        .map(|(k, c)| {
            let gb = c.effective_root_volume().gb;
            (k.clone(), gb.unwrap_or(engine::DEFAULT_ROOT_GB))
        })
        .collect();
    let mut s = daemon_policy::Flotilla::new(
        policy,
        types,
        root_gb,
        config.default_class.clone(),
        crate::pool::Pool::default(),
    );
    engine::run(name, trace, &mut s, env)
}

/// Replays the trace through the docker+machine model with one config per class.
pub(super) fn run_docker_machine(
    name: &str,
    configs: BTreeMap<String, docker_machine::Config>,
    trace: &Trace,
    env: &Env,
) -> Outcome {
    let mut s = docker_machine::DockerMachine::new(configs);
    engine::run(name, trace, &mut s, env)
}

/// Replays the trace through the taskscaler model with one config per class.
pub(super) fn run_taskscaler(
    name: &str,
    configs: BTreeMap<String, taskscaler::Config>,
    trace: &Trace,
    env: &Env,
) -> Outcome {
    let mut s = taskscaler::Taskscaler::new(configs);
    engine::run(name, trace, &mut s, env)
}

/// docker+machine with the config's knobs under docker+machine's semantics (schedules
/// become `[[runners.machine.autoscaling]]` periods, unset fields taking the class value).
/// `jobs_per_machine` has no counterpart there: docker+machine runs one job per machine.
pub(super) fn docker_machine_from(config: &Config) -> BTreeMap<String, docker_machine::Config> {
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
/// `max_use_count`, `max_machines` as `max_instances`, `jobs_per_machine` as
/// `capacity_per_instance`.
pub(super) fn taskscaler_from(config: &Config) -> BTreeMap<String, taskscaler::Config> {
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
                    capacity_per_instance: k.jobs_per_machine,
                },
            )
        })
        .collect()
}

/// A policy that tried to terminate a busy machine or run a job twice is a bug, not a
/// result.
pub(super) fn check(outcomes: &[Outcome]) -> anyhow::Result<()> {
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
