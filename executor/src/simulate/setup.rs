//! What one `flotilla simulate` replays, read and checked once: the arguments ([`Args`]),
//! the configuration (the `--config` file, or [`default_config`] for the trace's classes),
//! the trace, and the simulated EC2 ([`Env`]: boot times, prices, spot reclaims). The
//! single run and the sweep both start from the same [`Setup`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use flotilla_proto::config::{ClassConfig, Config};

use super::engine::Env;
use super::rng::Dist;
use super::trace;

/// Arguments of `flotilla simulate`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Job trace (CSV): the shared CI-builds format (started_at,duration_seconds,...,n_jobs)
    /// or one job per line as `arrival,duration_seconds[,class]`.
    #[arg(long, value_name = "FILE")]
    pub trace: PathBuf,
    /// Print `{"policies": [...]}` as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Walk each baseline's main knobs and report its Pareto front (idle machine-hours vs
    /// p95 wait) next to Flotilla's.
    #[arg(long)]
    pub sweep: bool,
    /// Write an SVG plot of demand, machines and idle machines over time.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Cold launch to ready (RunInstances, boot, dockerd answering): fixed:S,
    /// uniform:MIN:MAX, normal:MEAN:SD or lognormal:MEDIAN:SIGMA (seconds). `--boot` is its
    /// older name.
    #[arg(
        long,
        alias = "boot",
        default_value = "uniform:40:90",
        value_name = "DIST"
    )]
    pub launch: String,
    /// Start of a stopped machine to ready (StartInstances, boot, dockerd answering), in
    /// the same forms as `--launch`.
    #[arg(long, default_value = "uniform:15:30", value_name = "DIST")]
    pub start: String,
    /// EBS price per GB-month (gp3 in us-east-1: 0.08); a stopped machine costs its class's
    /// root volume (`root_volume.gb`, 30 GB when unset) at this price.
    #[arg(long, default_value_t = 0.08, value_name = "USD")]
    pub ebs_usd_per_gb_month: f64,
    /// Seed of the simulated EC2's random draws (boot times, reclaims).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Mean spot reclaims per machine-hour (0: none); a reclaimed job runs again.
    #[arg(long, default_value_t = 0.0, value_name = "RATE")]
    pub spot_reclaims_per_hour: f64,
}

/// Built-in on-demand prices (USD per hour, us-east-1, Linux) used for instance types the
/// config's `[prices]` table does not list.
const DEFAULT_PRICES: &[(&str, f64)] = &[
    ("t3.medium", 0.0416),
    ("t3.large", 0.0832),
    ("t3.xlarge", 0.1664),
    ("m5.large", 0.096),
    ("m5.xlarge", 0.192),
    ("m5.2xlarge", 0.384),
    ("m6i.large", 0.096),
    ("m6i.xlarge", 0.192),
    ("m7i.large", 0.1008),
    ("c5.large", 0.085),
    ("c5.xlarge", 0.17),
    ("c5.2xlarge", 0.34),
    ("c6i.large", 0.085),
    ("c6i.xlarge", 0.17),
    ("c7i.large", 0.0893),
];

/// The instance type and limits used when no config is given: one class, capacity that
/// never binds for the shared trace, so the comparison is about the autoscaling policy.
pub(super) const SIM_INSTANCE_TYPE: &str = "m5.large";
const SIM_MAX_MACHINES: u32 = 300;

/// The configuration simulated without `--config`: Flotilla's defaults (the learned
/// policy on, idle_time 10 min) for every class in the trace.
pub(super) fn default_config(classes: &[String]) -> Config {
    let mut c = Config {
        fleet: "simulated".into(),
        default_class: classes.first().cloned().unwrap_or_else(|| "default".into()),
        max_machines: SIM_MAX_MACHINES,
        max_growth_rate: SIM_MAX_MACHINES,
        ..Config::default()
    };
    for class in classes {
        c.classes.insert(
            class.clone(),
            ClassConfig {
                ami: "ami-simulated".into(),
                instance_types: vec![SIM_INSTANCE_TYPE.into()],
                subnets: vec!["subnet-simulated".into()],
                max_machines: SIM_MAX_MACHINES,
                ..ClassConfig::default()
            },
        );
    }
    c
}

fn prices(config: &Config) -> BTreeMap<String, f64> {
    let mut p: BTreeMap<String, f64> = DEFAULT_PRICES
        .iter()
        .map(|(t, v)| (t.to_string(), *v))
        .collect();
    p.extend(config.prices.iter().map(|(k, v)| (k.clone(), *v)));
    p
}

/// Everything one replay needs besides the policy.
pub(super) struct Setup {
    pub config: Config,
    pub trace: trace::Trace,
    pub env: Env,
}

