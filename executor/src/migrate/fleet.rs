//! The fleet around the classes: one region and EC2 endpoint, the fleet's name, limits
//! and shutdown policy, and the `[job]` settings every runner shares (the rest going to
//! each class's `[classes.X.job]`). Validated as the daemon will read it.

use std::collections::BTreeMap;

use flotilla_proto::config::{AwsConfig, ClassConfig, Config, JobConfig, ShutdownPolicy};

use super::class::Plan;
use super::error::Bad;
use super::fields::Fields;
use super::job::{common, lookup, minus};
use super::options::Options;
use super::report::{Kind, Report};
use super::{job, names};

/// The fleet around the classes: region, growth, job settings shared or per class.
pub(super) fn fleet_config(
    plans: &[Plan],
    machine_global: Option<&toml::Table>,
    options: &Options,
    report: &mut Report,
) -> Result<Config, Bad> {
    let Some(first) = plans.first() else {
        return Err(Bad::new("runners", "no runner to migrate"));
    };
    for p in plans.iter() {
        if p.region != first.region {
            return Err(Bad::new(
                format!("runners[{}].machine.MachineOptions", p.index),
                format!(
                    "amazonec2-region {:?} differs from {:?} of runners[{}]: one Flotilla \
                     daemon serves one region; migrate the runners of each region separately \
                     (--runner NAME, and a --fleet and --state-dir each)",
                    p.region, first.region, first.index
                ),
            ));
        }
        if p.endpoint != first.endpoint {
            return Err(Bad::new(
                format!("runners[{}].machine.MachineOptions", p.index),
                format!(
                    "amazonec2-endpoint differs from runners[{}]'s: one Flotilla daemon uses \
                     one EC2 endpoint; migrate them separately (--runner NAME)",
                    first.index
                ),
            ));
        }
        for (key, mine, theirs) in [
            ("builds_dir", &p.builds_dir, &first.builds_dir),
            ("cache_dir", &p.cache_dir, &first.cache_dir),
        ] {
            if mine != theirs {
                return Err(Bad::new(
                    format!("runners[{}].{key}", p.index),
                    format!(
                        "{mine:?} differs from {theirs:?} of runners[{}]: a fleet has one \
                         {key}; migrate them separately (--runner NAME)",
                        first.index
                    ),
                ));
            }
        }
    }

    let fleet = match &options.fleet {
        Some(f) => {
            if !names::is_valid(f) {
                return Err(Bad::new(
                    "--fleet",
                    format!("{f:?} must be 1-64 letters, digits, '-', '_' or '.'"),
                ));
            }
            f.clone()
        }
        None => {
            let class_names: Vec<&str> = plans.iter().map(|p| p.class_name.as_str()).collect();
            let f = names::common_prefix(&class_names).unwrap_or_else(|| first.class_name.clone());
            report.push(
                Kind::Default,
                "fleet",
                format!(
                    "fleet = {f:?}, from the runner names (choose it with --fleet): the \
                     flotilla:fleet tag of every machine; the daemon only ever terminates \
                     instances with its own fleet tag"
                ),
            );
            f
        }
    };
    report.push(
        Kind::Default,
        "state_dir",
        format!(
            "state_dir = {:?} (--state-dir): the fleet CA, the pool state and the control \
             socket; run the daemon as the gitlab-runner user, who must own it",
            options.state_dir.display().to_string()
        ),
    );
    let default_class = first.class_name.clone();
    if plans.len() > 1 {
        report.push(
            Kind::Default,
            "default_class",
            format!(
                "default_class = {default_class:?} (the first runner's class); each migrated \
                 runner sets its own class as FLOTILLA_CLASS in its environment, and a job picks \
                 another with variables: {{ FLOTILLA_CLASS: <class> }}"
            ),
        );
    } else {
        report.push(
            Kind::Default,
            "default_class",
            format!("default_class = {default_class:?}, the runner's class"),
        );
    }

    // Machines: per class from limit; the fleet's total is their sum.
    let max_machines = plans
        .iter()
        .fold(0u32, |n, p| n.saturating_add(p.class.max_machines));
    report.push(
        Kind::Default,
        "max_machines",
        format!("max_machines = {max_machines}: the classes' max_machines added up"),
    );
    let unlimited = plans.iter().any(|p| p.growth.unwrap_or(0) == 0);
    let max_growth_rate = if unlimited {
        max_machines.max(1)
    } else {
        plans
            .iter()
            .fold(0u32, |n, p| n.saturating_add(p.growth.unwrap_or(0)))
            .max(1)
    };
    report.push(
        if unlimited {
            Kind::Default
        } else {
            Kind::Converted
        },
        "max_growth_rate",
        if unlimited {
            format!(
                "max_growth_rate = {max_growth_rate}: a runner had no MaxGrowthRate (no limit), \
                 so as many launches at once as max_machines"
            )
        } else {
            format!(
                "max_growth_rate = {max_growth_rate}: the runners' MaxGrowthRate added up (one \
                 daemon launches for every class)"
            )
        },
    );
    let on_shutdown = shutdown(machine_global, report)?;
    report.push(
        Kind::Default,
        "classes.*.forecast",
        "enabled = false: docker+machine's idle semantics exactly (IdleCount, IdleTime). \
         Flotilla's learned warm pool needs far fewer idle machine-hours for the same waits \
         (README: Autoscaling economics): replay your job history with flotilla simulate, then \
         remove the [classes.X.forecast] sections",
    );
    report.push(
        Kind::Default,
        "classes.*.max_age",
        "\"7d\" (not written): machines are replaced after a week (docker+machine kept them \
         until MaxBuilds or IdleTime), which keeps them inside their 30-day TLS certificates \
         and picks up AMI updates",
    );
    report.push(
        Kind::Default,
        "job.acquire_timeout",
        "\"15m\" (not written): prepare waits this long for a machine, then the job fails \
         with a system failure (retry: when: runner_system_failure retries it)",
    );

    // Job settings: shared ones in [job], the rest per class.
    let tables: Vec<&toml::Table> = plans.iter().map(|p| &p.job).collect();
    let base = common(&tables);
    let job: JobConfig = job::deserialize(&base)
        .map_err(|(path, message)| Bad::new(format!("flotilla.toml job.{path}"), message))?;
    for p in plans {
        for (key, docker_key, what) in [
            (
                "helper_image",
                "helper_image",
                "docker+machine used the helper of the runner's own version; set [job] \
                 helper_image to match your gitlab-runner",
            ),
            ("default_image", "image", "the image of jobs without image:"),
        ] {
            if !p.job.contains_key(key) {
                let value = match key {
                    "helper_image" => &job.helper_image,
                    _ => &job.default_image,
                };
                report.push(
                    Kind::Default,
                    format!("{} docker.{docker_key}", p.at),
                    format!("not set: [job] {key} = {value:?}, Flotilla's default; {what}"),
                );
            }
        }
    }
    let mut classes = BTreeMap::new();
    for p in plans.iter() {
        let own = minus(&p.job, &base);
        for s in &p.settings {
            let target = if lookup(&base, &s.to) == Some(&s.value) {
                format!("[job] {}", s.to_key())
            } else {
                format!("[classes.{}.job] {}", p.class_name, s.to_key())
            };
            report.push(
                Kind::Converted,
                format!("{} docker.{}", p.at, s.from),
                target,
            );
        }
        let mut class = p.class.clone();
        class.job = (!own.is_empty()).then_some(own);
        classes.insert(p.class_name.clone(), class);
    }

    if classes.len() > 1 {
        report.push(
            Kind::Note,
            "classes",
            format!(
                "{} runners, {} classes of one fleet and one daemon; they differ in {}",
                classes.len(),
                classes.keys().cloned().collect::<Vec<_>>().join(", "),
                differences(&classes).join(", ")
            ),
        );
    }
    let config = Config {
        fleet,
        state_dir: options.state_dir.clone(),
        default_class,
        max_machines,
        max_growth_rate,
        on_shutdown,
        aws: AwsConfig {
            region: Some(first.region.clone()),
            endpoint_url: first.endpoint.clone(),
            ..AwsConfig::default()
        },
        job,
        classes,
        ..Config::default()
    };
    config
        .validate()
        .map_err(|e| Bad::new(format!("flotilla.toml {}", e.key), e.message))?;
    Ok(config)
}

