//! `flotilla config`: tells gitlab-runner where builds and caches live. Prints only JSON
//! on stdout and touches neither the daemon nor the network, so it returns in milliseconds.

use flotilla_proto::config::Config;
use serde_json::json;

pub fn render(config: &Config) -> String {
    json!({
        "driver": { "name": "flotilla", "version": env!("CARGO_PKG_VERSION") },
        "hostname": format!("flotilla-{}", config.fleet),
        "builds_dir": config.job.builds_dir,
        "cache_dir": config.job.cache_dir,
        "builds_dir_is_shared": false,
    })
    .to_string()
}
