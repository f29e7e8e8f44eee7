//! The stack file (`stack.toml`): its schema, and the checks that run before anything
//! touches the network ("validate, then resolve").
//!
//! Parsing rejects unknown keys and names the offending key and line; [`Stack::validate`]
//! checks the rules serde cannot express (CIDRs inside the VPC, one subnet per zone, S3
//! bucket naming, the fleet section as the daemon's own validator sees it). Every error
//! names the file and the key.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use flotilla_proto::config::Config;
use flotilla_proto::duration::HumanDuration;
use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;
use crate::monitoring::Monitoring;
use crate::naming::Names;
use crate::oidc_section::Oidc;
use crate::paths::STATE_DIR;
use crate::vpn::Vpn;

/// What the stack creates that the daemon's config refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FleetIds {
    /// Private subnet ids, in `network.zones` order.
    pub(crate) private_subnets: Vec<String>,
    pub(crate) build_security_group: String,
    pub(crate) build_instance_profile: String,
    pub(crate) region: Option<String>,
}

impl FleetIds {
    /// Stand-ins for ids not known before `apply` (used by validation and `plan`).
    pub(crate) fn placeholders(stack: &Stack) -> Self {
        Self {
            private_subnets: stack
                .network
                .zones
                .iter()
                .map(|z| format!("(subnet/private/{z})"))
                .collect(),
            build_security_group: "(sg/build-machine)".into(),
            build_instance_profile: Names::new(&stack.name).build_role(),
            region: stack.aws.region.clone(),
        }
    }
}

/// One stack: every resource `apply` creates carries `flotilla:stack = <name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stack {
    /// Lower-case letters, digits and '-', at most 32 characters; prefixes resource names.
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) aws: AwsSection,
    pub(crate) network: Network,
    pub(crate) bucket: Bucket,
    pub(crate) runner_hosts: RunnerHosts,
    pub(crate) gitlab: Gitlab,
    /// `[logs]`: a CloudWatch Logs group for the hosts' and build machines' journals and
    /// the daemon's reports on broken or lost machines. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) logs: Option<crate::log_settings::LogSettings>,
    /// The daemon's `flotilla.toml`: any of its keys, minus what the stack creates
    /// (each class's `subnets`, `security_groups`, `instance_profile`), which apply
    /// fills in; `name` is the fleet name (the stack name by default). Checked by
    /// `flotilla_proto`'s own parser and validator, so every key the daemon accepts is
    /// accepted here with the daemon's defaults.
    pub(crate) fleet: toml::Table,
    /// GitLab OIDC deploy roles (`oidc_section`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) oidc: Option<Oidc>,
    /// Metrics scraped from inside the VPC (`monitoring`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) monitoring: Option<Monitoring>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AwsSection {
    /// Overrides the SDK's region chain (`AWS_REGION`, profile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) region: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Network {
    /// The VPC's CIDR block, /16 to /28.
    pub(crate) cidr: String,
    /// Availability zones, at least two; subnet lists are indexed like this one.
    pub(crate) zones: Vec<String>,
    /// One public subnet per zone (NAT gateways live here).
    pub(crate) public_subnets: Vec<String>,
    /// One private subnet per zone (runner hosts and build machines live here).
    pub(crate) private_subnets: Vec<String>,
    /// One NAT gateway for the stack, or one per zone.
    #[serde(default)]
    pub(crate) nat: NatMode,
    /// When set, runner hosts accept SSH (TCP 22) from this CIDR; nothing else inbound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ssh_cidr: Option<String>,
    /// An AWS Client VPN endpoint and its subnets; runner-host SSH only through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) vpn: Option<Vpn>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum NatMode {
    #[default]
    Single,
    PerZone,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Bucket {
    /// Globally unique S3 bucket name for the runner cache and artifacts.
    pub(crate) name: String,
    /// Objects expire this many days after they were written.
    #[serde(default = "defaults::expire_days")]
    pub(crate) expire_days: u32,
    /// Encrypt with this KMS key (id or ARN) instead of S3-managed keys (AES256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) kms_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunnerHosts {
    /// How many runner hosts (gitlab-runner + flotilla daemon) to run; they share one
    /// GitLab runner registration.
    #[serde(default = "defaults::host_count")]
    pub(crate) count: u32,
    pub(crate) ami: String,
    pub(crate) instance_type: String,
    #[serde(default = "defaults::host_root_gb")]
    pub(crate) root_volume_gb: u32,
    /// EC2 key pair for SSH (optional; pair it with `network.ssh_cidr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key_name: Option<String>,
    /// Where cloud-init downloads the gitlab-runner binary from (https://).
    #[serde(default = "defaults::gitlab_runner_url")]
    pub(crate) gitlab_runner_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) gitlab_runner_sha256: Option<String>,
    /// Where cloud-init downloads the flotilla binary from (https://, with
    /// `flotilla_sha256`). Unset (the default): apply uploads the local `flotilla`
    /// binary to the stack's bucket and the hosts install it from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) flotilla_url: Option<String>,
    /// Required with `flotilla_url`; not allowed without it (the uploaded binary's sum
    /// is computed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) flotilla_sha256: Option<String>,
    /// How long a host being replaced may take to finish its jobs and give back its
    /// build machines (`gitlab-runner stop`, then `flotilla drain --wait`) before apply
    /// gives up on it.
    #[serde(default = "defaults::drain_timeout")]
    pub(crate) drain_timeout: HumanDuration,
    /// OS packages cloud-init installs (the token script needs the AWS CLI and curl).
    #[serde(default = "defaults::packages")]
    pub(crate) packages: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
