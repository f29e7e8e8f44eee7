//! Self-tests of the sandbox itself, independent of Flotilla's executor: the machine
//! emulator turns a hand-launched instance into a dockerd reachable only over mutual TLS,
//! the images pull and run, the stage scripts run under busybox ash, and the runner
//! emulator calls a driver the way gitlab-runner does.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use flotilla_proto::bootstrap::{machine_dns_name, CloudConfig, MachineBootstrap};
use flotilla_proto::tags;
use flotilla_sandbox::runner::{self, Cancel, CancelWhen, Job, Outcome, RunnerOptions};
use flotilla_sandbox::script::{stage_script, user_command};
use flotilla_sandbox::{docker_on, Sandbox, SandboxOptions};

use crate::common::{bounded, curl_machine, TestCa};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulated_machine_serves_docker_only_over_mutual_tls_and_stops_on_terminate() -> Result<()>
{
    bounded(Duration::from_secs(240), async {
        let sb = Sandbox::start(SandboxOptions {
            start_daemon: false,
            ..Default::default()
        })
        .await?;
        let ca = TestCa::new("harness fleet CA")?;
        let machine_id = "m-selftest";
        let dns = machine_dns_name(machine_id);
        let server = ca.server(&dns)?;
        let client = ca.client("harness stage")?;
        let user_data = CloudConfig::for_machine(&MachineBootstrap {
            machine_id,
            ca_cert_pem: &ca.cert_pem(),
            server_cert_pem: &server.cert_pem,
            server_key_pem: &server.key_pem,
            dockerd: &Default::default(),
            journal: None,
        })
        .render()?;
        let id = flotilla_sandbox::moto::launch_instance(
            sb.ec2(),
            &sb.network,
            &[(tags::FLEET, &sb.fleet), (tags::MACHINE, machine_id)],
            Some(&user_data),
        )
        .await?;

        let machines = sb
            .emulator()
            .wait_running(1, Duration::from_secs(60))
            .await?;
        let m = &machines[0];
        ensure!(
            m.instance_id == id,
            "emulated {} instead of {id}",
            m.instance_id
        );
        ensure!(
            m.private_ip.starts_with(&format!("127.{}.1.", sb.slot)),
            "ip {}",
            m.private_ip
        );
        let key = m.file(flotilla_proto::bootstrap::SERVER_KEY_PATH);
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key)?.permissions());
        ensure!(mode & 0o777 == 0o600, "server key mode {mode:o}");

        let dir = tempfile::tempdir()?;
        let write = |name: &str, text: &str| -> Result<std::path::PathBuf> {
            let p = dir.path().join(name);
            std::fs::write(&p, text)?;
            Ok(p)
        };
        let ca_path = write("ca.pem", &ca.cert_pem())?;
        let cert = write("cert.pem", &client.cert_pem)?;
        let ckey = write("key.pem", &client.key_pem)?;
        let other = TestCa::new("some other CA")?.client("intruder")?;
        let ocert = write("ocert.pem", &other.cert_pem)?;
        let okey = write("okey.pem", &other.key_pem)?;

        let (code, out, err) = curl_machine(
            &dns,
            &m.private_ip,
            2376,
            &ca_path,
            Some((&cert, &ckey)),
            "/_ping",
        )
        .await?;
        ensure!(
            code == 0 && out == "OK",
            "fleet client refused: {code} {out:?} {err}"
        );
        let (code, out, _) = curl_machine(
            &dns,
            &m.private_ip,
            2376,
            &ca_path,
            Some((&ocert, &okey)),
            "/_ping",
        )
        .await?;
        ensure!(
            code != 0 && out != "OK",
            "foreign client accepted: {code} {out:?}"
        );
        let (code, out, _) =
            curl_machine(&dns, &m.private_ip, 2376, &ca_path, None, "/_ping").await?;
        ensure!(
            code != 0 && out != "OK",
            "client without certificate accepted: {code} {out:?}"
        );

        // The images pull from the sandbox registry and run on a job-style network.
        docker_on(m, &["pull", "-q", &sb.job_image]).await?;
        docker_on(m, &["network", "create", "selftest"]).await?;
        let out = docker_on(
            m,
            &[
                "run",
                "--rm",
                "--network",
                "selftest",
                &sb.job_image,
                "sh",
                "-c",
                "cat /etc/flotilla-image; id -u build; ls -ld /tmp | cut -c1-10",
            ],
        )
        .await?;
        ensure!(
            out == "job\n1000\ndrwxrwxrwt\n",
            "unexpected container output {out:?}"
        );
        let subnet = docker_on(
            m,
            &[
                "network",
                "inspect",
                "-f",
                "{{(index .IPAM.Config 0).Subnet}}",
                "selftest",
            ],
        )
        .await?;
        ensure!(
            subnet.starts_with(&format!("10.{}.", sb.slot)),
            "network outside the machine's pool: {subnet}"
        );

        // Terminating the instance stops its dockerd and removes its directories.
        let pid = m.dockerd_pid.context("no dockerd pid")?;
        sb.ec2()
            .terminate_instances()
            .instance_ids(&id)
            .send()
            .await?;
        let stopped = sb
            .emulator()
            .wait_stopped(&id, Duration::from_secs(60))
            .await?;
        ensure!(
            stopped.dockerd_pid == Some(pid),
            "the emulator stopped another dockerd than {pid}: {stopped:?}"
        );
        ensure!(
            sb.machines().is_empty(),
            "machine still emulated: {:?}",
            sb.machines()
        );
        ensure!(
            !flotilla_sandbox::util::pid_alive(pid as i32),
            "dockerd {pid} still running"
        );
        ensure!(!m.root.exists(), "{} not removed", m.root.display());
        sb.shutdown().await
    })
    .await
}

