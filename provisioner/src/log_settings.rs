//! The stack file's `[logs]` section: the CloudWatch Logs group the runner hosts and
//! build machines ship their journals to and the daemon saves broken or lost machines'
//! reports in, and its retention. Its own module (not `stack`) so `stack` only names it.

use serde::{Deserialize, Serialize};

use flotilla_proto::config::Invalid;

/// Retention periods CloudWatch Logs accepts (`PutRetentionPolicy`), in days.
pub(crate) const RETENTION_DAYS: [u32; 22] = [
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922,
    3288, 3653,
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogSettings {
    /// The log group; `/flotilla/<stack>` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) group: Option<String>,
    /// Days CloudWatch keeps events (one of [`RETENTION_DAYS`]).
    #[serde(default = "default_retention")]
    pub(crate) retention_days: u32,
}

fn default_retention() -> u32 {
    30
}

impl LogSettings {
    pub(crate) fn group(&self, stack: &str) -> String {
        self.group
            .clone()
            .unwrap_or_else(|| format!("/flotilla/{stack}"))
    }

    pub(crate) fn validate(&self) -> Result<(), Invalid> {
        if let Some(g) = &self.group {
            if !flotilla_proto::logs::is_log_group_name(g) {
                return Err(Invalid {
                    key: "logs.group".into(),
                    message: format!(
                        "{g:?} is not a CloudWatch Logs group name (1-512 characters of \
                         letters, digits, '_', '-', '/', '.' and '#')"
                    ),
                });
            }
        }
        if !RETENTION_DAYS.contains(&self.retention_days) {
            return Err(Invalid {
                key: "logs.retention_days".into(),
                message: format!(
                    "{} is not a retention CloudWatch Logs accepts (one of {})",
                    self.retention_days,
                    RETENTION_DAYS.map(|d| d.to_string()).join(", ")
                ),
            });
        }
        Ok(())
    }
}

/// Sets the daemon's `logs.group` in its config table (unless `[fleet.logs]` already
/// names one), so it saves machine reports to the stack's group.
pub(crate) fn fill_daemon_logs(fleet: &mut toml::Table, group: &str) {
    let logs = fleet
        .entry("logs")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let Some(logs) = logs.as_table_mut() {
        logs.entry("group").or_insert_with(|| group.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_defaults_to_the_stack_and_retention_is_checked() {
        let s = LogSettings {
            group: None,
            retention_days: 30,
        };
        assert_eq!(s.group("ci"), "/flotilla/ci");
        assert!(s.validate().is_ok());
        let e = LogSettings {
            retention_days: 31,
            ..s.clone()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.key, "logs.retention_days");
        assert!(e.message.contains("30, 60"), "{}", e.message);
        let e = LogSettings {
            group: Some("bad group".into()),
            ..s
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.key, "logs.group");
    }
}
