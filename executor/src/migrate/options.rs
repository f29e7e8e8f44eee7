//! What the conversion needs besides the input text ([`Options`]: the input's name, the
//! fleet name, paths and the AMI and subnets given on the command line, the runners
//! selected). A leaf shared by `convert`, `class` and `fleet`.

use std::path::PathBuf;

/// What the conversion needs besides the input text.
#[derive(Debug, Clone)]
pub struct Options {
    /// The input's name in messages (its path).
    pub source: String,
    pub fleet: Option<String>,
    pub state_dir: PathBuf,
    /// The flotilla binary and the flotilla.toml path written into `[runners.custom]`.
    pub binary: String,
    pub config_path: String,
    /// For runners whose `MachineOptions` set no AMI / subnet.
    pub ami: Option<String>,
    pub subnets: Vec<String>,
    /// Runner names to migrate; empty: every docker+machine runner.
    pub runners: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            source: "config.toml".into(),
            fleet: None,
            state_dir: PathBuf::from("/var/lib/flotilla"),
            binary: "/usr/local/bin/flotilla".into(),
            config_path: flotilla_proto::config::DEFAULT_CONFIG_PATH.into(),
            ami: None,
            subnets: Vec::new(),
            runners: Vec::new(),
        }
    }
}
