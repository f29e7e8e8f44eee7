//! Single stage calls that need no machine: `config`'s output and a missing config file.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use flotilla_proto::config::{ClassConfig, Config};
use flotilla_sandbox::runner::{JobContext, RunnerOptions, SYSTEM_FAILURE_EXIT_CODE};
use flotilla_sandbox::sandbox::find_flotilla_bin;
use flotilla_sandbox::Job;

use crate::common::bounded;

fn write_config(dir: &Path) -> Result<std::path::PathBuf> {
    let text = format!(
        "fleet = \"stages\"\nstate_dir = \"{}\"\ndefault_class = \"default\"\n\n[job]\nbuilds_dir = \"/b\"\ncache_dir = \"/c\"\n",
        dir.join("state").display()
    );
    let mut config = Config::from_toml(&format!(
        "{text}\n[classes.default]\nami = \"ami-12c6146b\"\ninstance_types = [\"t3.micro\"]\nsubnets = [\"subnet-1\"]\n"
    ))
    .map_err(anyhow::Error::msg)?;
    config.classes.insert(
        "other".into(),
        ClassConfig {
            idle_count: 0,
            ..config.classes["default"].clone()
        },
    );
    config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let path = dir.join("flotilla.toml");
    std::fs::write(&path, config.to_toml()?)?;
    Ok(path)
}

#[tokio::test]
async fn config_prints_only_json_with_builds_dir_cache_dir_and_driver() -> Result<()> {
    bounded(Duration::from_secs(60), async {
        let dir = tempfile::tempdir()?;
        let config = write_config(dir.path())?;
        let ctx = JobContext::new(
            RunnerOptions::new(&find_flotilla_bin()?, Some(&config)),
            Job::new(301, &["true"]),
        )?;
        let r = ctx.call("config", &["config"]).await?;
        ensure!(
            r.exit_code == Some(0),
            "config exited {:?}: {}",
            r.exit_code,
            r.stderr
        );
        let v: serde_json::Value = serde_json::from_str(&r.stdout)
            .map_err(|e| anyhow::anyhow!("stdout is not only JSON ({e}): {:?}", r.stdout))?;
        ensure!(v.is_object(), "not an object: {v}");
        ensure!(v["builds_dir"] == "/b", "builds_dir: {v}");
        ensure!(v["cache_dir"] == "/c", "cache_dir: {v}");
        ensure!(
            v["driver"]["name"].as_str().is_some_and(|n| !n.is_empty()),
            "driver: {v}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn missing_config_file_is_a_system_failure_with_one_clear_line_on_stderr() -> Result<()> {
    bounded(Duration::from_secs(60), async {
        let missing = Path::new("/nonexistent/flotilla-e2e/flotilla.toml");
        let mut ctx = JobContext::new(
            RunnerOptions::new(&find_flotilla_bin()?, Some(missing)),
            Job::new(302, &["true"]),
        )?;
        let script = ctx.write_script("build_script", &["true".into()])?;
        let script = script.display().to_string();
        for (stage, args) in [
            ("prepare", vec!["prepare"]),
            ("build_script", vec!["run", &script, "build_script"]),
        ] {
            let r = ctx.call(stage, &args).await?;
            ensure!(
                r.exit_code == Some(SYSTEM_FAILURE_EXIT_CODE),
                "{stage} exited {:?}, stderr: {}",
                r.exit_code,
                r.stderr
            );
            let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            ensure!(
                lines.len() == 1,
                "{stage}: expected one line on stderr, got {lines:#?}"
            );
            ensure!(
                lines[0].contains(&missing.display().to_string()),
                "{stage}: the line does not name the file: {}",
                lines[0]
            );
        }
        Ok(())
    })
    .await
}
