//! The `flotilla.toml` schema: read by the daemon and the stages, written by the
//! provisioner and the sandbox with these same types, so a file one side writes is always
//! one the other side accepts.
//!
//! Loading is two steps (ripgrep's "validate, then resolve"): [`Config::from_toml`] parses
//! with unknown keys rejected and the offending key named, then [`Config::validate`] checks
//! cross-field rules. Nothing here touches the network.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::container::{ContainerOptions, VolumeSpec};
use crate::dockerd::DockerdSettings;
use crate::duration::HumanDuration;
pub use crate::schedule::Schedule;

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "FLOTILLA_CONFIG";
/// Where the config lives when neither `--config` nor `FLOTILLA_CONFIG` is set.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/flotilla/flotilla.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Fleet name: the value of the `flotilla:fleet` tag on every instance this daemon
    /// launches and the only instances it will ever terminate.
    pub fleet: String,
    /// Holds the CA, the state file and (by default) the control socket.
    pub state_dir: PathBuf,
    /// Control socket path; defaults to `<state_dir>/flotilla.sock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// Class used by jobs that do not set `FLOTILLA_CLASS`.
    pub default_class: String,
    /// Machines in any state, all classes together.
    #[serde(default = "defaults::max_machines")]
    pub max_machines: u32,
    /// How often the daemon observes EC2 when nothing else wakes it.
    #[serde(default = "defaults::reconcile_interval")]
    pub reconcile_interval: HumanDuration,
    /// An instance tagged with this fleet but unknown to the daemon is terminated once it
    /// has been seen for this long.
    #[serde(default = "defaults::orphan_grace")]
    pub orphan_grace: HumanDuration,
    /// Most launches started in one reconcile pass (docker+machine's `MaxGrowthRate`).
    #[serde(default = "defaults::max_growth_rate")]
    pub max_growth_rate: u32,
    /// How often idle machines are pinged over mTLS; one that stops answering is replaced.
    #[serde(default = "defaults::health_interval")]
    pub health_interval: HumanDuration,
    /// A lease held longer than this is presumed abandoned (its runner died before
    /// `cleanup`): the machine is taken back as broken and replaced. Longer than any job.
    #[serde(default = "defaults::lease_timeout")]
    pub lease_timeout: HumanDuration,
    /// What SIGTERM does to idle machines: `keep` them for the next start, or `terminate` them.
    #[serde(default)]
    pub on_shutdown: ShutdownPolicy,
    /// Prometheus metrics listen address (e.g. `127.0.0.1:9402`); off when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
    #[serde(default)]
    pub aws: AwsConfig,
    /// Where broken or lost machines' console output and dockerd events are saved.
    #[serde(default, skip_serializing_if = "crate::logs::LogsConfig::is_off")]
    pub logs: crate::logs::LogsConfig,
    /// Extra tags on every build machine (instance, root volume, network interface), set in
    /// the launch call beside Flotilla's own (`flotilla:*`, `Name`), which cannot be set
    /// here; a class's `tags` add to these and win on the same key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub job: JobConfig,
    /// `[dockerd]`: settings of every build machine's dockerd, merged into the AMI's
    /// daemon.json; a class's `[classes.X.dockerd]` overrides them key by key.
    #[serde(default, skip_serializing_if = "DockerdSettings::is_empty")]
    pub dockerd: DockerdSettings,
    /// Named machine classes; a job picks one with the `FLOTILLA_CLASS` variable.
    pub classes: BTreeMap<String, ClassConfig>,
    /// USD per hour by instance type (`[prices]`, e.g. `"m5.large" = 0.096`); used by
    /// `flotilla simulate` to cost a policy. Types not listed use built-in on-demand prices.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prices: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Overrides the SDK's region chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Overrides the SDK's endpoint chain (`AWS_ENDPOINT_URL` also works).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// Client-side budget for EC2 calls, shared by every call the daemon makes.
    #[serde(default = "defaults::max_requests_per_second")]
    pub max_requests_per_second: u32,
}

impl Default for AwsConfig {
    fn default() -> Self {
        Self {
            region: None,
            endpoint_url: None,
            max_requests_per_second: defaults::max_requests_per_second(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownPolicy {
    /// Leave machines running; the next daemon adopts them from its state file.
    #[default]
    Keep,
    /// Terminate idle (and booting) machines; leased ones are left to finish their jobs.
    Terminate,
}

/// How a class buys capacity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Market {
    #[default]
    OnDemand,
    Spot,
    /// Spot first (every type and subnet), then on-demand for the shortfall.
    SpotWithFallback,
}

/// A class's root volume. Always encrypted (with `kms_key`, else the account's default
/// EBS key) and deleted with the machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootVolume {
    /// GiB; the AMI's own size when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gb: Option<u32>,
    #[serde(default, rename = "type")]
    pub kind: VolumeKind,
    /// Provisioned IOPS (gp3: 3000-16000, io1: 100-64000, io2: 100-256000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u32>,
    /// MiB/s (gp3 only: 125-1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput: Option<u32>,
    /// KMS key id, alias or ARN for the volume's encryption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key: Option<String>,
}

/// EBS volume types a root volume may have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    #[default]
    Gp3,
    Gp2,
    Io1,
    Io2,
}

impl VolumeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gp3 => "gp3",
            Self::Gp2 => "gp2",
            Self::Io1 => "io1",
            Self::Io2 => "io2",
        }
    }
}

/// An operator-owned EC2 launch template a class launches from, for the settings
/// Flotilla does not model (placement groups, capacity reservations, tenancy, key pairs,
/// license specifications...). Everything Flotilla sets per launch (AMI, instance type,
/// subnet, security groups, user data, tags, root volume, metadata options, instance
/// profile, market, public IP) overrides the template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchTemplateRef {
    /// The template's name; or give `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The template's id (`lt-...`); or give `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `$Default` (the default), `$Latest` or a version number.
    #[serde(default = "defaults::launch_template_version")]
    pub version: String,
}

impl ClassConfig {
    /// The root volume machines get: `root_volume`, or `root_volume_gb` as a gp3 of that
    /// size (validation refuses both at once).
    pub fn effective_root_volume(&self) -> RootVolume {
        self.root_volume.clone().unwrap_or(RootVolume {
            gb: self.root_volume_gb,
            ..RootVolume::default()
        })
    }
}

/// What the stages need to run a job on a leased machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Where the builds volume is mounted in the job's containers.
    #[serde(default = "defaults::builds_dir")]
    pub builds_dir: String,
    /// Where the cache volume is mounted in the job's containers.
    #[serde(default = "defaults::cache_dir")]
    pub cache_dir: String,
    /// Image for jobs without `image:`.
    #[serde(default = "defaults::default_image")]
    pub default_image: String,
    /// Image that runs the predefined stages (git, cache, artifacts).
    #[serde(default = "defaults::helper_image")]
    pub helper_image: String,
    /// How long `prepare` waits for a machine before failing with a system failure.
    #[serde(default = "defaults::acquire_timeout")]
    pub acquire_timeout: HumanDuration,
    /// Docker API timeout for single calls (not for script execution).
    #[serde(default = "defaults::docker_timeout")]
    pub docker_timeout: HumanDuration,
    /// Pull policy for images whose job sets none; a list is tried in order.
    #[serde(default = "defaults::pull_policy")]
    pub pull_policy: Vec<PullPolicy>,
    /// Policies a job may ask for with `pull_policy:`; empty means those in `pull_policy`.
    #[serde(default)]
    pub allowed_pull_policies: Vec<PullPolicy>,
    /// How long prepare waits for services' exposed ports before warning and going on.
    #[serde(default = "defaults::service_wait")]
    pub service_wait: HumanDuration,
    /// Run the build container privileged (Docker-in-Docker builds), if its image matches
    /// `allowed_privileged_images`.
    #[serde(default)]
    pub privileged: bool,
    /// Run services privileged (the `docker:dind` service); unset means `privileged`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services_privileged: Option<bool>,
    /// Glob patterns of build images that may run privileged; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_privileged_images: Vec<String>,
    /// Glob patterns of service images that may run privileged; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_privileged_services: Vec<String>,
    /// Volumes of the build, helper and service containers: `"/certs/client"` (a volume
    /// made for the job, removed at cleanup), `"/host/path:/path[:ro]"`, `"name:/path"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// Glob patterns (`*` within a path segment, `**` across) of images a job may use;
    /// empty means any. The runner's `default_image` is always allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_images: Vec<String>,
    /// Glob patterns of service images a job may use; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_services: Vec<String>,
    /// Percent of the machine's Docker disk in use past which cleanup prunes unused images
    /// and unused project cache volumes on it (1..=99).
    #[serde(default = "defaults::disk_high_water")]
    pub disk_high_water: u8,
    /// `[job.container]`: shm size, tmpfs, capabilities, devices, limits and the rest.
    #[serde(default, skip_serializing_if = "is_default_container")]
    pub container: ContainerOptions,
}

