//! `[network.vpn]`: the optional AWS Client VPN in front of the stack (its schema and
//! the checks that need no network). Its own module so the stack file's main schema
//! only gains one field and one call.
//!
//! With it, runner-host SSH is reachable only through the VPN: `network.ssh_cidr` is
//! refused next to it rather than silently ignored.

use flotilla_proto::config::Invalid;
use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;

/// The VPN endpoint and its subnets as the stack file says them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Vpn {
    /// Addresses handed to VPN clients: /12 to /22, outside the VPC (AWS's rules).
    pub(crate) client_cidr: String,
    /// One VPN subnet per zone (`network.zones` order), inside the VPC; the endpoint is
    /// associated with each.
    pub(crate) subnets: Vec<String>,
    /// ACM certificate the endpoint presents to clients.
    pub(crate) server_certificate_arn: String,
    /// ACM certificate of the CA that issued the clients' certificates (mutual TLS).
    pub(crate) client_root_certificate_arn: String,
    /// Only the VPC's routes go through the VPN (AWS's default is everything).
    #[serde(default = "default_split_tunnel")]
    pub(crate) split_tunnel: bool,
    /// DNS servers pushed to clients (at most two); none: the clients' own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) dns_servers: Vec<String>,
    #[serde(default)]
    pub(crate) transport_protocol: Transport,
    /// 443 or 1194.
    #[serde(default = "default_port")]
    pub(crate) port: u16,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Transport {
    #[default]
    Udp,
    Tcp,
}

impl Transport {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

fn default_split_tunnel() -> bool {
    true
}

fn default_port() -> u16 {
    443
}

fn bad<T>(key: impl Into<String>, message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid {
        key: key.into(),
        message: message.into(),
    })
}

impl Vpn {
    /// Checks the section against the VPC (`vpc`), the number of zones, and the subnet
    /// blocks already taken (key, block); `ssh_cidr`: whether `network.ssh_cidr` is set.
    pub(crate) fn validate(
        &self,
        vpc: Cidr,
        zones: usize,
        taken: &[(String, Cidr)],
        ssh_cidr: bool,
    ) -> Result<(), Invalid> {
        const KEY: &str = "network.vpn";
        if ssh_cidr {
            return bad(
                "network.ssh_cidr",
                "cannot be used with [network.vpn]: runner-host SSH is then allowed only \
                 through the VPN; remove ssh_cidr",
            );
        }
        let client: Cidr = match self.client_cidr.parse() {
            Ok(c) => c,
            Err(e) => return bad(format!("{KEY}.client_cidr"), e),
        };
        if !(12..=22).contains(&client.prefix) {
            return bad(
                format!("{KEY}.client_cidr"),
                format!("{client}: a Client VPN client block must be /12 to /22"),
            );
        }
        if client.overlaps(vpc) {
            return bad(
                format!("{KEY}.client_cidr"),
                format!(
                    "{client} overlaps network.cidr {vpc}: clients need addresses of their own"
                ),
            );
        }
        if self.subnets.len() != zones {
            return bad(
                format!("{KEY}.subnets"),
                format!(
                    "has {} entries but network.zones has {zones}: give one subnet per zone",
                    self.subnets.len()
                ),
            );
        }
        let mut all: Vec<(String, Cidr)> = taken.to_vec();
        for (i, text) in self.subnets.iter().enumerate() {
            let key = format!("{KEY}.subnets[{i}]");
            let c: Cidr = match text.parse() {
                Ok(c) => c,
                Err(e) => return bad(key, e),
            };
            if !vpc.contains(c) {
                return bad(key, format!("{c} is not inside network.cidr {vpc}"));
            }
            if c.prefix > 27 {
                return bad(
                    key,
                    format!("{c}: a Client VPN subnet's prefix must be /27 or larger"),
                );
            }
            if let Some((other, _)) = all.iter().find(|(_, o)| o.overlaps(c)) {
                return bad(key, format!("{c} overlaps {other}"));
            }
            all.push((key, c));
        }
        for (key, arn) in [
            ("server_certificate_arn", &self.server_certificate_arn),
            (
                "client_root_certificate_arn",
                &self.client_root_certificate_arn,
            ),
        ] {
            if !is_acm_arn(arn) {
                return bad(
                    format!("{KEY}.{key}"),
                    format!(
                        "{arn:?} is not an ACM certificate ARN \
                         (arn:aws:acm:<region>:<account>:certificate/<id>)"
                    ),
                );
            }
        }
        if self.dns_servers.len() > 2 {
            return bad(format!("{KEY}.dns_servers"), "at most two DNS servers");
        }
        for (i, s) in self.dns_servers.iter().enumerate() {
            if s.parse::<std::net::Ipv4Addr>().is_err() {
                return bad(
                    format!("{KEY}.dns_servers[{i}]"),
                    format!("{s:?} is not an IPv4 address"),
                );
            }
        }
        if !matches!(self.port, 443 | 1194) {
            return bad(
                format!("{KEY}.port"),
                format!(
                    "{} must be 443 or 1194 (the ports Client VPN offers)",
                    self.port
                ),
            );
        }
        Ok(())
    }
}

