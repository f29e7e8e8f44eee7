//! One `[[runners]]` entry rewritten for the custom executor: `executor = "custom"`, a
//! `[runners.custom]` section calling the Flotilla stages, the runner's class as its
//! default `FLOTILLA_CLASS`; everything else (url, token, limit, cache, scripts, feature
//! flags) is kept as it was. `[runners.docker]` and `[runners.machine]` are converted by
//! the caller and left out here.

use super::error::Bad;
use super::report::{Kind, Report};

/// Keys of `[[runners]]` that gitlab-runner knows (RunnerCredentials, RunnerSettings,
/// RunnerConfig), plus the clone scripts of older versions.
const KNOWN_KEYS: &[&str] = &[
    "name",
    "limit",
    "output_limit",
    "request_concurrency",
    "strict_check_interval",
    "unhealthy_requests_limit",
    "unhealthy_interval",
    "job_status_final_update_retry_limit",
    "experimental",
    "url",
    "id",
    "token",
    "token_obtained_at",
    "token_expires_at",
    "tls-ca-file",
    "tls-cert-file",
    "tls-key-file",
    "labels",
    "executor",
    "builds_dir",
    "cache_dir",
    "clone_url",
    "environment",
    "proxy_exec",
    "pre_get_sources_script",
    "post_get_sources_script",
    "pre_clone_script",
    "post_clone_script",
    "pre_build_script",
    "post_build_script",
    "prepare_timeout",
    "get_sources_timeout",
    "debug_trace_disabled",
    "safe_directory_checkout",
    "clean_git_config",
    "shell",
    "custom_build_dir",
    "referees",
    "cache",
    "artifact",
    "feature_flags",
    "monitoring",
    "use_slot_cgroups",
    "slot_cgroup_template",
    "step_runner_image",
];

/// Other executors' sections: kept, unused by the custom executor.
const OTHER_EXECUTORS: &[&str] = &[
    "ssh",
    "parallels",
    "virtualbox",
    "kubernetes",
    "autoscaler",
    "instance",
];

/// Where the stages are: the `flotilla` binary and the flotilla.toml it is given.
#[derive(Debug, Clone)]
pub(super) struct Stages<'a> {
    pub binary: &'a str,
    pub config_path: &'a str,
    /// `prepare_exec_timeout`: see [`prepare_exec_timeout`].
    pub prepare_timeout_secs: u64,
}

/// `prepare` waits for a machine (up to `[job] acquire_timeout`) and then pulls images:
/// gitlab-runner gives it five minutes more, as flotilla-provision's runner config does.
pub(super) fn prepare_exec_timeout(acquire_timeout: std::time::Duration) -> u64 {
    acquire_timeout.as_secs().saturating_add(300)
}

/// The `[runners.custom]` section that calls the Flotilla stages.
pub(super) fn custom_section(stages: &Stages<'_>) -> toml::Table {
    let mut t = toml::Table::new();
    for stage in ["config", "prepare", "run", "cleanup"] {
        t.insert(
            format!("{stage}_exec"),
            toml::Value::String(stages.binary.to_owned()),
        );
        t.insert(
            format!("{stage}_args"),
            toml::Value::Array(
                ["--config", stages.config_path, stage]
                    .iter()
                    .map(|s| toml::Value::String((*s).to_owned()))
                    .collect(),
            ),
        );
        if stage == "prepare" {
            t.insert(
                "prepare_exec_timeout".into(),
                toml::Value::Integer(
                    i64::try_from(stages.prepare_timeout_secs).unwrap_or(i64::MAX),
                ),
            );
        }
    }
    t
}