fn is_default_container(c: &ContainerOptions) -> bool {
    *c == ContainerOptions::default()
}

/// gitlab-runner's image pull policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::IfNotPresent => "if-not-present",
            Self::Never => "never",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "always" => Some(Self::Always),
            "if-not-present" => Some(Self::IfNotPresent),
            "never" => Some(Self::Never),
            _ => None,
        }
    }
}

impl Default for JobConfig {
    fn default() -> Self {
        Self {
            builds_dir: defaults::builds_dir(),
            cache_dir: defaults::cache_dir(),
            default_image: defaults::default_image(),
            helper_image: defaults::helper_image(),
            acquire_timeout: defaults::acquire_timeout(),
            docker_timeout: defaults::docker_timeout(),
            pull_policy: defaults::pull_policy(),
            allowed_pull_policies: Vec::new(),
            service_wait: defaults::service_wait(),
            privileged: false,
            services_privileged: None,
            allowed_privileged_images: Vec::new(),
            allowed_privileged_services: Vec::new(),
            volumes: Vec::new(),
            allowed_images: Vec::new(),
            allowed_services: Vec::new(),
            disk_high_water: defaults::disk_high_water(),
            container: ContainerOptions::default(),
        }
    }
}

/// GitLab's helper image for the machine's architecture and the runner's version; the
/// stages expand `${ARCH}`, `${CI_RUNNER_VERSION}` and `${CI_RUNNER_REVISION}`.
pub const DEFAULT_HELPER_IMAGE: &str =
    "registry.gitlab.com/gitlab-org/gitlab-runner/gitlab-runner-helper:${ARCH}-v${CI_RUNNER_VERSION}";

/// One kind of build machine and the pool policy that keeps it warm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassConfig {
    pub ami: String,
    /// Tried in order when launching.
    pub instance_types: Vec<String>,
    /// Private subnets the class may launch into.
    pub subnets: Vec<String>,
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// IAM instance profile name for the machines (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_profile: Option<String>,
    /// Root volume size in GiB; the AMI's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume_gb: Option<u32>,
    /// The root volume in full (always encrypted); `root_volume_gb` is its size alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume: Option<RootVolume>,
    /// IMDSv2's hop limit: 1 keeps job containers (one hop further, behind Docker's
    /// bridge) away from the instance metadata service; 2 lets them use the machine's
    /// role (and read its metadata and user data: see the README before raising it).
    #[serde(
        default = "defaults::imds_hop_limit",
        skip_serializing_if = "defaults::is_imds_hop_limit"
    )]
    pub imds_hop_limit: u8,
    /// A public IP on each machine, for fleets in public subnets that want no NAT
    /// charges. dockerd stays reachable only as the security groups allow, over mTLS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public_ip: bool,
    /// Extra tags on this class's machines, over the fleet's `tags`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Launch from this (operator-owned) launch template; Flotilla's settings win.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_template: Option<LaunchTemplateRef>,
    #[serde(default)]
    pub market: Market,
    /// Idle job slots to keep (machines, with one job per machine); with
    /// `idle_scale_factor` this is the cap.
    #[serde(default)]
    pub idle_count: u32,
    /// With `idle_scale_factor`: keep at least this many idle machines.
    #[serde(default)]
    pub idle_count_min: u32,
    /// When above 0, keep `idle_scale_factor x machines in use` idle machines, between
    /// `idle_count_min` and `idle_count` (docker+machine's `IdleScaleFactor`).
    #[serde(default)]
    pub idle_scale_factor: f64,
    /// An idle machine beyond `idle_count` is terminated after this long without a job.
    #[serde(default = "defaults::idle_time")]
    pub idle_time: HumanDuration,
    /// Machines of this class in any state.
    #[serde(default = "defaults::max_machines")]
    pub max_machines: u32,
    /// Idle machines the policy does not need hot are stopped (not terminated) up to this
    /// many per class, and started before any cold launch when demand comes: a stopped
    /// machine costs only its disk and keeps its image cache. With the forecast on this is
    /// a bound: the pool is sized by `forecast.stopped_horizon`. 0 (the default)
    /// terminates them as before.
    #[serde(default)]
    pub max_stopped: u32,
    /// Jobs per machine before it is replaced; 0 means unlimited.
    #[serde(default)]
    pub max_builds: u32,
    /// Jobs a machine runs at once (docker-autoscaler's `capacity_per_instance`): each
    /// lease is a slot, each job's containers get `1/jobs_per_machine` of the machine's
    /// CPUs and memory unless `[job.container]` sets `cpus`/`memory`. Jobs sharing a
    /// machine share its dockerd, so a class with more than one may not run privileged.
    #[serde(
        default = "defaults::jobs_per_machine",
        skip_serializing_if = "defaults::is_jobs_per_machine"
    )]
    pub jobs_per_machine: u32,
    /// A machine whose dockerd does not answer over mTLS within this is replaced.
    #[serde(default = "defaults::boot_timeout")]
    pub boot_timeout: HumanDuration,
    /// A machine this old (since its launch) is retired: at once when idle, at the end of its
    /// job when leased. Keeps machines inside their server certificate's lifetime
    /// ([`crate::bootstrap::SERVER_CERT_LIFETIME`]) and picks up AMI updates.
    #[serde(default = "defaults::max_age")]
    pub max_age: HumanDuration,
    /// Idle-policy overrides by time of day; the last matching one wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<Schedule>,
    /// Machines kept warm from the job arrivals the daemon has seen (`[classes.X.forecast]`).
    #[serde(default, skip_serializing_if = "ForecastConfig::is_default")]
    pub forecast: ForecastConfig,
    /// `[classes.X.job]`: `[job]` keys that differ for this class (privileged, volumes,
    /// `container`, images...); merged key by key over the fleet's `[job]`, see
    /// [`Config::job_for`]. `builds_dir` and `cache_dir` are the runner's and cannot differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<toml::Table>,
    /// `[classes.X.dockerd]`: `[dockerd]` keys that differ for this class, see
    /// [`Config::dockerd_for`].
    #[serde(default, skip_serializing_if = "DockerdSettings::is_empty")]
    pub dockerd: DockerdSettings,
    /// Extra cloud-init parts after Flotilla's own (per class: they go with the AMI).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_data_parts: Vec<crate::boot_hooks::UserDataPart>,
    /// A check a booting machine must pass before it is ready; failing it is a failed boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_command: Option<crate::boot_hooks::ReadyCommand>,
    /// A new machine (launched or started) pulls this many of the class's most used recent
    /// images (job, services, helper; learned from the jobs' cleanups) while it is idle,
    /// so its first job finds them present. 0 turns it off.
    #[serde(default = "defaults::prefetch_images")]
    pub prefetch_images: u32,
}

/// Most jobs one machine may run at once.
pub const MAX_JOBS_PER_MACHINE: u32 = 64;

/// Most images a class may prefetch onto each new machine.
pub const MAX_PREFETCH_IMAGES: u32 = 16;

/// Flotilla's learned warm pool, on top of `idle_count` and the schedules: a warm machine
/// for each job expected within `lookahead`, at the larger of the job rate learned for this
/// hour of the day (weekdays and weekends apart, over past days) and the rate of the last
/// `memory`; at most `max_idle`. What it learns is kept in the daemon's state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForecastConfig {
    /// Off: the idle policy (`idle_count`, scale factor, schedules, `idle_time`) alone.
    #[serde(default = "defaults::forecast_enabled")]
    pub enabled: bool,
    /// Most job slots the forecast keeps idle (its spending cap): machines, with one job
    /// per machine; with `jobs_per_machine = N`, this many slots, in whole machines.
    #[serde(default = "defaults::forecast_max_idle")]
    pub max_idle: u32,
    /// Jobs expected within this look-ahead get a warm machine before they arrive.
    #[serde(default = "defaults::forecast_lookahead")]
    pub lookahead: HumanDuration,
    /// How far back the recent job rate is taken.
    #[serde(default = "defaults::forecast_memory")]
    pub memory: HumanDuration,
    /// Idle machines beyond the idle target and the forecast go after this long (or after
    /// the class's `idle_time`, whichever is shorter): the forecast keeps what is needed.
    #[serde(default = "defaults::forecast_idle_time")]
    pub idle_time: HumanDuration,
    /// With `max_stopped`: the stopped pool is sized for the largest burst (jobs arriving
    /// within a minute) seen in the last `stopped_horizon` or learned for the hours of the
    /// day within the next `stopped_horizon`; stopped machines beyond it are terminated.
    #[serde(default = "defaults::forecast_stopped_horizon")]
    pub stopped_horizon: HumanDuration,
}