/// `arn:<partition>:acm:<region>:<12-digit account>:certificate/<id>`.
fn is_acm_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [prefix, partition, service, region, account, resource] = parts[..] else {
        return false;
    };
    let id = resource.strip_prefix("certificate/").unwrap_or("");
    prefix == "arn"
        && partition.starts_with("aws")
        && service == "acm"
        && !region.is_empty()
        && !region.contains(char::is_whitespace)
        && account.len() == 12
        && account.chars().all(|c| c.is_ascii_digit())
        && !id.is_empty()
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str =
        "arn:aws:acm:us-east-1:123456789012:certificate/12345678-1234-1234-1234-123456789012";

    fn vpn(client: &str, subnets: &[&str]) -> Vpn {
        Vpn {
            client_cidr: client.into(),
            subnets: subnets.iter().map(|s| s.to_string()).collect(),
            server_certificate_arn: CERT.into(),
            client_root_certificate_arn: CERT.into(),
            split_tunnel: true,
            dns_servers: Vec::new(),
            transport_protocol: Transport::Udp,
            port: 443,
        }
    }

    fn check(v: &Vpn, ssh: bool) -> Result<(), Invalid> {
        let vpc: Cidr = "10.42.0.0/16".parse().unwrap();
        let taken = vec![(
            "network.private_subnets[0]".to_owned(),
            "10.42.16.0/20".parse().unwrap(),
        )];
        v.validate(vpc, 2, &taken, ssh)
    }

    fn err(v: &Vpn, ssh: bool) -> String {
        check(v, ssh).unwrap_err().to_string()
    }

    #[test]
    fn a_good_section_passes() {
        check(
            &vpn("172.16.0.0/22", &["10.42.64.0/26", "10.42.64.64/26"]),
            false,
        )
        .unwrap();
    }

    #[test]
    fn client_block_must_be_outside_the_vpc_and_sized_as_aws_requires() {
        let e = err(
            &vpn("10.42.128.0/22", &["10.42.64.0/26", "10.42.64.64/26"]),
            false,
        );
        assert!(
            e.contains("network.vpn.client_cidr") && e.contains("overlaps"),
            "{e}"
        );
        let e = err(
            &vpn("172.16.0.0/24", &["10.42.64.0/26", "10.42.64.64/26"]),
            false,
        );
        assert!(e.contains("/12 to /22"), "{e}");
    }

    #[test]
    fn subnets_are_one_per_zone_inside_the_vpc_and_apart() {
        let e = err(&vpn("172.16.0.0/22", &["10.42.64.0/26"]), false);
        assert!(
            e.contains("network.vpn.subnets") && e.contains("one subnet per zone"),
            "{e}"
        );
        let e = err(
            &vpn("172.16.0.0/22", &["10.42.64.0/26", "10.43.0.0/26"]),
            false,
        );
        assert!(
            e.contains("network.vpn.subnets[1]") && e.contains("not inside"),
            "{e}"
        );
        let e = err(
            &vpn("172.16.0.0/22", &["10.42.64.0/26", "10.42.17.0/26"]),
            false,
        );
        assert!(e.contains("overlaps network.private_subnets[0]"), "{e}");
        let e = err(
            &vpn("172.16.0.0/22", &["10.42.64.0/26", "10.42.64.64/28"]),
            false,
        );
        assert!(e.contains("/27"), "{e}");
    }

    #[test]
    fn certificates_are_acm_arns() {
        let mut v = vpn("172.16.0.0/22", &["10.42.64.0/26", "10.42.64.64/26"]);
        v.client_root_certificate_arn = "arn:aws:iam::123456789012:server-certificate/x".into();
        let e = err(&v, false);
        assert!(e.contains("network.vpn.client_root_certificate_arn"), "{e}");
        assert!(is_acm_arn(
            "arn:aws-us-gov:acm:us-gov-west-1:123456789012:certificate/abc-1"
        ));
        assert!(!is_acm_arn("arn:aws:acm:us-east-1:1234:certificate/abc"));
        assert!(!is_acm_arn(
            "arn:aws:acm:us-east-1:123456789012:certificate/"
        ));
    }

    #[test]
    fn ssh_cidr_next_to_a_vpn_is_refused_naming_it() {
        let e = err(
            &vpn("172.16.0.0/22", &["10.42.64.0/26", "10.42.64.64/26"]),
            true,
        );
        assert!(
            e.contains("network.ssh_cidr") && e.contains("through the VPN"),
            "{e}"
        );
    }

    #[test]
    fn dns_servers_and_port_are_checked() {
        let mut v = vpn("172.16.0.0/22", &["10.42.64.0/26", "10.42.64.64/26"]);
        v.dns_servers = vec!["10.42.0.2".into(), "dns".into()];
        assert!(err(&v, false).contains("network.vpn.dns_servers[1]"));
        v.dns_servers.clear();
        v.port = 8443;
        assert!(err(&v, false).contains("network.vpn.port"));
    }
}