/// The class settings that are not the same in every class, as `flotilla.toml` names them.
fn differences(classes: &BTreeMap<String, ClassConfig>) -> Vec<String> {
    let tables: Vec<toml::Table> = classes
        .values()
        .filter_map(|c| toml::Table::try_from(c).ok())
        .collect();
    let mut keys: Vec<String> = Vec::new();
    for t in &tables {
        for k in t.keys() {
            if !keys.contains(k) && tables.iter().any(|o| o.get(k) != t.get(k)) {
                keys.push(k.clone());
            }
        }
    }
    keys
}

/// `[machine.shutdown_drain]` (global docker+machine settings) as `on_shutdown`.
fn shutdown(machine: Option<&toml::Table>, report: &mut Report) -> Result<ShutdownPolicy, Bad> {
    let Some(machine) = machine else {
        return Ok(ShutdownPolicy::Keep);
    };
    let mut m = Fields::new(machine.clone(), "machine");
    let mut policy = ShutdownPolicy::Keep;
    if let Some(drain) = m.table("shutdown_drain")? {
        let mut d = Fields::new(drain, "machine.shutdown_drain");
        if d.bool("enabled")?.unwrap_or(false) {
            policy = ShutdownPolicy::Terminate;
            report.push(
                Kind::Converted,
                "machine.shutdown_drain.enabled",
                "on_shutdown = \"terminate\": idle machines are terminated when the daemon \
                 stops (leased ones finish their jobs)",
            );
        } else {
            report.push(
                Kind::Converted,
                "machine.shutdown_drain.enabled",
                "false: on_shutdown = \"keep\" (the default): machines are kept for the next \
                 start",
            );
        }
        for (k, _) in d.rest() {
            report.push(
                Kind::Note,
                format!("machine.shutdown_drain.{k}"),
                "not needed: Flotilla terminates idle machines in one batched call",
            );
        }
    }
    for (k, _) in m.rest() {
        report.push(
            Kind::Unknown,
            format!("machine.{k}"),
            "not a [machine] key gitlab-runner knows: not converted",
        );
    }
    Ok(policy)
}