// The variants are GitLab's own `runner_type` values (`instance_type`, ...).
#[allow(clippy::enum_variant_names)]
pub(crate) enum RunnerType {
    InstanceType,
    GroupType,
    ProjectType,
}

impl RunnerType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::InstanceType => "instance_type",
            Self::GroupType => "group_type",
            Self::ProjectType => "project_type",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Gitlab {
    /// GitLab's base URL, e.g. `https://gitlab.example.com`.
    pub(crate) url: String,
    /// Environment variable holding a GitLab access token with the `create_runner` scope.
    /// Without it, `apply` skips registration and says so.
    #[serde(default = "defaults::token_env")]
    pub(crate) token_env: String,
    pub(crate) runner_type: RunnerType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) group_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) project_id: Option<u64>,
    /// The runner's description in GitLab; `flotilla <stack>` by default. Also how a
    /// runner created by an interrupted apply is found again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) description: Option<String>,
    #[serde(default)]
    pub(crate) tags: Vec<String>,
    #[serde(default)]
    pub(crate) run_untagged: bool,
    #[serde(default)]
    pub(crate) locked: bool,
    /// gitlab-runner's `concurrent`: jobs one runner host runs at once.
    #[serde(default = "defaults::concurrent")]
    pub(crate) concurrent: u32,
}

mod defaults {
    pub(crate) fn expire_days() -> u32 {
        30
    }
    pub(crate) fn host_count() -> u32 {
        1
    }
    pub(crate) fn host_root_gb() -> u32 {
        30
    }
    pub(crate) fn gitlab_runner_url() -> String {
        "https://gitlab-runner-downloads.s3.amazonaws.com/v18.6.0/binaries/gitlab-runner-linux-amd64"
            .into()
    }
    /// GitLab's default job timeout (1 h), and time to give back the build machines.
    pub(crate) fn drain_timeout() -> super::HumanDuration {
        super::HumanDuration::from_secs(90 * 60)
    }
    pub(crate) fn packages() -> Vec<String> {
        ["awscli", "curl", "ca-certificates"]
            .map(String::from)
            .to_vec()
    }
    pub(crate) fn token_env() -> String {
        "GITLAB_TOKEN".into()
    }
    pub(crate) fn concurrent() -> u32 {
        10
    }
}

/// The jobs one daemon's fleet can run at once: each class's machines times its
/// `jobs_per_machine`, within the fleet-wide `max_machines`. Pure.
fn fleet_job_slots(config: &Config) -> u32 {
    let by_class: u32 = config
        .classes
        .values()
        .map(|c| {
            c.max_machines
                .min(config.max_machines)
                .saturating_mul(c.jobs_per_machine.max(1))
        })
        .fold(0, u32::saturating_add);
    let widest = config
        .classes
        .values()
        .map(|c| c.jobs_per_machine.max(1))
        .max()
        .unwrap_or(1);
    by_class.min(config.max_machines.saturating_mul(widest))
}

/// A stack file that cannot be used, naming the file and (where there is one) the key.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("cannot read stack file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A broken rule, naming the key in stack-file terms (the same type as flotilla.toml's).
pub(crate) use flotilla_proto::config::Invalid;

fn bad<T>(key: impl Into<String>, message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid {
        key: key.into(),
        message: message.into(),
    })
}

impl Stack {
    /// The stack's name (`name`), which tags and prefixes every resource.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `aws.region`, when the stack file sets it (the SDK chain's otherwise).
    pub fn region(&self) -> Option<&str> {
        self.aws.region.as_deref()
    }

    /// The environment variable holding the GitLab access token (`gitlab.token_env`).
    pub fn token_env(&self) -> &str {
        &self.gitlab.token_env
    }

