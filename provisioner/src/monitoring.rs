//! `[monitoring]`: Prometheus scrapes the runner hosts from inside the VPC. Its schema
//! and checks, the addresses the two metrics endpoints listen on (the host's private
//! address, filled in at first boot: see [`PRIVATE_IPV4_PLACEHOLDER`]), the ingress the
//! runner hosts' security group gets (both ports, from the monitoring CIDR and/or group
//! only) and the scrape targets `output` prints. Pure.
//!
//! The endpoints carry no authentication, so they are never opened to the world: a
//! `/0` source is refused, and without this section nothing listens beyond loopback.

use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;
use crate::paths::PRIVATE_IPV4_PLACEHOLDER;

/// The stack file's `[monitoring]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Monitoring {
    /// Where Prometheus scrapes from (an IPv4 CIDR block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cidr: Option<String>,
    /// Or the security group Prometheus runs in (`sg-...`, same VPC or peered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) security_group: Option<String>,
    /// The daemon's `metrics_addr` port.
    #[serde(default = "default_flotilla_port")]
    pub(crate) flotilla_port: u16,
    /// gitlab-runner's `listen_address` port (its usual 9252).
    #[serde(default = "default_runner_port")]
    pub(crate) runner_port: u16,
}

fn default_flotilla_port() -> u16 {
    9402
}

fn default_runner_port() -> u16 {
    9252
}

/// Where one ingress rule for the metrics ports admits traffic from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    Cidr(String),
    Group(String),
}

/// One endpoint Prometheus scrapes (`output`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScrapeTarget {
    /// `flotilla` or `gitlab-runner` (a Prometheus job name).
    pub job: String,
    /// The runner host (`host/0`, ...).
    pub host: String,
    /// `<private ip>:<port>`.
    pub target: String,
}

