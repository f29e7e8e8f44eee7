//! `flotilla-sandbox`: run the local cloud by hand.
//!
//! `up` starts a detached `serve` (moto, registry, machine emulator, `flotilla daemon` with
//! its Prometheus metrics on a loopback port) and prints the flotilla config path (and the
//! metrics URL on stderr); `down` stops it and waits until every instance is
//! terminated; `status` shows it; `run-job` runs one job through all stages like
//! gitlab-runner; `watch` follows the fleet's instances in moto.
//!
//! State of `up`/`down` lives in `$FLOTILLA_SANDBOX_DIR` (default /tmp/flotilla-sandbox):
//! `serve.pid`, `ready` (holds the config path once the sandbox is up), `serve.log`, and
//! the sandbox itself under `s/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use flotilla_proto::config::Config;
use flotilla_sandbox::runner::{run_job, Outcome};
use flotilla_sandbox::sandbox::find_flotilla_bin;
use flotilla_sandbox::util::{pid_alive, wait_until_blocking};
use flotilla_sandbox::{moto, Job, RunnerOptions, Sandbox, SandboxOptions};

#[derive(Parser)]
#[command(about = "Flotilla's local cloud sandbox (moto + emulated build machines)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a sandbox in the foreground until SIGTERM/SIGINT.
    Serve(PoolArgs),
    /// Start a sandbox in the background; print its flotilla config path.
    Up(PoolArgs),
    /// Stop the background sandbox; wait until its instances are terminated.
    Down,
    /// Show the background sandbox and its instances.
    Status,
    /// Run one job through all stages like gitlab-runner.
    RunJob(RunJobArgs),
    /// Follow the fleet's instances in moto, printing every change.
    Watch(WatchArgs),
}

#[derive(Args, Clone)]
struct PoolArgs {
    /// Idle machines to keep warm.
    #[arg(long, default_value_t = 0)]
    idle_count: u32,
    /// Idle machines beyond idle_count are terminated after this many seconds.
    #[arg(long, default_value_t = 20)]
    idle_time_secs: u64,
    /// Jobs per machine (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    max_builds: u32,
    /// Emulated boot time of a machine, in seconds.
    #[arg(long, default_value_t = 2)]
    boot_delay_secs: u64,
}

#[derive(Args)]
struct RunJobArgs {
    /// The flotilla config (as printed by `up`).
    #[arg(long, env = "FLOTILLA_CONFIG")]
    config: PathBuf,
    /// The job's image (default: the config's default image).
    #[arg(long)]
    image: Option<String>,
    /// A script line; repeat for more.
    #[arg(long = "script", default_values_t = vec!["echo \"Hello from $(hostname): job $CI_JOB_ID\"".to_owned(), "cat /etc/os-release 2>/dev/null || uname -a".to_owned()])]
    script: Vec<String>,
    /// An after_script line; repeat for more.
    #[arg(long = "after-script")]
    after_script: Vec<String>,
    /// FLOTILLA_CLASS for the job.
    #[arg(long)]
    class: Option<String>,
    /// CI_JOB_ID (default: derived from the clock).
    #[arg(long)]
    job_id: Option<u64>,
}

