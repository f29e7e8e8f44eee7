//! Docker-in-Docker on the emulated machines: privileged containers work as on a real EC2
//! machine (the emulator's runc wrapper), and a docker:dind-like service (`flotilla/dind`,
//! built from the host's docker.io binaries) lets a job container with the docker CLI
//! `docker build` and `docker run` an image over tcp://docker:2375 and, with
//! `DOCKER_TLS_CERTDIR`, over TLS on 2376 with the client certificates in a shared
//! /certs/client volume. Once with plain docker commands on the machine (and the same
//! build straight against the machine's dockerd, for the timings), once through the
//! runner emulator and flotilla with `[job] privileged = true` and
//! `volumes = ["/certs/client"]`.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use flotilla_sandbox::runner::run_job;
use flotilla_sandbox::sandbox::DindImages;
use flotilla_sandbox::util::unique_token;
use flotilla_sandbox::{docker_on, EmulatedMachine, Job, Outcome, Sandbox, SandboxOptions};
use serde_json::json;

use crate::common::bounded;

const LIMIT: Duration = Duration::from_secs(420);

/// Waits (bounded, 60 s) until the docker CLI reaches the daemon of DOCKER_HOST.
const WAIT_FOR_DOCKER: &str = r#"i=0
until docker version >/dev/null 2>&1; do
  i=$((i+1))
  if [ "$i" -ge 240 ]; then echo "no docker daemon at $DOCKER_HOST after 60 s"; docker version; exit 1; fi
  sleep 0.25
done"#;

/// Makes a build context from the container's own busybox and builds it (legacy
/// builder). The RUN step is a container on the daemon's default bridge: it records the
/// first two octets of its address (172.17 on the nested dockerd's docker0).
const BUILD: &str = r#"set -e
rm -rf /tmp/ctx && mkdir -p /tmp/ctx && cp /bin/busybox /tmp/ctx/busybox
cat > /tmp/ctx/run.sh <<'EOF'
net=$(/bin/busybox ip -o -4 addr show dev eth0 2>/dev/null | /bin/busybox sed -n 's/.* inet \([0-9]*\.[0-9]*\)\..*/\1/p')
echo "built-by-run-on-$net" > /built
EOF
cat > /tmp/ctx/Dockerfile <<'EOF'
FROM scratch
COPY busybox /bin/busybox
COPY run.sh /run.sh
RUN ["/bin/busybox", "sh", "/run.sh"]
CMD ["/bin/busybox", "cat", "/built"]
EOF
docker build -q -t flotilla-dind-test:1 /tmp/ctx"#;

/// Runs the built image; it prints what its RUN step wrote.
const RUN: &str = "docker run --rm flotilla-dind-test:1";

/// The sandbox's only machine.
async fn the_machine(sb: &Sandbox) -> Result<EmulatedMachine> {
    let mut running = sb
        .emulator()
        .wait_running(1, Duration::from_secs(90))
        .await?;
    ensure!(running.len() == 1, "expected one machine: {running:#?}");
    Ok(running.remove(0))
}

/// `CapBnd` of this process (the machines' dockerd inherit it).
fn host_cap_bounding() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .context("no CapBnd in /proc/self/status")?;
    Ok(u64::from_str_radix(hex.trim(), 16)?)
}

/// `docker exec <container> sh -c <script>` on the machine; returns stdout and how long
/// it took.
async fn exec(m: &EmulatedMachine, container: &str, script: &str) -> Result<(String, Duration)> {
    let start = Instant::now();
    let out = docker_on(m, &["exec", container, "sh", "-c", script]).await?;
    Ok((out, start.elapsed()))
}