impl Default for ForecastConfig {
    fn default() -> Self {
        Self {
            enabled: defaults::forecast_enabled(),
            max_idle: defaults::forecast_max_idle(),
            lookahead: defaults::forecast_lookahead(),
            memory: defaults::forecast_memory(),
            idle_time: defaults::forecast_idle_time(),
            stopped_horizon: defaults::forecast_stopped_horizon(),
        }
    }
}

impl ForecastConfig {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for ClassConfig {
    /// Empty AMI, types and subnets (invalid until set); every policy knob at its default.
    /// For writing configs in code: `ClassConfig { ami, .., ..Default::default() }`.
    fn default() -> Self {
        Self {
            ami: String::new(),
            instance_types: Vec::new(),
            subnets: Vec::new(),
            security_groups: Vec::new(),
            instance_profile: None,
            root_volume_gb: None,
            root_volume: None,
            imds_hop_limit: defaults::imds_hop_limit(),
            public_ip: false,
            launch_template: None,
            tags: BTreeMap::new(),
            market: Market::default(),
            idle_count: 0,
            idle_count_min: 0,
            idle_scale_factor: 0.0,
            idle_time: defaults::idle_time(),
            max_machines: defaults::max_machines(),
            max_stopped: 0,
            max_builds: 0,
            jobs_per_machine: defaults::jobs_per_machine(),
            boot_timeout: defaults::boot_timeout(),
            max_age: defaults::max_age(),
            schedules: Vec::new(),
            forecast: ForecastConfig::default(),
            job: None,
            dockerd: DockerdSettings::default(),
            user_data_parts: Vec::new(),
            ready_command: None,
            prefetch_images: defaults::prefetch_images(),
        }
    }
}

impl Default for Config {
    /// Empty fleet and classes (invalid until set); everything else at its default.
    fn default() -> Self {
        Self {
            fleet: String::new(),
            state_dir: PathBuf::from("/var/lib/flotilla"),
            socket: None,
            default_class: "default".into(),
            max_machines: defaults::max_machines(),
            reconcile_interval: defaults::reconcile_interval(),
            orphan_grace: defaults::orphan_grace(),
            max_growth_rate: defaults::max_growth_rate(),
            health_interval: defaults::health_interval(),
            lease_timeout: defaults::lease_timeout(),
            on_shutdown: ShutdownPolicy::default(),
            metrics_addr: None,
            aws: AwsConfig::default(),
            logs: crate::logs::LogsConfig::default(),
            tags: BTreeMap::new(),
            job: JobConfig::default(),
            dockerd: DockerdSettings::default(),
            classes: BTreeMap::new(),
            prices: BTreeMap::new(),
        }
    }
}

mod defaults {
    use super::HumanDuration;
    pub fn max_machines() -> u32 {
        10
    }
    pub fn prefetch_images() -> u32 {
        3
    }
    pub fn reconcile_interval() -> HumanDuration {
        HumanDuration::from_secs(10)
    }
    pub fn orphan_grace() -> HumanDuration {
        HumanDuration::from_secs(600)
    }
    pub fn max_growth_rate() -> u32 {
        10
    }
    pub fn health_interval() -> HumanDuration {
        HumanDuration::from_secs(30)
    }
    pub fn lease_timeout() -> HumanDuration {
        HumanDuration::from_secs(24 * 3600)
    }
    pub fn max_requests_per_second() -> u32 {
        20
    }
    pub fn builds_dir() -> String {
        "/builds".into()
    }
    pub fn cache_dir() -> String {
        "/cache".into()
    }
    pub fn disk_high_water() -> u8 {
        85
    }