    /// Reads, parses and validates a stack file. No network.
    pub fn load(path: &Path) -> Result<Self, StackError> {
        let text = std::fs::read_to_string(path).map_err(|source| StackError::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |message: String| StackError::Invalid {
            path: path.to_owned(),
            message,
        };
        let stack = Self::from_toml(&text).map_err(invalid)?;
        if let Err(e) = stack.placeholder_config() {
            return Err(invalid(with_line(&text, e)));
        }
        stack.validate().map_err(|e| invalid(e.to_string()))?;
        Ok(stack)
    }

    /// Parses TOML with unknown keys rejected, naming the key and line of the first problem.
    pub(crate) fn from_toml(text: &str) -> Result<Self, String> {
        flotilla_proto::config::parse_toml(text)
    }

    /// The fleet name: `fleet.name`, or the stack name.
    pub(crate) fn fleet_name(&self) -> &str {
        self.fleet
            .get("name")
            .and_then(toml::Value::as_str)
            .unwrap_or(&self.name)
    }

    /// The daemon's config for one runner host: `[fleet]` with the ids the stack
    /// created filled in, parsed by `flotilla_proto` (its defaults, its unknown-key
    /// rejection). Errors name the key as written in the stack file (`fleet.<path>`).
    pub(crate) fn fleet_config(&self, ids: &FleetIds, fleet: &str) -> Result<Config, Invalid> {
        let mut t = self.fleet.clone();
        if t.contains_key("fleet") {
            return bad("fleet.fleet", "the fleet name is `fleet.name`");
        }
        if let Some(name) = t.remove("name") {
            if !name.is_str() {
                return bad("fleet.name", "must be a string");
            }
        }
        t.insert("fleet".into(), fleet.into());
        if let Some(group) = self.log_group() {
            crate::log_settings::fill_daemon_logs(&mut t, &group);
        }
        t.entry("state_dir").or_insert_with(|| STATE_DIR.into());
        if let Some(region) = &ids.region {
            let aws = t
                .entry("aws")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let Some(aws) = aws.as_table_mut() {
                aws.entry("region")
                    .or_insert_with(|| region.as_str().into());
            }
        }
        if let Some(classes) = t.get_mut("classes").and_then(toml::Value::as_table_mut) {
            for (name, class) in classes.iter_mut() {
                let Some(class) = class.as_table_mut() else {
                    continue;
                };
                for key in OWNED_CLASS_KEYS {
                    if class.contains_key(key) {
                        return bad(
                            format!("fleet.classes.{name}.{key}"),
                            "is set by flotilla-provision from the stack's own resources; \
                             remove it",
                        );
                    }
                }
                class.insert(
                    "subnets".into(),
                    toml::Value::Array(
                        ids.private_subnets
                            .iter()
                            .map(|s| s.as_str().into())
                            .collect(),
                    ),
                );
                class.insert(
                    "security_groups".into(),
                    toml::Value::Array(vec![ids.build_security_group.as_str().into()]),
                );
                class.insert(
                    "instance_profile".into(),
                    ids.build_instance_profile.as_str().into(),
                );
            }
        }
        serde_path_to_error::deserialize(toml::Value::Table(t)).map_err(|e| {
            let path: Vec<String> = e.path().iter().map(segment).collect();
            let message = e.into_inner().message().trim_end().to_owned();
            Invalid {
                key: fleet_key(&path),
                message,
            }
        })
    }

    /// The fleet config with placeholder ids: what validation and the AMI lookup use.
    pub(crate) fn placeholder_config(&self) -> Result<Config, Invalid> {
        let fleets = self.host_fleets();
        let last = fleets.last().map_or(self.fleet_name(), String::as_str);
        self.fleet_config(&FleetIds::placeholders(self), last)
    }

    /// A plan note when `gitlab.concurrent` holds a runner host below the job slots its
    /// fleet offers (`max_machines x jobs_per_machine`): machines (or shared machines'
    /// slots) the operator pays for would never get a job. None for a fleet that does not
    /// validate (validation reports that).
    pub(crate) fn concurrency_note(&self) -> Option<String> {
        let config = self.placeholder_config().ok()?;
        let slots = fleet_job_slots(&config);
        (self.gitlab.concurrent < slots).then(|| {
            format!(
                "gitlab.concurrent is {}: a runner host runs at most {} jobs at once, but its \
                 fleet has {slots} job slots (max_machines x jobs_per_machine); raise \
                 gitlab.concurrent to {slots} to use them",
                self.gitlab.concurrent, self.gitlab.concurrent
            )
        })
    }

    /// One fleet name per runner host: the fleet name itself for host 0, `<fleet>-<n>`
    /// for host n. Each daemon reaps instances of its own fleet that it does not know,
    /// so two daemons must never share one; host 0 keeping the plain name means adding
    /// hosts never replaces the first one.
    pub(crate) fn host_fleets(&self) -> Vec<String> {
        let base = self.fleet_name();
        (0..self.runner_hosts.count.max(1))
            .map(|i| {
                if i == 0 {
                    base.to_owned()
                } else {
                    format!("{base}-{i}")
                }
            })
            .collect()
    }

    /// True for a fleet name this stack's hosts use or used (`<fleet>` or `<fleet>-<n>`).
    pub(crate) fn is_own_fleet(&self, fleet: &str) -> bool {
        let base = self.fleet_name();
        fleet == base
            || fleet
                .strip_prefix(base)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
    }

    /// GitLab's runner description for this stack.
    pub(crate) fn runner_description(&self) -> String {
        self.gitlab
            .description
            .clone()
            .unwrap_or_else(|| format!("flotilla {}", self.name))
    }

    /// The stack's log group when `[logs]` is on (`logs.group`, `/flotilla/<stack>` by
    /// default).
    pub(crate) fn log_group(&self) -> Option<String> {
        self.logs.as_ref().map(|l| l.group(&self.name))
    }

    pub(crate) fn gitlab_url(&self) -> &str {
        self.gitlab.url.trim_end_matches('/')
    }

    /// Cross-field rules; each error names the key as written in the stack file.
    pub(crate) fn validate(&self) -> Result<(), Invalid> {
        if !is_stack_name(&self.name) {
            return bad(
                "name",
                format!(
                    "{:?} must be 1-32 characters of lower-case letters, digits and '-', \
                     starting with a letter",
                    self.name
                ),
            );
        }
        if let Some(region) = &self.aws.region {
            if region.trim().is_empty() || region.contains(char::is_whitespace) {
                return bad("aws.region", format!("{region:?} is not a region name"));
            }
        }
        self.validate_network()?;
        self.validate_bucket()?;
        self.validate_hosts()?;
        self.validate_gitlab()?;
        if let Some(logs) = &self.logs {
            logs.validate()?;
        }
        if let Some(o) = &self.oidc {
            let prefix = Names::new(&self.name).deploy_role("");
            o.check(&self.gitlab.url, &prefix)
                .or_else(|(key, message)| bad(key, message))?;
        }
        if let Some(m) = &self.monitoring {
            m.check(self.fleet.contains_key("metrics_addr"))
                .or_else(|(key, message)| bad(key, message))?;
        }
        self.validate_fleet()
    }

    fn validate_network(&self) -> Result<(), Invalid> {
        let n = &self.network;
        let vpc: Cidr = match n.cidr.parse() {
            Ok(c) => c,
            Err(e) => return bad("network.cidr", e),
        };
        if !(16..=28).contains(&vpc.prefix) {
            return bad(
                "network.cidr",
                format!("{vpc}: a VPC's prefix must be /16 to /28"),
            );
        }
        if n.zones.len() < 2 {
            return bad(
                "network.zones",
                "list at least two availability zones (subnets are spread across them)",
            );
        }
        let mut seen = BTreeSet::new();
        for (i, zone) in n.zones.iter().enumerate() {
            if zone.trim().is_empty() || zone.contains(char::is_whitespace) {
                return bad(
                    format!("network.zones[{i}]"),
                    format!("{zone:?} is not a zone name"),
                );
            }
            if let Some(region) = &self.aws.region {
                if !zone.starts_with(region.as_str()) {
                    return bad(
                        format!("network.zones[{i}]"),
                        format!("{zone:?} is not in aws.region {region:?}"),
                    );
                }
            }
            if !seen.insert(zone) {
                return bad(
                    format!("network.zones[{i}]"),
                    format!("{zone:?} is listed twice"),
                );
            }
        }
        let mut all: Vec<(String, Cidr)> = Vec::new();
        for (list, name) in [
            (&n.public_subnets, "network.public_subnets"),
            (&n.private_subnets, "network.private_subnets"),
        ] {
            if list.len() != n.zones.len() {
                return bad(
                    name,
                    format!(
                        "has {} entries but network.zones has {}: give one subnet per zone",
                        list.len(),
                        n.zones.len()
                    ),
                );
            }
            for (i, text) in list.iter().enumerate() {
                let key = format!("{name}[{i}]");
                let c: Cidr = match text.parse() {
                    Ok(c) => c,
                    Err(e) => return bad(key, e),
                };
                if !vpc.contains(c) {
                    return bad(key, format!("{c} is not inside network.cidr {vpc}"));
                }
                if c.prefix > 28 {
                    return bad(key, format!("{c}: a subnet's prefix must be /28 or larger"));
                }
                if let Some((other, _)) = all.iter().find(|(_, o)| o.overlaps(c)) {
                    return bad(key, format!("{c} overlaps {other}"));
                }
                all.push((key, c));
            }
        }
        if let Some(ssh) = &n.ssh_cidr {
            if let Err(e) = ssh.parse::<Cidr>() {
                return bad("network.ssh_cidr", e);
            }
        }
        if let Some(vpn) = &n.vpn {
            vpn.validate(vpc, n.zones.len(), &all, n.ssh_cidr.is_some())?;
        }
        Ok(())
    }

    fn validate_bucket(&self) -> Result<(), Invalid> {
        let name = &self.bucket.name;
        let ok_chars = name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        let ends_ok = name
            .chars()
            .next()
            .zip(name.chars().last())
            .is_some_and(|(a, b)| a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric());
        if !(3..=63).contains(&name.len())
            || !ok_chars
            || !ends_ok
            || name.contains("..")
            || name.parse::<std::net::Ipv4Addr>().is_ok()
        {
            return bad(
                "bucket.name",
                format!(
                    "{name:?} is not a valid S3 bucket name (3-63 lower-case letters, digits, \
                     '-' or '.', starting and ending with a letter or digit)"
                ),
            );
        }
        if self.bucket.expire_days == 0 {
            return bad("bucket.expire_days", "must be at least 1");
        }
        if let Some(key) = &self.bucket.kms_key {
            if !is_kms_key(key) {
                return bad(
                    "bucket.kms_key",
                    format!("{key:?} is not a KMS key id, key ARN, alias (alias/...) or alias ARN"),
                );
            }
        }
        Ok(())
    }

    fn validate_hosts(&self) -> Result<(), Invalid> {
        let h = &self.runner_hosts;
        if h.count > 20 {
            return bad("runner_hosts.count", format!("{} is more than 20", h.count));
        }
        if !h.ami.starts_with("ami-") {
            return bad(
                "runner_hosts.ami",
                format!("{:?} is not an AMI id (ami-...)", h.ami),
            );
        }
        if h.instance_type.trim().is_empty() {
            return bad("runner_hosts.instance_type", "must name an instance type");
        }
        if !(8..=16384).contains(&h.root_volume_gb) {
            return bad("runner_hosts.root_volume_gb", "must be 8 to 16384 (GiB)");
        }
        check_url(
            "runner_hosts.gitlab_runner_url",
            &h.gitlab_runner_url,
            "the runner hosts download and run this binary",
        )?;
        match (&h.flotilla_url, &h.flotilla_sha256) {
            (Some(url), Some(_)) => check_url(
                "runner_hosts.flotilla_url",
                url,
                "the runner hosts download and run this binary",
            )?,
            (Some(_), None) => {
                return bad(
                    "runner_hosts.flotilla_sha256",
                    "is required with runner_hosts.flotilla_url: the hosts check the binary \
                     they download against it (64 hexadecimal digits, `sha256sum flotilla`)",
                )
            }
            (None, Some(_)) => {
                return bad(
                    "runner_hosts.flotilla_sha256",
                    "is only for runner_hosts.flotilla_url: without it apply uploads the \
                     local flotilla binary (--flotilla-bin) and computes its sum",
                )
            }
            (None, None) => {}
        }
        let drain = h.drain_timeout.as_duration();
        if drain < MIN_DRAIN_TIMEOUT || drain > MAX_DRAIN_TIMEOUT {
            return bad(
                "runner_hosts.drain_timeout",
                format!(
                    "{} must be 1m to 48h (SSM Run Command's longest execution)",
                    h.drain_timeout
                ),
            );
        }
        for (key, sum) in [
            ("runner_hosts.gitlab_runner_sha256", &h.gitlab_runner_sha256),
            ("runner_hosts.flotilla_sha256", &h.flotilla_sha256),
        ] {
            if let Some(sum) = sum {
                if sum.len() != 64 || !sum.chars().all(|c| c.is_ascii_hexdigit()) {
                    return bad(key, "must be 64 hexadecimal digits");
                }
            }
        }
        for (i, p) in h.packages.iter().enumerate() {
            let ok = !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-' | '_'));
            if !ok {
                return bad(
                    format!("runner_hosts.packages[{i}]"),
                    format!("{p:?} is not a package name"),
                );
            }
        }
        if let Some(key) = &h.key_name {
            if key.trim().is_empty() {
                return bad("runner_hosts.key_name", "must name an EC2 key pair");
            }
        }
        Ok(())
    }

    fn validate_gitlab(&self) -> Result<(), Invalid> {
        let g = &self.gitlab;
        check_url(
            "gitlab.url",
            &g.url,
            "the access token and the runners' tokens are sent to it",
        )?;
        let env_ok = g
            .token_env
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_uppercase() || c == '_')
            && g.token_env
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !env_ok {
            return bad(
                "gitlab.token_env",
                format!("{:?} is not an environment variable name", g.token_env),
            );
        }
        match g.runner_type {
            RunnerType::InstanceType => {
                if g.group_id.is_some() {
                    return bad("gitlab.group_id", "only for runner_type = \"group_type\"");
                }
                if g.project_id.is_some() {
                    return bad(
                        "gitlab.project_id",
                        "only for runner_type = \"project_type\"",
                    );
                }
            }
            RunnerType::GroupType => {
                if g.group_id.is_none() {
                    return bad(
                        "gitlab.group_id",
                        "required for runner_type = \"group_type\"",
                    );
                }
                if g.project_id.is_some() {
                    return bad(
                        "gitlab.project_id",
                        "only for runner_type = \"project_type\"",
                    );
                }
            }
            RunnerType::ProjectType => {
                if g.project_id.is_none() {
                    return bad(
                        "gitlab.project_id",
                        "required for runner_type = \"project_type\"",
                    );
                }
                if g.group_id.is_some() {
                    return bad("gitlab.group_id", "only for runner_type = \"group_type\"");
                }
            }
        }
        for (i, t) in g.tags.iter().enumerate() {
            if t.trim().is_empty() || t.contains(',') {
                return bad(
                    format!("gitlab.tags[{i}]"),
                    format!("{t:?}: tags are non-empty and contain no ','"),
                );
            }
        }
        if g.tags.is_empty() && !g.run_untagged {
            return bad(
                "gitlab.tags",
                "give at least one tag, or set gitlab.run_untagged = true",
            );
        }
        if g.concurrent == 0 {
            return bad("gitlab.concurrent", "must be at least 1");
        }
        Ok(())
    }

