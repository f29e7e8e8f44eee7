//! `flotilla`: argument parsing and exit codes; everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flotilla::control::ControlClient;
use flotilla::stages::{self, JobEnv, StageError};
use flotilla_proto::config::{Config, CONFIG_ENV, DEFAULT_CONFIG_PATH};

/// `flotilla --version`: the crate's version and the git revision it was built from
/// (`build.rs`; "unknown" outside a git checkout).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("FLOTILLA_GIT_REVISION"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "flotilla",
    version = VERSION,
    about = "Autoscaled EC2 build machines for GitLab CI (custom executor + daemon)"
)]
struct Cli {
    /// Config file [default: $FLOTILLA_CONFIG, else /etc/flotilla/flotilla.toml]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Custom executor config stage: print the driver JSON.
    Config,
    /// Custom executor prepare stage: lease a machine and create the job's containers.
    Prepare,
    /// Custom executor run stage: run a stage script on the leased machine.
    Run { script: PathBuf, stage: String },
    /// Custom executor cleanup stage: remove the job's containers and release the machine.
    Cleanup,
    /// Run the fleet manager.
    Daemon {
        /// If the pool state (state.json, its journals) is unreadable, move it aside and
        /// start with an empty pool that adopts the fleet's running instances (health-
        /// checked, never leased, terminated once no job runs on them) instead of refusing
        /// to start. Has no effect on a readable state.
        #[arg(long)]
        adopt: bool,
    },
    /// Show the pool.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// List the instances the daemon would reap (orphans, broken machines) and why.
    Audit {
        /// Terminate the listed orphans now instead of after orphan_grace.
        #[arg(long)]
        terminate: bool,
        #[arg(long)]
        json: bool,
    },
    /// Stop granting leases and terminate machines as they become idle.
    Drain {
        /// Leave drain mode.
        #[arg(long)]
        off: bool,
        /// Wait until every machine is gone.
        #[arg(long)]
        wait: bool,
    },
    /// Validate the config file and exit.
    CheckConfig,
    /// Replay a job trace through Flotilla's scaling policy and through docker+machine and
    /// taskscaler, on simulated EC2; compare waits, idle machine-hours and cost. Uses
    /// `--config` only when given (built-in defaults otherwise).
    Simulate(flotilla::simulate::Args),
    /// Convert a gitlab-runner config.toml with docker+machine runners into a flotilla.toml
    /// and the runner config for the custom executor, with a report of every setting.
    /// Exit 0 converted, 2 refused (bad input, or outputs exist without --force).
    Migrate(flotilla::migrate::Args),
}

#[path = "../../build/packaging.rs"]
mod packaging;
use packaging::Packaging;

