//! Fleet numbers for issue 4, measured in the sandbox (moto + real dockerd per machine):
//!
//! `flotilla-fleet-bench api-calls [--jobs 20] [--reconcile-secs 1]`
//!   EC2 requests per job on a warm pool (idle_count 1, idle_time 600 s), counted on the
//!   wire by the fault proxy between the daemon and moto (no faults injected), by action,
//!   and DescribeInstances amortized per job at that reconcile interval.
//!
//! `flotilla-fleet-bench docker-ops [--runs 10]`
//!   A job's prepare + run (one build_script) + cleanup on a warm machine, each stage a
//!   `flotilla` process as gitlab-runner starts it, against the same Docker operations done
//!   with the docker CLI on the same machine (its local socket): pull of the two present
//!   images, network + volume create, two containers created and started, one exec of the
//!   script, rm -f, network + volume rm. Medians and spread over the runs.
//!
//! `flotilla-fleet-bench prepare-service [--runs 10]`
//!   A warm job's prepare without and with one service (a busybox httpd whose exposed
//!   port prepare waits for), alternating, on one warm machine. Medians and spread.
//!
//! Needs what the e2e tests need (root, dockerd, moto, a built `flotilla`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::{Parser, Subcommand};
use flotilla_proto::api::{MachineState, StatusResponse};
use flotilla_sandbox::runner::Outcome;
use flotilla_sandbox::util::wait_until;
use flotilla_sandbox::{docker_on, Job, Sandbox, SandboxOptions};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    ApiCalls {
        #[arg(long, default_value_t = 20)]
        jobs: u64,
        #[arg(long, default_value_t = 1)]
        reconcile_secs: u64,
        /// Jobs per machine (1: every job gets a fresh machine, the churn case).
        #[arg(long, default_value_t = 0)]
        max_builds: u32,
    },
    DockerOps {
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    PrepareService {
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
}

/// The stages gitlab-runner runs by default that the measured job leaves out.
const SKIPPED: &[&str] = &[
    "prepare_script",
    "get_sources",
    "restore_cache",
    "download_artifacts",
    "after_script",
    "archive_cache",
    "archive_cache_on_failure",
    "upload_artifacts_on_success",
    "upload_artifacts_on_failure",
    "cleanup_file_variables",
];

const SCRIPT: &str = "echo hello from the build";

fn bare_job(id: u64) -> Job {
    let mut job = Job::new(id, &[SCRIPT]);
    for s in SKIPPED {
        job.stage_bodies.insert((*s).to_owned(), Vec::new());
    }
    // Without get_sources there is no project dir to cd into: the bare script.
    job.stage_bodies
        .insert("build_script".into(), vec![SCRIPT.to_owned()]);
    job
}

async fn status(sb: &Sandbox) -> Result<StatusResponse> {
    let out = tokio::process::Command::new(&sb.flotilla_bin)
        .arg("--config")
        .arg(&sb.config_path)
        .args(["status", "--json"])
        .envs(sb.aws_env())
        .output()
        .await?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

async fn wait_idle(sb: &Sandbox, n: usize) -> Result<()> {
    wait_until(
        "idle machines",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || async {
            let s = status(sb).await?;
            let idle = s
                .machines
                .iter()
                .filter(|m| m.state == MachineState::Idle)
                .count();
            Ok((idle >= n).then_some(()))
        },
    )
    .await
}

async fn run_ok(sb: &Sandbox, job: Job) -> Result<flotilla_sandbox::JobResult> {
    let r = sb.run_job(job).await?;
    ensure!(
        r.outcome == Outcome::Success && r.cleanup_exit == Some(0),
        "job failed:\n{}",
        r.describe()
    );
    Ok(r)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("min {:.0} max {:.0}", min * 1e3, max * 1e3)
}

async fn api_calls(jobs: u64, reconcile_secs: u64, max_builds: u32) -> Result<()> {
    let sb = Sandbox::start(SandboxOptions {
        ec2_proxy: true,
        idle_count: 1,
        idle_time: Duration::from_secs(600),
        max_machines: 5,
        max_builds,
        reconcile_interval: Duration::from_secs(reconcile_secs),
        ..Default::default()
    })
    .await?;
    // Warm: the idle machine, then one job (whose lease makes the pool top idle back up).
    wait_idle(&sb, 1).await?;
    run_ok(&sb, bare_job(1)).await?;
    wait_idle(&sb, if max_builds == 1 { 1 } else { 2 }).await?;
    let faults = sb.faults().context("no proxy")?;
    let before = faults.counts();
    let started = Instant::now();
    for i in 0..jobs {
        run_ok(&sb, bare_job(100 + i)).await?;
    }
    let elapsed = started.elapsed();
    let after = faults.counts();
    let during: BTreeMap<String, u64> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect();
    let total: u64 = during.values().sum();
    let describes = during.get("DescribeInstances").copied().unwrap_or(0);
    let per_job_secs = elapsed.as_secs_f64() / jobs as f64;
    println!(
        "api-calls: {jobs} jobs on a warm pool in {:.1}s ({per_job_secs:.2}s per job), reconcile_interval {reconcile_secs}s, max_builds {max_builds}",
        elapsed.as_secs_f64()
    );
    println!("  EC2 requests during the jobs: {during:?}");
    println!(
        "  per job: {:.2} EC2 requests in all, {:.2} DescribeInstances (= job duration / reconcile_interval), {:.2} other",
        total as f64 / jobs as f64,
        describes as f64 / jobs as f64,
        (total - describes) as f64 / jobs as f64
    );
    sb.shutdown().await
}

async fn prepare_service(runs: usize) -> Result<()> {
    let sb = Sandbox::start(SandboxOptions {
        idle_count: 1,
        idle_time: Duration::from_secs(600),
        max_machines: 1,
        ..Default::default()
    })
    .await?;
    wait_idle(&sb, 1).await?;
    let web = flotilla_sandbox::auth_registry::busybox_image_with(
        "web",
        serde_json::json!({"Cmd": ["httpd", "-f", "-p", "8080"], "ExposedPorts": {"8080/tcp": {}}}),
    )?;
    let registry = sb.registry_host();
    flotilla_sandbox::auth_registry::push_image(
        &format!("http://{registry}"),
        None,
        "flotilla/web",
        "latest",
        &web,
    )?;
    let with_service = |id: u64| {
        let mut job = bare_job(id);
        job.services = vec![
            serde_json::json!({"name": format!("{registry}/flotilla/web:latest"), "alias": "web"}),
        ];
        job
    };
    // Warm-up: every image lands on the machine.
    run_ok(&sb, with_service(1)).await?;
    let mut plain = Vec::new();
    let mut service = Vec::new();
    for i in 0..runs as u64 {
        let secs = |r: &flotilla_sandbox::JobResult| {
            r.stage("prepare").map_or(0.0, |s| s.duration.as_secs_f64())
        };
        plain.push(secs(&run_ok(&sb, bare_job(100 + i)).await?));
        service.push(secs(&run_ok(&sb, with_service(200 + i)).await?));
    }
    println!("prepare-service: {runs} warm jobs each (medians, ms; pull policy always)");
    for (name, v) in [("no service", &mut plain), ("one service", &mut service)] {
        let sp = spread(v);
        println!("  {name:<12} {:>8.0}   {sp}", median(v) * 1e3);
    }
    sb.shutdown().await
}

async fn docker_ops(runs: usize) -> Result<()> {
    let sb = Sandbox::start(SandboxOptions {
        idle_count: 1,
        idle_time: Duration::from_secs(600),
        max_machines: 1,
        ..Default::default()
    })
    .await?;
    wait_idle(&sb, 1).await?;
    // Warm-up (the images land on the machine).
    run_ok(&sb, bare_job(1)).await?;
    let machine = sb
        .machines()
        .into_iter()
        .next()
        .context("no emulated machine")?;

    let mut flotilla: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut cli: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for i in 0..runs {
        let r = run_ok(&sb, bare_job(10 + i as u64)).await?;
        let secs = |name: &str| r.stage(name).map_or(0.0, |s| s.duration.as_secs_f64());
        let (p, b, c) = (secs("prepare"), secs("build_script"), secs("cleanup"));
        flotilla.entry("prepare").or_default().push(p);
        flotilla.entry("run").or_default().push(b);
        flotilla.entry("cleanup").or_default().push(c);
        flotilla.entry("total").or_default().push(p + b + c);

        let n = format!("bench-{i}");
        let (net, vol, helper, build) = (
            format!("{n}-net"),
            format!("{n}-vol"),
            format!("{n}-helper"),
            format!("{n}-build"),
        );
        let step = |args: Vec<String>| {
            let m = machine.clone();
            async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let t = Instant::now();
                docker_on(&m, &args).await?;
                anyhow::Ok(t.elapsed().as_secs_f64())
            }
        };
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        let mut prep = 0.0;
        prep += step(s(&["pull", "-q", &sb.job_image])).await?;
        prep += step(s(&["pull", "-q", &sb.helper_image])).await?;
        prep += step(s(&["network", "create", &net])).await?;
        prep += step(s(&["volume", "create", &vol])).await?;
        for (name, image) in [(&helper, &sb.helper_image), (&build, &sb.job_image)] {
            prep += step(s(&[
                "run",
                "-d",
                "--name",
                name,
                "--network",
                &net,
                "-v",
                &format!("{vol}:/builds"),
                image,
                "sleep",
                "3600",
            ]))
            .await?;
        }
        let t = Instant::now();
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo '{SCRIPT}' | docker -H {} exec -i {build} sh",
                machine.docker_host()
            ))
            .output()
            .await?;
        ensure!(out.status.success(), "docker exec failed: {out:?}");
        let run = t.elapsed().as_secs_f64();
        let mut clean = step(s(&["rm", "-f", &helper, &build])).await?;
        clean += step(s(&["network", "rm", &net])).await?;
        clean += step(s(&["volume", "rm", &vol])).await?;
        cli.entry("prepare").or_default().push(prep);
        cli.entry("run").or_default().push(run);
        cli.entry("cleanup").or_default().push(clean);
        cli.entry("total").or_default().push(prep + run + clean);
    }
    println!(
        "docker-ops: {runs} runs on one warm machine (medians, ms; flotilla = stage process wall time incl. lease check and mTLS; CLI over the machine's unix socket)"
    );
    println!(
        "  {:<8} {:>10} {:>22} {:>10} {:>22}",
        "", "flotilla", "", "docker CLI", ""
    );
    for k in ["prepare", "run", "cleanup", "total"] {
        let f = flotilla.get_mut(k).context("no samples")?;
        let c = cli.get_mut(k).context("no samples")?;
        let (fs, cs) = (spread(f), spread(c));
        println!(
            "  {k:<8} {:>10.0} {:>22} {:>10.0} {:>22}",
            median(f) * 1e3,
            fs,
            median(c) * 1e3,
            cs
        );
    }
    sb.shutdown().await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_E2E_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match Cli::parse().command {
        Cmd::ApiCalls {
            jobs,
            reconcile_secs,
            max_builds,
        } => api_calls(jobs, reconcile_secs, max_builds).await,
        Cmd::DockerOps { runs } => docker_ops(runs).await,
        Cmd::PrepareService { runs } => prepare_service(runs).await,
    }
}