    fn validate_fleet(&self) -> Result<(), Invalid> {
        let config = self.placeholder_config()?;
        for (name, class) in &config.classes {
            if !class.ami.starts_with("ami-") {
                return bad(
                    format!("fleet.classes.{name}.ami"),
                    format!("{:?} is not an AMI id (ami-...)", class.ami),
                );
            }
        }
        // The daemon's own cross-field rules.
        config.validate().map_err(|e| Invalid {
            key: fleet_key(&e.key.split('.').map(String::from).collect::<Vec<_>>()),
            message: e.message,
        })
    }
}

/// Keys of a class that apply fills in.
pub(crate) const OWNED_CLASS_KEYS: [&str; 3] = ["subnets", "security_groups", "instance_profile"];

fn segment(s: &serde_path_to_error::Segment) -> String {
    match s {
        serde_path_to_error::Segment::Seq { index } => format!("[{index}]"),
        serde_path_to_error::Segment::Map { key } => key.clone(),
        serde_path_to_error::Segment::Enum { variant } => variant.clone(),
        serde_path_to_error::Segment::Unknown => "?".into(),
    }
}

/// A path inside the daemon's config, as a stack-file key (`fleet` is `fleet.name`).
fn fleet_key(path: &[String]) -> String {
    let mut key = String::from("fleet");
    match path.first().map(String::as_str) {
        Some("fleet") if path.len() == 1 => return "fleet.name".into(),
        Some(".") | None => return key,
        _ => {}
    }
    for p in path {
        if p.starts_with('[') {
            key.push_str(p);
        } else {
            key.push('.');
            key.push_str(p);
        }
    }
    key
}

