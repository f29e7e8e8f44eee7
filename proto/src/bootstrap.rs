//! The build-machine bootstrap contract: what the daemon puts in a machine's user data and
//! what the machine (cloud-init, or the sandbox's machine emulator) does with it.
//!
//! User data is `#cloud-config` followed by JSON (cloud-init accepts JSON as YAML), so it
//! can be rendered and parsed without a YAML library. It writes the fleet CA, the machine's
//! own server certificate and key, and Flotilla's part of the dockerd configuration (TLS
//! verification on [`DOCKER_TLS_PORT`], the operator's `[dockerd]` keys) to
//! [`FLOTILLA_DAEMON_JSON_PATH`]; then merges it over the AMI's daemon.json with
//! [`MERGE_DAEMON_JSON`] (python3: cloud-init's own language, so on every image that runs
//! it), Flotilla's keys winning, and restarts Docker.

use serde::{Deserialize, Serialize};

use crate::boot_hooks::{self, UserDataPart};
use crate::cloud_files::root_owner;
pub use crate::cloud_files::WriteFile;
use crate::dockerd::DockerdSettings;
use crate::journal::{self, ShipperConfig};

/// dockerd's TLS port on every build machine.
pub const DOCKER_TLS_PORT: u16 = 2376;
pub const CA_CERT_PATH: &str = "/etc/flotilla/tls/ca.pem";
pub const SERVER_CERT_PATH: &str = "/etc/flotilla/tls/server-cert.pem";
pub const SERVER_KEY_PATH: &str = "/etc/flotilla/tls/server-key.pem";
pub const DAEMON_JSON_PATH: &str = "/etc/docker/daemon.json";
/// Flotilla's part of daemon.json, merged over the AMI's at boot.
pub const FLOTILLA_DAEMON_JSON_PATH: &str = "/etc/flotilla/daemon.json";
/// The merge program [`MERGE_DAEMON_JSON`] on the machine.
pub const MERGE_SCRIPT_PATH: &str = "/etc/flotilla/merge-daemon-json.py";
/// Merges `argv[1]` (Flotilla's keys) over `argv[2]` (the AMI's daemon.json, if any) and
/// replaces `argv[2]` atomically. The AMI's keys stay unless Flotilla sets them; an AMI
/// file that is not a JSON object is kept aside as `daemon.json.ami` (dockerd would refuse
/// it anyway). The machine emulator runs this same program.
pub const MERGE_DAEMON_JSON: &str = r#"import json, os, sys
ours_path, target = sys.argv[1], sys.argv[2]
with open(ours_path) as f:
    ours = json.load(f)
theirs = {}
if os.path.exists(target):
    try:
        with open(target) as f:
            theirs = json.load(f)
    except ValueError:
        theirs = None
    if not isinstance(theirs, dict):
        os.replace(target, target + ".ami")
        theirs = {}
theirs.update(ours)
os.makedirs(os.path.dirname(target), exist_ok=True)
tmp = target + ".flotilla"
with open(tmp, "w") as f:
    json.dump(theirs, f, indent=2, sort_keys=True)
os.chmod(tmp, 0o644)
os.replace(tmp, target)
"#;
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
    /// The class's `[dockerd]` settings (fleet's, class's over them).
    pub dockerd: &'a DockerdSettings,
    /// Ship the machine's journal (`[logs]` with a group): the shipper's configuration.
    pub journal: Option<&'a ShipperConfig>,
}