/// Runs a stage script with the host's busybox ash, as the machines' shells would.
async fn ash(script: &str) -> Result<(i32, String)> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("/bin/busybox")
        .arg("sh")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(script.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    ))
}

#[tokio::test]
async fn stage_scripts_in_gitlab_bash_format_run_under_busybox_ash() -> Result<()> {
    let exports = vec![
        ("CI_JOB_ID".to_owned(), "7".to_owned()),
        (
            "TRICKY".to_owned(),
            "it's a \"quote\" \\ and\nnewline $HOME".to_owned(),
        ),
    ];
    let mut body = user_command(r#"echo "job $CI_JOB_ID""#);
    body.extend(user_command(r#"printf '%s|' "$TRICKY""#));
    let (code, out) = ash(&stage_script(&exports, &body)).await?;
    ensure!(code == 0, "exit {code}: {out}");
    ensure!(out.contains("$ echo \"job $CI_JOB_ID\"\njob 7\n"), "{out}");
    ensure!(
        out.contains("it's a \"quote\" \\ and\nnewline $HOME|"),
        "{out}"
    );

    let mut body = user_command("echo before");
    body.extend(user_command("exit 3"));
    body.extend(user_command("echo after"));
    let (code, out) = ash(&stage_script(&[], &body)).await?;
    ensure!(code == 3, "exit {code}: {out}");
    ensure!(out.contains("before") && !out.contains("\nafter"), "{out}");

    let (code, _) = ash(&stage_script(&[], &user_command("false | true"))).await?;
    ensure!(code == 1, "pipefail not honoured: {code}");
    Ok(())
}

/// A stand-in driver: records each call, runs stage scripts with busybox ash locally
/// (the project dir is inside the job's TMPDIR), honours the exit-code contract.
const FAKE_DRIVER: &str = r#"#!/bin/sh
shift 2
stage="$1"
echo "$*|$(pwd)|$TMPDIR|$CUSTOM_ENV_CI_JOB_ID|$FROM_JOB_ENV|$(stat -c %a "$JOB_RESPONSE_FILE")" >> "$FAKE_LOG"
case "$stage" in
  config) printf '{"builds_dir":"%s/builds","cache_dir":"/cache","job_env":{"FROM_JOB_ENV":"yes"},"driver":{"name":"fake","version":"0"}}\n' "$TMPDIR";;
  prepare) echo preparing;;
  run)
    trap 'echo got-term >&2; exit 1' TERM
    /bin/busybox sh < "$2" &
    wait $!
    code=$?
    if [ "$code" -ne 0 ]; then echo "$code" > "$BUILD_EXIT_CODE_FILE"; exit "$BUILD_FAILURE_EXIT_CODE"; fi;;
  cleanup) echo cleaned;;
esac
"#;