/// Adds the line of the key an error names (or of its closest parent, or of the unknown
/// field it names) from the stack file's text.
fn with_line(text: &str, e: Invalid) -> String {
    let line = key_span(text, &e).map(|pos| text[..pos.min(text.len())].matches('\n').count() + 1);
    match line {
        Some(l) => format!("{e} (line {l})"),
        None => e.to_string(),
    }
}

fn key_span(text: &str, e: &Invalid) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let doc = DeTable::parse(text).ok()?;
    let mut parts: Vec<String> = Vec::new();
    for part in e.key.split('.') {
        match part.split_once('[') {
            Some((name, rest)) => {
                parts.push(name.to_owned());
                parts.push(format!("[{rest}"));
            }
            None => parts.push(part.to_owned()),
        }
    }
    // deny_unknown_fields names the field in the message, the path names its parent.
    if let Some(field) = e
        .message
        .strip_prefix("unknown field `")
        .and_then(|m| m.split('`').next())
    {
        parts.push(field.to_owned());
    }
    let mut table: &DeTable<'_> = doc.get_ref();
    let mut best: Option<usize> = None;
    let mut value: Option<&DeValue<'_>> = None;
    for part in &parts {
        if let Some(index) = part.strip_prefix('[').and_then(|p| p.strip_suffix(']')) {
            let Some(DeValue::Array(items)) = value else {
                break;
            };
            let Some(item) = index.parse::<usize>().ok().and_then(|i| items.get(i)) else {
                break;
            };
            best = Some(item.span().start);
            value = Some(item.get_ref());
            if let DeValue::Table(t) = item.get_ref() {
                table = t;
            }
            continue;
        }
        let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref() == part) else {
            break;
        };
        best = Some(k.span().start);
        value = Some(v.get_ref());
        if let DeValue::Table(t) = v.get_ref() {
            table = t;
        }
    }
    best
}

