//! What `output` prints (and `apply` summarises): the ids and addresses a pass found or
//! made and the generated configuration files, assembled from what each resource module
//! returned. Placeholders (`(known after apply: ...)`) stand for what is not created yet.

use serde::Serialize;

use crate::ec2::instance::HostInfo;
use crate::ec2::nat_gateway::Nat;
use crate::id::Id;
use crate::monitoring::{Monitoring, ScrapeTarget};
use crate::oidc::DeployOutputs;

/// What `output` prints: ids, addresses and the generated configuration files.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outputs {
    pub stack: String,
    pub region: String,
    pub vpc: String,
    pub public_subnets: Vec<String>,
    pub private_subnets: Vec<String>,
    pub nat_gateways: Vec<NatOutput>,
    pub s3_endpoint: String,
    pub runner_security_group: String,
    pub build_security_group: String,
    pub bucket: String,
    /// Where the hosts install flotilla from (`s3://...` or `runner_hosts.flotilla_url`).
    pub flotilla_binary: String,
    pub flotilla_sha256: String,
    pub runner_role_arn: String,
    pub build_role_arn: String,
    pub runner_instance_profile: String,
    pub build_instance_profile: String,
    pub runner_hosts: Vec<HostOutput>,
    pub token_parameter: String,
    pub gitlab_runner_id: Option<u64>,
    pub registration: String,
    pub gitlab_runner_config_toml: String,
    /// `[oidc]`: the provider and the deploy roles' ARNs.
    pub deploy: DeployOutputs,
    /// `[network.vpn]`: the Client VPN endpoint (what `aws ec2
    /// export-client-vpn-client-configuration` takes), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_vpn_endpoint: Option<String>,
    /// `[monitoring]`: what Prometheus scrapes (empty without it).
    pub scrape_targets: Vec<ScrapeTarget>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NatOutput {
    pub zone: String,
    pub id: String,
    pub public_ip: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostOutput {
    pub name: String,
    pub fleet: String,
    pub instance_id: String,
    pub private_ip: String,
    pub state: String,
    pub flotilla_toml: String,
}

pub(crate) fn ids(ids: &[Id]) -> Vec<String> {
    ids.iter().map(Id::to_string).collect()
}

pub(crate) fn nats(nats: &[Nat]) -> Vec<NatOutput> {
    nats.iter()
        .map(|n| NatOutput {
            zone: n.zone.clone(),
            id: n.id.to_string(),
            public_ip: n.public_ip.to_string(),
        })
        .collect()
}

/// Each host with its fleet name and `flotilla.toml` (`configs`, in host order).
pub(crate) fn hosts(hosts: Vec<HostInfo>, configs: Vec<(String, String)>) -> Vec<HostOutput> {
    hosts
        .into_iter()
        .zip(configs)
        .map(|(h, (fleet, flotilla_toml))| HostOutput {
            name: h.logical,
            fleet,
            instance_id: h.instance_id.to_string(),
            private_ip: h.private_ip.to_string(),
            state: h.state,
            flotilla_toml,
        })
        .collect()
}

/// Both metrics endpoints of each host that has an address, with `[monitoring]`.
pub(crate) fn scrape_targets(
    monitoring: Option<&Monitoring>,
    hosts: &[HostOutput],
) -> Vec<ScrapeTarget> {
    let hosts: Vec<(String, String)> = hosts
        .iter()
        .map(|h| (h.name.clone(), h.private_ip.clone()))
        .collect();
    monitoring.map_or_else(Vec::new, |m| m.scrape_targets(&hosts))
}
