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
    /// Launch-to-ready time: fixed:S, uniform:MIN:MAX, normal:MEAN:SD or
    /// lognormal:MEDIAN:SIGMA (seconds).
    #[arg(long, default_value = "uniform:40:90", value_name = "DIST")]
    pub boot: String,
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
        let boot = Dist::parse(&args.boot).map_err(|e| anyhow::anyhow!("--boot {e}"))?;
        if !(args.spot_reclaims_per_hour.is_finite() && args.spot_reclaims_per_hour >= 0.0) {
            bail!("--spot-reclaims-per-hour must be a number >= 0");
        }
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
        // gp3 at $0.08 per GB-month, the default class's root volume (30 GB without one).
        let root_gb = config
            .classes
            .get(&config.default_class)
            .and_then(|c| c.root_volume_gb)
            .unwrap_or(30);
        let env = Env {
            boot,
            start: super::rng::Dist::Uniform(15.0, 30.0),
            stopped_usd_per_hour: f64::from(root_gb) * 0.08 / 730.0,
            seed: args.seed,
            reclaims_per_hour: args.spot_reclaims_per_hour,
            tick_ms: config.reconcile_interval.0.as_millis().max(1) as i64,
            prices,
            lead_ms: 15 * 60_000,
            timeline: args.plot.is_some() || !args.json,
        };
        Ok(Self { config, trace, env })
    }
}