    pub fn default_image() -> String {
        "alpine:3".into()
    }
    pub fn helper_image() -> String {
        super::DEFAULT_HELPER_IMAGE.into()
    }
    pub fn acquire_timeout() -> HumanDuration {
        HumanDuration::from_secs(900)
    }
    pub fn docker_timeout() -> HumanDuration {
        HumanDuration::from_secs(120)
    }
    pub fn pull_policy() -> Vec<super::PullPolicy> {
        vec![super::PullPolicy::Always]
    }
    pub fn service_wait() -> HumanDuration {
        HumanDuration::from_secs(30)
    }
    pub fn idle_time() -> HumanDuration {
        HumanDuration::from_secs(600)
    }
    pub fn launch_template_version() -> String {
        "$Default".into()
    }
    pub fn imds_hop_limit() -> u8 {
        1
    }
    /// Rendered configs (the provisioner's) leave the default out, so adding the key did
    /// not change the files existing hosts were set up with.
    pub fn is_imds_hop_limit(n: &u8) -> bool {
        *n == imds_hop_limit()
    }
    pub fn boot_timeout() -> HumanDuration {
        HumanDuration::from_secs(300)
    }
    pub fn jobs_per_machine() -> u32 {
        1
    }
    pub fn is_jobs_per_machine(n: &u32) -> bool {
        *n == jobs_per_machine()
    }
    pub fn max_age() -> HumanDuration {
        HumanDuration::from_secs(7 * 86_400)
    }
    pub fn forecast_enabled() -> bool {
        true
    }
    pub fn forecast_max_idle() -> u32 {
        20
    }
    pub fn forecast_lookahead() -> HumanDuration {
        HumanDuration::from_secs(300)
    }
    pub fn forecast_memory() -> HumanDuration {
        HumanDuration::from_secs(600)
    }
    pub fn forecast_idle_time() -> HumanDuration {
        HumanDuration::from_secs(60)
    }
    pub fn forecast_stopped_horizon() -> HumanDuration {
        HumanDuration::from_secs(6 * 3600)
    }
}

/// A config file that could not be used. The message names the file and, where there is
/// one, the key and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A rule the parsed config breaks, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key `{}`: {}", self.key, self.message)
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let config = Self::from_toml(&text).map_err(invalid)?;
        config.validate().map_err(|e| invalid(e.to_string()))?;
        Ok(config)
    }

    /// Parses TOML, naming the key and line of the first problem.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        parse_toml(text)
    }

    /// Cross-field rules that serde cannot express, section by section; the first broken
    /// rule is returned, naming its key.
    pub fn validate(&self) -> Result<(), Invalid> {
        self.check_fleet()?;
        for (name, class) in &self.classes {
            self.check_class(name, class)?;
        }
        self.check_jobs()?;
        self.logs.validate().map_err(|(key, message)| Invalid {
            key: key.into(),
            message,
        })?;
        self.check_prices()
    }

    /// The top-level keys: fleet name, classes, caps, addresses, intervals.
    fn check_fleet(&self) -> Result<(), Invalid> {
        if !is_tag_safe(&self.fleet) {
            return bad(
                "fleet",
                format!(
                    "{:?} must be 1-64 characters of letters, digits, '-', '_' or '.'",
                    self.fleet
                ),
            );
        }
        if self.classes.is_empty() {
            return bad("classes", "at least one machine class is required".into());
        }
        if !self.classes.contains_key(&self.default_class) {
            return bad(
                "default_class",
                format!(
                    "{:?} is not a configured class (have: {})",
                    self.default_class,
                    self.class_names().join(", ")
                ),
            );
        }
        if self.max_growth_rate == 0 {
            return bad("max_growth_rate", "must be at least 1".into());
        }
        if self.aws.max_requests_per_second == 0 {
            return bad("aws.max_requests_per_second", "must be at least 1".into());
        }
        if let Some(addr) = &self.metrics_addr {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return bad(
                    "metrics_addr",
                    format!("{addr:?} is not an address like 127.0.0.1:9402"),
                );
            }
        }
        if self.reconcile_interval.0.is_zero() {
            return bad("reconcile_interval", "must be greater than zero".into());
        }
        check_dockerd(&self.dockerd, "dockerd")?;
        check_tags(&self.tags, "tags")
    }

    /// One `[classes.X]` table: AMI, types, subnets, caps, timeouts against the server
    /// certificate's lifetime, the idle policy, the forecast and the schedules.
    fn check_class(&self, name: &str, class: &ClassConfig) -> Result<(), Invalid> {
        let key = |k: &str| format!("classes.{name}.{k}");
        if !is_tag_safe(name) {
            return bad(
                &format!("classes.{name}"),
                "class names are letters, digits, '-', '_' or '.'".into(),
            );
        }
        if class.ami.trim().is_empty() {
            return bad(&key("ami"), "must name an AMI id".into());
        }
        if class.instance_types.is_empty() {
            return bad(
                &key("instance_types"),
                "must list at least one instance type".into(),
            );
        }
        let arm: Vec<&str> = class
            .instance_types
            .iter()
            .filter(|t| instance_arch(t) == Arch::Arm64)
            .map(String::as_str)
            .collect();
        if !arm.is_empty() && arm.len() < class.instance_types.len() {
            return bad(
                &key("instance_types"),
                format!(
                    "mixes arm64 (Graviton: {}) and x86_64 types; a class has one AMI, so                      one architecture: make a class per architecture",
                    arm.join(", ")
                ),
            );
        }
        if class.subnets.is_empty() {
            return bad(
                &key("subnets"),
                "must list at least one private subnet id".into(),
            );
        }
        if class.max_machines == 0 {
            return bad(&key("max_machines"), "must be at least 1".into());
        }
        if class.idle_count > class.max_machines {
            return bad(
                &key("idle_count"),
                format!(
                    "{} is more than max_machines ({})",
                    class.idle_count, class.max_machines
                ),
            );
        }
        if !(1..=MAX_JOBS_PER_MACHINE).contains(&class.jobs_per_machine) {
            return bad(
                &key("jobs_per_machine"),
                format!(
                    "{} must be from 1 to {MAX_JOBS_PER_MACHINE}",
                    class.jobs_per_machine
                ),
            );
        }
        if class.max_stopped > class.max_machines {
            return bad(
                &key("max_stopped"),
                format!(
                    "{} is more than max_machines ({})",
                    class.max_stopped, class.max_machines
                ),
            );
        }
        if class.boot_timeout.0.is_zero() {
            return bad(&key("boot_timeout"), "must be greater than zero".into());
        }
        if class.max_age.0 <= class.boot_timeout.0 {
            return bad(
                &key("max_age"),
                format!(
                    "{} must be longer than boot_timeout ({})",
                    class.max_age, class.boot_timeout
                ),
            );
        }
        let cert_limit = crate::bootstrap::SERVER_CERT_LIFETIME
            .saturating_sub(crate::bootstrap::SERVER_CERT_MARGIN);
        if class.max_age.0.saturating_add(self.lease_timeout.0) > cert_limit {
            return bad(
                &key("max_age"),
                format!(
                    "{} plus lease_timeout ({}) must be at most {}: a machine is retired \
                     after max_age, or at the end of a job that may hold it for \
                     lease_timeout, and its server certificate is valid for {} \
                     ({} of it kept as a margin)",
                    in_days(class.max_age.0),
                    in_days(self.lease_timeout.0),
                    in_days(cert_limit),
                    in_days(crate::bootstrap::SERVER_CERT_LIFETIME),
                    in_days(crate::bootstrap::SERVER_CERT_MARGIN),
                ),
            );
        }
        if !(0.0..=100.0).contains(&class.idle_scale_factor) {
            return bad(
                &key("idle_scale_factor"),
                "must be between 0 and 100".into(),
            );
        }
        if class.idle_count_min > class.idle_count && class.idle_scale_factor > 0.0 {
            return bad(
                &key("idle_count_min"),
                format!(
                    "{} is more than idle_count ({})",
                    class.idle_count_min, class.idle_count
                ),
            );
        }
        let f = &class.forecast;
        if f.memory.0.is_zero() || f.memory.0 > std::time::Duration::from_secs(6 * 3600) {
            return bad(
                &key("forecast.memory"),
                "must be between 1s and 6h (recent arrivals are kept 6h)".into(),
            );
        }
        if f.lookahead.0 > std::time::Duration::from_secs(3600) {
            return bad(&key("forecast.lookahead"), "must be at most 1h".into());
        }
        if f.stopped_horizon.0 < std::time::Duration::from_secs(60)
            || f.stopped_horizon.0 > std::time::Duration::from_secs(24 * 3600)
        {
            return bad(
                &key("forecast.stopped_horizon"),
                "must be between 1m and 24h (the hour-of-day profile covers a day)".into(),
            );
        }
        for (i, schedule) in class.schedules.iter().enumerate() {
            if let Err(e) = schedule.compile() {
                return bad(
                    &format!("classes.{name}.schedules[{i}].{}", e.field),
                    e.message,
                );
            }
        }
        check_disk_and_network(name, class)?;
        check_dockerd(&class.dockerd, &key("dockerd"))?;
        crate::boot_hooks::check(
            &class.user_data_parts,
            class.ready_command.as_ref(),
            crate::boot_hooks::FLOTILLA_PART_BUDGET
                + self
                    .logs
                    .build_machine_journal()
                    .map_or(0, |j| crate::journal::user_data_bytes(&j)),
            crate::bootstrap::MAX_USER_DATA_BYTES,
        )
        .or_else(|(k, message)| bad(&key(&k), message))?;
        if class.prefetch_images > MAX_PREFETCH_IMAGES {
            return bad(
                &key("prefetch_images"),
                format!(
                    "{} is more than {MAX_PREFETCH_IMAGES} (each new machine pulls them all)",
                    class.prefetch_images
                ),
            );
        }
        // With the fleet's: the limit is on what one machine carries.
        check_tags(&self.machine_tags(name), &key("tags"))
    }

    /// `[job]` and every class's `[classes.X.job]` merged over it; the runner's
    /// directories are absolute and the same for every class.
    fn check_jobs(&self) -> Result<(), Invalid> {
        check_job(&self.job, "job")?;
        for (name, class) in &self.classes {
            if class.jobs_per_machine > 1 {
                check_sharable(&self.job_for(name)?, name)?;
            }
            let Some(over) = &class.job else { continue };
            for fixed in ["builds_dir", "cache_dir"] {
                if over.contains_key(fixed) {
                    return bad(
                        &format!("classes.{name}.job.{fixed}"),
                        "is the runner's, the same for every class: set it in [job]".into(),
                    );
                }
            }
            let job = self.job_for(name)?;
            check_job(&job, &format!("classes.{name}.job"))?;
        }
        for (key, dir) in [
            ("job.builds_dir", &self.job.builds_dir),
            ("job.cache_dir", &self.job.cache_dir),
        ] {
            if !dir.starts_with('/') {
                return bad(key, format!("{dir:?} must be an absolute path"));
            }
        }
        Ok(())
    }

    /// `[prices]`: USD per hour for each instance type, for the cost metrics.
    fn check_prices(&self) -> Result<(), Invalid> {
        for (instance_type, price) in &self.prices {
            if !(price.is_finite() && *price >= 0.0) {
                return bad(
                    &format!("prices.{instance_type}"),
                    format!("{price} must be a number of USD per hour, 0 or more"),
                );
            }
        }
        Ok(())
    }

    /// The extra tags of `class`'s machines: the fleet's `tags`, the class's over them.
    pub fn machine_tags(&self, class: &str) -> BTreeMap<String, String> {
        let mut tags = self.tags.clone();
        if let Some(c) = self.classes.get(class) {
            tags.extend(c.tags.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        tags
    }

    /// The dockerd settings of `class`'s machines: `[dockerd]` with the class's keys over it.
    pub fn dockerd_for(&self, class: &str) -> DockerdSettings {
        match self.classes.get(class) {
            Some(c) => self.dockerd.overridden_by(&c.dockerd),
            None => self.dockerd.clone(),
        }
    }

    /// The `[job]` settings for jobs of `class`: the fleet's `[job]` with the class's
    /// `[classes.X.job]` keys merged over it (tables such as `container` key by key).
    pub fn job_for(&self, class: &str) -> Result<JobConfig, Invalid> {
        let Some(over) = self.classes.get(class).and_then(|c| c.job.as_ref()) else {
            return Ok(self.job.clone());
        };
        let prefix = format!("classes.{class}.job");
        let invalid = |message: String| Invalid {
            key: prefix.clone(),
            message,
        };
        let mut base = toml::Table::try_from(&self.job).map_err(|e| invalid(e.to_string()))?;
        merge_tables(&mut base, over);
        serde_path_to_error::deserialize(toml::Value::Table(base)).map_err(|e| {
            let path = e.path().to_string();
            Invalid {
                key: if path.is_empty() || path == "." {
                    prefix.clone()
                } else {
                    format!("{prefix}.{path}")
                },
                message: e.into_inner().message().trim_end().to_owned(),
            }
        })
    }

    pub fn class_names(&self) -> Vec<&str> {
        self.classes.keys().map(String::as_str).collect()
    }

    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("flotilla.sock"))
    }

    /// Renders the config as TOML; the provisioner and the sandbox write files this way.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string_pretty(self)
    }
}