#[derive(Args)]
struct WatchArgs {
    #[arg(long, env = "FLOTILLA_CONFIG")]
    config: PathBuf,
    /// Exit 0 once at least one instance was seen and none is left running.
    #[arg(long)]
    until_all_terminated: bool,
    /// Give up (exit 1) after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

fn base_dir() -> PathBuf {
    std::env::var_os("FLOTILLA_SANDBOX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/flotilla-sandbox"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_SANDBOX_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flotilla-sandbox: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Serve(a) => serve(a).await,
            Cmd::Up(a) => up(a),
            Cmd::Down => down(),
            Cmd::Status => status().await,
            Cmd::RunJob(a) => run_job_cmd(a).await,
            Cmd::Watch(a) => watch(a).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flotilla-sandbox: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn options(a: &PoolArgs, dir: PathBuf) -> SandboxOptions {
    SandboxOptions {
        idle_count: a.idle_count,
        idle_time: Duration::from_secs(a.idle_time_secs),
        max_builds: a.max_builds,
        boot_delay: Duration::from_secs(a.boot_delay_secs),
        dir: Some(dir),
        // The daemon's Prometheus metrics on a free loopback port (`up` prints the URL).
        metrics: true,
        ..Default::default()
    }
}

async fn serve(a: PoolArgs) -> Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    let base = base_dir();
    std::fs::create_dir_all(&base)?;
    let ready = base.join("ready");
    let pid_file = base.join("serve.pid");
    let _ = std::fs::remove_file(&ready);
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    let started = tokio::select! {
        r = Sandbox::start(options(&a, base.join("s"))) => Some(r),
        _ = term.recv() => None,
        _ = int.recv() => None,
    };
    let sb = match started {
        Some(Ok(sb)) => sb,
        Some(Err(e)) => {
            let _ = std::fs::remove_file(&pid_file);
            return Err(e.context("starting the sandbox"));
        }
        None => {
            let _ = std::fs::remove_file(&pid_file);
            eprintln!("flotilla-sandbox: interrupted while starting");
            return Ok(ExitCode::FAILURE);
        }
    };
    std::fs::write(&ready, format!("{}\n", sb.config_path.display()))?;
    eprintln!(
        "flotilla-sandbox: up: fleet {} config {} moto {} metrics {} daemon log {}",
        sb.fleet,
        sb.config_path.display(),
        sb.moto_url(),
        sb.metrics_url().unwrap_or_default(),
        sb.daemon_log().display()
    );
    tokio::select! {
        _ = term.recv() => eprintln!("flotilla-sandbox: SIGTERM: shutting down"),
        _ = int.recv() => eprintln!("flotilla-sandbox: SIGINT: shutting down"),
    }
    let _ = std::fs::remove_file(&ready);
    let fleet = sb.fleet.clone();
    sb.shutdown().await?;
    eprintln!("flotilla-sandbox: fleet {fleet}: every instance terminated, all stopped");
    let _ = std::fs::remove_file(&pid_file);
    Ok(ExitCode::SUCCESS)
}

/// The pid of the background `serve`, if it is alive.
fn running_pid(base: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(base.join("serve.pid")).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    pid_alive(pid).then_some(pid)
}

fn ready_config(base: &Path) -> Option<String> {
    std::fs::read_to_string(base.join("ready"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The daemon's metrics URL from the sandbox's flotilla config.
fn metrics_url(config: &str) -> Option<String> {
    let c = Config::load(Path::new(config)).ok()?;
    c.metrics_addr.map(|a| format!("http://{a}/metrics"))
}

fn up(a: PoolArgs) -> Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let base = base_dir();
    std::fs::create_dir_all(&base)?;
    if let Some(pid) = running_pid(&base) {
        let config =
            wait_until_blocking(Duration::from_secs(180), Duration::from_millis(200), || {
                ready_config(&base)
            })
            .with_context(|| format!("a sandbox (pid {pid}) is running but never became ready"))?;
        eprintln!("flotilla-sandbox: already running (pid {pid})");
        if let Some(url) = metrics_url(&config) {
            eprintln!("flotilla-sandbox: daemon metrics (Prometheus): {url}");
        }
        println!("{config}");
        return Ok(ExitCode::SUCCESS);
    }
    let _ = std::fs::remove_file(base.join("ready"));
    let log_path = base.join("serve.log");
    let log = std::fs::File::create(&log_path)?;
    let err = log.try_clone()?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("serve")
        .arg(format!("--idle-count={}", a.idle_count))
        .arg(format!("--idle-time-secs={}", a.idle_time_secs))
        .arg(format!("--max-builds={}", a.max_builds))
        .arg(format!("--boot-delay-secs={}", a.boot_delay_secs))
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting flotilla-sandbox serve")?;
    eprintln!(
        "flotilla-sandbox: starting (pid {}, log {})",
        child.id(),
        log_path.display()
    );
    let start = Instant::now();
    loop {
        if let Some(config) = ready_config(&base) {
            if let Some(url) = metrics_url(&config) {
                eprintln!("flotilla-sandbox: daemon metrics (Prometheus): {url}");
            }
            println!("{config}");
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "serve exited with {status} before it was ready; log {}:\n{}",
                log_path.display(),
                flotilla_sandbox::util::tail(&log_path, 30)
            );
        }
        if start.elapsed() > Duration::from_secs(180) {
            bail!(
                "the sandbox was not ready within 180 s; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn down() -> Result<ExitCode> {
    let base = base_dir();
    let Some(pid) = running_pid(&base) else {
        eprintln!("flotilla-sandbox: not running");
        let _ = std::fs::remove_file(base.join("ready"));
        return Ok(ExitCode::SUCCESS);
    };
    eprintln!("flotilla-sandbox: stopping pid {pid} (terminates every instance)...");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let gone = wait_until_blocking(Duration::from_secs(180), Duration::from_millis(200), || {
        (!pid_alive(pid)).then_some(())
    });
    if gone.is_none() {
        bail!(
            "pid {pid} is still running after 180 s; see {}",
            base.join("serve.log").display()
        );
    }
    let log = std::fs::read_to_string(base.join("serve.log")).unwrap_or_default();
    if let Some(line) = log
        .lines()
        .rev()
        .find(|l| l.contains("every instance terminated"))
    {
        eprintln!("{line}");
    } else {
        eprintln!(
            "flotilla-sandbox: serve did not report a clean shutdown; see {}",
            base.join("serve.log").display()
        );
    }
    eprintln!("flotilla-sandbox: down");
    Ok(ExitCode::SUCCESS)
}

async fn status() -> Result<ExitCode> {
    let base = base_dir();
    let Some(pid) = running_pid(&base) else {
        println!("not running");
        return Ok(ExitCode::from(3));
    };
    let Some(config) = ready_config(&base) else {
        println!("starting (pid {pid})");
        return Ok(ExitCode::SUCCESS);
    };
    println!("running (pid {pid})\nconfig: {config}");
    let c = Config::load(Path::new(&config))?;
    let endpoint = c
        .aws
        .endpoint_url
        .clone()
        .context("config has no aws.endpoint_url")?;
    println!("fleet: {}\nmoto: {endpoint}", c.fleet);
    if let Some(addr) = &c.metrics_addr {
        println!("metrics: http://{addr}/metrics");
    }
    let ec2 = moto::ec2_client(&endpoint).await;
    for i in moto::fleet_instances(&ec2, &c.fleet).await? {
        println!(
            "  {} {:<13} {:<15} {}",
            i.instance_id,
            i.state,
            i.private_ip.unwrap_or_default(),
            i.machine_id.unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_job_cmd(a: RunJobArgs) -> Result<ExitCode> {
    let config = Config::load(&a.config)?;
    let mut opts = RunnerOptions::new(&find_flotilla_bin()?, Some(&a.config));
    opts.echo = true;
    opts.env = vec![
        ("AWS_ACCESS_KEY_ID".into(), "test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ("AWS_REGION".into(), moto::REGION.into()),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
    ];
    if std::env::var_os("RUST_LOG").is_none() {
        opts.env.push(("RUST_LOG".into(), "info".into()));
    }
    if let Some(parent) = a.config.parent() {
        opts.work_dir = Some(parent.join("runner"));
    }
    let id = a.job_id.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() % 1_000_000)
            .unwrap_or(1)
    });
    let lines: Vec<&str> = a.script.iter().map(String::as_str).collect();
    let after: Vec<&str> = a.after_script.iter().map(String::as_str).collect();
    let mut job = Job::new(id, &lines).with_after_script(&after);
    if let Some(image) = &a.image {
        job = job.with_image(image);
    }
    if let Some(class) = &a.class {
        job = job.with_variable("FLOTILLA_CLASS", class);
    }
    eprintln!(
        "flotilla-sandbox: job {id} on fleet {} ({} script line(s))",
        config.fleet,
        lines.len()
    );
    let r = run_job(opts, job).await?;
    eprintln!("flotilla-sandbox: job {id}: {:?}", r.outcome);
    Ok(match r.outcome {
        Outcome::Success if r.cleanup_exit == Some(0) => ExitCode::SUCCESS,
        Outcome::Success => {
            eprintln!("flotilla-sandbox: cleanup exited {:?}", r.cleanup_exit);
            ExitCode::FAILURE
        }
        Outcome::BuildFailure { .. } => ExitCode::from(1),
        _ => ExitCode::from(2),
    })
}

async fn watch(a: WatchArgs) -> Result<ExitCode> {
    let c = Config::load(&a.config)?;
    let endpoint = c
        .aws
        .endpoint_url
        .clone()
        .context("config has no aws.endpoint_url")?;
    let ec2 = moto::ec2_client(&endpoint).await;
    let start = Instant::now();
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let now = moto::fleet_instances(&ec2, &c.fleet).await?;
        for i in &now {
            if last.get(&i.instance_id) != Some(&i.state) {
                println!(
                    "[{:>5.1}s] {} ({}, {}) is {}",
                    start.elapsed().as_secs_f64(),
                    i.instance_id,
                    i.machine_id.as_deref().unwrap_or("-"),
                    i.private_ip.as_deref().unwrap_or("-"),
                    i.state
                );
                last.insert(i.instance_id.clone(), i.state.clone());
            }
        }
        let alive = now.iter().filter(|i| !i.is_terminated()).count();
        if a.until_all_terminated && !now.is_empty() && alive == 0 {
            println!(
                "[{:>5.1}s] all {} instance(s) of fleet {} are terminated",
                start.elapsed().as_secs_f64(),
                now.len(),
                c.fleet
            );
            return Ok(ExitCode::SUCCESS);
        }
        if start.elapsed() > Duration::from_secs(a.timeout_secs) {
            println!(
                "gave up after {} s with {alive} instance(s) not terminated",
                a.timeout_secs
            );
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