fn config_path(cli: &Option<PathBuf>) -> PathBuf {
    cli.clone()
        .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn main() -> ExitCode {
    flotilla::stages::timing::main_entered();
    if let Ok(packaging) = Packaging::try_parse() {
        return packaging.run::<Cli>("flotilla");
    }
    let env = JobEnv::from_env();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let rendered = e.render().to_string();
            let line = rendered
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("flotilla: {line} (see flotilla --help)");
            return exit(env.system_failure_code);
        }
    };
    let is_stage = matches!(
        cli.command,
        Command::Config | Command::Prepare | Command::Run { .. } | Command::Cleanup
    );
    init_logging(if is_stage { "warn" } else { "info" });
    flotilla::stages::timing::mark("logging_ready");
    if let Command::Simulate(args) = &cli.command {
        return match flotilla::simulate::run(cli.config.as_deref(), args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("flotilla: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Migrate(args) = &cli.command {
        return migrate(cli.config.is_some(), args);
    }
    flotilla::tls::install_crypto_provider();

    let path = config_path(&cli.config);
    let config = match Config::load(&path) {
        Ok(c) => {
            flotilla::stages::timing::mark("config_loaded");
            c
        }
        Err(e) => {
            eprintln!("flotilla: {e}");
            return exit(if is_stage { env.system_failure_code } else { 2 });
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("flotilla: cannot start the async runtime: {e}");
            return exit(env.system_failure_code);
        }
    };
    if is_stage {
        flotilla::stages::timing::mark("runtime_started");
        let result = runtime.block_on(run_stage(&config, &env, cli.command));
        return stage_exit(&env, result);
    }
    let result = runtime.block_on(run_command(config, cli.command));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flotilla: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn migrate(config_given: bool, args: &flotilla::migrate::Args) -> ExitCode {
    if config_given {
        eprintln!(
            "flotilla: migrate reads --from and writes --out-dir; --config is not used \
             (--config-path is the flotilla.toml path written into the runner's config)"
        );
        return ExitCode::from(2);
    }
    match flotilla::migrate::run(args) {
        Ok(m) => {
            let dir = args.out_dir.display();
            println!(
                "wrote {dir}/{}, {dir}/{} and {dir}/{} (fleet {}, classes {})",
                flotilla::migrate::FLOTILLA_TOML,
                flotilla::migrate::RUNNER_TOML,
                flotilla::migrate::REPORT_FILE,
                m.config.fleet,
                m.config.class_names().join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flotilla: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run_stage(config: &Config, env: &JobEnv, command: Command) -> Result<(), StageError> {
    let result = run_stage_command(config, env, command).await;
    stages::name_machine_log(config, env, result)
}

async fn run_stage_command(
    config: &Config,
    env: &JobEnv,
    command: Command,
) -> Result<(), StageError> {
    match command {
        Command::Config => {
            println!("{}", stages::config::render(config));
            Ok(())
        }
        Command::Prepare => stages::prepare::run(config, env).await,
        Command::Run { script, stage } => stages::run::run(config, env, &script, &stage).await,
        Command::Cleanup => stages::cleanup::run(config, env).await,
        _ => Ok(()),
    }
}

fn stage_exit(env: &JobEnv, result: Result<(), StageError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(StageError::Build { code, message }) => {
            if let Some(m) = message {
                eprintln!("flotilla: {m}");
            }
            if let Some(file) = &env.build_exit_code_file {
                if let Err(e) = std::fs::write(file, format!("{code}\n")) {
                    eprintln!("flotilla: cannot write {}: {e}", file.display());
                    return exit(env.system_failure_code);
                }
            }
            exit(env.build_failure_code)
        }
        Err(StageError::System(m)) => {
            eprintln!("flotilla: {m}");
            exit(env.system_failure_code)
        }
        Err(StageError::Machine(m)) => {
            eprintln!("flotilla: {m}");
            // Cleanup reads this and releases the machine as broken, never to the next job.
            let marker = env.tmpdir.join(stages::MACHINE_SUSPECT_FILE);
            if let Err(e) = stages::write_private(&marker, m.as_bytes()) {
                eprintln!("flotilla: {e:?}");
            }
            exit(env.system_failure_code)
        }
    }
}

async fn run_command(config: Config, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Daemon { adopt } => flotilla::daemon::run(config, adopt).await,
        Command::Status { json } => {
            let status = ControlClient::new(&config.socket_path())
                .status()
                .await
                .context("cannot read the pool status")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", flotilla::status::render_table(&status));
            }
            Ok(())
        }
        Command::Audit { terminate, json } => {
            let audit = ControlClient::new(&config.socket_path())
                .audit(terminate)
                .await
                .context("cannot audit the fleet")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&audit)?);
            } else if audit.entries.is_empty() {
                println!("nothing to reap");
            } else {
                for e in &audit.entries {
                    let when = e
                        .reap_at
                        .map(|t| format!(" (reaped at {})", t.format("%H:%M:%S UTC")))
                        .unwrap_or_default();
                    let verb = if audit.terminated && e.reap_at.is_some() {
                        "terminated "
                    } else {
                        ""
                    };
                    println!(
                        "{verb}{} {}: {}{when}",
                        e.instance_id,
                        e.machine_id.as_deref().unwrap_or("-"),
                        e.reason
                    );
                }
            }
            Ok(())
        }
        Command::Drain { off, wait } => {
            let client = ControlClient::new(&config.socket_path());
            let status = client
                .drain(!off)
                .await
                .context("cannot change drain mode")?;
            print!("{}", flotilla::status::render_table(&status));
            let mut watching = wait && !off;
            while watching {
                let status = client
                    .status()
                    .await
                    .context("cannot read the pool status")?;
                watching = !status.machines.is_empty();
                if watching {
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                } else {
                    println!("drained: no machines left");
                }
            }
            Ok(())
        }
        Command::CheckConfig => {
            println!(
                "config OK: fleet {}, classes {}",
                config.fleet,
                config.class_names().join(", ")
            );
            Ok(())
        }
        _ => Ok(()),
    }
}