/// One DinD service and one docker-cli container on a fresh user-defined network of the
/// machine: wait for the nested dockerd, `docker build`, `docker run`. Returns the build
/// time. Everything it creates is removed, also on failure.
async fn dind_round(
    m: &EmulatedMachine,
    images: &DindImages,
    tls: bool,
) -> Result<(Duration, Duration)> {
    let token = unique_token();
    let (net, svc, cli, vol) = (
        format!("dind-net-{token}"),
        format!("dind-svc-{token}"),
        format!("dind-cli-{token}"),
        format!("dind-certs-{token}"),
    );
    let result = async {
        docker_on(m, &["network", "create", &net]).await?;
        let certs = format!("{vol}:/certs/client");
        let mut service = vec![
            "run",
            "-d",
            "--privileged",
            "--name",
            &svc,
            "--network",
            &net,
            "--network-alias",
            "docker",
        ];
        let mut client = vec!["run", "-d", "--name", &cli, "--network", &net];
        if tls {
            docker_on(m, &["volume", "create", &vol]).await?;
            service.extend(["-e", "DOCKER_TLS_CERTDIR=/certs", "-v", &certs]);
            client.extend([
                "-v",
                &certs,
                "-e",
                "DOCKER_HOST=tcp://docker:2376",
                "-e",
                "DOCKER_TLS_VERIFY=1",
                "-e",
                "DOCKER_CERT_PATH=/certs/client",
            ]);
        } else {
            client.extend(["-e", "DOCKER_HOST=tcp://docker:2375"]);
        }
        service.push(&images.dind);
        client.extend([images.docker_cli.as_str(), "sleep", "600"]);
        let started = Instant::now();
        docker_on(m, &service).await?;
        docker_on(m, &client).await?;
        exec(m, &cli, WAIT_FOR_DOCKER).await?;
        let ready = started.elapsed();
        let (driver, _) = exec(m, &cli, "docker info --format '{{.Driver}}'").await?;
        ensure!(
            driver.trim() == "vfs",
            "nested dockerd storage driver: {driver}"
        );
        let (_, build) = exec(m, &cli, BUILD).await?;
        let (out, _) = exec(m, &cli, RUN).await?;
        // The RUN step ran on the nested dockerd's default bridge (172.17.x.x).
        ensure!(
            out.trim() == "built-by-run-on-172.17",
            "unexpected output of the built image: {out:?}"
        );
        if tls {
            let (perms, _) = exec(
                m,
                &cli,
                "cd /certs/client && stat -c '%a %n' ca.pem cert.pem key.pem",
            )
            .await?;
            ensure!(
                perms.lines().count() == 3 && perms.lines().all(|l| l.starts_with("644 ")),
                "client certificates should be readable by any job user: {perms}"
            );
            let (refused, _) = exec(
                m,
                &cli,
                "DOCKER_TLS_VERIFY= DOCKER_CERT_PATH=/nonexistent docker --tls=false version 2>&1 || echo REFUSED",
            )
            .await?;
            ensure!(
                refused.contains("REFUSED"),
                "the TLS daemon answered a client without a certificate: {refused}"
            );
        }
        anyhow::Ok((ready, build))
    }
    .await;
    let result = match result {
        Ok(r) => Ok(r),
        Err(e) => {
            let logs = docker_on(m, &["logs", "--tail", "40", &svc])
                .await
                .unwrap_or_else(|e| format!("(no logs: {e:#})"));
            Err(e.context(format!("dind service log (tail):\n{logs}")))
        }
    };
    let _ = docker_on(m, &["rm", "-f", "-v", &svc, &cli]).await;
    let _ = docker_on(m, &["network", "rm", &net]).await;
    if tls {
        let _ = docker_on(m, &["volume", "rm", &vol]).await;
    }
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_dind_service_builds_and_runs_an_image_for_a_docker_cli_container_over_tcp_and_tls(
) -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions {
            idle_count: 1,
            max_machines: 1,
            ..Default::default()
        })
        .await?;
        let t = Instant::now();
        let images = sb.push_dind_images().await?;
        let images_time = t.elapsed();
        let m = the_machine(&sb).await?;
        let t = Instant::now();
        docker_on(&m, &["pull", "-q", &images.dind]).await?;
        docker_on(&m, &["pull", "-q", &images.docker_cli]).await?;
        let pull_time = t.elapsed();

        // Privileged containers get every capability the host has, as on a real machine
        // they get all; unprivileged ones keep Docker's default set.
        let host = host_cap_bounding()?;
        let privileged = docker_on(
            &m,
            &[
                "run",
                "--rm",
                "--privileged",
                &sb.job_image,
                "grep",
                "CapEff",
                "/proc/self/status",
            ],
        )
        .await?;
        // Docker 20.10 knows capabilities 0..=37 (up to CAP_AUDIT_READ): all of those
        // the host has, and nothing it lacks.
        let eff = privileged
            .split_whitespace()
            .nth(1)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .with_context(|| format!("no CapEff in {privileged:?}"))?;
        let known = (1u64 << 38) - 1;
        ensure!(
            eff & !host == 0 && eff & known == host & known,
            "privileged CapEff {eff:x}, host CapBnd {host:x}"
        );
        let plain = docker_on(
            &m,
            &[
                "run",
                "--rm",
                &sb.job_image,
                "grep",
                "CapEff",
                "/proc/self/status",
            ],
        )
        .await?;
        ensure!(
            plain.split_whitespace().nth(1) == Some("00000000a80425fb"),
            "an unprivileged container should keep Docker's default capabilities: {plain:?}"
        );

        let (ready_plain, build_plain) = dind_round(&m, &images, false)
            .await
            .context("DinD over tcp://docker:2375")?;
        let (ready_tls, build_tls) = dind_round(&m, &images, true)
            .await
            .context("DinD over TLS on tcp://docker:2376")?;

        // The same build straight against the machine's dockerd (its socket mounted
        // into a docker-cli container), for comparison.
        let direct = format!("dind-direct-{}", unique_token());
        let socket = format!("{}:/var/run/docker.sock", m.docker_socket.display());
        docker_on(
            &m,
            &[
                "run",
                "-d",
                "--name",
                &direct,
                "-v",
                &socket,
                &images.docker_cli,
                "sleep",
                "600",
            ],
        )
        .await?;
        let direct_result = async {
            let (_, build) = exec(&m, &direct, BUILD).await?;
            let (out, _) = exec(&m, &direct, RUN).await?;
            anyhow::Ok((build, out))
        }
        .await;
        let _ = docker_on(&m, &["rm", "-f", &direct]).await;
        let _ = docker_on(&m, &["rmi", "flotilla-dind-test:1"]).await;
        let (build_direct, out) = direct_result.context("the build on the machine's dockerd")?;
        ensure!(
            out.trim().starts_with("built-by-run-on-"),
            "unexpected output of the image built on the machine: {out:?}"
        );
        println!(
            "dind: images built+pushed in {images_time:.2?}, pulled in {pull_time:.2?}; \
             nested dockerd ready in {ready_plain:.2?} (2375) / {ready_tls:.2?} (TLS 2376); \
             docker build in DinD {build_plain:.2?} (2375) / {build_tls:.2?} (TLS 2376), \
             on the machine's dockerd {build_direct:.2?}"
        );
        sb.shutdown().await
    })
    .await
}

