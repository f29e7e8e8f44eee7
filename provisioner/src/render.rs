//! The two files a runner host is configured with: the daemon's `flotilla.toml`, built
//! as a `flotilla_proto::config::Config` (so the daemon's own loader accepts it), and
//! gitlab-runner's `config.toml` with the `[runners.custom]` section pointing at flotilla.
//!
//! Invariant: neither file ever contains the runner token; `config.toml` carries the
//! placeholder `TOKEN_PLACEHOLDER`, which the host replaces at boot from SSM.

use flotilla_proto::config::Config;
use serde::Serialize;

use crate::paths::{FLOTILLA_BIN, FLOTILLA_TOML_PATH, TOKEN_PLACEHOLDER};
use crate::stack::{FleetIds, Stack};

/// The daemon's config for one runner host of this stack (`fleet` is that host's fleet
/// name, see `Stack::host_fleets`).
pub(crate) fn flotilla_config(
    stack: &Stack,
    ids: &FleetIds,
    fleet: &str,
) -> Result<Config, String> {
    let mut config = stack.fleet_config(ids, fleet).map_err(|e| e.to_string())?;
    if let Some(m) = &stack.monitoring {
        config.metrics_addr = Some(m.flotilla_addr());
    }
    Ok(config)
}

/// `flotilla.toml` as text, via the proto's own writer.
pub(crate) fn flotilla_toml(config: &Config) -> Result<String, String> {
    let body = config
        .to_toml()
        .map_err(|e| format!("cannot write flotilla.toml: {e}"))?;
    Ok(format!(
        "# Written by flotilla-provision; changes are overwritten by the next apply.\n{body}"
    ))
}

#[derive(Serialize)]
struct RunnerConfig {
    concurrent: u32,
    check_interval: u32,
    shutdown_timeout: u32,
    /// gitlab-runner's metrics endpoint (`[monitoring]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    listen_address: Option<String>,
    runners: Vec<RunnerEntry>,
}

#[derive(Serialize)]
struct RunnerEntry {
    name: String,
    url: String,
    token: String,
    executor: String,
    builds_dir: String,
    cache_dir: String,
    custom: Custom,
    cache: Cache,
}