/// The subset of cloud-config Flotilla uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudConfig {
    pub write_files: Vec<WriteFile>,
    #[serde(default)]
    pub runcmd: Vec<Vec<String>>,
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
    #[error("user data is {size} bytes (with the class's user_data_parts and, with a [logs] group, the journal shipper), above EC2's limit of {MAX_USER_DATA_BYTES}")]
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
            encoding: None,
        };
        let daemon_json = flotilla_daemon_json(b.dockerd);
        let mut dropin = "[Service]\nExecStart=\nExecStart=/usr/bin/dockerd\n".to_owned();
        for (name, value) in b.dockerd.proxy_env() {
            // Validation keeps quotes, backslashes and whitespace out of proxy values.
            dropin.push_str(&format!("Environment=\"{name}={value}\"\n"));
        }
        let mut cloud = Self {
            write_files: vec![
                file(CA_CERT_PATH, b.ca_cert_pem.into(), "0644"),
                file(SERVER_CERT_PATH, b.server_cert_pem.into(), "0644"),
                file(SERVER_KEY_PATH, b.server_key_pem.into(), "0600"),
                file(FLOTILLA_DAEMON_JSON_PATH, daemon_json, "0644"),
                file(MERGE_SCRIPT_PATH, MERGE_DAEMON_JSON.into(), "0755"),
                // Mode 0600 in case a proxy URL carries a password.
                file(SYSTEMD_DROPIN_PATH, dropin, "0600"),
                file(
                    "/etc/flotilla/machine-id",
                    format!("{}\n", b.machine_id),
                    "0644",
                ),
            ],
            runcmd: vec![
                vec![
                    "python3".into(),
                    MERGE_SCRIPT_PATH.into(),
                    FLOTILLA_DAEMON_JSON_PATH.into(),
                    DAEMON_JSON_PATH.into(),
                ],
                vec!["systemctl".into(), "daemon-reload".into()],
                vec!["systemctl".into(), "restart".into(), "docker".into()],
            ],
        };
        if let Some(journal) = b.journal {
            let mut files = journal::cloud_init_files(journal);
            for f in &mut files {
                f.owner = root_owner();
            }
            cloud.write_files.extend(files);
            cloud.runcmd.push(journal::enable_command());
        }
        cloud
    }

    /// `#cloud-config` + JSON, checked against EC2's size limit.
    pub fn render(&self) -> Result<String, BootstrapError> {
        self.render_with(&[])
    }

    /// This part, then a class's `user_data_parts` (a MIME multipart when there are any),
    /// checked against EC2's size limit.
    pub fn render_with(&self, parts: &[UserDataPart]) -> Result<String, BootstrapError> {
        let ours = format!("#cloud-config\n{}\n", serde_json::to_string(self)?);
        let text = boot_hooks::render_multipart(&ours, parts);
        if text.len() > MAX_USER_DATA_BYTES {
            return Err(BootstrapError::TooLarge { size: text.len() });
        }
        Ok(text)
    }

    /// Flotilla's own part of user data (plain, or the first part of a multipart).
    pub fn parse(user_data: &str) -> Result<Self, BootstrapError> {
        let (ours, _) =
            boot_hooks::split_multipart(user_data).ok_or(BootstrapError::NotCloudConfig)?;
        let body = ours
            .strip_prefix("#cloud-config")
            .ok_or(BootstrapError::NotCloudConfig)?;
        Ok(serde_json::from_str(body.trim())?)
    }

    pub fn file(&self, path: &str) -> Option<&WriteFile> {
        self.write_files.iter().find(|f| f.path == path)
    }

    /// Flotilla's part of the dockerd configuration (what wins over the AMI's).
    pub fn dockerd_config(&self) -> Result<DockerdConfig, BootstrapError> {
        let f = self
            .file(FLOTILLA_DAEMON_JSON_PATH)
            .ok_or(BootstrapError::Missing(FLOTILLA_DAEMON_JSON_PATH))?;
        Ok(serde_json::from_str(&f.content)?)
    }

    /// dockerd's environment from the systemd drop-in's `Environment="K=V"` lines.
    pub fn dockerd_env(&self) -> Vec<(String, String)> {
        self.file(SYSTEMD_DROPIN_PATH)
            .map(|f| {
                f.content
                    .lines()
                    .filter_map(|l| l.strip_prefix("Environment="))
                    .filter_map(|v| v.trim_matches('"').split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn machine_id(&self) -> Option<&str> {
        self.file("/etc/flotilla/machine-id")
            .map(|f| f.content.trim())
    }
}

/// Flotilla's daemon.json keys: the operator's settings, then the TLS keys over them
/// (the settings cannot name those, this keeps it so).
fn flotilla_daemon_json(settings: &DockerdSettings) -> String {
    let mut keys = settings.daemon_json();
    // A plain struct of strings and bools always serializes to an object.
    if let Ok(serde_json::Value::Object(tls)) =
        serde_json::to_value(DockerdConfig::flotilla_default())
    {
        keys.extend(tls);
    }
    serde_json::to_string_pretty(&serde_json::Value::Object(keys)).unwrap_or_default()
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
            dockerd: &DockerdSettings::default(),
            journal: None,
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
            dockerd: &DockerdSettings::default(),
            journal: None,
        };
        assert!(matches!(
            CloudConfig::for_machine(&b).render(),
            Err(BootstrapError::TooLarge { .. })
        ));
    }

    fn with_settings(dockerd: &DockerdSettings) -> CloudConfig {
        CloudConfig::for_machine(&MachineBootstrap {
            machine_id: "m-1",
            ca_cert_pem: "CA",
            server_cert_pem: "CERT",
            server_key_pem: "KEY",
            dockerd,
            journal: None,
        })
    }

    #[test]
    fn dockerd_settings_reach_flotillas_daemon_json_and_proxies_the_dropin() {
        let settings: DockerdSettings = toml::from_str(
            "mtu = 1450\ndata_root = \"/mnt/docker\"\n\
             http_proxy = \"http://u:pw@proxy:3128\"\nno_proxy = \"localhost,10.0.0.0/8\"",
        )
        .unwrap();
        let cloud = CloudConfig::parse(&with_settings(&settings).render().unwrap()).unwrap();
        let ours: serde_json::Value =
            serde_json::from_str(&cloud.file(FLOTILLA_DAEMON_JSON_PATH).unwrap().content).unwrap();
        assert_eq!(ours["mtu"], 1450);
        assert_eq!(ours["data-root"], "/mnt/docker");
        assert_eq!(ours["tlsverify"], true);
        assert_eq!(
            cloud.dockerd_env(),
            vec![
                (
                    "HTTP_PROXY".to_string(),
                    "http://u:pw@proxy:3128".to_string()
                ),
                ("NO_PROXY".to_string(), "localhost,10.0.0.0/8".to_string()),
            ]
        );
        assert_eq!(cloud.file(SYSTEMD_DROPIN_PATH).unwrap().permissions, "0600");
        // The merge runs before dockerd restarts.
        assert_eq!(cloud.runcmd[0][1], MERGE_SCRIPT_PATH);
        assert_eq!(cloud.runcmd.last().unwrap()[1], "restart");
    }

    /// Runs the merge program the machines run (python3) on files in a temp dir.
    fn merge(ami: Option<&str>, ours: &str) -> (serde_json::Value, bool) {
        let dir = std::env::temp_dir().join(format!(
            "flotilla-merge-{}-{}",
            std::process::id(),
            ami.map_or(0, str::len)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (ours_path, target) = (dir.join("ours.json"), dir.join("docker/daemon.json"));
        std::fs::write(&ours_path, ours).unwrap();
        if let Some(ami) = ami {
            std::fs::create_dir_all(dir.join("docker")).unwrap();
            std::fs::write(&target, ami).unwrap();
        }
        let status = std::process::Command::new("python3")
            .args(["-c", MERGE_DAEMON_JSON])
            .arg(&ours_path)
            .arg(&target)
            .status()
            .unwrap();
        assert!(status.success());
        let merged = serde_json::from_str(&std::fs::read_to_string(&target).unwrap()).unwrap();
        let kept_aside = dir.join("docker/daemon.json.ami").exists();
        std::fs::remove_dir_all(&dir).unwrap();
        (merged, kept_aside)
    }

    #[test]
    fn the_merge_keeps_the_amis_keys_and_flotillas_win() {
        let ours = flotilla_daemon_json(&toml::from_str("mtu = 1450").unwrap());
        let (merged, _) = merge(
            Some(r#"{"labels": ["ami=base"], "mtu": 1500, "hosts": ["fd://"], "tls": false}"#),
            &ours,
        );
        assert_eq!(merged["labels"][0], "ami=base");
        assert_eq!(merged["mtu"], 1450);
        assert_eq!(merged["tls"], true);
        assert!(merged["hosts"][0].as_str().unwrap().starts_with("tcp://"));
        let (alone, _) = merge(None, &ours);
        assert_eq!(alone["mtu"], 1450);
        let (broken, kept_aside) = merge(Some("not json"), &ours);
        assert!(kept_aside && broken["tlsverify"] == true);
    }

    #[test]
    fn dns_name_is_derived_from_machine_id() {
        assert_eq!(machine_dns_name("m-1"), "m-1.machine.flotilla.internal");
    }

    #[test]
    fn with_logs_the_journal_shipper_is_written_and_started_leaving_room_for_parts() {
        let journal = ShipperConfig::new(
            "/flotilla/ci",
            journal::BUILD_MACHINE_STREAMS,
            journal::BUILD_MACHINE_UNITS,
        );
        // Sizes of the fleet's real PEMs (ECDSA P-256) with room to spare.
        let (ca, cert, key) = ("c".repeat(800), "s".repeat(1000), "k".repeat(300));
        let b = MachineBootstrap {
            machine_id: "m-1",
            ca_cert_pem: &ca,
            server_cert_pem: &cert,
            server_key_pem: &key,
            dockerd: &DockerdSettings::default(),
            journal: Some(&journal),
        };
        let text = CloudConfig::for_machine(&b).render().unwrap();
        let parsed = CloudConfig::parse(&text).unwrap();
        let program = parsed.file(journal::SHIPPER_PATH).unwrap();
        assert_eq!(program.bytes().unwrap(), journal::SHIPPER.as_bytes());
        assert!(parsed.file(journal::UNIT_PATH).is_some());
        assert_eq!(parsed.runcmd.last(), Some(&journal::enable_command()));
        // What is left for the class's user_data_parts.
        let left = MAX_USER_DATA_BYTES - text.len();
        assert!(left > 5 * 1024, "{left} bytes left");
        let without = CloudConfig::for_machine(&MachineBootstrap { journal: None, ..b });
        assert!(without.file(journal::SHIPPER_PATH).is_none());
    }
}
