//! The conversion itself, input text to output texts: every docker+machine runner becomes
//! a class of one fleet (its machines, idle policy and docker options), `[job]` holds the
//! docker options all of them share and `[classes.X.job]` the rest, and each runner keeps
//! its registration with `FLOTILLA_CLASS=X` as its jobs' default class.
//!
//! The top of the conversion: it calls `class` for each runner, `fleet` for the fleet
//! around the classes, `runner` and `render` for the output texts; none of them calls back.

use flotilla_proto::config::Config;

use super::class::{plan_runner, Plan};
use super::error::{Bad, MigrateError};
use super::fields::Fields;
use super::fleet::fleet_config;
use super::options::Options;
use super::render;
use super::report::{Kind, Report};
use super::runner::{self, Stages};

/// The outputs of a conversion.
#[derive(Debug, Clone)]
pub struct Migration {
    pub config: Config,
    /// `flotilla.toml` (a comment header, then [`Config::to_toml`]).
    pub flotilla_toml: String,
    /// The runner's `config.toml` with the migrated runners on the custom executor.
    pub runner_toml: String,
    pub report: Report,
    /// The report as written to `migration-report.txt` and stderr.
    pub report_text: String,
    /// `(runner name, class)` of the migrated runners, in input order.
    pub classes: Vec<(String, String)>,
}

pub(super) const EXECUTOR: &str = "docker+machine";

/// Global keys of gitlab-runner's config.toml.
const GLOBAL_KEYS: &[&str] = &[
    "listen_address",
    "session_server",
    "labels",
    "concurrent",
    "check_interval",
    "log_level",
    "log_format",
    "user",
    "sentry_dsn",
    "connection_max_age",
    "experimental",
    "shutdown_timeout",
];

/// Converts `text` (a gitlab-runner config.toml). Pure: no files, no network.
pub fn convert(text: &str, options: &Options) -> Result<Migration, MigrateError> {
    let file = options.source.clone();
    let input: toml::Table = toml::from_str(text).map_err(|e| MigrateError::Parse {
        file: file.clone(),
        message: flotilla_proto::config::describe_toml_error(text, &e),
    })?;
    let mut report = Report::default();
    let input_error = |b: Bad| MigrateError::Input {
        file: file.clone(),
        key: b.key,
        message: b.message,
    };
    let runners_error = |message: String| MigrateError::Runners {
        file: file.clone(),
        message,
    };

    let mut global = Fields::new(input.clone(), "");
    let runners = global.tables("runners").map_err(input_error)?;
    let concurrent = global.count("concurrent").map_err(input_error)?;
    let machine_global = global.table("machine").map_err(input_error)?;
    let selected = select(&runners, &options.runners).map_err(runners_error)?;

    let mut plans = Vec::new();
    for &i in &selected {
        let taken: Vec<&str> = plans.iter().map(|p: &Plan| p.class_name.as_str()).collect();
        let plan = plan_runner(i, &runners[i], concurrent, &taken, options, &mut report)
            .map_err(input_error)?;
        plans.push(plan);
    }
    for (i, r) in runners.iter().enumerate() {
        if selected.contains(&i) {
            continue;
        }
        let name = r.get("name").and_then(toml::Value::as_str).unwrap_or("");
        let executor = r
            .get("executor")
            .and_then(toml::Value::as_str)
            .unwrap_or("");
        let why = if executor == EXECUTOR {
            "not selected with --runner: kept as it was (still docker+machine)".to_owned()
        } else {
            format!("executor {executor:?}, not docker+machine: kept as it was")
        };
        report.push(Kind::Kept, format!("runners[{i}] {name:?}"), why);
    }
    let config =
        fleet_config(&plans, machine_global.as_ref(), options, &mut report).map_err(input_error)?;

    // The runner config: migrated runners rewritten, the rest and the globals kept.
    let multi = plans.len() > 1;
    let stages = Stages {
        binary: &options.binary,
        config_path: &options.config_path,
        prepare_timeout_secs: runner::prepare_exec_timeout(config.job.acquire_timeout.0),
    };
    let mut rewritten = Vec::with_capacity(runners.len());
    for (i, r) in runners.iter().enumerate() {
        match plans.iter().find(|p| p.index == i) {
            Some(p) => {
                let class = multi.then_some(p.class_name.as_str());
                let path = format!("runners[{i}]");
                let r = runner::rewrite(r, &path, &p.at, &stages, class, &mut report)
                    .map_err(input_error)?;
                rewritten.push(toml::Value::Table(r));
            }
            None => rewritten.push(toml::Value::Table(r.clone())),
        }
    }
    let docker_machine_left = runners.iter().enumerate().any(|(i, r)| {
        !selected.contains(&i) && r.get("executor").and_then(toml::Value::as_str) == Some(EXECUTOR)
    });
    let mut output = toml::Table::new();
    let mut kept_globals = Vec::new();
    for (key, value) in input {
        match key.as_str() {
            "runners" => {
                output.insert(key, toml::Value::Array(std::mem::take(&mut rewritten)));
            }
            "machine" if !docker_machine_left => {}
            k => {
                if k == "machine" {
                    report.push(
                        Kind::Kept,
                        "machine",
                        "kept for the docker+machine runners that are not migrated",
                    );
                } else if GLOBAL_KEYS.contains(&k) {
                    kept_globals.push(k.to_owned());
                } else {
                    report.push(
                        Kind::Unknown,
                        k,
                        "not a global key gitlab-runner knows: kept as it was",
                    );
                }
                output.insert(key, value);
            }
        }
    }
    if !kept_globals.is_empty() {
        report.push(
            Kind::Kept,
            "global",
            format!("kept as they were: {}", kept_globals.join(", ")),
        );
    }

    let flotilla_toml =
        render::flotilla_toml(&config, &file, &options.config_path).map_err(input_error)?;
    let runner_toml = render::runner_toml(&output, &file, &config.fleet).map_err(input_error)?;
    let classes: Vec<(String, String)> = plans
        .iter()
        .map(|p| (p.name.clone(), p.class_name.clone()))
        .collect();
    let summary = format!(
        "flotilla migrate: {file}: {} docker+machine runner{} -> fleet {:?}, classes {} \
         (default {})",
        plans.len(),
        if plans.len() == 1 { "" } else { "s" },
        config.fleet,
        config.class_names().join(", "),
        config.default_class
    );
    let report_text = report.render(&summary);
    Ok(Migration {
        config,
        flotilla_toml,
        runner_toml,
        report,
        report_text,
        classes,
    })
}

