//! Build machines configured the way operators run them: `[dockerd]` settings merged over
//! the AMI's own daemon.json, and the machine they give still running jobs; a class's
//! `ready_command` deciding when a machine is ready, and a failing one a failed boot;
//! `user_data_parts` run in cloud-init's order before dockerd starts.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use flotilla_proto::boot_hooks::ReadyCommand;
use flotilla_proto::dockerd::{AddressPool, DockerdSettings};
use flotilla_proto::duration::HumanDuration;
use flotilla_sandbox::util::wait_until;
use flotilla_sandbox::{docker_on, Job, Outcome, Sandbox, SandboxOptions};

use crate::common::bounded;

/// What the planted "AMI" ships in /etc/docker/daemon.json: a key of its own that must
/// survive, and keys Flotilla's settings and TLS must win over.
const AMI_DAEMON_JSON: &str =
    r#"{"labels": ["ami=base"], "mtu": 1500, "hosts": ["fd://"], "tls": false}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_settings_merge_over_the_amis_daemon_json_and_jobs_still_run() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions {
            idle_count: 1,
            ami_files: vec![("/etc/docker/daemon.json".into(), AMI_DAEMON_JSON.into())],
            dockerd: DockerdSettings {
                registry_mirrors: Some(vec!["https://mirror.flotilla.test".into()]),
                insecure_registries: Some(vec!["registry.flotilla.test:5000".into()]),
                mtu: Some(1450),
                data_root: Some("/mnt/docker".into()),
                log_driver: Some("json-file".into()),
                log_opts: Some([("max-size".to_string(), "7m".to_string())].into()),
                default_address_pools: Some(vec![AddressPool {
                    base: "172.80.0.0/16".into(),
                    size: 24,
                }]),
                http_proxy: Some("http://proxy.flotilla.test:3128".into()),
                https_proxy: Some("http://proxy.flotilla.test:3129".into()),
                no_proxy: Some("localhost,127.0.0.0/8".into()),
            },
            ..Default::default()
        })
        .await?;
        let m = sb
            .emulator()
            .wait_running(1, Duration::from_secs(120))
            .await
            .with_context(|| sb.diagnostics())?
            .remove(0);
        let ctx = || sb.diagnostics();

        // The machine's daemon.json after boot's merge: the AMI's own key kept, Flotilla's
        // settings and TLS over the AMI's.
        let merged: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(m.file("/etc/docker/daemon.json"))?)?;
        ensure!(merged["labels"][0] == "ami=base", "{merged:#}");
        ensure!(merged["mtu"] == 1450, "{merged:#}");
        ensure!(
            merged["tls"] == true && merged["tlsverify"] == true,
            "{merged:#}"
        );
        ensure!(
            merged["hosts"]
                .as_array()
                .is_some_and(|h| h.iter().all(|h| h != "fd://")),
            "{merged:#}"
        );
        ensure!(
            merged["default-address-pools"][0]["base"] == "172.80.0.0/16",
            "{merged:#}"
        );

        // What the machine's dockerd runs with.
        let info: serde_json::Value =
            serde_json::from_str(&docker_on(&m, &["info", "--format", "{{json .}}"]).await?)?;
        let reg = &info["RegistryConfig"];
        ensure!(
            reg["Mirrors"][0] == "https://mirror.flotilla.test/",
            "mirrors: {reg:#}"
        );
        ensure!(
            reg["IndexConfigs"]["registry.flotilla.test:5000"]["Secure"] == false,
            "insecure registries: {reg:#}"
        );
        ensure!(
            info["Labels"]
                .as_array()
                .is_some_and(|l| l.iter().any(|l| l == "ami=base")),
            "the AMI's labels: {}",
            info["Labels"]
        );
        let data_root = m.file("/mnt/docker");
        ensure!(
            info["DockerRootDir"] == data_root.display().to_string(),
            "data root {} (expected {})",
            info["DockerRootDir"],
            data_root.display()
        );
        ensure!(
            info["HttpProxy"] == "http://proxy.flotilla.test:3128"
                && info["HttpsProxy"] == "http://proxy.flotilla.test:3129"
                && info["NoProxy"] == "localhost,127.0.0.0/8",
            "proxies: {} {} {}",
            info["HttpProxy"],
            info["HttpsProxy"],
            info["NoProxy"]
        );
        ensure!(
            info["LoggingDriver"] == "json-file",
            "{}",
            info["LoggingDriver"]
        );

        // A job runs on it (its images pulled past the proxy settings, into the data root).
        let r = sb
            .run_job(Job::new(701, &["echo ran-on-tuned-dockerd"]))
            .await?;
        ensure!(r.outcome == Outcome::Success, "{}\n{}", r.describe(), ctx());
        // A container made now gets the configured log options by default.
        let id = docker_on(&m, &["create", &sb.job_image, "true"]).await?;
        let log_config = docker_on(
            &m,
            &[
                "inspect",
                "--format",
                "{{json .HostConfig.LogConfig}}",
                id.trim(),
            ],
        )
        .await?;
        let log_config: serde_json::Value = serde_json::from_str(&log_config)?;
        ensure!(
            log_config["Config"]["max-size"] == "7m",
            "log config of a new container: {log_config}"
        );
        ensure!(
            std::fs::read_dir(data_root.join("containers"))?.count() > 0,
            "no containers under the configured data root"
        );
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_ready_command_is_a_failed_boot_and_a_replacement_serves_the_job() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        // The ready command checks a file under /host: in the sandbox that is this host's /
        // (the emulated machines' dockerd run here), so the test decides when it passes.
        let flag = tempfile::NamedTempFile::new()?.into_temp_path();
        let flag_path = flag.to_path_buf();
        std::fs::remove_file(&flag_path)?;
        let sb = Sandbox::start(SandboxOptions {
            metrics: true,
            ready_command: Some(ReadyCommand {
                image: "{registry}/flotilla/busybox:latest".into(),
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("echo checking; test -e /host{}", flag_path.display()),
                ],
                timeout: Some(HumanDuration::from_secs(60)),
            }),
            ..Default::default()
        })
        .await?;
        let job = tokio::spawn(flotilla_sandbox::runner::run_job(
            sb.runner_options(),
            Job::new(702, &["echo served"]),
        ));
        // The first machine fails its ready command and is terminated as a failed boot.
        let first = wait_until(
            "a machine terminated as a failed boot",
            Duration::from_secs(120),
            Duration::from_millis(250),
            || async {
                let text = sb.metrics().await?;
                Ok(text
                    .contains(r#"flotilla_terminations_total{reason="boot_timeout"} 1"#)
                    .then_some(()))
            },
        )
        .await
        .with_context(|| sb.diagnostics());
        let log = std::fs::read_to_string(sb.daemon_log()).unwrap_or_default();
        first?;
        ensure!(
            log.contains("failed its ready_command") && log.contains("exited with 1"),
            "the daemon log says why: {}",
            sb.diagnostics()
        );
        // The metric counts the termination when it is decided; moto shows it once the
        // daemon's TerminateInstances call went through.
        wait_until(
            "moto to hold the failed machine terminated",
            Duration::from_secs(60),
            Duration::from_millis(250),
            || async {
                let terminated = flotilla_sandbox::moto::fleet_instances(sb.ec2(), &sb.fleet)
                    .await?
                    .into_iter()
                    .any(|i| i.state == "terminated" || i.state == "shutting-down");
                Ok(terminated.then_some(()))
            },
        )
        .await
        .with_context(|| sb.diagnostics())?;
        // Now the check passes: a replacement becomes ready and serves the job.
        std::fs::write(&flag_path, b"ok")?;
        let r = job.await??;
        ensure!(
            r.outcome == Outcome::Success,
            "{}\n{}",
            r.describe(),
            sb.diagnostics()
        );
        sb.shutdown().await
    })
    .await
}