/// A CPU architecture as EC2 names it for AMIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Arm64,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::Arm64 => "arm64",
        }
    }
}

/// The architecture of an EC2 instance type, from its family: Graviton families carry a
/// `g` right after the generation (`m7g`, `c7gn`, `r8gd`, `t4g`, `im4gn`, `is4gen`), and `a1`.
/// GPU families (`g5`, `p4d`) and everything else are x86_64.
pub fn instance_arch(instance_type: &str) -> Arch {
    let family = instance_type.split('.').next().unwrap_or_default();
    if family == "a1" {
        return Arch::Arm64;
    }
    let after_generation = family
        .trim_start_matches(|c: char| c.is_ascii_alphabetic())
        .trim_start_matches(|c: char| c.is_ascii_digit());
    let has_generation = family.chars().any(|c| c.is_ascii_digit());
    if has_generation && after_generation.starts_with('g') {
        Arch::Arm64
    } else {
        Arch::X86_64
    }
}

/// A launch template reference EC2 would accept: a name or an `lt-` id (not both), and a
/// version EC2 understands.
fn check_launch_template(key: &str, t: &LaunchTemplateRef) -> Result<(), Invalid> {
    match (&t.name, &t.id) {
        (Some(_), Some(_)) | (None, None) => {
            return bad(key, "give exactly one of name or id".into());
        }
        (Some(name), None) => {
            let ok = (3..=128).contains(&name.len())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "()./_-".contains(c));
            if !ok {
                return bad(
                    &format!("{key}.name"),
                    format!("{name:?} is not a launch template name (3-128 of A-Za-z0-9()./_-)"),
                );
            }
        }
        (None, Some(id)) => {
            let ok = id
                .strip_prefix("lt-")
                .is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()));
            if !ok {
                return bad(
                    &format!("{key}.id"),
                    format!("{id:?} is not a launch template id (lt- and hex digits)"),
                );
            }
        }
    }
    let v = t.version.as_str();
    if !(v == "$Default" || v == "$Latest" || v.parse::<u64>().is_ok_and(|n| n > 0)) {
        return bad(
            &format!("{key}.version"),
            format!("{v:?} must be \"$Default\", \"$Latest\" or a version number"),
        );
    }
    Ok(())
}

/// `[classes.X]`'s root volume and IMDS hop limit, within what EC2 accepts.
fn check_disk_and_network(name: &str, class: &ClassConfig) -> Result<(), Invalid> {
    let key = |k: &str| format!("classes.{name}.{k}");
    if !(1..=64).contains(&class.imds_hop_limit) {
        return bad(&key("imds_hop_limit"), "must be 1 to 64".into());
    }
    if let Some(t) = &class.launch_template {
        check_launch_template(&key("launch_template"), t)?;
    }
    let Some(v) = &class.root_volume else {
        return Ok(());
    };
    if class.root_volume_gb.is_some() {
        return bad(
            &key("root_volume_gb"),
            "set the size in root_volume.gb instead (root_volume is given too)".into(),
        );
    }
    if let Some(gb) = v.gb {
        if !(1..=16_384).contains(&gb) {
            return bad(
                &key("root_volume.gb"),
                format!("{gb} must be 1 to 16384 GiB"),
            );
        }
    }
    let iops_range = match v.kind {
        VolumeKind::Gp3 => Some(3_000..=16_000),
        VolumeKind::Io1 => Some(100..=64_000),
        VolumeKind::Io2 => Some(100..=256_000),
        VolumeKind::Gp2 => None,
    };
    match (v.iops, iops_range) {
        (Some(_), None) => {
            return bad(
                &key("root_volume.iops"),
                format!("{} volumes have no provisioned IOPS", v.kind.as_str()),
            )
        }
        (Some(n), Some(r)) if !r.contains(&n) => {
            return bad(
                &key("root_volume.iops"),
                format!(
                    "{n} is outside {}-{} for {}",
                    r.start(),
                    r.end(),
                    v.kind.as_str()
                ),
            )
        }
        (None, _) if matches!(v.kind, VolumeKind::Io1 | VolumeKind::Io2) => {
            return bad(
                &key("root_volume.iops"),
                format!("{} volumes need iops", v.kind.as_str()),
            )
        }
        _ => {}
    }
    if let Some(t) = v.throughput {
        if v.kind != VolumeKind::Gp3 {
            return bad(
                &key("root_volume.throughput"),
                "only gp3 volumes take a throughput".into(),
            );
        }
        if !(125..=1_000).contains(&t) {
            return bad(
                &key("root_volume.throughput"),
                format!("{t} must be 125 to 1000 MiB/s"),
            );
        }
    }
    if v.kms_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        return bad(&key("root_volume.kms_key"), "must name a KMS key".into());
    }
    Ok(())
}

/// One `[dockerd]` table (the fleet's or a class's), keys under `prefix`.
fn check_dockerd(d: &DockerdSettings, prefix: &str) -> Result<(), Invalid> {
    d.check().map_err(|(key, message)| Invalid {
        key: format!("{prefix}.{key}"),
        message,
    })
}

/// Most tags EC2 keeps on a resource, and how many of them Flotilla sets itself.
const EC2_MAX_TAGS: usize = 50;
const OWN_TAGS: usize = 5;

/// Extra machine tags under `prefix`: EC2's limits (key 1-128 characters, value up to
/// 256, no `aws:` prefix, 50 tags in all) and none of Flotilla's own keys, which it
/// relies on to recognise its machines (an operator's `flotilla:fleet` would make another
/// fleet's daemon reap them).
fn check_tags(tags: &BTreeMap<String, String>, prefix: &str) -> Result<(), Invalid> {
    if tags.len() > EC2_MAX_TAGS - OWN_TAGS {
        return bad(
            prefix,
            format!(
                "{} tags, at most {} (EC2 keeps {EC2_MAX_TAGS} per machine and Flotilla sets {OWN_TAGS})",
                tags.len(),
                EC2_MAX_TAGS - OWN_TAGS
            ),
        );
    }
    for (key, value) in tags {
        let at = format!("{prefix}.{key:?}");
        if key.is_empty() || key.chars().count() > 128 {
            return bad(&at, "a tag key is 1 to 128 characters".into());
        }
        if value.chars().count() > 256 {
            return bad(&at, "a tag value is at most 256 characters".into());
        }
        if key.to_ascii_lowercase().starts_with("aws:") {
            return bad(&at, "the aws: prefix is reserved by AWS".into());
        }
        if key.starts_with("flotilla:") || key == crate::tags::NAME {
            return bad(
                &at,
                format!(
                    "{key} is Flotilla's own tag (it names and recognises its machines) and cannot be set"
                ),
            );
        }
    }
    Ok(())
}

/// A broken rule at `key`, as the `validate` checks return it.
fn bad(key: &str, message: String) -> Result<(), Invalid> {
    Err(Invalid {
        key: key.into(),
        message,
    })
}

/// Jobs that share a machine share its dockerd: one that controls the machine (a
/// privileged container, dockerd's socket) controls the other jobs on it too.
fn check_sharable(job: &JobConfig, class: &str) -> Result<(), Invalid> {
    let key = format!("classes.{class}.jobs_per_machine");
    let why = "jobs sharing a machine must not control it";
    if job.privileged || job.services_privileged == Some(true) {
        return bad(
            &key,
            format!(
                "is more than 1 with privileged jobs or services: {why} (a privileged \
                 container controls the machine and the other jobs on it); give privileged \
                 builds a class of their own with jobs_per_machine = 1"
            ),
        );
    }
    let binds_socket = |v: &&String| {
        v.split(':')
            .next()
            .is_some_and(|host| host.ends_with("docker.sock"))
    };
    if let Some(v) = job.volumes.iter().find(binds_socket) {
        return bad(
            &key,
            format!(
                "is more than 1 with the volume {v:?}: {why} (dockerd's socket runs any \
                 container on it)"
            ),
        );
    }
    Ok(())
}

