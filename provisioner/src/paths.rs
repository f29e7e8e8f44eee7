//! Where things live on a runner host: the paths the user data writes and installs to,
//! which the rendered configs, the boot scripts and the Run Command scripts all refer
//! to. Plain constants in a module of their own, so that the stack schema, the renderers
//! and cloud-init share them without depending on each other.

/// Where the daemon's config goes on a runner host (the daemon's default path).
pub(crate) const FLOTILLA_TOML_PATH: &str = flotilla_proto::config::DEFAULT_CONFIG_PATH;
/// The daemon's state directory on a runner host (CA, state file, socket).
pub(crate) const STATE_DIR: &str = "/var/lib/flotilla";
/// gitlab-runner's config, as written by the boot script (with the token).
pub(crate) const RUNNER_CONFIG_PATH: &str = "/etc/gitlab-runner/config.toml";
/// The token-less template cloud-init writes.
pub(crate) const RUNNER_CONFIG_TEMPLATE_PATH: &str = "/etc/gitlab-runner/config.toml.in";
/// Replaced at boot with the runner authentication token read from SSM.
pub(crate) const TOKEN_PLACEHOLDER: &str = "@FLOTILLA_RUNNER_TOKEN@";
/// The flotilla binary, installed by the user data.
pub(crate) const FLOTILLA_BIN: &str = "/usr/local/bin/flotilla";
/// gitlab-runner, installed by the user data.
pub(crate) const GITLAB_RUNNER_BIN: &str = "/usr/local/bin/gitlab-runner";
/// Replaced at first boot with the host's private IPv4 address (from IMDS): what the
/// metrics endpoints listen on with `[monitoring]`, known only once the host runs.
pub(crate) const PRIVATE_IPV4_PLACEHOLDER: &str = "@FLOTILLA_PRIVATE_IPV4@";
