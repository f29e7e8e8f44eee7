//! The output texts. `flotilla.toml` says only what the migration decided: keys at
//! Flotilla's documented defaults are left out (the file reads back as the same config),
//! except the few an operator looks for first.

use flotilla_proto::config::{AwsConfig, ClassConfig, Config, ForecastConfig, JobConfig};

use super::error::Bad;

/// Written even at their defaults.
const TOP_KEYS: &[&str] = &[
    "fleet",
    "state_dir",
    "default_class",
    "max_machines",
    "max_growth_rate",
];
const JOB_KEYS: &[&str] = &["builds_dir", "cache_dir", "default_image"];
const CLASS_KEYS: &[&str] = &[
    "ami",
    "instance_types",
    "subnets",
    "security_groups",
    "market",
    "idle_count",
    "idle_time",
    "max_machines",
    "max_builds",
];

/// `flotilla.toml`: a header naming the input and the report, then the config without
/// the keys at their defaults.
pub(super) fn flotilla_toml(
    config: &Config,
    source: &str,
    install_path: &str,
) -> Result<String, Bad> {
    let mut top = to_table(config, "flotilla.toml")?;
    prune(
        &mut top,
        &to_table(&Config::default(), "flotilla.toml")?,
        TOP_KEYS,
    );
    let aws_default = to_table(&AwsConfig::default(), "flotilla.toml")?;
    if let Some(toml::Value::Table(aws)) = top.get_mut("aws") {
        prune(aws, &aws_default, &["region"]);
    }
    let job_default = to_table(&JobConfig::default(), "flotilla.toml")?;
    if let Some(toml::Value::Table(job)) = top.get_mut("job") {
        prune(job, &job_default, JOB_KEYS);
    }
    let class_default = to_table(&ClassConfig::default(), "flotilla.toml")?;
    let forecast_default = to_table(&ForecastConfig::default(), "flotilla.toml")?;
    if let Some(toml::Value::Table(classes)) = top.get_mut("classes") {
        for (_, class) in classes.iter_mut() {
            if let toml::Value::Table(class) = class {
                prune(class, &class_default, CLASS_KEYS);
                if let Some(toml::Value::Table(f)) = class.get_mut("forecast") {
                    prune(f, &forecast_default, &["enabled"]);
                }
            }
        }
    }
    let body = toml::to_string(&top).map_err(|e| unwritable("flotilla.toml", &e))?;
    Ok(format!(
        "# flotilla.toml written by `flotilla migrate` from {source}.\n\
         # Read migration-report.txt first: do what it lists as \"action required\" before\n\
         # starting the daemon. Install this file as {install_path}. Settings not written\n\
         # here are at their defaults (README: Configuration reference).\n\n{body}"
    ))
}

/// The runner's `config.toml`, with a header.
pub(super) fn runner_toml(table: &toml::Table, source: &str, fleet: &str) -> Result<String, Bad> {
    let body = toml::to_string(table).map_err(|e| unwritable("config.toml", &e))?;
    Ok(format!(
        "# gitlab-runner config.toml written by `flotilla migrate` from {source}: its\n\
         # docker+machine runners use the custom executor with Flotilla (fleet {fleet}).\n\
         # Comments of the original file are not carried over.\n\n{body}"
    ))
}

fn to_table<T: serde::Serialize>(value: &T, file: &str) -> Result<toml::Table, Bad> {
    toml::Table::try_from(value).map_err(|e| unwritable(file, &e))
}

fn unwritable(file: &str, e: &toml::ser::Error) -> Bad {
    Bad::new(
        file,
        format!("cannot be written: {}", e.to_string().trim_end()),
    )
}

/// Removes the keys of `t` equal to `defaults`' (a key missing there is one serde skips
/// when unset), but not those in `keep`.
fn prune(t: &mut toml::Table, defaults: &toml::Table, keep: &[&str]) {
    t.retain(|k, v| keep.contains(&k) || defaults.get(k) != Some(v));
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::config::Market;

    #[test]
    fn defaults_are_left_out_and_the_file_reads_back_the_same() {
        let mut config = Config {
            fleet: "ci".into(),
            default_class: "a".into(),
            ..Config::default()
        };
        let mut class = ClassConfig {
            ami: "ami-1".into(),
            instance_types: vec!["m5.large".into()],
            subnets: vec!["subnet-1".into()],
            market: Market::Spot,
            ..ClassConfig::default()
        };
        class.forecast.enabled = false;
        config.classes.insert("a".into(), class);
        let text = flotilla_toml(&config, "in.toml", "/etc/flotilla/flotilla.toml").unwrap();
        assert!(!text.contains("reconcile_interval"), "{text}");
        assert!(!text.contains("helper_image"), "{text}");
        assert!(!text.contains("lookahead"), "{text}");
        assert!(
            text.contains("[classes.a.forecast]\nenabled = false"),
            "{text}"
        );
        assert!(text.contains("max_machines = 10"), "{text}");
        let back = Config::from_toml(&text).unwrap();
        assert_eq!(back, config);
    }
}