/// A class's `user_data_parts` as cloud-init runs them: every part's files written, the
/// shell part before the runcmd (Flotilla's daemon.json merge and dockerd start, then the
/// operator's commands), all on the machine itself. The shell part prepares the AMI's
/// daemon.json, which proves it ran before dockerd read it; the cloud-config part installs
/// a registry CA (one of the documented uses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_data_parts_run_in_cloud_inits_order_before_dockerd_starts() -> Result<()> {
    use flotilla_proto::boot_hooks::{PartKind, UserDataPart};
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions {
            idle_count: 1,
            user_data_parts: vec![
                UserDataPart {
                    kind: PartKind::Shell,
                    content: "#!/bin/sh\nset -e\nmkdir -p /etc/docker /var/log\n\
                              printf '{\"labels\": [\"hook=ran\"]}' > /etc/docker/daemon.json\n\
                              echo shell-part >> /var/log/flotilla-hooks\n"
                        .into(),
                },
                UserDataPart {
                    kind: PartKind::CloudConfig,
                    content: "#cloud-config\n\
                              write_files:\n\
                              \x20 - path: /etc/docker/certs.d/registry.flotilla.test:5000/ca.crt\n\
                              \x20   permissions: '0644'\n\
                              \x20   content: |\n\
                              \x20     operator-ca\n\
                              runcmd:\n\
                              \x20 - [sh, -c, 'echo runcmd-list >> /var/log/flotilla-hooks']\n\
                              \x20 - test -s /etc/docker/daemon.json && echo runcmd-string >> /var/log/flotilla-hooks\n"
                        .into(),
                },
            ],
            ..Default::default()
        })
        .await?;
        let m = sb
            .emulator()
            .wait_running(1, Duration::from_secs(120))
            .await
            .with_context(|| sb.diagnostics())?
            .remove(0);
        let hooks = std::fs::read_to_string(m.file("/var/log/flotilla-hooks"))?;
        ensure!(
            hooks == "shell-part\nruncmd-list\nruncmd-string\n",
            "hook order: {hooks:?}"
        );
        let ca = std::fs::read_to_string(
            m.file("/etc/docker/certs.d/registry.flotilla.test:5000/ca.crt"),
        )?;
        ensure!(ca == "operator-ca\n", "{ca:?}");
        // dockerd started from the daemon.json the shell part left, merged with Flotilla's.
        let info: serde_json::Value =
            serde_json::from_str(&docker_on(&m, &["info", "--format", "{{json .}}"]).await?)?;
        ensure!(
            info["Labels"]
                .as_array()
                .is_some_and(|l| l.iter().any(|l| l == "hook=ran")),
            "labels: {}",
            info["Labels"]
        );
        let r = sb.run_job(Job::new(703, &["echo after-hooks"])).await?;
        ensure!(
            r.outcome == Outcome::Success,
            "{}\n{}",
            r.describe(),
            sb.diagnostics()
        );
        sb.shutdown().await
    })
    .await
}
