//! Benchmarks that need the real daemon and moto but no dockerd per machine:
//!
//! `flotilla-bench daemon-scale [--machines 1000] [--clients 200] [--rounds 5]`
//!   moto holds N running instances tagged as one fleet, the daemon's state file knows
//!   them as idle machines (as after a restart), and C concurrent clients acquire and
//!   release leases over the control socket. Reports lease latency percentiles, the
//!   daemon's resident memory, and EC2 calls per reconcile (from its /metrics).
//!
//! Health checks are pushed out of the measurement window (no dockerd answers for these
//! machines); everything else is the production daemon.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use chrono::Utc;
use clap::{Parser, Subcommand};
use flotilla::control::ControlClient;
use flotilla::pool::Pool;
use flotilla_proto::api::{AcquireRequest, MachineState, ReleaseOutcome};
use flotilla_proto::config::{AwsConfig, ClassConfig, Config};
use flotilla_proto::duration::HumanDuration;
use flotilla_proto::tags;
use flotilla_sandbox::moto::{self, Moto};
use flotilla_sandbox::util::{free_port, wait_until};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    DaemonScale {
        #[arg(long, default_value_t = 1000)]
        machines: usize,
        #[arg(long, default_value_t = 200)]
        clients: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds to watch reconciles for the EC2-calls-per-reconcile figure.
        #[arg(long, default_value_t = 6)]
        observe_secs: u64,
    },
}