/// A KMS key as S3 default encryption and the runner-host policy take it: a key id
/// (`1234abcd-...`, `mrk-...`), a key ARN, `alias/<name>` or an alias ARN.
fn is_kms_key(key: &str) -> bool {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/'))
    };
    if let Some(rest) = key.strip_prefix("arn:") {
        let parts: Vec<&str> = rest.splitn(5, ':').collect();
        return match parts[..] {
            [partition, "kms", region, account, resource] => {
                !partition.is_empty()
                    && !region.is_empty()
                    && account.len() == 12
                    && account.chars().all(|c| c.is_ascii_digit())
                    && (resource.strip_prefix("key/").is_some_and(name_ok)
                        || resource.strip_prefix("alias/").is_some_and(name_ok))
            }
            _ => false,
        };
    }
    match key.strip_prefix("alias/") {
        Some(alias) => name_ok(alias),
        None => name_ok(key) && !key.contains('/'),
    }
}

fn is_stack_name(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Shortest and longest `runner_hosts.drain_timeout` (SSM Run Command's
/// `executionTimeout` is at most 48 hours).
pub(crate) const MIN_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
pub(crate) const MAX_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(48 * 3600);

/// A URL the stack downloads from or sends secrets to: https:// only (`why` says what
/// travels over it). Plain http:// is accepted for a loopback host alone (127.0.0.0/8,
/// `[::1]`, `localhost`), where nothing crosses a network. No quotes or whitespace: URLs
/// are interpolated into shell scripts.
fn check_url(key: &str, url: &str, why: &str) -> Result<(), Invalid> {
    let chars_ok = !url
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '\'' | '"' | '\\' | '`'));
    let rest = url.strip_prefix("https://");
    if let Some(plain) = url.strip_prefix("http://") {
        if !is_loopback_authority(plain) {
            return bad(
                key,
                format!(
                    "{url:?} is plain http://: expected an https:// URL ({why}, and http \
                     lets anyone on the path read or replace it)"
                ),
            );
        }
    } else if rest.is_none() {
        return bad(
            key,
            format!("{url:?} is not a URL: expected https://<host>/..."),
        );
    }
    let host_part = url.split_once("://").map_or("", |(_, r)| r);
    if !chars_ok || host_part.is_empty() || host_part.starts_with('/') {
        return bad(
            key,
            format!("{url:?}: expected an https:// URL with a host and without quotes or spaces"),
        );
    }
    Ok(())
}

