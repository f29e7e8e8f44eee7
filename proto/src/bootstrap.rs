//! The build-machine bootstrap contract: what the daemon puts in a machine's user data and
//! what the machine (cloud-init, or the sandbox's machine emulator) does with it.
//!
//! User data is `#cloud-config` followed by JSON (cloud-init accepts JSON as YAML), so it
//! can be rendered and parsed without a YAML library. It writes the fleet CA, the machine's
//! own server certificate and key, and a dockerd configuration that listens only with TLS
//! verification on [`DOCKER_TLS_PORT`]; then restarts Docker.

use serde::{Deserialize, Serialize};

/// dockerd's TLS port on every build machine.
pub const DOCKER_TLS_PORT: u16 = 2376;
pub const CA_CERT_PATH: &str = "/etc/flotilla/tls/ca.pem";
pub const SERVER_CERT_PATH: &str = "/etc/flotilla/tls/server-cert.pem";
pub const SERVER_KEY_PATH: &str = "/etc/flotilla/tls/server-key.pem";
pub const DAEMON_JSON_PATH: &str = "/etc/docker/daemon.json";
/// Debian/Ubuntu start dockerd with `-H fd://`, which conflicts with `hosts` in
/// daemon.json; this drop-in clears it.
pub const SYSTEMD_DROPIN_PATH: &str = "/etc/systemd/system/docker.service.d/flotilla.conf";
/// EC2 rejects user data above 16 KiB (before base64).
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;

/// DNS suffix of the names machines carry in their server certificates.
pub const MACHINE_DNS_SUFFIX: &str = "machine.flotilla.internal";

/// How long a machine's server certificate is valid. A machine is retired before then: after
/// its class's `max_age` once idle, and validation keeps `max_age` plus the longest lease
/// ([`SERVER_CERT_MARGIN`] on top) within this.
pub const SERVER_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);
/// Slack between a machine's `max_age` plus `lease_timeout` and its certificate's expiry
/// (a reconcile loop stalled by EC2 outages, a daemon stopped for a while).
pub const SERVER_CERT_MARGIN: std::time::Duration = std::time::Duration::from_secs(86_400);

/// The name a machine's server certificate carries and clients verify.
pub fn machine_dns_name(machine_id: &str) -> String {
    format!("{machine_id}.{MACHINE_DNS_SUFFIX}")
}

/// What one machine needs to come up reachable only over mutual TLS.
#[derive(Debug, Clone)]
pub struct MachineBootstrap<'a> {
    pub machine_id: &'a str,
    pub ca_cert_pem: &'a str,
    pub server_cert_pem: &'a str,
    pub server_key_pem: &'a str,
}

/// The subset of cloud-config Flotilla uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudConfig {
    pub write_files: Vec<WriteFile>,
    #[serde(default)]
    pub runcmd: Vec<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFile {
    pub path: String,
    pub content: String,
    /// Octal mode as cloud-init expects it, e.g. `"0600"`.
    pub permissions: String,
    #[serde(default = "root_owner")]
    pub owner: String,
}

fn root_owner() -> String {
    "root:root".into()
}

/// dockerd's daemon.json as Flotilla writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerdConfig {
    pub hosts: Vec<String>,
    pub tls: bool,
    pub tlsverify: bool,
    pub tlscacert: String,
    pub tlscert: String,
    pub tlskey: String,
}