#[derive(Serialize)]
struct Custom {
    config_exec: String,
    config_args: Vec<String>,
    prepare_exec: String,
    prepare_args: Vec<String>,
    run_exec: String,
    run_args: Vec<String>,
    cleanup_exec: String,
    cleanup_args: Vec<String>,
    /// Waiting for a machine happens in prepare: give it the acquire timeout and more.
    prepare_exec_timeout: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Cache {
    #[serde(rename = "Type")]
    kind: String,
    shared: bool,
    #[serde(rename = "s3")]
    s3: S3Cache,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct S3Cache {
    server_address: String,
    bucket_name: String,
    bucket_location: String,
    authentication_type: String,
}

/// gitlab-runner's `config.toml` with the token placeholder; the custom executor runs
/// every stage through flotilla, and the cache goes to the stack's bucket with the
/// host's instance-profile credentials.
pub(crate) fn runner_config_toml(
    stack: &Stack,
    config: &Config,
    region: &str,
) -> Result<String, String> {
    let exec = |stage: &str| {
        (
            FLOTILLA_BIN.to_owned(),
            vec![
                "--config".to_owned(),
                FLOTILLA_TOML_PATH.to_owned(),
                stage.to_owned(),
            ],
        )
    };
    let (config_exec, config_args) = exec("config");
    let (prepare_exec, prepare_args) = exec("prepare");
    let (run_exec, run_args) = exec("run");
    let (cleanup_exec, cleanup_args) = exec("cleanup");
    let doc = RunnerConfig {
        concurrent: stack.gitlab.concurrent,
        check_interval: 3,
        shutdown_timeout: 0,
        listen_address: stack.monitoring.as_ref().map(|m| m.runner_addr()),
        runners: vec![RunnerEntry {
            name: format!("flotilla-{}", stack.name),
            url: stack.gitlab_url().to_owned(),
            token: TOKEN_PLACEHOLDER.into(),
            executor: "custom".into(),
            builds_dir: config.job.builds_dir.clone(),
            cache_dir: config.job.cache_dir.clone(),
            custom: Custom {
                config_exec,
                config_args,
                prepare_exec,
                prepare_args,
                run_exec,
                run_args,
                cleanup_exec,
                cleanup_args,
                prepare_exec_timeout: config.job.acquire_timeout.0.as_secs() + 300,
            },
            cache: Cache {
                kind: "s3".into(),
                shared: true,
                s3: S3Cache {
                    server_address: "s3.amazonaws.com".into(),
                    bucket_name: stack.bucket.name.clone(),
                    bucket_location: region.to_owned(),
                    authentication_type: "iam".into(),
                },
            },
        }],
    };
    let body = toml::to_string_pretty(&doc)
        .map_err(|e| format!("cannot write gitlab-runner's config.toml: {e}"))?;
    Ok(format!(
        "# Written by flotilla-provision. The token is filled in at boot from SSM by\n\
         # /usr/local/sbin/flotilla-runner-token; it is never in user data.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::tests::GOOD;

    #[test]
    fn rendered_flotilla_toml_loads_with_the_daemon_loader() {
        let stack = Stack::from_toml(GOOD).unwrap();
        let ids = FleetIds {
            private_subnets: vec!["subnet-a".into(), "subnet-b".into()],
            build_security_group: "sg-1".into(),
            build_instance_profile: "flotilla-ci-build-machine".into(),
            region: Some("us-east-1".into()),
        };
        let config = flotilla_config(&stack, &ids, "ci").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flotilla.toml");
        std::fs::write(&path, flotilla_toml(&config).unwrap()).unwrap();
        let loaded = Config::load(&path).unwrap();
        assert_eq!(loaded, config);
        assert_eq!(loaded.fleet, "ci");
        assert_eq!(loaded.classes["small"].subnets, ["subnet-a", "subnet-b"]);
        assert_eq!(loaded.classes["small"].security_groups, ["sg-1"]);
        // proto's defaults, not ours
        assert_eq!(loaded.max_machines, 10);
    }

    #[test]
    fn host_fleets_keep_the_first_name() {
        let mut stack = Stack::from_toml(GOOD).unwrap();
        assert_eq!(stack.host_fleets(), ["ci"]);
        stack.runner_hosts.count = 3;
        assert_eq!(stack.host_fleets(), ["ci", "ci-1", "ci-2"]);
        assert!(stack.is_own_fleet("ci-7"));
        assert!(!stack.is_own_fleet("ci-x"));
        assert!(!stack.is_own_fleet("cid"));
    }

    #[test]
    fn runner_config_has_custom_executor_and_no_token() {
        let stack = Stack::from_toml(GOOD).unwrap();
        let config = flotilla_config(&stack, &FleetIds::placeholders(&stack), "ci").unwrap();
        let text = runner_config_toml(&stack, &config, "us-east-1").unwrap();
        let v: toml::Table = toml::from_str(&text).unwrap();
        let runner = &v["runners"].as_array().unwrap()[0];
        assert_eq!(runner["executor"].as_str(), Some("custom"));
        assert_eq!(runner["token"].as_str(), Some(TOKEN_PLACEHOLDER));
        assert_eq!(runner["url"].as_str(), Some("https://gitlab.example.com"));
        let run_args: Vec<&str> = runner["custom"]["run_args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(run_args, ["--config", "/etc/flotilla/flotilla.toml", "run"]);
        assert_eq!(
            runner["custom"]["prepare_exec_timeout"].as_integer(),
            Some(1200)
        );
        assert_eq!(
            runner["cache"]["s3"]["BucketName"].as_str(),
            Some("ci-flotilla-cache")
        );
    }

    /// With `[monitoring]` both endpoints listen on the private address the host fills in
    /// at first boot; once filled in, the daemon's own loader accepts the file.
    #[test]
    fn monitoring_puts_both_endpoints_on_the_private_address() {
        let stack =
            Stack::from_toml(&format!("{GOOD}\n[monitoring]\ncidr = \"10.9.0.0/16\"\n")).unwrap();
        stack.validate().unwrap();
        let config = flotilla_config(&stack, &FleetIds::placeholders(&stack), "ci").unwrap();
        let text = flotilla_toml(&config).unwrap();
        let filled = text.replace(crate::paths::PRIVATE_IPV4_PLACEHOLDER, "10.9.16.5");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flotilla.toml");
        std::fs::write(&path, filled).unwrap();
        let loaded = Config::load(&path).unwrap();
        assert_eq!(loaded.metrics_addr.as_deref(), Some("10.9.16.5:9402"));
        let runner = runner_config_toml(&stack, &config, "us-east-1").unwrap();
        let v: toml::Table = toml::from_str(&runner).unwrap();
        assert_eq!(
            v["listen_address"].as_str(),
            Some("@FLOTILLA_PRIVATE_IPV4@:9252")
        );
        // Without the section: no listener beyond what [fleet] says, none for the runner.
        let plain = Stack::from_toml(GOOD).unwrap();
        let config = flotilla_config(&plain, &FleetIds::placeholders(&plain), "ci").unwrap();
        assert_eq!(config.metrics_addr, None);
        let runner = runner_config_toml(&plain, &config, "us-east-1").unwrap();
        assert!(!runner.contains("listen_address"), "{runner}");
    }
}