/// A broken rule of the section: the key (under `monitoring.`) and what was expected.
pub(crate) type Problem = (&'static str, String);

impl Monitoring {
    /// The section's own rules. `fleet_metrics_addr`: whether `[fleet]` sets
    /// `metrics_addr` itself (this section sets it).
    pub(crate) fn check(&self, fleet_metrics_addr: bool) -> Result<(), Problem> {
        if self.cidr.is_none() && self.security_group.is_none() {
            return Err((
                "monitoring",
                "give cidr or security_group (or both): where Prometheus scrapes from".into(),
            ));
        }
        if let Some(text) = &self.cidr {
            let cidr: Cidr = text.parse().map_err(|e| ("monitoring.cidr", e))?;
            if cidr.prefix == 0 {
                return Err((
                    "monitoring.cidr",
                    format!(
                        "{cidr} is the whole internet: the metrics endpoints have no \
                         authentication; give the monitoring network's block"
                    ),
                ));
            }
        }
        if let Some(sg) = &self.security_group {
            let ok = sg
                .strip_prefix("sg-")
                .is_some_and(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit()));
            if !ok {
                return Err((
                    "monitoring.security_group",
                    format!("{sg:?} is not a security group id (sg-...)"),
                ));
            }
        }
        for (key, port) in [
            ("monitoring.flotilla_port", self.flotilla_port),
            ("monitoring.runner_port", self.runner_port),
        ] {
            if port == 0 || port == 22 {
                return Err((
                    key,
                    format!("{port} is not a port for metrics (1-65535, not 22)"),
                ));
            }
        }
        if self.flotilla_port == self.runner_port {
            return Err((
                "monitoring.runner_port",
                format!(
                    "{} is also monitoring.flotilla_port: the two endpoints need two ports",
                    self.runner_port
                ),
            ));
        }
        if fleet_metrics_addr {
            return Err((
                "fleet.metrics_addr",
                "is set by [monitoring] (the host's private address and \
                 monitoring.flotilla_port); remove it"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The daemon's `metrics_addr`, with the placeholder the host fills in at first boot.
    pub(crate) fn flotilla_addr(&self) -> String {
        format!("{PRIVATE_IPV4_PLACEHOLDER}:{}", self.flotilla_port)
    }

    /// gitlab-runner's `listen_address`, likewise.
    pub(crate) fn runner_addr(&self) -> String {
        format!("{PRIVATE_IPV4_PLACEHOLDER}:{}", self.runner_port)
    }

    /// The runner hosts' ingress for metrics: both ports from each source given.
    pub(crate) fn ingress(&self) -> Vec<(u16, Source)> {
        let sources: Vec<Source> = self
            .cidr
            .iter()
            .map(|c| Source::Cidr(c.clone()))
            .chain(self.security_group.iter().map(|g| Source::Group(g.clone())))
            .collect();
        [self.flotilla_port, self.runner_port]
            .into_iter()
            .flat_map(|port| sources.iter().map(move |s| (port, s.clone())))
            .collect()
    }

    /// What Prometheus scrapes: both endpoints of each host (`(logical id, private
    /// ip)`); hosts without an address yet are left out.
    pub(crate) fn scrape_targets(&self, hosts: &[(String, String)]) -> Vec<ScrapeTarget> {
        let mut out = Vec::new();
        for (host, ip) in hosts {
            if ip.parse::<std::net::Ipv4Addr>().is_err() {
                continue;
            }
            for (job, port) in [
                ("flotilla", self.flotilla_port),
                ("gitlab-runner", self.runner_port),
            ] {
                out.push(ScrapeTarget {
                    job: job.into(),
                    host: host.clone(),
                    target: format!("{ip}:{port}"),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> Monitoring {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_are_the_usual_ports_and_one_source_is_required() {
        let m = section("cidr = \"10.0.0.0/8\"");
        assert_eq!((m.flotilla_port, m.runner_port), (9402, 9252));
        m.check(false).unwrap();
        let e = section("").check(false).unwrap_err();
        assert_eq!(e.0, "monitoring");
        assert!(e.1.contains("cidr or security_group"), "{}", e.1);
    }

    #[test]
    fn bad_sources_and_ports_name_their_key() {
        for (text, key) in [
            ("cidr = \"0.0.0.0/0\"", "monitoring.cidr"),
            ("cidr = \"10.0.0.0/33\"", "monitoring.cidr"),
            ("security_group = \"default\"", "monitoring.security_group"),
            (
                "cidr = \"10.0.0.0/8\"\nflotilla_port = 0",
                "monitoring.flotilla_port",
            ),
            (
                "cidr = \"10.0.0.0/8\"\nrunner_port = 9402",
                "monitoring.runner_port",
            ),
        ] {
            assert_eq!(section(text).check(false).unwrap_err().0, key, "{text}");
        }
        let e = section("cidr = \"10.0.0.0/8\"").check(true).unwrap_err();
        assert_eq!(e.0, "fleet.metrics_addr");
    }

    #[test]
    fn ingress_is_both_ports_from_each_source_only() {
        let m = section("cidr = \"10.9.0.0/16\"\nsecurity_group = \"sg-0abc\"");
        m.check(false).unwrap();
        assert_eq!(
            m.ingress(),
            [
                (9402, Source::Cidr("10.9.0.0/16".into())),
                (9402, Source::Group("sg-0abc".into())),
                (9252, Source::Cidr("10.9.0.0/16".into())),
                (9252, Source::Group("sg-0abc".into())),
            ]
        );
        assert_eq!(m.flotilla_addr(), "@FLOTILLA_PRIVATE_IPV4@:9402");
        assert_eq!(m.runner_addr(), "@FLOTILLA_PRIVATE_IPV4@:9252");
    }

    #[test]
    fn scrape_targets_are_each_hosts_private_address_and_skip_unknown_ones() {
        let m = section("cidr = \"10.0.0.0/8\"");
        let hosts = [
            ("host/0".to_string(), "10.1.16.5".to_string()),
            (
                "host/1".to_string(),
                "(known after apply: host/1)".to_string(),
            ),
        ];
        let t = m.scrape_targets(&hosts);
        let got: Vec<(&str, &str)> = t
            .iter()
            .map(|t| (t.job.as_str(), t.target.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("flotilla", "10.1.16.5:9402"),
                ("gitlab-runner", "10.1.16.5:9252")
            ]
        );
    }
}