/// Rules of one `[job]` (the fleet's, or a class's merged one), keys under `prefix`.
fn check_job(job: &JobConfig, prefix: &str) -> Result<(), Invalid> {
    let bad = |key: &str, message: String| Invalid {
        key: format!("{prefix}.{key}"),
        message,
    };
    if job.pull_policy.is_empty() {
        return Err(bad("pull_policy", "must list at least one policy".into()));
    }
    if !(1..=99).contains(&job.disk_high_water) {
        return Err(bad(
            "disk_high_water",
            format!("{} must be a percent from 1 to 99", job.disk_high_water),
        ));
    }
    let mut targets = std::collections::BTreeSet::new();
    for (i, v) in job.volumes.iter().enumerate() {
        let spec = VolumeSpec::parse(v).map_err(|m| bad(&format!("volumes[{i}]"), m))?;
        let target = spec.target().trim_end_matches('/').to_owned();
        if target == job.builds_dir.trim_end_matches('/')
            || target == job.cache_dir.trim_end_matches('/')
        {
            return Err(bad(
                &format!("volumes[{i}]"),
                format!("{v:?} would hide the builds or cache directory ({target})"),
            ));
        }
        if !targets.insert(target.clone()) {
            return Err(bad(
                &format!("volumes[{i}]"),
                format!("{target} is mounted twice"),
            ));
        }
    }
    for (key, patterns) in [
        ("allowed_images", &job.allowed_images),
        ("allowed_services", &job.allowed_services),
        ("allowed_privileged_images", &job.allowed_privileged_images),
        (
            "allowed_privileged_services",
            &job.allowed_privileged_services,
        ),
    ] {
        if let Some(i) = patterns.iter().position(|p| p.trim().is_empty()) {
            return Err(bad(&format!("{key}[{i}]"), "must not be empty".into()));
        }
    }
    job.container
        .check()
        .map_err(|(key, message)| bad(&format!("container.{key}"), message))
}

fn merge_tables(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// `"29d"`, `"36h"` or the plain form: long durations in messages.
fn in_days(d: std::time::Duration) -> String {
    match d.as_secs() {
        s if s > 0 && d.subsec_nanos() == 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s > 0 && d.subsec_nanos() == 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        _ => HumanDuration(d).to_string(),
    }
}

fn is_tag_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Parses a TOML document into `T` (which should reject unknown keys), naming the key
/// path and line of the first problem: shared by every Flotilla file format.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let de = toml::Deserializer::parse(text).map_err(|e| describe_toml_error(text, &e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let mut what = describe_toml_error(text, &inner);
        if let Some(known) = nearest_known_field(inner.message()) {
            what.push_str(&format!("; did you mean `{known}`?"));
        }
        if key.is_empty() || key == "." {
            what
        } else {
            format!("key `{key}`: {what}")
        }
    })
}

/// For serde's "unknown field `x`, expected one of `a`, `b`": the expected field closest
/// to the typo, when it is close enough to be what was meant (a typo, not another key).
fn nearest_known_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, expected) = rest.split_once('`')?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|known| (edit_distance(unknown, known), known))
        .filter(|(d, known)| *d <= (known.len().max(unknown.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, known)| known)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// A TOML error as its message and line. Never the source excerpt that the error's
/// Display shows: the line could hold a secret (a runner token in a migrated file).
pub fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end().to_owned();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{message} (line {line})")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_key_gets_the_nearest_known_one_and_an_unrelated_key_none() {
        let with = |extra: &str| {
            Config::from_toml(&format!("{MINIMAL}{extra}")).expect_err("unknown key accepted")
        };
        let typo = with("idle_cout = 2\n");
        assert!(typo.contains("did you mean `idle_count`?"), "{typo}");
        let other = with("colour = \"blue\"\n");
        assert!(!other.contains("did you mean"), "{other}");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "ab"), 2);
    }

    const MINIMAL: &str = r#"
fleet = "ci"
state_dir = "/var/lib/flotilla"
default_class = "small"