/// True when the authority of `rest` (what follows `http://`) is a loopback address.
fn is_loopback_authority(rest: &str) -> bool {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const GOOD: &str = r#"
name = "ci"

[network]
cidr = "10.42.0.0/16"
zones = ["us-east-1a", "us-east-1b"]
public_subnets = ["10.42.0.0/24", "10.42.1.0/24"]
private_subnets = ["10.42.16.0/20", "10.42.32.0/20"]

[bucket]
name = "ci-flotilla-cache"

[runner_hosts]
ami = "ami-12c6146b"
instance_type = "t3.small"
# no flotilla_url: apply uploads the flotilla binary

[gitlab]
url = "https://gitlab.example.com/"
runner_type = "instance_type"
tags = ["flotilla"]

[fleet]
default_class = "small"

[fleet.classes.small]
ami = "ami-12c6146b"
instance_types = ["t3.medium"]
"#;

    fn err(text: &str) -> String {
        match Stack::from_toml(text) {
            Err(e) => e,
            Ok(s) => s.validate().unwrap_err().to_string(),
        }
    }

    #[test]
    fn concurrent_below_the_fleets_job_slots_gets_a_plan_note() {
        // Defaults: 10 machines, one job each, concurrent 10.
        assert_eq!(Stack::from_toml(GOOD).unwrap().concurrency_note(), None);
        let shared = GOOD.replace(
            "instance_types = [\"t3.medium\"]",
            "instance_types = [\"t3.medium\"]\nmax_machines = 5\njobs_per_machine = 4",
        );
        let note = Stack::from_toml(&shared)
            .unwrap()
            .concurrency_note()
            .unwrap();
        assert!(note.contains("gitlab.concurrent is 10"), "{note}");
        assert!(note.contains("20 job slots"), "{note}");
        let raised = shared.replace(
            "tags = [\"flotilla\"]",
            "tags = [\"flotilla\"]\nconcurrent = 20",
        );
        assert_eq!(Stack::from_toml(&raised).unwrap().concurrency_note(), None);
        // The fleet-wide max_machines bounds the classes' machines together.
        let capped = shared.replace(
            "default_class = \"small\"",
            "default_class = \"small\"\nmax_machines = 2",
        );
        assert_eq!(Stack::from_toml(&capped).unwrap().concurrency_note(), None);
    }

    #[test]
    fn good_stack_validates_with_defaults() {
        let s = Stack::from_toml(GOOD).unwrap();
        s.validate().unwrap();
        assert_eq!(s.fleet_name(), "ci");
        assert_eq!(s.bucket.expire_days, 30);
        assert_eq!(s.gitlab_url(), "https://gitlab.example.com");
        assert_eq!(s.runner_description(), "flotilla ci");
        assert_eq!(s.network.nat, NatMode::Single);
    }

    #[test]
    fn unknown_key_is_named_with_path_and_line() {
        let e = err(&GOOD.replace(
            "name = \"ci-flotilla-cache\"",
            "name = \"ci-flotilla-cache\"\nexpire_dayz = 3",
        ));
        assert!(e.contains("key `bucket.expire_dayz`"), "{e}");
        assert!(e.contains("expire_days"), "{e}");
        assert!(e.contains("line 12"), "{e}");
    }

    fn load_err(text: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stack.toml");
        std::fs::write(&path, text).unwrap();
        let e = Stack::load(&path).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: ", path.display())), "{e}");
        e
    }

    #[test]
    fn wrong_type_in_fleet_is_named_with_line() {
        let e = load_err(&GOOD.replace(
            "instance_types = [\"t3.medium\"]",
            "instance_types = \"t3\"",
        ));
        assert!(
            e.contains("key `fleet.classes.small.instance_types`"),
            "{e}"
        );
        assert!(e.contains("expected a sequence"), "{e}");
        assert!(e.contains("line 28"), "{e}");
    }

    #[test]
    fn unknown_fleet_key_is_named_with_line() {
        let e = load_err(&GOOD.replace(
            "instance_types = [\"t3.medium\"]",
            "instance_types = [\"t3.medium\"]\nidle_tme = \"5m\"",
        ));
        assert!(e.contains("key `fleet.classes.small.idle_tme`"), "{e}");
        assert!(e.contains("unknown field"), "{e}");
        assert!(e.contains("line 29"), "{e}");
    }

    #[test]
    fn owned_class_keys_are_refused() {
        let e = load_err(&GOOD.replace(
            "instance_types = [\"t3.medium\"]",
            "instance_types = [\"t3.medium\"]\nsubnets = [\"subnet-1\"]",
        ));
        assert!(e.contains("key `fleet.classes.small.subnets`"), "{e}");
        assert!(e.contains("line 29"), "{e}");
    }

    #[test]
    fn bad_fleet_name_is_named() {
        let e = err(&GOOD.replace(
            "default_class = \"small\"",
            "default_class = \"small\"\nname = \"no spaces\"",
        ));
        assert!(e.contains("key `fleet.name`"), "{e}");
    }

    #[test]
    fn subnet_outside_vpc_is_named_by_index() {
        let e = err(&GOOD.replace("10.42.32.0/20", "10.43.32.0/20"));
        assert!(e.contains("network.private_subnets[1]"), "{e}");
        assert!(e.contains("not inside"), "{e}");
    }

    #[test]
    fn overlapping_subnets_are_rejected() {
        let e = err(&GOOD.replace("10.42.1.0/24", "10.42.16.0/24"));
        assert!(e.contains("key `network.private_subnets[0]`"), "{e}");
        assert!(e.contains("overlaps network.public_subnets[1]"), "{e}");
        let e = err(&GOOD.replace("10.42.1.0/24", "10.42.20.0/24"));
        assert!(e.contains("network.private_subnets[0]"), "{e}");
    }

    #[test]
    fn one_zone_is_not_enough() {
        let e = err(&GOOD.replace(
            "zones = [\"us-east-1a\", \"us-east-1b\"]",
            "zones = [\"us-east-1a\"]",
        ));
        assert!(e.contains("network.zones"), "{e}");
    }

    #[test]
    fn fleet_rules_come_from_the_daemon_validator() {
        let e = err(&GOOD.replace("default_class = \"small\"", "default_class = \"big\""));
        assert!(e.contains("key `fleet.default_class`"), "{e}");
        let e = err(&GOOD.replace(
            "instance_types = [\"t3.medium\"]",
            "instance_types = [\"t3.medium\"]\nidle_count = 20\nmax_machines = 2",
        ));
        assert!(e.contains("fleet.classes.small.idle_count"), "{e}");
    }

    #[test]
    fn group_runner_needs_group_id() {
        let e = err(&GOOD.replace("instance_type\"\n", "group_type\"\n"));
        assert!(e.contains("gitlab.group_id"), "{e}");
    }

    #[test]
    fn bad_bucket_name_and_url() {
        let e = err(&GOOD.replace("ci-flotilla-cache", "CI_cache"));
        assert!(e.contains("bucket.name"), "{e}");
        let e = err(&GOOD.replace(
            "instance_type = \"t3.small\"",
            "instance_type = \"t3.small\"\ngitlab_runner_url = \"https://x/'; rm -rf /\"",
        ));
        assert!(e.contains("runner_hosts.gitlab_runner_url"), "{e}");
    }

    const SUM: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn with_hosts(extra: &str) -> String {
        GOOD.replace(
            "instance_type = \"t3.small\"",
            &format!("instance_type = \"t3.small\"\n{extra}"),
        )
    }

    #[test]
    fn plain_http_urls_are_refused_naming_the_key_and_https() {
        let cases = [
            (
                with_hosts(&format!(
                    "flotilla_url = \"http://downloads.example.com/flotilla\"\n\
                     flotilla_sha256 = \"{SUM}\""
                )),
                "runner_hosts.flotilla_url",
            ),
            (
                with_hosts("gitlab_runner_url = \"http://downloads.example.com/gitlab-runner\""),
                "runner_hosts.gitlab_runner_url",
            ),
            (
                GOOD.replace("https://gitlab.example.com/", "http://gitlab.example.com/"),
                "gitlab.url",
            ),
            (
                GOOD.replace("https://gitlab.example.com/", "HTTP://gitlab.example.com/"),
                "gitlab.url",
            ),
            (
                GOOD.replace(
                    "https://gitlab.example.com/",
                    "http://127.0.0.1.example.com/",
                ),
                "gitlab.url",
            ),
            (
                GOOD.replace("https://gitlab.example.com/", "ftp://gitlab.example.com/"),
                "gitlab.url",
            ),
        ];
        for (text, key) in cases {
            let e = err(&text);
            assert!(e.contains(&format!("key `{key}`")), "{e}");
            assert!(e.contains("https://"), "{e}");
        }
        // Through Stack::load the file is named too.
        let e =
            load_err(&GOOD.replace("https://gitlab.example.com/", "http://gitlab.example.com/"));
        assert!(e.contains("key `gitlab.url`"), "{e}");
        assert!(e.contains("plain http://"), "{e}");
    }

    #[test]
    fn loopback_http_is_accepted() {
        for url in [
            "http://127.0.0.1:8080",
            "http://127.1.2.3/",
            "http://localhost:3000/gitlab",
            "http://[::1]:80",
        ] {
            let s = Stack::from_toml(&GOOD.replace("https://gitlab.example.com/", url)).unwrap();
            s.validate().unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        assert!(!is_loopback_authority("10.0.0.1/x"));
        assert!(!is_loopback_authority("localhost.example.com"));
        assert!(!is_loopback_authority("127.0.0.1@evil.example.com/"));
    }

    #[test]
    fn flotilla_url_is_optional_and_needs_its_sum() {
        let s = Stack::from_toml(GOOD).unwrap();
        assert_eq!(s.runner_hosts.flotilla_url, None);
        s.validate().unwrap();
        let url = "flotilla_url = \"https://downloads.example.com/flotilla\"";
        let e = err(&with_hosts(url));
        assert!(e.contains("key `runner_hosts.flotilla_sha256`"), "{e}");
        assert!(e.contains("required"), "{e}");
        let e = err(&with_hosts(&format!("flotilla_sha256 = \"{SUM}\"")));
        assert!(e.contains("key `runner_hosts.flotilla_sha256`"), "{e}");
        assert!(e.contains("--flotilla-bin"), "{e}");
        let s =
            Stack::from_toml(&with_hosts(&format!("{url}\nflotilla_sha256 = \"{SUM}\""))).unwrap();
        s.validate().unwrap();
    }

    #[test]
    fn drain_timeout_defaults_to_90_minutes_and_is_bounded() {
        let s = Stack::from_toml(GOOD).unwrap();
        assert_eq!(s.runner_hosts.drain_timeout.as_duration().as_secs(), 5400);
        for bad in ["\"30s\"", "\"49h\""] {
            let e = err(&with_hosts(&format!("drain_timeout = {bad}")));
            assert!(e.contains("key `runner_hosts.drain_timeout`"), "{e}");
        }
        let s = Stack::from_toml(&with_hosts("drain_timeout = \"2h\"")).unwrap();
        s.validate().unwrap();
    }

    #[test]
    fn kms_keys_are_ids_arns_or_aliases() {
        for good in [
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "mrk-1234abcd12ab34cd56ef1234567890ab",
            "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "alias/flotilla-cache",
            "arn:aws:kms:us-east-1:123456789012:alias/flotilla-cache",
        ] {
            assert!(is_kms_key(good), "{good}");
        }
        for bad in [
            "",
            " ",
            "key/1234",
            "arn:aws:s3:::bucket",
            "arn:aws:kms:us-east-1:1234:key/x",
            "alias/",
            "my key",
        ] {
            assert!(!is_kms_key(bad), "{bad}");
        }
        let e = err(&GOOD.replace(
            "name = \"ci-flotilla-cache\"",
            "name = \"ci-flotilla-cache\"\nkms_key = \"key/1\"",
        ));
        assert!(e.contains("bucket.kms_key"), "{e}");
    }

    #[test]
    fn untagged_needs_opt_in() {
        let e = err(&GOOD.replace("tags = [\"flotilla\"]", "tags = []"));
        assert!(e.contains("gitlab.tags"), "{e}");
    }
}