/// `runner` (at input key `path`, reported at `at`) for the custom executor, with
/// `FLOTILLA_CLASS=<class>` in its environment when `class` is given.
pub(super) fn rewrite(
    runner: &toml::Table,
    path: &str,
    at: &str,
    stages: &Stages<'_>,
    class: Option<&str>,
    report: &mut Report,
) -> Result<toml::Table, Bad> {
    let mut out = toml::Table::new();
    let mut kept = Vec::new();
    for (key, value) in runner {
        match key.as_str() {
            "docker" | "machine" => {}
            "executor" => {
                out.insert(key.clone(), toml::Value::String("custom".into()));
                report.push(
                    Kind::Converted,
                    format!("{at} executor"),
                    format!(
                        "\"custom\", with [runners.custom] calling {} --config {} \
                         config|prepare|run|cleanup (prepare_exec_timeout = {}: prepare waits \
                         for a machine)",
                        stages.binary, stages.config_path, stages.prepare_timeout_secs
                    ),
                );
            }
            "custom" => report.push(
                Kind::Note,
                format!("{at} custom"),
                "replaced by the Flotilla stages",
            ),
            "environment" => {
                out.insert(
                    key.clone(),
                    environment(Some(value), class, &format!("{path}.environment"))?,
                );
                kept.push("environment".to_owned());
            }
            "shell" if !matches!(value.as_str(), Some("bash" | "sh")) => {
                report.push(
                    Kind::Unsupported,
                    format!("{at} shell"),
                    "Flotilla runs job scripts with bash or sh in Linux containers: remove \
                     shell (kept as it was)",
                );
                out.insert(key.clone(), value.clone());
            }
            "cache" => {
                cache_notes(value, at, report);
                out.insert(key.clone(), value.clone());
                kept.push("[runners.cache]".to_owned());
            }
            k if OTHER_EXECUTORS.contains(&k) => {
                report.push(
                    Kind::Kept,
                    format!("{at} {k}"),
                    "another executor's section: unused by the custom executor",
                );
                out.insert(key.clone(), value.clone());
            }
            k if KNOWN_KEYS.contains(&k) => {
                out.insert(key.clone(), value.clone());
                kept.push(if value.is_table() {
                    format!("[runners.{k}]")
                } else {
                    k.to_owned()
                });
            }
            k => {
                report.push(
                    Kind::Unknown,
                    format!("{at} {k}"),
                    "not a [[runners]] key gitlab-runner knows: kept as it was",
                );
                out.insert(key.clone(), value.clone());
            }
        }
    }
    if let Some(class) = class {
        if !out.contains_key("environment") {
            out.insert(
                "environment".into(),
                environment(None, Some(class), &format!("{path}.environment"))?,
            );
        }
        report.push(
            Kind::Converted,
            format!("{at} environment"),
            format!(
                "FLOTILLA_CLASS={class} added: this runner's jobs run on class {class} unless \
                 a job sets the variable FLOTILLA_CLASS itself"
            ),
        );
    }
    out.insert("custom".into(), toml::Value::Table(custom_section(stages)));
    if !kept.is_empty() {
        report.push(
            Kind::Kept,
            at,
            format!("kept as they were: {}", kept.join(", ")),
        );
    }
    Ok(out)
}

/// The runner's `environment` with `FLOTILLA_CLASS=<class>` set (replacing one there).
fn environment(
    value: Option<&toml::Value>,
    class: Option<&str>,
    key: &str,
) -> Result<toml::Value, Bad> {
    let mut entries = match value {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items.clone(),
        Some(other) => {
            return Err(Bad::new(
                key,
                format!(
                    "expected an array of \"NAME=value\", found {}",
                    other.type_str()
                ),
            ))
        }
    };
    if let Some(class) = class {
        entries.retain(|e| !e.as_str().is_some_and(|s| s.starts_with("FLOTILLA_CLASS=")));
        entries.push(toml::Value::String(format!("FLOTILLA_CLASS={class}")));
    }
    Ok(toml::Value::Array(entries))
}