impl Setup {
    pub(super) fn load(config_path: Option<&Path>, args: &Args) -> anyhow::Result<Self> {
        check_args(args)?;
        let config = match config_path {
            Some(p) => Some(Config::load(p)?),
            None => None,
        };
        let text = std::fs::read_to_string(&args.trace)
            .with_context(|| format!("cannot read trace {}", args.trace.display()))?;
        let default_class = config
            .as_ref()
            .map_or_else(|| "default".to_string(), |c| c.default_class.clone());
        let trace = trace::parse(&text, &default_class)
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.trace.display()))?;
        let config = match config {
            Some(c) => {
                let unknown: Vec<String> = trace
                    .classes()
                    .into_iter()
                    .filter(|k| !c.classes.contains_key(k))
                    .collect();
                if !unknown.is_empty() {
                    bail!(
                        "{}: jobs ask for classes the config does not define: {} (configured: {})",
                        args.trace.display(),
                        unknown.join(", "),
                        c.class_names().join(", ")
                    );
                }
                c
            }
            None => default_config(&trace.classes()),
        };
        let prices = prices(&config);
        for (name, class) in &config.classes {
            let t = class.instance_types.first().cloned().unwrap_or_default();
            if !prices.contains_key(&t) {
                eprintln!(
                    "flotilla: warning: no price for instance type {t:?} (class {name}); add it to [prices] in the config — its cost counts as 0"
                );
            }
        }
        let env = env_from(args, &config, prices)?;
        Ok(Self { config, trace, env })
    }
}

/// The flags' own checks, before any file is read: each error names its flag.
fn check_args(args: &Args) -> anyhow::Result<()> {
    Dist::parse(&args.launch).map_err(|e| anyhow::anyhow!("--launch {e}"))?;
    Dist::parse(&args.start).map_err(|e| anyhow::anyhow!("--start {e}"))?;
    if !(args.spot_reclaims_per_hour.is_finite() && args.spot_reclaims_per_hour >= 0.0) {
        bail!("--spot-reclaims-per-hour must be a number >= 0");
    }
    if !(args.ebs_usd_per_gb_month.is_finite() && args.ebs_usd_per_gb_month >= 0.0) {
        bail!(
            "--ebs-usd-per-gb-month must be a number >= 0, not {}",
            args.ebs_usd_per_gb_month
        );
    }
    Ok(())
}

/// The simulated EC2 of the flags and the config (reconcile interval); root volumes are
/// per class, taken by the replay of each class (`runs`).
fn env_from(args: &Args, config: &Config, prices: BTreeMap<String, f64>) -> anyhow::Result<Env> {
    check_args(args)?;
    Ok(Env {
        launch: Dist::parse(&args.launch).map_err(|e| anyhow::anyhow!("--launch {e}"))?,
        start: Dist::parse(&args.start).map_err(|e| anyhow::anyhow!("--start {e}"))?,
        ebs_usd_per_gb_month: args.ebs_usd_per_gb_month,
        seed: args.seed,
        reclaims_per_hour: args.spot_reclaims_per_hour,
        tick_ms: config.reconcile_interval.0.as_millis().max(1) as i64,
        prices,
        lead_ms: 15 * 60_000,
        timeline: args.plot.is_some() || !args.json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(flags: &[&str]) -> Result<Args, clap::Error> {
        let argv = ["simulate", "--trace", "t.csv"].iter().chain(flags);
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    fn env(flags: &[&str]) -> anyhow::Result<Env> {
        let config = default_config(&["default".to_string()]);
        env_from(&parse(flags)?, &config, prices(&config))
    }

    #[test]
    fn launch_and_start_latencies_default_to_the_issues_distributions() {
        let e = env(&[]).unwrap();
        assert_eq!(e.launch, Dist::Uniform(40.0, 90.0));
        assert_eq!(e.start, Dist::Uniform(15.0, 30.0));
        assert_eq!(e.ebs_usd_per_gb_month, 0.08);
    }

    #[test]
    fn launch_start_and_ebs_price_are_settable_and_boot_is_the_old_name_of_launch() {
        let e = env(&[
            "--launch",
            "fixed:60",
            "--start",
            "lognormal:20:0.3",
            "--ebs-usd-per-gb-month",
            "0.1",
        ])
        .unwrap();
        assert_eq!(e.launch, Dist::Fixed(60.0));
        assert_eq!(e.start, Dist::LogNormal(20.0, 0.3));
        assert_eq!(e.ebs_usd_per_gb_month, 0.1);
        assert_eq!(
            env(&["--boot", "fixed:45"]).unwrap().launch,
            Dist::Fixed(45.0)
        );
    }

    #[test]
    fn a_bad_value_is_refused_naming_its_flag() {
        let msg = |flags: &[&str]| format!("{:#}", env(flags).unwrap_err());
        assert!(
            msg(&["--start", "uniform:30"]).starts_with("--start "),
            "{}",
            msg(&["--start", "uniform:30"])
        );
        assert!(msg(&["--launch", "gamma:1:2"]).starts_with("--launch "));
        assert!(msg(&["--boot", "fixed:-1"]).starts_with("--launch "));
        assert!(msg(&["--ebs-usd-per-gb-month=-0.5"]).starts_with("--ebs-usd-per-gb-month "));
        assert!(msg(&["--ebs-usd-per-gb-month", "NaN"]).starts_with("--ebs-usd-per-gb-month "));
        // Not a number at all: clap's own error names the flag.
        let e = parse(&["--ebs-usd-per-gb-month", "cheap"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--ebs-usd-per-gb-month"), "{e}");
    }
}