/// The job script of the runner tests: wait for the service's dockerd, build, run.
fn job_script() -> Vec<String> {
    vec![
        WAIT_FOR_DOCKER.to_owned(),
        BUILD.to_owned(),
        format!("{RUN} | sed 's/^/image-says: /'"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_with_a_dind_service_builds_and_runs_an_image_with_privileged_and_a_certs_volume(
) -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions {
            idle_count: 1,
            max_machines: 1,
            ..Default::default()
        })
        .await?;
        let images = sb.push_dind_images().await?;
        let mut config = sb.config.clone();
        config.job.privileged = true;
        config.job.volumes = vec!["/certs/client".into()];
        // The dind image exposes 2375 and 2376 and listens on one of them: the service is
        // up once either answers (gitlab-runner's rule), so no wait and no warning.
        let path = sb.dir.join("flotilla-dind.toml");
        std::fs::write(&path, config.to_toml()?)?;
        let mut opts = sb.runner_options();
        opts.config_path = Some(path);

        for (id, tls) in [(701, false), (702, true)] {
            let (certdir, docker_host) = if tls {
                ("/certs", "tcp://docker:2376")
            } else {
                ("", "tcp://docker:2375")
            };
            let script = job_script();
            let script: Vec<&str> = script.iter().map(String::as_str).collect();
            let mut job = Job::new(id, &script)
                .with_image(&images.docker_cli)
                .with_variable("DOCKER_HOST", docker_host);
            if tls {
                job = job
                    .with_variable("DOCKER_TLS_VERIFY", "1")
                    .with_variable("DOCKER_CERT_PATH", "/certs/client");
            }
            job.services.push(json!({
                "name": images.dind,
                "alias": "docker",
                "variables": [{"key": "DOCKER_TLS_CERTDIR", "value": certdir}],
            }));
            let t = Instant::now();
            let r = run_job(opts.clone(), job).await?;
            let took = t.elapsed();
            let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
            ensure!(
                r.outcome == Outcome::Success,
                "job {id} (tls: {tls})\n{}",
                ctx()
            );
            let prepare = r
                .stage("prepare")
                .map(|p| p.stdout.clone())
                .unwrap_or_default();
            ensure!(
                !prepare.contains("probably didn't start properly"),
                "job {id} (tls: {tls}): the dind service answered on one of its ports\n{}",
                ctx()
            );
            let build = r
                .stage("build_script")
                .with_context(|| format!("build_script did not run\n{}", ctx()))?;
            ensure!(
                build.stdout.contains("image-says: built-by-run-on-172.17"),
                "job {id} (tls: {tls}): the built image did not run\n{}",
                ctx()
            );
            // Cleanup took the service's /var/lib/docker and the job's /certs/client
            // volumes with it (the machine's own cache volumes stay).
            let m = the_machine(&sb).await?;
            let volumes = docker_on(&m, &["volume", "ls", "-q"]).await?;
            let left: Vec<&str> = volumes
                .lines()
                .filter(|v| !v.starts_with("flotilla-cache-"))
                .collect();
            ensure!(
                left.is_empty(),
                "job {id} left volumes on the machine: {left:?}"
            );
            println!("dind job {id} (tls: {tls}) took {took:.2?}");
        }
        sb.shutdown().await
    })
    .await
}
