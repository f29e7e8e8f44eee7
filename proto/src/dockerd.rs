//! `[dockerd]` and `[classes.X.dockerd]`: the dockerd settings operators give their build
//! machines (docker+machine's `--engine-*` options), typed and validated, and how they
//! become daemon.json keys and dockerd's proxy environment.
//!
//! Only settings that cannot fight Flotilla's own are expressible: `hosts` and the `tls*`
//! keys are Flotilla's (they make the machine reachable only over mutual TLS) and have no
//! field here, so a conflict is a parse error naming the key (unknown keys are refused).
//! On the machine these keys are merged over the AMI's own daemon.json, Flotilla's winning
//! (see [`crate::bootstrap`]).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// daemon.json keys Flotilla always sets itself: listening only with TLS verification.
pub const FLOTILLA_OWNED_KEYS: [&str; 6] = [
    "hosts",
    "tls",
    "tlsverify",
    "tlscacert",
    "tlscert",
    "tlskey",
];

/// dockerd settings; every key is optional so a class can override the fleet's key by key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerdSettings {
    /// Pull-through mirrors of Docker Hub (`registry-mirrors`), e.g. `https://mirror:5000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_mirrors: Option<Vec<String>>,
    /// Registries reached over plain HTTP or unverified TLS (`insecure-registries`):
    /// `host[:port]` or a CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_registries: Option<Vec<String>>,
    /// MTU of Docker's bridge (`mtu`), e.g. 1450 inside a VPN or overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Where dockerd keeps images and containers (`data-root`), e.g. an instance-store mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_root: Option<String>,
    /// Default logging driver of containers (`log-driver`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_driver: Option<String>,
    /// Options of the logging driver (`log-opts`), e.g. `max-size = "50m"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_opts: Option<BTreeMap<String, String>>,
    /// Address pools of the networks jobs create (`default-address-pools`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_address_pools: Option<Vec<AddressPool>>,
    /// Proxy for dockerd's own HTTP traffic (pulls, pushes): `HTTP_PROXY` in its environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_proxy: Option<String>,
    /// `HTTPS_PROXY` in dockerd's environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_proxy: Option<String>,
    /// `NO_PROXY` in dockerd's environment: comma-separated hosts, domains or CIDRs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_proxy: Option<String>,
}

/// One of dockerd's `default-address-pools`: networks of `size` bits carved out of `base`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressPool {
    /// IPv4 CIDR, e.g. `"172.80.0.0/16"`.
    pub base: String,
    /// Prefix length of each network, e.g. 24 (at least the base's).
    pub size: u8,
}