#[tokio::test]
async fn runner_emulator_calls_the_driver_like_gitlab_runner() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let driver = dir.path().join("fake-flotilla");
    flotilla_sandbox::util::write_file(&driver, FAKE_DRIVER.as_bytes(), 0o755)?;
    let log = dir.path().join("calls.log");
    let mut opts = RunnerOptions::new(&driver, Some(std::path::Path::new("/dev/null")));
    opts.env
        .push(("FAKE_LOG".into(), log.display().to_string()));
    opts.work_dir = Some(dir.path().join("runner"));

    // A failing job: build failure with the user's code, after_script and the failure
    // stages still run, cleanup last.
    let job = Job::new(41, &["echo building", "exit 3"]).with_after_script(&["echo after-ran"]);
    let r = runner::run_job(opts.clone(), job).await?;
    ensure!(
        r.outcome
            == Outcome::BuildFailure {
                stage: "build_script".into(),
                exit_code: Some(3)
            },
        "{}",
        r.describe()
    );
    let names: Vec<&str> = r.stages.iter().map(|s| s.name.as_str()).collect();
    ensure!(
        names
            == [
                "config",
                "prepare",
                "prepare_script",
                "get_sources",
                "build_script",
                "after_script",
                "cleanup_file_variables",
                "cleanup"
            ],
        "{names:?}"
    );
    ensure!(
        r.stage("after_script")
            .is_some_and(|s| s.stdout.contains("after-ran")),
        "{}",
        r.describe()
    );
    ensure!(r.cleanup_exit == Some(0));
    let calls = std::fs::read_to_string(&log)?;
    for line in calls.lines() {
        let f: Vec<&str> = line.split('|').collect();
        ensure!(
            f[1] == f[2] && f[1].contains("/custom-executor"),
            "cwd/TMPDIR: {line}"
        );
        ensure!(f[3] == "41", "CUSTOM_ENV_CI_JOB_ID: {line}");
        ensure!(f[5] == "600", "JOB_RESPONSE_FILE mode: {line}");
        if !line.starts_with("config") {
            ensure!(f[4] == "yes", "job_env missing: {line}");
        }
    }

    // Cancel: SIGTERM reaches the process group while the script runs.
    let mut opts = opts.clone();
    opts.cancel = Some(Cancel {
        stage: "build_script".into(),
        when: CancelWhen::OutputContains("ready-2".into()),
    });
    let job = Job::new(42, &["echo ready-$((1+1))", "while true; do sleep 1; done"])
        .with_after_script(&["echo after-cancel"]);
    let r = runner::run_job(opts.clone(), job).await?;
    ensure!(
        r.outcome
            == Outcome::Cancelled {
                stage: "build_script".into()
            },
        "{}",
        r.describe()
    );
    let b = r.stage("build_script").context("no build_script")?;
    ensure!(b.cancelled_after.is_some() && !b.killed, "{}", r.describe());
    ensure!(
        r.stage("after_script")
            .is_some_and(|s| s.stdout.contains("after-cancel")),
        "{}",
        r.describe()
    );
    ensure!(r.ran("cleanup"));

    // Cancel on the test's own event (here: the script's loop has started).
    let cancel = std::sync::Arc::new(tokio::sync::Notify::new());
    let started = dir.path().join("loop-started");
    opts.cancel = Some(Cancel {
        stage: "build_script".into(),
        when: CancelWhen::Notified(cancel.clone()),
    });
    let touch = format!("touch '{}'", started.display());
    let job = Job::new(43, &[&touch, "while true; do sleep 1; done"]);
    let trigger = async {
        flotilla_sandbox::util::wait_until(
            "the script's loop to start",
            Duration::from_secs(60),
            Duration::from_millis(50),
            || async { Ok(started.exists().then_some(())) },
        )
        .await?;
        cancel.notify_one();
        anyhow::Ok(())
    };
    let (r, triggered) = tokio::join!(runner::run_job(opts.clone(), job), trigger);
    triggered?;
    let r = r?;
    let b = r.stage("build_script").context("no build_script")?;
    ensure!(
        r.outcome
            == Outcome::Cancelled {
                stage: "build_script".into()
            }
            && b.cancelled_after.is_some()
            && !b.killed,
        "{}",
        r.describe()
    );
    Ok(())
}
