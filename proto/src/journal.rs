//! Journal shipping (`[logs]`): runner hosts and build machines send their journal for a
//! few units to the stack's CloudWatch Logs group, each into its own stream.
//!
//! The shipper ([`SHIPPER`]) is a python3 program using the standard library only
//! (cloud-init's language, so on every image that boots with it): it follows
//! `journalctl --output=json`, batches entries into `PutLogEvents`, signs with SigV4 using
//! the instance role (IMDSv2) and keeps a cursor file so a restart resumes where it left
//! off. No agent to install, no credentials of its own. Both the provisioner (hosts) and
//! the daemon (build machines) write it with cloud-init; this module holds what they share.

use serde::{Deserialize, Serialize};

use crate::cloud_files::{gz_b64, WriteFile};

/// The shipper program.
pub const SHIPPER: &str = include_str!("journal_shipper.py");
pub const SHIPPER_PATH: &str = "/usr/local/lib/flotilla/journal-shipper.py";
pub const CONFIG_PATH: &str = "/etc/flotilla/journal.json";
pub const CURSOR_PATH: &str = "/var/lib/flotilla/journal.cursor";
pub const UNIT_NAME: &str = "flotilla-journal.service";
pub const UNIT_PATH: &str = "/etc/systemd/system/flotilla-journal.service";

/// Streams of runner hosts: `hosts/<instance-id>`.
pub const HOST_STREAMS: &str = "hosts/";
/// Streams of build machines: `build-machines/<instance-id>` (their role may write only
/// these, so a job that reaches the instance's credentials cannot write over the hosts'
/// journals or the daemon's machine reports).
pub const BUILD_MACHINE_STREAMS: &str = "build-machines/";

/// What a runner host ships.
pub const HOST_UNITS: &[&str] = &[
    "gitlab-runner.service",
    "flotilla.service",
    "cloud-init-local.service",
    "cloud-init.service",
    "cloud-config.service",
    "cloud-final.service",
];
/// What a build machine ships.
pub const BUILD_MACHINE_UNITS: &[&str] = &[
    "docker.service",
    "containerd.service",
    "cloud-init-local.service",
    "cloud-init.service",
    "cloud-config.service",
    "cloud-final.service",
];

/// The shipper's configuration file ([`CONFIG_PATH`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipperConfig {
    pub group: String,
    /// The stream is this followed by the instance id (from IMDS unless `instance_id`).
    pub stream_prefix: String,
    pub units: Vec<String>,
    pub cursor_file: String,
    /// The CloudWatch Logs endpoint; unset: the region's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// Unset: from IMDS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Unset: from IMDS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// The journalctl program (tests give a stand-in); unset: `journalctl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journalctl: Option<String>,
    /// Keep following the journal (the service); false: ship what is there and exit.
    #[serde(default = "follow")]
    pub follow: bool,
}

fn follow() -> bool {
    true
}

impl ShipperConfig {
    /// A host's or machine's shipper for `group`: `stream_prefix` and `units` say which.
    pub fn new(group: &str, stream_prefix: &str, units: &[&str]) -> Self {
        Self {
            group: group.to_owned(),
            stream_prefix: stream_prefix.to_owned(),
            units: units.iter().map(|u| (*u).to_owned()).collect(),
            cursor_file: CURSOR_PATH.to_owned(),
            endpoint_url: None,
            region: None,
            instance_id: None,
            journalctl: None,
            follow: true,
        }
    }

    pub fn to_json(&self) -> String {
        // A struct of strings, lists and options always serializes.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// The files cloud-init writes for the shipper: the program (gzipped: user data is
/// limited to 16 KiB), its configuration and its unit.
pub fn cloud_init_files(config: &ShipperConfig) -> Vec<WriteFile> {
    let file = |path: &str, content: String, encoding: Option<&str>| WriteFile {
        path: path.to_owned(),
        content,
        permissions: "0644".to_owned(),
        owner: "root:root".to_owned(),
        encoding: encoding.map(str::to_owned),
    };
    vec![
        file(SHIPPER_PATH, shipper_gz_b64().to_owned(), Some("gz+b64")),
        file(CONFIG_PATH, config.to_json(), None),
        file(UNIT_PATH, UNIT.to_owned(), None),
    ]
}

/// [`SHIPPER`] gzipped and base64-encoded, computed once: config validation (every
/// stage call loads the config) and every launch need it.
fn shipper_gz_b64() -> &'static str {
    static ENCODED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ENCODED.get_or_init(|| gz_b64(SHIPPER.as_bytes()))
}

/// What the shipper adds to a machine's user data, in bytes (as JSON in the cloud-config).
pub fn user_data_bytes(config: &ShipperConfig) -> usize {
    let files = cloud_init_files(config);
    serde_json::to_string(&files).map_or(0, |s| s.len())
        + serde_json::to_string(&enable_command()).map_or(0, |s| s.len())
}

/// The `runcmd` entry that starts the shipper (after `systemctl daemon-reload`).
pub fn enable_command() -> Vec<String> {
    ["systemctl", "enable", "--now", "--no-block", UNIT_NAME]
        .map(str::to_owned)
        .to_vec()
}

/// The systemd unit. Restarted when it exits (a network outage it gave up on, an IMDS
/// hiccup at start); it never holds up boot or the units it ships.
pub const UNIT: &str = "[Unit]
Description=Flotilla: ship this machine's journal to CloudWatch Logs
After=network-online.target
Wants=network-online.target

[Service]
ExecStartPre=/bin/mkdir -p /var/lib/flotilla
ExecStart=/usr/bin/python3 /usr/local/lib/flotilla/journal-shipper.py /etc/flotilla/journal.json
Restart=always
RestartSec=10
Nice=10

[Install]
WantedBy=multi-user.target
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_runs_the_shipper_with_the_config_at_their_paths() {
        assert!(UNIT.contains(&format!("{SHIPPER_PATH} {CONFIG_PATH}")));
        assert!(UNIT.contains(&format!("mkdir -p {}", "/var/lib/flotilla")));
        assert!(CURSOR_PATH.starts_with("/var/lib/flotilla/"));
    }

    #[test]
    fn the_program_is_written_compressed_and_decodes_to_itself() {
        let files = cloud_init_files(&ShipperConfig::new("/g", BUILD_MACHINE_STREAMS, &[]));
        let program = files.iter().find(|f| f.path == SHIPPER_PATH).unwrap();
        assert_eq!(program.encoding.as_deref(), Some("gz+b64"));
        assert_eq!(program.bytes().unwrap(), SHIPPER.as_bytes());
        assert!(
            program.content.len() < SHIPPER.len() / 2,
            "{}",
            program.content.len()
        );
        let config = files.iter().find(|f| f.path == CONFIG_PATH).unwrap();
        let parsed: ShipperConfig = serde_json::from_slice(&config.bytes().unwrap()).unwrap();
        assert_eq!(parsed.stream_prefix, BUILD_MACHINE_STREAMS);
    }

    #[test]
    fn the_config_round_trips_and_defaults_to_following() {
        let c = ShipperConfig::new("/g", HOST_STREAMS, HOST_UNITS);
        let back: ShipperConfig = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(back, c);
        assert!(back.follow);
        let minimal: ShipperConfig = serde_json::from_str(
            r#"{"group":"/g","stream_prefix":"hosts/","units":[],"cursor_file":"/c"}"#,
        )
        .unwrap();
        assert!(minimal.follow);
        assert!(c.units.contains(&"gitlab-runner.service".to_owned()));
    }
}
