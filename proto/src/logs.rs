//! Where a build machine's console output and last dockerd events go when the daemon
//! marks it broken or lost (`[logs]` in `flotilla.toml`), and how that place is named.
//!
//! The location is a pure function of the config and the machine id, so a stage can
//! name it in a job's failure message without waiting for the daemon to write it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::journal::{ShipperConfig, BUILD_MACHINE_STREAMS, BUILD_MACHINE_UNITS};

/// `[logs]`: off (the state directory) unless `group` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsConfig {
    /// CloudWatch Logs group (it must exist; `flotilla-provision` creates it) that
    /// receives stream `machines/<machine-id>`. Unset: `<state_dir>/machines/<id>.log`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Overrides the CloudWatch Logs endpoint (default: `aws.endpoint_url`, then the SDK's
    /// chain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
}

/// The directory under `state_dir` holding saved machine reports when logging is off.
pub const MACHINES_DIR: &str = "machines";

/// Where one broken or lost machine's report is saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachineLog {
    /// A CloudWatch Logs stream.
    Stream { group: String, stream: String },
    /// A file on the runner host (mode 0600).
    File(PathBuf),
}

impl std::fmt::Display for MachineLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stream { group, stream } => {
                write!(f, "CloudWatch Logs group {group}, stream {stream}")
            }
            Self::File(p) => write!(f, "{} on the runner host", p.display()),
        }
    }
}

impl LogsConfig {
    /// Nothing set (the default), so not written out.
    pub fn is_off(&self) -> bool {
        *self == Self::default()
    }

    /// The build machines' journal shipper, when a group is set: streams
    /// `build-machines/<instance-id>`, through `endpoint_url` when set (the machines do not
    /// use `aws.endpoint_url`, the runner host's).
    pub fn build_machine_journal(&self) -> Option<ShipperConfig> {
        let group = self.group.as_deref()?;
        let mut c = ShipperConfig::new(group, BUILD_MACHINE_STREAMS, BUILD_MACHINE_UNITS);
        c.endpoint_url.clone_from(&self.endpoint_url);
        Some(c)
    }

    /// Where machine `machine_id`'s report goes.
    pub fn machine_log(&self, state_dir: &Path, machine_id: &str) -> MachineLog {
        match &self.group {
            Some(group) => MachineLog::Stream {
                group: group.clone(),
                stream: format!("machines/{machine_id}"),
            },
            None => MachineLog::File(
                state_dir
                    .join(MACHINES_DIR)
                    .join(format!("{machine_id}.log")),
            ),
        }
    }

    /// `logs.group` as CloudWatch allows it (1-512 of `[A-Za-z0-9_./#-]`) and an http(s)
    /// endpoint: the first broken rule as (key, message). `config` turns it into its
    /// `Invalid` (this module does not depend on `config`, which holds it).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(g) = &self.group {
            if !is_log_group_name(g) {
                return Err((
                    "logs.group",
                    format!(
                        "{g:?} is not a CloudWatch Logs group name (1-512 characters of \
                         letters, digits, '_', '-', '/', '.' and '#')"
                    ),
                ));
            }
        }
        if let Some(u) = &self.endpoint_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err((
                    "logs.endpoint_url",
                    format!("{u:?} is not an http:// or https:// URL"),
                ));
            }
        }
        Ok(())
    }
}

/// CloudWatch Logs' rule for group names.
pub fn is_log_group_name(g: &str) -> bool {
    (1..=512).contains(&g.len())
        && g.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-/.#".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_follows_the_config() {
        let off = LogsConfig::default();
        assert_eq!(
            off.machine_log(Path::new("/var/lib/flotilla"), "m-1")
                .to_string(),
            "/var/lib/flotilla/machines/m-1.log on the runner host"
        );
        let on = LogsConfig {
            group: Some("/flotilla/prod".into()),
            endpoint_url: None,
        };
        assert_eq!(
            on.machine_log(Path::new("/x"), "m-1"),
            MachineLog::Stream {
                group: "/flotilla/prod".into(),
                stream: "machines/m-1".into()
            }
        );
    }

    #[test]
    fn bad_group_and_endpoint_are_named() {
        let e = LogsConfig {
            group: Some("a b".into()),
            endpoint_url: None,
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.0, "logs.group");
        let e = LogsConfig {
            group: None,
            endpoint_url: Some("ftp://x".into()),
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.0, "logs.endpoint_url");
        assert!(!is_log_group_name(""));
        assert!(is_log_group_name("/flotilla/prod-1"));
    }
}