/// What the distributed cache needs now: nothing changes for the jobs (the helper gets
/// pre-signed URLs as before), but with IAM authentication the role that signs them is the
/// runner host's.
fn cache_notes(cache: &toml::Value, at: &str, report: &mut Report) {
    let here = format!("{at} cache");
    let get = |t: Option<&toml::Value>, k: &str| {
        t.and_then(|t| t.get(k))
            .and_then(toml::Value::as_str)
            .map(str::to_owned)
    };
    let kind = get(Some(cache), "Type");
    match kind.as_deref() {
        Some("s3") => {
            let s3 = cache.get("s3");
            let auth = get(s3, "AuthenticationType");
            let has_keys = get(s3, "AccessKey").is_some_and(|k| !k.is_empty())
                && get(s3, "SecretKey").is_some_and(|k| !k.is_empty());
            if auth.as_deref() == Some("iam") || (!has_keys && auth.is_none()) {
                let bucket = get(s3, "BucketName").unwrap_or_else(|| "<bucket>".into());
                report.push(
                    Kind::Action,
                    here,
                    format!(
                        "kept: gitlab-runner signs the cache URLs with the runner host's own \
                         credentials (AuthenticationType iam): its role needs s3:GetObject, \
                         s3:PutObject on arn:aws:s3:::{bucket}/* and s3:ListBucket on the \
                         bucket (the README's RunnerCache statements; kms:Decrypt and \
                         kms:GenerateDataKey for SSE-KMS)"
                    ),
                );
            } else {
                report.push(
                    Kind::Kept,
                    here,
                    "kept with its access keys (not shown): jobs get pre-signed URLs as before",
                );
            }
        }
        Some(_) => report.push(
            Kind::Kept,
            here,
            "kept: jobs get pre-signed URLs from gitlab-runner as before",
        ),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAGES: Stages<'static> = Stages {
        binary: "/usr/local/bin/flotilla",
        config_path: "/etc/flotilla/flotilla.toml",
        prepare_timeout_secs: 1200,
    };

    fn runner(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn becomes_a_custom_runner_that_keeps_its_registration() {
        let r = runner(
            "name = \"a\"\nurl = \"https://gitlab\"\ntoken = \"glrt-x\"\nexecutor = \"docker+machine\"\nlimit = 3\n\
             [docker]\nimage = \"x\"\n[machine]\nIdleCount = 1\n",
        );
        let mut report = Report::default();
        let out = rewrite(&r, "runners[0]", "at", &STAGES, Some("small"), &mut report).unwrap();
        assert_eq!(out["executor"].as_str(), Some("custom"));
        assert_eq!(out["token"].as_str(), Some("glrt-x"));
        assert_eq!(out["limit"].as_integer(), Some(3));
        assert!(!out.contains_key("docker") && !out.contains_key("machine"));
        let custom = out["custom"].as_table().unwrap();
        assert_eq!(
            custom["run_args"].as_array().unwrap()[2].as_str(),
            Some("run")
        );
        assert_eq!(
            out["environment"].as_array().unwrap()[0].as_str(),
            Some("FLOTILLA_CLASS=small")
        );
        let text = report.render("r");
        assert!(!text.contains("glrt-x"), "{text}");
        assert!(
            text.contains("kept as they were: name, url, token, limit"),
            "{text}"
        );
    }

    #[test]
    fn an_existing_class_variable_is_replaced_and_other_variables_kept() {
        let r = runner(
            "environment = [\"A=1\", \"FLOTILLA_CLASS=old\"]\nexecutor = \"docker+machine\"\n",
        );
        let out = rewrite(
            &r,
            "runners[0]",
            "at",
            &STAGES,
            Some("new"),
            &mut Report::default(),
        )
        .unwrap();
        let env: Vec<&str> = out["environment"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(toml::Value::as_str)
            .collect();
        assert_eq!(env, ["A=1", "FLOTILLA_CLASS=new"]);
    }

    #[test]
    fn unknown_keys_are_reported_and_kept() {
        let r = runner("executor = \"docker+machine\"\nfrobnicate = true\n");
        let mut report = Report::default();
        let out = rewrite(&r, "runners[0]", "at", &STAGES, None, &mut report).unwrap();
        assert_eq!(out["frobnicate"].as_bool(), Some(true));
        assert_eq!(report.count(Kind::Unknown), 1);
    }
}