fn flotilla_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FLOTILLA_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no exe dir")?;
    for candidate in [dir.join("flotilla"), dir.join("../flotilla")] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "flotilla binary not found next to {}; set FLOTILLA_BIN",
        exe.display()
    )
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .find(|l| {
            l.starts_with(&format!("{name}{{{labels}}}"))
                || (labels.is_empty() && l.starts_with(&format!("{name} ")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn launch_fleet(
    ec2: &aws_sdk_ec2::Client,
    subnet: &str,
    fleet: &str,
    n: usize,
) -> Result<Vec<(String, String, String)>> {
    // One call per machine: each carries its own machine tag, as the daemon's launches do.
    let mut out = Vec::with_capacity(n);
    let mut tasks = Vec::new();
    for i in 0..n {
        let ec2 = ec2.clone();
        let subnet = subnet.to_owned();
        let fleet = fleet.to_owned();
        tasks.push(async move {
            let machine = format!("m-bench{i:05}");
            let tag_spec = TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(Tag::builder().key(tags::FLEET).value(&fleet).build())
                .tags(Tag::builder().key(tags::CLASS).value("default").build())
                .tags(Tag::builder().key(tags::MACHINE).value(&machine).build())
                .build();
            let r = ec2
                .run_instances()
                .image_id(moto::AMI)
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .min_count(1)
                .max_count(1)
                .subnet_id(&subnet)
                .tag_specifications(tag_spec)
                .send()
                .await?;
            let inst = r.instances().first().context("no instance")?;
            anyhow::Ok((
                machine,
                inst.instance_id().unwrap_or_default().to_owned(),
                inst.private_ip_address().unwrap_or_default().to_owned(),
            ))
        });
        if tasks.len() == 16 {
            for r in futures_util::future::join_all(tasks.drain(..)).await {
                out.push(r?);
            }
        }
    }
    for r in futures_util::future::join_all(tasks).await {
        out.push(r?);
    }
    Ok(out)
}

async fn daemon_scale(
    machines: usize,
    clients: usize,
    rounds: usize,
    observe_secs: u64,
) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("flt-bench-")
        .tempdir_in("/tmp")?;
    let moto = Moto::start(&dir.path().join("moto.log")).await?;
    let ec2 = moto.ec2().await;
    let vpc = ec2.create_vpc().cidr_block("127.250.0.0/16").send().await?;
    let vpc_id = vpc
        .vpc()
        .and_then(|v| v.vpc_id())
        .context("no vpc")?
        .to_owned();
    let subnet = ec2
        .create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block("127.250.0.0/20")
        .send()
        .await?;
    let subnet_id = subnet
        .subnet()
        .and_then(|s| s.subnet_id())
        .context("no subnet")?
        .to_owned();
    let fleet = format!("bench{}", std::process::id());

    eprintln!("launching {machines} instances in moto...");
    let t = Instant::now();
    let fleet_instances = launch_fleet(&ec2, &subnet_id, &fleet, machines).await?;
    eprintln!("  done in {:.1}s", t.elapsed().as_secs_f64());

    let state_dir = dir.path().join("state");
    std::fs::create_dir_all(&state_dir)?;
    // The fleet's CA exists before any machine is on record (a daemon refuses to make a
    // new CA for a state that lists machines).
    flotilla::pki::FleetCa::load_or_create(&state_dir, 0)?;
    let now = Utc::now();
    let mut pool = Pool::default();
    for (machine, instance, ip) in &fleet_instances {
        pool.reserve(machine, "default", "t3.micro", now);
        pool.record_launch(machine, instance, ip, "t3.micro");
        pool.mark_ready(machine, now);
    }
    std::fs::write(state_dir.join("state.json"), serde_json::to_vec(&pool)?)?;

    let metrics_port = free_port()?;
    let config = Config {
        fleet: fleet.clone(),
        state_dir: state_dir.clone(),
        default_class: "default".into(),
        max_machines: (machines as u32) * 2,
        reconcile_interval: HumanDuration::from_secs(2),
        health_interval: HumanDuration::from_secs(3600),
        metrics_addr: Some(format!("127.0.0.1:{metrics_port}")),
        aws: AwsConfig {
            region: Some(moto::REGION.into()),
            endpoint_url: Some(moto.url()),
            max_requests_per_second: 100,
        },
        classes: [(
            "default".to_string(),
            ClassConfig {
                ami: moto::AMI.into(),
                instance_types: vec!["t3.micro".into()],
                subnets: vec![subnet_id.clone()],
                idle_time: HumanDuration::from_secs(3600),
                max_machines: (machines as u32) * 2,
                ..ClassConfig::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Config::default()
    };
    config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let config_path = dir.path().join("flotilla.toml");
    std::fs::write(&config_path, config.to_toml()?)?;
    let log = std::fs::File::create(dir.path().join("daemon.log"))?;
    let mut daemon = Command::new(flotilla_bin()?)
        .arg("--config")
        .arg(&config_path)
        .arg("daemon")
        .env("AWS_ACCESS_KEY_ID", "bench")
        .env("AWS_SECRET_ACCESS_KEY", "bench")
        .env("FLOTILLA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let pid = daemon.id();
    let socket = config.socket_path();
    let client = Arc::new(ControlClient::new(&socket));
    wait_until(
        "daemon socket",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || {
            let client = client.clone();
            async move { Ok(client.status().await.ok()) }
        },
    )
    .await?;
    let rss_start = rss_kib(pid).unwrap_or(0);
    let status = client.status().await?;
    let idle = status
        .machines
        .iter()
        .filter(|m| m.state == MachineState::Idle)
        .count();
    eprintln!(
        "daemon up: tracking {} machines ({idle} idle), RSS {} MiB",
        status.machines.len(),
        rss_start / 1024
    );

    // Concurrent acquire/release: each client holds one lease per round.
    let mut latencies = Vec::new();
    let started = Instant::now();
    for round in 0..rounds {
        let tasks = (0..clients).map(|c| {
            let client = client.clone();
            async move {
                let t = Instant::now();
                let lease = client
                    .acquire(&AcquireRequest {
                        job_key: format!("bench-{round}-{c}"),
                        class: None,
                        timeout_ms: 30_000,
                        secret: format!("bench-secret-{round}-{c}"),
                        job_timeout_secs: None,
                    })
                    .await?;
                let acquired = t.elapsed();
                let t = Instant::now();
                client
                    .release(
                        &lease.lease_id,
                        &format!("bench-secret-{round}-{c}"),
                        ReleaseOutcome::Healthy,
                        None,
                        Vec::new(),
                    )
                    .await?;
                anyhow::Ok((acquired, t.elapsed()))
            }
        });
        for r in futures_util::future::join_all(tasks).await {
            latencies.push(r?);
        }
    }
    let wall = started.elapsed();
    let rss_peak = rss_kib(pid).unwrap_or(0);
    let mut acq: Vec<Duration> = latencies.iter().map(|l| l.0).collect();
    let mut rel: Vec<Duration> = latencies.iter().map(|l| l.1).collect();
    acq.sort();
    rel.sort();

    let scrape = |port: u16| {
        ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
            .call()
            .ok()
            .and_then(|r| r.into_string().ok())
            .unwrap_or_default()
    };
    let before = scrape(metrics_port);
    tokio::time::sleep(Duration::from_secs(observe_secs)).await;
    let after = scrape(metrics_port);
    let describes = metric(
        &after,
        "flotilla_ec2_calls_total",
        r#"operation="DescribeInstances""#,
    ) - metric(
        &before,
        "flotilla_ec2_calls_total",
        r#"operation="DescribeInstances""#,
    );
    let other_calls: f64 = ["RunInstances", "TerminateInstances"]
        .iter()
        .map(|op| {
            metric(
                &after,
                "flotilla_ec2_calls_total",
                &format!(r#"operation="{op}""#),
            )
        })
        .sum();
    let reconciles = observe_secs as f64 / 2.0;

    println!("daemon-scale: {machines} machines, {clients} concurrent clients x {rounds} rounds ({} leases in {:.2}s, {:.0} leases/s)", acq.len(), wall.as_secs_f64(), acq.len() as f64 / wall.as_secs_f64());
    println!(
        "  acquire latency  p50 {:>7.2} ms  p95 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        percentile(&acq, 0.5).as_secs_f64() * 1e3,
        percentile(&acq, 0.95).as_secs_f64() * 1e3,
        percentile(&acq, 0.99).as_secs_f64() * 1e3,
        percentile(&acq, 1.0).as_secs_f64() * 1e3
    );
    println!(
        "  release latency  p50 {:>7.2} ms  p95 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        percentile(&rel, 0.5).as_secs_f64() * 1e3,
        percentile(&rel, 0.95).as_secs_f64() * 1e3,
        percentile(&rel, 0.99).as_secs_f64() * 1e3,
        percentile(&rel, 1.0).as_secs_f64() * 1e3
    );
    println!(
        "  daemon RSS: {:.1} MiB at start, {:.1} MiB after the lease storm",
        rss_start as f64 / 1024.0,
        rss_peak as f64 / 1024.0
    );
    println!("  EC2 DescribeInstances calls in {observe_secs}s (~{reconciles:.0} reconciles at a 2s interval): {describes}; RunInstances+TerminateInstances during the run: {other_calls}");
    // Every EC2 request of the observation window, whatever the operation.
    let by_op = |text: &str| {
        flotilla_sandbox::prom::parse(text)
            .map(|e| e.by_label("flotilla_ec2_calls_total", "operation"))
            .unwrap_or_default()
    };
    let (b, a) = (by_op(&before), by_op(&after));
    let window: Vec<(String, f64)> = a
        .iter()
        .map(|(op, n)| (op.clone(), n - b.get(op).copied().unwrap_or(0.0)))
        .filter(|(_, n)| *n > 0.0)
        .collect();
    let total: f64 = window.iter().map(|(_, n)| n).sum();
    println!(
        "  EC2 requests per reconcile with {machines} machines tracked: {:.2} (all operations in the window: {window:?})",
        total / describes.max(1.0)
    );

    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();
    drop(moto);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::DaemonScale {
            machines,
            clients,
            rounds,
            observe_secs,
        } => daemon_scale(machines, clients, rounds, observe_secs).await,
    }
}