/// Indexes of the runners to migrate: those named (which must be docker+machine), or every
/// docker+machine runner.
fn select(runners: &[toml::Table], names: &[String]) -> Result<Vec<usize>, String> {
    let name_of = |r: &toml::Table| {
        r.get("name")
            .and_then(toml::Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let is_dm = |r: &toml::Table| r.get("executor").and_then(toml::Value::as_str) == Some(EXECUTOR);
    if names.is_empty() {
        let all: Vec<usize> = (0..runners.len()).filter(|&i| is_dm(&runners[i])).collect();
        if all.is_empty() {
            return Err(format!(
                "no [[runners]] with executor = \"{EXECUTOR}\": nothing to migrate"
            ));
        }
        return Ok(all);
    }
    let mut out = Vec::new();
    for n in names {
        let Some(i) = runners.iter().position(|r| name_of(r) == *n) else {
            let have: Vec<String> = runners
                .iter()
                .map(|r| format!("{:?}", name_of(r)))
                .collect();
            return Err(format!(
                "--runner {n:?}: no [[runners]] with that name (have: {})",
                have.join(", ")
            ));
        };
        if !is_dm(&runners[i]) {
            return Err(format!(
                "--runner {n:?}: runners[{i}] has executor {:?}, not \"{EXECUTOR}\": nothing \
                 to migrate",
                runners[i]
                    .get("executor")
                    .and_then(toml::Value::as_str)
                    .unwrap_or("")
            ));
        }
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::machine_options::{DEFAULT_INSTANCE_TYPE, DEFAULT_REGION};
    use flotilla_proto::config::Market;
    use flotilla_proto::duration::HumanDuration;

    fn fixture(name: &str) -> String {
        let path = format!("{}/tests/migrate/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn migrate(name: &str, options: &Options) -> Migration {
        convert(&fixture(name), options).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn reloads(m: &Migration) -> Config {
        let c = Config::from_toml(&m.flotilla_toml).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c, m.config,
            "flotilla.toml reads back as the converted config"
        );
        c
    }

    #[test]
    fn single_spot_runner_becomes_one_spot_class() {
        let m = migrate("single-spot.toml", &Options::default());
        let c = reloads(&m);
        assert_eq!(c.fleet, "aws-spot");
        let class = &c.classes["aws-spot"];
        assert_eq!(class.market, Market::Spot);
        assert_eq!(class.instance_types, ["m5.large"]);
        assert_eq!(class.subnets, ["subnet-0a1b2c3d4e5f60718"]);
        assert_eq!(class.idle_count, 2);
        assert_eq!(class.idle_time, HumanDuration::from_secs(1800));
        assert_eq!(class.max_builds, 10);
        assert_eq!(class.max_machines, 20);
        assert_eq!(class.root_volume_gb, Some(40));
        assert!(!class.forecast.enabled);
        assert_eq!(c.max_growth_rate, 3);
        assert_eq!(c.aws.region.as_deref(), Some("eu-central-1"));
        assert_eq!(c.job.default_image, "alpine:3.20");
        assert!(
            c.job.volumes.is_empty(),
            "the /cache volume is Flotilla's own"
        );
        let runner: toml::Table = toml::from_str(&m.runner_toml).unwrap();
        let r = &runner["runners"].as_array().unwrap()[0];
        assert_eq!(r["executor"].as_str(), Some("custom"));
        assert!(r.get("environment").is_none(), "one class: the default");
        assert!(!m.report_text.contains("glrt-SPOTSECRETTOKEN0001"));
    }

    #[test]
    fn periods_become_schedules_with_every_idle_setting_written() {
        let m = migrate("autoscaling-periods.toml", &Options::default());
        let c = reloads(&m);
        let class = &c.classes["autoscale-runner-on-demand"];
        assert_eq!(class.market, Market::OnDemand);
        assert_eq!(class.schedules.len(), 2);
        let work = &class.schedules[0];
        assert_eq!(work.periods, ["* 9-17 * * mon-fri"]);
        assert_eq!(work.timezone, "Europe/Berlin");
        assert_eq!(work.idle_scale_factor, Some(1.5));
        let weekend = &class.schedules[1];
        assert_eq!(weekend.idle_time, Some(HumanDuration::from_secs(0)));
        assert_eq!(weekend.idle_count_min, Some(0));
        // limit 0: concurrent 50 + the largest IdleCount 50.
        assert_eq!(class.max_machines, 100);
        assert_eq!(c.job.pull_policy.len(), 2);
        assert!(c.job.privileged);
    }

    #[test]
    fn runners_differing_by_instance_type_share_job_settings_in_one_fleet() {
        let m = migrate("three-instance-types.toml", &Options::default());
        let c = reloads(&m);
        assert_eq!(c.fleet, "ci");
        assert_eq!(c.class_names(), ["ci-large", "ci-medium", "ci-small"]);
        assert_eq!(c.default_class, "ci-small");
        assert!(
            c.classes.values().all(|k| k.job.is_none()),
            "same docker options"
        );
        assert_eq!(c.max_machines, 60);
        assert_eq!(c.classes["ci-large"].instance_types, ["c5.4xlarge"]);
    }

    #[test]
    fn docker_options_that_differ_go_to_the_class() {
        let text = fixture("three-instance-types.toml").replacen(
            "privileged = false",
            "privileged = true\n    shm_size = \"1g\"",
            1,
        );
        let m = convert(&text, &Options::default()).unwrap();
        let c = reloads(&m);
        assert!(!c.job.privileged, "the runners disagree: each class says");
        let small = c.job_for("ci-small").unwrap();
        assert!(small.privileged);
        assert!(small.container.shm_size.is_some());
        assert!(!c.job_for("ci-large").unwrap().privileged);
        let line = m
            .report
            .lines(Kind::Converted)
            .into_iter()
            .find(|l| l.contains("\"ci-small\" docker.privileged"))
            .unwrap();
        assert!(
            line.ends_with("[classes.ci-small.job] privileged"),
            "{line}"
        );
    }

    #[test]
    fn another_driver_is_refused_naming_the_key() {
        let e = convert(&fixture("unsupported-options.toml"), &Options::default()).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("runners[1].machine.MachineDriver"), "{text}");
        assert!(text.contains("\"google\""), "{text}");
        assert!(text.contains("--runner"), "{text}");
    }

    #[test]
    fn errors_name_the_key_and_never_show_a_token() {
        let text =
            "[[runners]]\nname = \"x\"\ntoken = \"glrt-NOPE\"\nexecutor = \"docker+machine\"\n\
                    [runners.machine]\nMachineDriver = \"amazonec2\"\nIdleCount = \"two\"\n\
                    MachineOptions = [\"amazonec2-ami=ami-1\", \"amazonec2-subnet-id=subnet-1\"]\n";
        let e = convert(text, &Options::default()).unwrap_err().to_string();
        assert!(e.contains("runners[0].machine.IdleCount"), "{e}");
        assert!(e.contains("expected an integer"), "{e}");
        let e = convert("token = \"glrt-NOPE\" = 3\n", &Options::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && !e.contains("glrt-NOPE"), "{e}");
        let e = convert("[[runners]]\nexecutor = \"shell\"\n", &Options::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("nothing to migrate"), "{e}");
    }

    #[test]
    fn missing_ami_and_subnet_are_refused_unless_given() {
        let text = "concurrent = 2\n[[runners]]\nname = \"x\"\nexecutor = \"docker+machine\"\n\
                    [runners.machine]\nMachineDriver = \"amazonec2\"\nMachineOptions = [\"amazonec2-zone=b\"]\n";
        let e = convert(text, &Options::default()).unwrap_err().to_string();
        assert!(e.contains("--ami"), "{e}");
        let with_ami = Options {
            ami: Some("ami-1".into()),
            ..Options::default()
        };
        let e = convert(text, &with_ami).unwrap_err().to_string();
        assert!(e.contains("--subnet") && e.contains("us-east-1b"), "{e}");
        let both = Options {
            subnets: vec!["subnet-1".into(), "subnet-2".into()],
            ..with_ami
        };
        let m = convert(text, &both).unwrap();
        let c = reloads(&m);
        assert_eq!(c.classes["x"].subnets, ["subnet-1", "subnet-2"]);
        assert_eq!(c.classes["x"].instance_types, [DEFAULT_INSTANCE_TYPE]);
        assert_eq!(c.aws.region.as_deref(), Some(DEFAULT_REGION));
        assert_eq!(m.report.count(Kind::Action), 1, "no security group");
    }
}