[classes.small]
ami = "ami-123"
instance_types = ["t3.small"]
subnets = ["subnet-1"]
"#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::from_toml(MINIMAL).unwrap();
        c.validate().unwrap();
        assert_eq!(c.job.builds_dir, "/builds");
        assert_eq!(
            c.socket_path(),
            PathBuf::from("/var/lib/flotilla/flotilla.sock")
        );
        assert_eq!(c.classes["small"].idle_time, HumanDuration::from_secs(600));
    }

    #[test]
    fn max_age_defaults_below_the_server_certificate_lifetime() {
        let c = Config::from_toml(MINIMAL).unwrap();
        let age = c.classes["small"].max_age.0;
        assert_eq!(age, std::time::Duration::from_secs(7 * 86_400));
        assert!(age + c.lease_timeout.0 < crate::bootstrap::SERVER_CERT_LIFETIME);
    }

    #[test]
    fn max_age_must_leave_room_for_a_lease_before_the_certificate_expires() {
        let with = |extra: &str| {
            let text = MINIMAL.replace(
                "subnets = [\"subnet-1\"]",
                &format!("subnets = [\"subnet-1\"]\n{extra}"),
            );
            Config::from_toml(&text).unwrap().validate()
        };
        with("max_age = \"28d\"").unwrap();
        // 29d + the default 1d lease_timeout leaves no margin before 30 days.
        let err = with("max_age = \"29d\"").unwrap_err();
        assert_eq!(err.key, "classes.small.max_age");
        assert!(err.message.contains("lease_timeout (1d)"), "{err}");
        assert!(err.message.contains("at most 29d"), "{err}");
        let err = with("max_age = \"60d\"").unwrap_err();
        assert_eq!(err.key, "classes.small.max_age");
        // A longer lease_timeout shrinks what max_age may be.
        let text = format!("lease_timeout = \"5d\"\n{MINIMAL}").replace(
            "subnets = [\"subnet-1\"]",
            "subnets = [\"subnet-1\"]\nmax_age = \"25d\"",
        );
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert_eq!(err.key, "classes.small.max_age");
        let err = with("max_age = \"4m\"").unwrap_err();
        assert_eq!(err.key, "classes.small.max_age");
        assert!(err.message.contains("boot_timeout"), "{err}");
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let text = MINIMAL.replace("ami = ", "amii = \"x\"\nami = ");
        let err = Config::from_toml(&text).unwrap_err();
        assert!(err.contains("classes.small"), "{err}");
        assert!(err.contains("amii"), "{err}");
    }

    #[test]
    fn wrong_type_names_key_and_expectation() {
        let text = MINIMAL.replace(
            "subnets = [\"subnet-1\"]",
            "subnets = [\"subnet-1\"]\nidle_time = \"ten minutes\"",
        );
        let err = Config::from_toml(&text).unwrap_err();
        assert!(err.contains("classes.small.idle_time"), "{err}");
        assert!(err.contains("duration"), "{err}");
    }

    #[test]
    fn prefetch_images_defaults_to_three_and_is_bounded() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.classes["small"].prefetch_images, 3);
        let text = MINIMAL.replace(
            "subnets = [\"subnet-1\"]",
            "subnets = [\"subnet-1\"]\nprefetch_images = 17",
        );
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert_eq!(err.key, "classes.small.prefetch_images");
    }

    #[test]
    fn jobs_per_machine_defaults_to_one_and_is_bounded() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.classes["small"].jobs_per_machine, 1);
        for bad_value in ["0", "65"] {
            let text = MINIMAL.replace(
                "subnets = [\"subnet-1\"]",
                &format!("subnets = [\"subnet-1\"]\njobs_per_machine = {bad_value}"),
            );
            let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
            assert_eq!(err.key, "classes.small.jobs_per_machine");
            assert!(err.message.contains("from 1 to 64"), "{}", err.message);
        }
    }

    #[test]
    fn machines_shared_by_jobs_refuse_what_controls_the_machine() {
        let shared = |job: &str| {
            let text = MINIMAL.replace(
                "subnets = [\"subnet-1\"]",
                &format!("subnets = [\"subnet-1\"]\njobs_per_machine = 4\n{job}"),
            );
            Config::from_toml(&text).unwrap().validate()
        };
        shared("").unwrap();
        for job in [
            "[classes.small.job]\nprivileged = true",
            "[classes.small.job]\nservices_privileged = true",
            "[classes.small.job]\nvolumes = [\"/var/run/docker.sock:/var/run/docker.sock\"]",
        ] {
            let err = shared(job).unwrap_err();
            assert_eq!(err.key, "classes.small.jobs_per_machine", "{job}");
            assert!(
                err.message.contains("must not control it"),
                "{}",
                err.message
            );
        }
        // The fleet's [job] counts too, and one job per machine may do as it likes.
        let fleet = format!("{MINIMAL}\n[job]\nprivileged = true\n");
        Config::from_toml(&fleet).unwrap().validate().unwrap();
        let err = Config::from_toml(&fleet.replace(
            "subnets = [\"subnet-1\"]",
            "subnets = [\"subnet-1\"]\njobs_per_machine = 2",
        ))
        .unwrap()
        .validate()
        .unwrap_err();
        assert_eq!(err.key, "classes.small.jobs_per_machine");
    }

    #[test]
    fn max_stopped_defaults_to_zero_and_is_bounded_by_max_machines() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.classes["small"].max_stopped, 0);
        let text = MINIMAL.replace(
            "subnets = [\"subnet-1\"]",
            "subnets = [\"subnet-1\"]\nmax_stopped = 3\nmax_machines = 2",
        );
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert_eq!(err.key, "classes.small.max_stopped");
        assert!(err.message.contains("max_machines (2)"), "{}", err.message);
    }

    #[test]
    fn default_class_must_exist() {
        let c = Config::from_toml(
            &MINIMAL.replace("default_class = \"small\"", "default_class = \"big\""),
        )
        .unwrap();
        let err = c.validate().unwrap_err();
        assert_eq!(err.key, "default_class");
        assert!(err.message.contains("small"));
    }

    #[test]
    fn idle_count_above_max_is_rejected() {
        let text = MINIMAL.replace(
            "subnets = [\"subnet-1\"]",
            "subnets = [\"subnet-1\"]\nidle_count = 5\nmax_machines = 2",
        );
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert_eq!(err.key, "classes.small.idle_count");
    }

    #[test]
    fn written_config_loads_back_identically() {
        let c = Config::from_toml(MINIMAL).unwrap();
        let again = Config::from_toml(&c.to_toml().unwrap()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn machine_tags_merge_class_over_fleet_and_never_replace_flotillas_own() {
        let text = format!(
            "tags = {{ CostCenter = \"ci\", Team = \"infra\" }}\n{MINIMAL}tags = {{ Team = \"builds\" }}\n"
        );
        let c = Config::from_toml(&text).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.machine_tags("small"),
            BTreeMap::from([
                ("CostCenter".to_string(), "ci".to_string()),
                ("Team".to_string(), "builds".to_string()),
            ])
        );
        let err = |text: String| Config::from_toml(&text).unwrap().validate().unwrap_err();
        let own = err(format!(
            "tags = {{ \"flotilla:fleet\" = \"other\" }}\n{MINIMAL}"
        ));
        assert_eq!(own.key, "tags.\"flotilla:fleet\"");
        assert!(own.message.contains("Flotilla's own tag"), "{own}");
        let name = err(format!("{MINIMAL}tags = {{ Name = \"x\" }}\n"));
        assert_eq!(name.key, "classes.small.tags.\"Name\"");
        let aws = err(format!("{MINIMAL}tags = {{ \"aws:foo\" = \"x\" }}\n"));
        assert!(aws.message.contains("reserved by AWS"), "{aws}");
        let many: String = (0..46).map(|i| format!("k{i} = \"v\"\n")).collect();
        let too_many = err(format!("{MINIMAL}[classes.small.tags]\n{many}"));
        assert_eq!(too_many.key, "classes.small.tags");
    }

    #[test]
    fn graviton_families_are_arm64_and_a_class_holds_one_architecture() {
        for t in [
            "m7g.large",
            "c7gn.xlarge",
            "r8gd.2xlarge",
            "t4g.small",
            "im4gn.large",
            "is4gen.large",
            "a1.medium",
        ] {
            assert_eq!(instance_arch(t), Arch::Arm64, "{t}");
        }
        for t in [
            "m7i.large",
            "c6a.xlarge",
            "g5.xlarge",
            "p4d.24xlarge",
            "t3.micro",
        ] {
            assert_eq!(instance_arch(t), Arch::X86_64, "{t}");
        }
        let arm = MINIMAL.replace("t3.small", r#"m7g.large", "c7g.large"#);
        Config::from_toml(&arm).unwrap().validate().unwrap();
        let mixed = MINIMAL.replace(r#""t3.small""#, r#""m7g.large", "m7i.large""#);
        let err = Config::from_toml(&mixed).unwrap().validate().unwrap_err();
        assert_eq!(err.key, "classes.small.instance_types");
        assert!(err.message.contains("m7g.large"), "{err}");
    }

    #[test]
    fn a_launch_template_is_a_name_or_an_id_and_a_version_ec2_accepts() {
        let lt = |body: &str| format!("{MINIMAL}[classes.small.launch_template]\n{body}\n");
        let c = Config::from_toml(&lt("name = \"ci-placement\"")).unwrap();
        c.validate().unwrap();
        let t = c.classes["small"].launch_template.clone().unwrap();
        assert_eq!(
            (t.name.as_deref(), t.version.as_str()),
            (Some("ci-placement"), "$Default")
        );
        let ok = Config::from_toml(&lt("id = \"lt-0abc123\"\nversion = \"7\"")).unwrap();
        ok.validate().unwrap();
        let err = |body: &str| {
            Config::from_toml(&lt(body))
                .unwrap()
                .validate()
                .unwrap_err()
                .key
        };
        assert_eq!(
            err("version = \"$Latest\""),
            "classes.small.launch_template"
        );
        assert_eq!(
            err("name = \"a\"\nid = \"lt-1\""),
            "classes.small.launch_template"
        );
        assert_eq!(err("id = \"ami-1\""), "classes.small.launch_template.id");
        assert_eq!(
            err("name = \"has space\""),
            "classes.small.launch_template.name"
        );
        assert_eq!(
            err("name = \"ci-x\"\nversion = \"latest\""),
            "classes.small.launch_template.version"
        );
        assert_eq!(
            err("name = \"ci-x\"\nversion = \"0\""),
            "classes.small.launch_template.version"
        );
    }

    #[test]
    fn root_volume_and_hop_limit_are_checked_against_what_ec2_accepts() {
        let ok = format!(
            "{MINIMAL}imds_hop_limit = 2\npublic_ip = true\n[classes.small.root_volume]\ngb = 100\ntype = \"gp3\"\niops = 6000\nthroughput = 500\nkms_key = \"alias/ci\"\n"
        );
        let c = Config::from_toml(&ok).unwrap();
        c.validate().unwrap();
        let class = &c.classes["small"];
        assert_eq!((class.imds_hop_limit, class.public_ip), (2, true));
        assert_eq!(class.effective_root_volume().iops, Some(6000));
        let plain = Config::from_toml(&format!("{MINIMAL}root_volume_gb = 40\n")).unwrap();
        assert_eq!(
            plain.classes["small"].effective_root_volume(),
            RootVolume {
                gb: Some(40),
                ..RootVolume::default()
            }
        );
        assert_eq!(plain.classes["small"].imds_hop_limit, 1, "the default");
        let err = |extra: &str| {
            Config::from_toml(&format!("{MINIMAL}{extra}"))
                .unwrap()
                .validate()
                .unwrap_err()
                .key
        };
        let vol = |body: &str| format!("[classes.small.root_volume]\n{body}\n");
        assert_eq!(err("imds_hop_limit = 0\n"), "classes.small.imds_hop_limit");
        assert_eq!(
            err(&format!("root_volume_gb = 40\n{}", vol("gb = 50"))),
            "classes.small.root_volume_gb"
        );
        assert_eq!(
            err(&vol("type = \"io2\"")),
            "classes.small.root_volume.iops"
        );
        assert_eq!(
            err(&vol("type = \"gp2\"\niops = 3000")),
            "classes.small.root_volume.iops"
        );
        assert_eq!(err(&vol("iops = 20000")), "classes.small.root_volume.iops");
        assert_eq!(
            err(&vol("type = \"io1\"\niops = 500\nthroughput = 200")),
            "classes.small.root_volume.throughput"
        );
        assert_eq!(err(&vol("gb = 0")), "classes.small.root_volume.gb");
    }

    #[test]
    fn with_a_logs_group_the_journal_shipper_counts_against_the_user_data_limit() {
        // A shell part that fits beside Flotilla's own part, but not also beside the
        // journal shipper that a [logs] group adds to every machine.
        let script = format!("#!/bin/sh\n# {}\n", "x".repeat(5 * 1024));
        let part = format!(
            "{MINIMAL}\n[[classes.small.user_data_parts]]\ntype = \"shell\"\ncontent = '''{script}'''\n"
        );
        Config::from_toml(&part).unwrap().validate().unwrap();
        let with_logs = format!("{part}\n[logs]\ngroup = \"/flotilla/ci\"\n");
        let err = Config::from_toml(&with_logs)
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(err.key, "classes.small.user_data_parts", "{err}");
    }

    #[test]
    fn bad_schedule_names_the_schedule_key() {
        let text = format!("{MINIMAL}\n[[classes.small.schedules]]\nperiods = [\"* 8-18 * * mon-fri\"]\ntimezone = \"Mars/Olympus\"\nidle_count = 3\n");
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert_eq!(err.key, "classes.small.schedules[0].timezone");
        let text = format!("{MINIMAL}\n[[classes.small.schedules]]\nperiods = [\"99 * * * *\"]\n");
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert_eq!(err.key, "classes.small.schedules[0].periods");
    }

    #[test]
    fn market_reads_kebab_case() {
        let text = MINIMAL.replace(
            "subnets = [\"subnet-1\"]",
            "subnets = [\"subnet-1\"]\nmarket = \"spot-with-fallback\"",
        );
        assert_eq!(
            Config::from_toml(&text).unwrap().classes["small"].market,
            Market::SpotWithFallback
        );
    }

    #[test]
    fn prices_table_reads_and_validates_naming_the_type() {
        let text = format!("{MINIMAL}\n[prices]\n\"t3.small\" = 0.0208\n");
        let c = Config::from_toml(&text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.prices["t3.small"], 0.0208);
        let text = format!("{MINIMAL}\n[prices]\n\"t3.small\" = -1.0\n");
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert_eq!(err.key, "prices.t3.small");
    }

    #[test]
    fn stopped_horizon_defaults_to_six_hours_and_is_validated_by_name() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(
            c.classes["small"].forecast.stopped_horizon,
            HumanDuration::from_secs(6 * 3600)
        );
        for bad in ["30s", "25h"] {
            let text =
                format!("{MINIMAL}\n[classes.small.forecast]\nstopped_horizon = \"{bad}\"\n");
            let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
            assert_eq!(err.key, "classes.small.forecast.stopped_horizon", "{bad}");
        }
        let text = format!("{MINIMAL}\n[classes.small.forecast]\nstopped_horizon = \"2h\"\n");
        let c = Config::from_toml(&text).unwrap();
        c.validate().unwrap();
        assert_eq!(Config::from_toml(&c.to_toml().unwrap()).unwrap(), c);
    }

    #[test]
    fn forecast_is_on_by_default_and_its_keys_are_validated_by_name() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert!(c.classes["small"].forecast.enabled);
        assert!(
            !c.to_toml().unwrap().contains("forecast"),
            "defaults are not written"
        );
        let text = format!("{MINIMAL}\n[classes.small.forecast]\nmemory = \"7h\"\n");
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert_eq!(err.key, "classes.small.forecast.memory");
        let text = format!("{MINIMAL}\n[classes.small.forecast]\nlookahead = \"2h\"\n");
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert_eq!(err.key, "classes.small.forecast.lookahead");
        let text = format!("{MINIMAL}\n[classes.small.forecast]\nenabeld = false\n");
        let err = Config::from_toml(&text).unwrap_err();
        assert!(err.contains("classes.small.forecast"), "{err}");
        let text = format!("{MINIMAL}\n[classes.small.forecast]\nenabled = false\nmax_idle = 4\n");
        let c = Config::from_toml(&text).unwrap();
        c.validate().unwrap();
        assert_eq!(Config::from_toml(&c.to_toml().unwrap()).unwrap(), c);
    }

    #[test]
    fn load_names_the_file() {
        let err = Config::load(Path::new("/nonexistent/flotilla.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/flotilla.toml"));
    }

    #[test]
    fn container_options_parse_and_round_trip() {
        let text = format!(
            "{MINIMAL}\n[job]\nprivileged = true\nvolumes = [\"/certs/client\", \"/srv/ca:/ca:ro\"]\n\
             allowed_images = [\"registry.example.com/**\"]\n\
             [job.container]\nshm_size = \"2g\"\ncpus = 1.5\nmemory = 1073741824\n\
             ulimits = {{ nofile = \"1024:2048\" }}\ntmpfs = {{ \"/scratch\" = \"rw,size=64m\" }}\ngpus = \"all\"\n"
        );
        let c = Config::from_toml(&text).unwrap();
        c.validate().unwrap();
        assert!(c.job.privileged);
        assert_eq!(
            c.job.container.shm_size,
            Some(crate::container::ByteSize(2 << 30))
        );
        assert_eq!(
            c.job.container.cpus,
            Some(crate::container::Cpus(1_500_000_000))
        );
        assert_eq!(Config::from_toml(&c.to_toml().unwrap()).unwrap(), c);
    }

    #[test]
    fn bad_container_values_name_their_key() {
        let text = format!("{MINIMAL}\n[job.container]\nshm_size = \"huge\"\n");
        let err = Config::from_toml(&text).unwrap_err();
        assert!(err.contains("job.container.shm_size"), "{err}");
        assert!(err.contains("2g"), "says what was expected: {err}");
        let text = format!("{MINIMAL}\n[job.container]\nshm_sise = \"1g\"\n");
        let err = Config::from_toml(&text).unwrap_err();
        assert!(err.contains("shm_sise"), "{err}");
        let text = format!("{MINIMAL}\n[job]\nvolumes = [\"/builds\"]\n");
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert_eq!(err.key, "job.volumes[0]");
        let text = format!("{MINIMAL}\n[job.container]\ndevices = [\"fuse\"]\n");
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert_eq!(err.key, "job.container.devices[0]");
    }

    #[test]
    fn a_class_overrides_job_keys_one_by_one() {
        let text = format!(
            "{MINIMAL}\n[job]\nvolumes = [\"/certs/client\"]\n[job.container]\nshm_size = \"1g\"\ncap_add = [\"NET_ADMIN\"]\n\
             [classes.dind]\nami = \"ami-1\"\ninstance_types = [\"t3.large\"]\nsubnets = [\"subnet-1\"]\n\
             [classes.dind.job]\nprivileged = true\n[classes.dind.job.container]\nshm_size = \"4g\"\n"
        );
        let c = Config::from_toml(&text).unwrap();
        c.validate().unwrap();
        let small = c.job_for("small").unwrap();
        assert!(!small.privileged);
        let dind = c.job_for("dind").unwrap();
        assert!(dind.privileged);
        assert_eq!(
            dind.container.shm_size,
            Some(crate::container::ByteSize(4 << 30))
        );
        assert_eq!(
            dind.container.cap_add,
            vec!["NET_ADMIN"],
            "unset keys keep the fleet's"
        );
        assert_eq!(dind.volumes, vec!["/certs/client"]);
        assert_eq!(Config::from_toml(&c.to_toml().unwrap()).unwrap(), c);

        let text = format!("{MINIMAL}\n[classes.small.job]\nprivileged = \"yes\"\n");
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert_eq!(err.key, "classes.small.job.privileged");
        assert_eq!(Config::from_toml(MINIMAL).unwrap().job.disk_high_water, 85);
        for bad_percent in ["0", "100"] {
            let text = format!("{MINIMAL}\n[job]\ndisk_high_water = {bad_percent}\n");
            let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
            assert_eq!(err.key, "job.disk_high_water", "{err}");
        }
        let text = format!("{MINIMAL}\n[classes.small.job]\ndisk_high_water = 0\n");
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert_eq!(err.key, "classes.small.job.disk_high_water");
        let text = format!("{MINIMAL}\n[classes.small.job]\nprivilegd = true\n");
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert!(err.message.contains("privilegd"), "{err}");
        let text = format!("{MINIMAL}\n[classes.small.job]\nbuilds_dir = \"/b\"\n");
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert_eq!(err.key, "classes.small.job.builds_dir");
        let text =
            format!("{MINIMAL}\n[classes.small.job.container]\nulimits = {{ nofile = \"x\" }}\n");
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert!(
            err.key.starts_with("classes.small.job.container.ulimits"),
            "{err}"
        );
    }

    #[test]
    fn the_readme_config_reference_is_a_valid_config() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme
            .find("## Configuration reference")
            .expect("README has a configuration reference")..];
        let start = section.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let text = &section[start..start + section[start..].find("```").expect("closed")];
        let c = Config::from_toml(text).unwrap_or_else(|e| panic!("README config: {e}"));
        c.validate()
            .unwrap_or_else(|e| panic!("README config: {e}"));
        assert!(c.job_for("default").unwrap().privileged);
    }
}