impl DockerdSettings {
    /// These settings with `over`'s keys replacing them where `over` sets one.
    pub fn overridden_by(&self, over: &Self) -> Self {
        fn pick<T: Clone>(base: &Option<T>, over: &Option<T>) -> Option<T> {
            over.clone().or_else(|| base.clone())
        }
        Self {
            registry_mirrors: pick(&self.registry_mirrors, &over.registry_mirrors),
            insecure_registries: pick(&self.insecure_registries, &over.insecure_registries),
            mtu: pick(&self.mtu, &over.mtu),
            data_root: pick(&self.data_root, &over.data_root),
            log_driver: pick(&self.log_driver, &over.log_driver),
            log_opts: pick(&self.log_opts, &over.log_opts),
            default_address_pools: pick(&self.default_address_pools, &over.default_address_pools),
            http_proxy: pick(&self.http_proxy, &over.http_proxy),
            https_proxy: pick(&self.https_proxy, &over.https_proxy),
            no_proxy: pick(&self.no_proxy, &over.no_proxy),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The daemon.json keys these settings set (proxies excepted: see [`Self::proxy_env`]).
    pub fn daemon_json(&self) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::{json, Value};
        let mut m = serde_json::Map::new();
        if let Some(v) = &self.registry_mirrors {
            m.insert("registry-mirrors".into(), json!(v));
        }
        if let Some(v) = &self.insecure_registries {
            m.insert("insecure-registries".into(), json!(v));
        }
        if let Some(v) = self.mtu {
            m.insert("mtu".into(), json!(v));
        }
        if let Some(v) = &self.data_root {
            m.insert("data-root".into(), Value::String(v.clone()));
        }
        if let Some(v) = &self.log_driver {
            m.insert("log-driver".into(), Value::String(v.clone()));
        }
        if let Some(v) = &self.log_opts {
            m.insert("log-opts".into(), json!(v));
        }
        if let Some(pools) = &self.default_address_pools {
            let pools: Vec<Value> = pools
                .iter()
                .map(|p| json!({"base": p.base, "size": p.size}))
                .collect();
            m.insert("default-address-pools".into(), Value::Array(pools));
        }
        m
    }

    /// dockerd's proxy environment (`HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`), set by a
    /// systemd drop-in: every dockerd version honours it (daemon.json's `proxies` needs 23+).
    pub fn proxy_env(&self) -> Vec<(&'static str, &str)> {
        [
            ("HTTP_PROXY", &self.http_proxy),
            ("HTTPS_PROXY", &self.https_proxy),
            ("NO_PROXY", &self.no_proxy),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }

    /// Every key within what dockerd accepts; `Err((key, what was expected))`, the key
    /// relative to this table. Proxy values are never echoed (they may carry a password).
    pub fn check(&self) -> Result<(), (String, String)> {
        let bad = |key: String, msg: String| Err((key, msg));
        for (i, url) in self.registry_mirrors.iter().flatten().enumerate() {
            if !is_url(url, &["http", "https"]) {
                return bad(
                    format!("registry_mirrors[{i}]"),
                    format!("{url:?} must be an http:// or https:// URL"),
                );
            }
        }
        for (i, r) in self.insecure_registries.iter().flatten().enumerate() {
            if r.is_empty() || r.contains("://") || r.contains(char::is_whitespace) {
                return bad(
                    format!("insecure_registries[{i}]"),
                    format!("{r:?} must be host[:port] or a CIDR, without a scheme"),
                );
            }
        }
        if let Some(mtu) = self.mtu {
            if !(68..=65_535).contains(&mtu) {
                return bad("mtu".into(), format!("{mtu} must be 68 to 65535"));
            }
        }
        if let Some(root) = &self.data_root {
            if !root.starts_with('/') || root.trim_end_matches('/').is_empty() {
                return bad(
                    "data_root".into(),
                    format!("{root:?} must be an absolute path other than /"),
                );
            }
        }
        if let Some(d) = &self.log_driver {
            if d.is_empty() || d.contains(char::is_whitespace) {
                return bad("log_driver".into(), format!("{d:?} must name a driver"));
            }
        }
        for k in self.log_opts.iter().flat_map(|o| o.keys()) {
            if k.is_empty() {
                return bad("log_opts".into(), "option names must not be empty".into());
            }
        }
        for (i, p) in self.default_address_pools.iter().flatten().enumerate() {
            let at = format!("default_address_pools[{i}]");
            let Some(prefix) = ipv4_cidr_prefix(&p.base) else {
                return bad(
                    format!("{at}.base"),
                    format!("{:?} must be an IPv4 CIDR like 172.80.0.0/16", p.base),
                );
            };
            if !(prefix..=30).contains(&p.size) {
                return bad(
                    format!("{at}.size"),
                    format!(
                        "{} must be between the base's prefix ({prefix}) and 30",
                        p.size
                    ),
                );
            }
        }
        for (key, v) in [
            ("http_proxy", &self.http_proxy),
            ("https_proxy", &self.https_proxy),
        ] {
            if let Some(v) = v {
                if !is_url(v, &["http", "https", "socks5"]) {
                    return bad(
                        key.into(),
                        "must be an http://, https:// or socks5:// URL".into(),
                    );
                }
            }
        }
        if let Some(v) = &self.no_proxy {
            if v.is_empty() || v.contains(char::is_whitespace) || v.contains('"') {
                return bad(
                    "no_proxy".into(),
                    "must be a comma-separated list of hosts, domains or CIDRs, without spaces"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

/// `scheme://host...` with one of `schemes`, a host, no whitespace or quotes (the value
/// goes into a systemd unit and JSON).
fn is_url(s: &str, schemes: &[&str]) -> bool {
    let Some((scheme, rest)) = s.split_once("://") else {
        return false;
    };
    let host = rest.rsplit('@').next().unwrap_or_default();
    schemes.contains(&scheme)
        && !host.is_empty()
        && !host.starts_with(['/', ':'])
        && !s.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\')
}

/// The prefix length of `a.b.c.d/n`, if it is one.
fn ipv4_cidr_prefix(s: &str) -> Option<u8> {
    let (addr, prefix) = s.split_once('/')?;
    addr.parse::<Ipv4Addr>().ok()?;
    prefix.parse::<u8>().ok().filter(|p| *p <= 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml_text: &str) -> DockerdSettings {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn a_class_overrides_the_fleet_key_by_key() {
        let fleet = settings("mtu = 1450\nregistry_mirrors = [\"https://m\"]");
        let class = settings("mtu = 9001\ndata_root = \"/mnt/docker\"");
        let merged = fleet.overridden_by(&class);
        assert_eq!(merged.mtu, Some(9001));
        assert_eq!(merged.data_root.as_deref(), Some("/mnt/docker"));
        assert_eq!(merged.registry_mirrors, Some(vec!["https://m".to_string()]));
    }

    #[test]
    fn daemon_json_uses_dockerd_names_and_leaves_proxies_to_the_environment() {
        let s = settings(
            "registry_mirrors = [\"https://m\"]\ninsecure_registries = [\"10.0.0.0/8\"]\n\
             mtu = 1450\nlog_opts = { max-size = \"50m\" }\nhttp_proxy = \"http://p:3128\"\n\
             default_address_pools = [{ base = \"172.80.0.0/16\", size = 24 }]",
        );
        let j = serde_json::Value::Object(s.daemon_json());
        assert_eq!(j["registry-mirrors"][0], "https://m");
        assert_eq!(j["insecure-registries"][0], "10.0.0.0/8");
        assert_eq!(j["mtu"], 1450);
        assert_eq!(j["log-opts"]["max-size"], "50m");
        assert_eq!(j["default-address-pools"][0]["size"], 24);
        assert!(j.get("http-proxy").is_none() && j.get("proxies").is_none());
        assert_eq!(s.proxy_env(), vec![("HTTP_PROXY", "http://p:3128")]);
    }

    #[test]
    fn flotilla_owned_keys_cannot_be_set() {
        for key in FLOTILLA_OWNED_KEYS {
            let err = toml::from_str::<DockerdSettings>(&format!("{key} = true")).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, key) in [
            (
                "registry_mirrors = [\"mirror:5000\"]",
                "registry_mirrors[0]",
            ),
            (
                "insecure_registries = [\"http://r\"]",
                "insecure_registries[0]",
            ),
            ("mtu = 40", "mtu"),
            ("data_root = \"docker\"", "data_root"),
            ("data_root = \"/\"", "data_root"),
            (
                "default_address_pools = [{ base = \"172.80.0.0\", size = 24 }]",
                "default_address_pools[0].base",
            ),
            (
                "default_address_pools = [{ base = \"172.80.0.0/16\", size = 8 }]",
                "default_address_pools[0].size",
            ),
            ("http_proxy = \"proxy:3128\"", "http_proxy"),
            ("https_proxy = \"http://u:secret@p 1\"", "https_proxy"),
            ("no_proxy = \"a, b\"", "no_proxy"),
        ] {
            let (k, msg) = settings(text).check().unwrap_err();
            assert_eq!(k, key, "{text}: {msg}");
            assert!(!msg.contains("secret"), "{msg}");
        }
        settings(
            "registry_mirrors = [\"https://mirror.internal:5000\"]\n\
             insecure_registries = [\"registry.internal:5000\", \"10.0.0.0/8\"]\n\
             mtu = 9001\ndata_root = \"/mnt/docker\"\n\
             http_proxy = \"http://user:pw@proxy:3128\"\nno_proxy = \"localhost,.internal,10.0.0.0/8\"",
        )
        .check()
        .unwrap();
    }
}
