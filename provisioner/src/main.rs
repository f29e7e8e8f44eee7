//! The `flotilla-provision` command line: loads the stack file (no network), builds the
//! AWS clients from the standard SDK chain, and runs plan / apply / destroy / output.
//! Plans and outputs go to stdout; progress and logs go to stderr (tracing).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use flotilla_provision::{
    converge, destroy, resolve_binary, Aws, Ctx, HostOptions, Mode, Outputs, Resolved, Secret,
    Stack,
};

/// `flotilla-provision --version`: the crate's version and the git revision it was built
/// from (`build.rs`; "unknown" outside a git checkout).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("FLOTILLA_GIT_REVISION"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "flotilla-provision",
    version = VERSION,
    about = "Plan, apply and destroy the AWS side of a Flotilla fleet"
)]
struct Cli {
    /// The stack file (TOML).
    #[arg(long, short, value_name = "FILE", env = "FLOTILLA_STACK")]
    stack: PathBuf,
    /// The flotilla binary apply uploads to the stack's bucket for the runner hosts
    /// (plan, apply, output); by default the `flotilla` next to this executable. Not
    /// used when the stack sets runner_hosts.flotilla_url.
    #[arg(long, global = true, value_name = "PATH")]
    flotilla_bin: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the stack file only (no network).
    Validate,
    /// Show what apply would create or change; writes nothing.
    Plan,
    /// Create what is missing and converge what drifted; replace changed runner hosts
    /// one at a time (new host ready, then the old one drained and terminated).
    Apply {
        /// Replace runner hosts without checking the new one over SSM or draining the
        /// old one (jobs running on it fail): for hosts SSM cannot reach.
        #[arg(long)]
        no_drain: bool,
    },
    /// Delete everything tagged with the stack, in dependency order.
    Destroy {
        /// Act; without it, destroy only prints what it would delete.
        #[arg(long)]
        yes: bool,
        /// Also terminate build machines of the stack's fleet still running in its VPC.
        #[arg(long)]
        terminate_build_machines: bool,
    },
    /// Print ids, addresses and the generated config.toml and flotilla.toml.
    Output {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

#[path = "../../build/packaging.rs"]
mod packaging;
use packaging::Packaging;

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("flotilla_provision=info,warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> ExitCode {
    if let Ok(packaging) = Packaging::try_parse() {
        return packaging.run::<Cli>("error");
    }
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // Shut down first (it waits for the worker threads), so that nothing its tasks log
    // while closing (connection pools at trace level) comes after the error line.
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn report_calls(aws: &Aws, what: &str) {
    tracing::info!(
        "{what}: {} AWS API calls ({} reads, {} writes)",
        aws.meter.reads() + aws.meter.writes(),
        aws.meter.reads(),
        aws.meter.writes()
    );
    tracing::debug!(calls = ?aws.meter.by_op(), "AWS API calls by operation");
}

async fn run(cli: Cli) -> Result<()> {
    let stack = Stack::load(&cli.stack)?;
    if let Command::Validate = cli.command {
        println!("{}: stack {} is valid", cli.stack.display(), stack.name());
        return Ok(());
    }
    // The binary the hosts install, found and hashed before any network use.
    let hosts = match cli.command {
        Command::Plan | Command::Apply { .. } | Command::Output { .. } => {
            let resolved = resolve_binary(
                &stack,
                &cli.stack,
                cli.flotilla_bin.as_deref(),
                std::env::current_exe(),
            )?;
            HostOptions {
                flotilla: match resolved {
                    Resolved::Local(bin) => Some(bin),
                    Resolved::Url => None,
                },
                no_drain: matches!(cli.command, Command::Apply { no_drain: true }),
            }
        }
        Command::Validate | Command::Destroy { .. } => HostOptions::default(),
    };
    let aws = Aws::from_env(stack.region())
        .await
        .context("configuring the AWS SDK")?;
    let token = std::env::var(stack.token_env())
        .ok()
        .filter(|t| !t.trim().is_empty())
        .map(Secret::new);
    let title = format!("stack {} in {}", stack.name(), aws.region);
    match cli.command {
        Command::Validate => unreachable!(),
        Command::Plan => {
            let ctx = Ctx::new(&aws, &stack, Mode::Plan, token).with_hosts(hosts);
            converge(&ctx).await?;
            print!("{}", ctx.plan.render(&format!("Plan for {title}")));
            report_calls(&aws, "plan");
        }
        Command::Apply { .. } => {
            let plan = Ctx::new(&aws, &stack, Mode::Plan, token.clone()).with_hosts(hosts.clone());
            converge(&plan).await?;
            print!("{}", plan.plan.render(&format!("Plan for {title}")));
            if plan.plan.is_empty() {
                println!("Nothing to apply.");
                report_calls(&aws, "apply");
                return Ok(());
            }
            let ctx = Ctx::new(&aws, &stack, Mode::Apply, token).with_hosts(hosts);
            let outputs = converge(&ctx).await?;
            println!("Apply complete: {}.", ctx.plan.summary());
            print_summary(&outputs);
            report_calls(&aws, "apply");
        }
        Command::Destroy {
            yes,
            terminate_build_machines,
        } => {
            let plan = Ctx::new(&aws, &stack, Mode::Plan, token.clone());
            destroy(&plan, terminate_build_machines).await?;
            print!("{}", plan.plan.render(&format!("Destroy plan for {title}")));
            if plan.plan.is_empty() {
                println!("Nothing to destroy.");
            } else if !yes {
                println!("Nothing deleted: run `destroy --yes` to delete the above.");
            } else {
                let ctx = Ctx::new(&aws, &stack, Mode::Apply, token);
                destroy(&ctx, terminate_build_machines).await?;
                println!("Destroy complete: {}.", ctx.plan.summary());
            }
            report_calls(&aws, "destroy");
        }
        Command::Output { json } => {
            let ctx = Ctx::new(&aws, &stack, Mode::Plan, token).with_hosts(hosts);
            let outputs = converge(&ctx).await?;
            if !ctx.plan.is_empty() {
                tracing::warn!(
                    "the stack differs from {} ({}): run apply; values not created yet \
                     are shown as placeholders",
                    cli.stack.display(),
                    ctx.plan.summary()
                );
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&outputs)?);
            } else {
                print_outputs(&outputs);
            }
            report_calls(&aws, "output");
        }
    }
    Ok(())
}

fn print_summary(o: &Outputs) {
    println!("VPC {}; runner hosts:", o.vpc);
    for h in &o.runner_hosts {
        println!(
            "  {} {} {} ({})",
            h.name, h.instance_id, h.private_ip, h.state
        );
    }
    println!("Registration: {}", o.registration);
}

fn print_outputs(o: &Outputs) {
    println!("stack                    {}", o.stack);
    println!("region                   {}", o.region);
    println!("vpc                      {}", o.vpc);
    println!("public_subnets           {}", o.public_subnets.join(" "));
    println!("private_subnets          {}", o.private_subnets.join(" "));
    for n in &o.nat_gateways {
        println!(
            "nat_gateway              {} {} {}",
            n.zone, n.id, n.public_ip
        );
    }
    println!("s3_endpoint              {}", o.s3_endpoint);
    println!("runner_security_group    {}", o.runner_security_group);
    println!("build_security_group     {}", o.build_security_group);
    println!("bucket                   {}", o.bucket);
    println!(
        "flotilla_binary          {} (sha256 {})",
        o.flotilla_binary, o.flotilla_sha256
    );
    println!("runner_role              {}", o.runner_role_arn);
    println!("build_role               {}", o.build_role_arn);
    println!("runner_instance_profile  {}", o.runner_instance_profile);
    println!("build_instance_profile   {}", o.build_instance_profile);
    for h in &o.runner_hosts {
        println!(
            "runner_host              {} {} {} {} (fleet {})",
            h.name, h.instance_id, h.private_ip, h.state, h.fleet
        );
    }
    println!("token_parameter          {}", o.token_parameter);
    match o.gitlab_runner_id {
        Some(id) => println!("gitlab_runner            {id} ({})", o.registration),
        None => println!("gitlab_runner            ({})", o.registration),
    }
    if !o.deploy.provider_arn.is_empty() {
        println!("oidc_provider            {}", o.deploy.provider_arn);
    }
    for (name, arn) in &o.deploy.roles {
        println!("deploy_role              {name} {arn}");
    }
    if let Some(id) = &o.client_vpn_endpoint {
        println!("client_vpn_endpoint      {id}");
    }
    for t in &o.scrape_targets {
        println!("scrape_target            {} {} {}", t.job, t.host, t.target);
    }
    println!("\n# gitlab-runner config.toml (/etc/gitlab-runner/config.toml)");
    print!("{}", o.gitlab_runner_config_toml);
    for h in &o.runner_hosts {
        println!(
            "\n# flotilla.toml of {} (/etc/flotilla/flotilla.toml)",
            h.name
        );
        print!("{}", h.flotilla_toml);
    }
}