impl DockerdConfig {
    pub fn flotilla_default() -> Self {
        Self {
            hosts: vec![
                format!("tcp://0.0.0.0:{DOCKER_TLS_PORT}"),
                "unix:///var/run/docker.sock".into(),
            ],
            tls: true,
            tlsverify: true,
            tlscacert: CA_CERT_PATH.into(),
            tlscert: SERVER_CERT_PATH.into(),
            tlskey: SERVER_KEY_PATH.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("user data is {size} bytes, above EC2's limit of {MAX_USER_DATA_BYTES}")]
    TooLarge { size: usize },
    #[error("user data does not start with #cloud-config")]
    NotCloudConfig,
    #[error("user data is not valid cloud-config JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("user data has no {0}")]
    Missing(&'static str),
}

impl CloudConfig {
    pub fn for_machine(b: &MachineBootstrap<'_>) -> Self {
        let file = |path: &str, content: String, permissions: &str| WriteFile {
            path: path.into(),
            content,
            permissions: permissions.into(),
            owner: root_owner(),
        };
        // serde_json of a plain struct of strings and bools cannot fail.
        let daemon_json =
            serde_json::to_string_pretty(&DockerdConfig::flotilla_default()).unwrap_or_default();
        Self {
            write_files: vec![
                file(CA_CERT_PATH, b.ca_cert_pem.into(), "0644"),
                file(SERVER_CERT_PATH, b.server_cert_pem.into(), "0644"),
                file(SERVER_KEY_PATH, b.server_key_pem.into(), "0600"),
                file(DAEMON_JSON_PATH, daemon_json, "0644"),
                file(
                    SYSTEMD_DROPIN_PATH,
                    "[Service]\nExecStart=\nExecStart=/usr/bin/dockerd\n".into(),
                    "0644",
                ),
                file(
                    "/etc/flotilla/machine-id",
                    format!("{}\n", b.machine_id),
                    "0644",
                ),
            ],
            runcmd: vec![
                vec!["systemctl".into(), "daemon-reload".into()],
                vec!["systemctl".into(), "restart".into(), "docker".into()],
            ],
        }
    }

    /// `#cloud-config` + JSON, checked against EC2's size limit.
    pub fn render(&self) -> Result<String, BootstrapError> {
        let text = format!("#cloud-config\n{}\n", serde_json::to_string(self)?);
        if text.len() > MAX_USER_DATA_BYTES {
            return Err(BootstrapError::TooLarge { size: text.len() });
        }
        Ok(text)
    }

    pub fn parse(user_data: &str) -> Result<Self, BootstrapError> {
        let body = user_data
            .strip_prefix("#cloud-config")
            .ok_or(BootstrapError::NotCloudConfig)?;
        Ok(serde_json::from_str(body.trim())?)
    }

    pub fn file(&self, path: &str) -> Option<&WriteFile> {
        self.write_files.iter().find(|f| f.path == path)
    }

    /// The dockerd configuration the machine will run with.
    pub fn dockerd_config(&self) -> Result<DockerdConfig, BootstrapError> {
        let f = self
            .file(DAEMON_JSON_PATH)
            .ok_or(BootstrapError::Missing(DAEMON_JSON_PATH))?;
        Ok(serde_json::from_str(&f.content)?)
    }

    pub fn machine_id(&self) -> Option<&str> {
        self.file("/etc/flotilla/machine-id")
            .map(|f| f.content.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips_and_carries_tls_files() {
        let b = MachineBootstrap {
            machine_id: "m-abc",
            ca_cert_pem: "CA",
            server_cert_pem: "CERT",
            server_key_pem: "KEY",
        };
        let text = CloudConfig::for_machine(&b).render().unwrap();
        assert!(text.starts_with("#cloud-config\n"));
        let parsed = CloudConfig::parse(&text).unwrap();
        assert_eq!(parsed.machine_id(), Some("m-abc"));
        let key = parsed.file(SERVER_KEY_PATH).unwrap();
        assert_eq!(
            (key.content.as_str(), key.permissions.as_str()),
            ("KEY", "0600")
        );
        let d = parsed.dockerd_config().unwrap();
        assert!(d.tlsverify);
        assert_eq!(d.tlscacert, CA_CERT_PATH);
        assert!(d.hosts.iter().any(|h| h.ends_with(":2376")));
    }

    #[test]
    fn oversized_user_data_is_refused() {
        let big = "x".repeat(MAX_USER_DATA_BYTES);
        let b = MachineBootstrap {
            machine_id: "m",
            ca_cert_pem: &big,
            server_cert_pem: "",
            server_key_pem: "",
        };
        assert!(matches!(
            CloudConfig::for_machine(&b).render(),
            Err(BootstrapError::TooLarge { .. })
        ));
    }

    #[test]
    fn dns_name_is_derived_from_machine_id() {
        assert_eq!(machine_dns_name("m-1"), "m-1.machine.flotilla.internal");
    }
}
