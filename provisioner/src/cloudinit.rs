//! The runner hosts' user data: `#cloud-config` followed by JSON (cloud-init reads JSON
//! as YAML). It installs gitlab-runner and flotilla, writes `flotilla.toml` and the
//! token-less gitlab-runner `config.toml` template, a boot script that fills the token in
//! from SSM Parameter Store, and enables a systemd unit for each program.
//!
//! Invariant: the user data carries the parameter's NAME, never the token.

use serde_json::json;

use crate::render::{
    FLOTILLA_BIN, FLOTILLA_TOML_PATH, GITLAB_RUNNER_BIN, RUNNER_CONFIG_PATH,
    RUNNER_CONFIG_TEMPLATE_PATH, STATE_DIR, TOKEN_PLACEHOLDER,
};
use crate::stack::RunnerHosts;

pub const TOKEN_SCRIPT_PATH: &str = "/usr/local/sbin/flotilla-runner-token";
pub const INSTALL_SCRIPT_PATH: &str = "/usr/local/sbin/flotilla-install";
pub const FLOTILLA_UNIT_PATH: &str = "/etc/systemd/system/flotilla.service";
pub const RUNNER_UNIT_PATH: &str = "/etc/systemd/system/gitlab-runner.service";

/// What a runner host's user data is made of.
#[derive(Debug, Clone)]
pub struct HostUserData<'a> {
    pub hosts: &'a RunnerHosts,
    pub region: &'a str,
    pub token_param: &'a str,
    pub flotilla_toml: &'a str,
    pub runner_config_toml: &'a str,
}

/// Renders the user data. Every value interpolated into a shell script was validated to
/// contain no quotes or whitespace (URLs, checksums) or is a fixed name.
pub fn render(input: &HostUserData<'_>) -> String {
    let doc = json!({
        "package_update": true,
        "packages": input.hosts.packages,
        "write_files": [
            file(FLOTILLA_TOML_PATH, input.flotilla_toml, "0644"),
            file(RUNNER_CONFIG_TEMPLATE_PATH, input.runner_config_toml, "0600"),
            file(INSTALL_SCRIPT_PATH, &install_script(input.hosts), "0755"),
            file(TOKEN_SCRIPT_PATH, &token_script(input.region, input.token_param), "0755"),
            file(FLOTILLA_UNIT_PATH, FLOTILLA_UNIT, "0644"),
            file(RUNNER_UNIT_PATH, RUNNER_UNIT, "0644"),
        ],
        "runcmd": [
            [INSTALL_SCRIPT_PATH],
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", "flotilla.service", "gitlab-runner.service"],
        ],
    });
    format!(
        "#cloud-config\n{}\n",
        serde_json::to_string_pretty(&doc).expect("JSON renders")
    )
}

fn file(path: &str, content: &str, permissions: &str) -> serde_json::Value {
    json!({
        "path": path,
        "content": content,
        "permissions": permissions,
        "owner": "root:root",
    })
}

fn install_script(h: &RunnerHosts) -> String {
    let sum = |s: &Option<String>| s.clone().unwrap_or_default();
    format!(
        r#"#!/bin/sh
# Installs gitlab-runner and flotilla (written by flotilla-provision).
set -eu
fetch() {{
  url=$1 dest=$2 sum=$3
  curl --fail --silent --show-error --location --retry 5 --output "$dest.tmp" "$url"
  if [ -n "$sum" ]; then echo "$sum  $dest.tmp" | sha256sum -c -; fi
  chmod 0755 "$dest.tmp"
  mv "$dest.tmp" "$dest"
}}
fetch '{runner_url}' {runner_bin} '{runner_sum}'
fetch '{flotilla_url}' {flotilla_bin} '{flotilla_sum}'
install -d -m 0700 {state_dir} /var/lib/gitlab-runner
{flotilla_bin} check-config
"#,
        runner_url = h.gitlab_runner_url,
        runner_bin = GITLAB_RUNNER_BIN,
        runner_sum = sum(&h.gitlab_runner_sha256),
        flotilla_url = h.flotilla_url,
        flotilla_bin = FLOTILLA_BIN,
        flotilla_sum = sum(&h.flotilla_sha256),
        state_dir = STATE_DIR,
    )
}

fn token_script(region: &str, param: &str) -> String {
    format!(
        r#"#!/bin/sh
# Fills the GitLab runner token into gitlab-runner's config from SSM Parameter Store
# (run before every gitlab-runner start; the token never touches user data).
set -eu
token=$(aws ssm get-parameter --region '{region}' --name '{param}' --with-decryption \
  --query Parameter.Value --output text)
umask 077
TOKEN="$token" awk '{{ gsub(/{placeholder}/, ENVIRON["TOKEN"]); print }}' \
  {template} > {config}.new
mv {config}.new {config}
"#,
        placeholder = TOKEN_PLACEHOLDER,
        template = RUNNER_CONFIG_TEMPLATE_PATH,
        config = RUNNER_CONFIG_PATH,
    )
}

const FLOTILLA_UNIT: &str = "[Unit]
Description=Flotilla fleet manager
After=network-online.target
Wants=network-online.target

[Service]
Environment=FLOTILLA_CONFIG=/etc/flotilla/flotilla.toml
ExecStart=/usr/local/bin/flotilla daemon
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
";

const RUNNER_UNIT: &str = "[Unit]
Description=GitLab Runner (Flotilla custom executor)
After=network-online.target flotilla.service
Wants=network-online.target flotilla.service

[Service]
ExecStartPre=/usr/local/sbin/flotilla-runner-token
ExecStart=/usr/local/bin/gitlab-runner run --config /etc/gitlab-runner/config.toml --working-directory /var/lib/gitlab-runner --service gitlab-runner
Restart=always
RestartSec=30

[Install]
WantedBy=multi-user.target
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::tests::GOOD;
    use crate::stack::Stack;

    #[test]
    fn user_data_is_cloud_config_json_with_param_name_only() {
        let stack = Stack::from_toml(GOOD).unwrap();
        let ud = render(&HostUserData {
            hosts: &stack.runner_hosts,
            region: "us-east-1",
            token_param: "/flotilla/ci/runner-token",
            flotilla_toml: "fleet = \"ci\"\n",
            runner_config_toml: "concurrent = 1\n",
        });
        let body = ud.strip_prefix("#cloud-config\n").unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        let paths: Vec<&str> = v["write_files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["path"].as_str().unwrap())
            .collect();
        assert!(paths.contains(&"/etc/flotilla/flotilla.toml"));
        assert!(ud.contains("/flotilla/ci/runner-token"));
        assert!(ud.len() < flotilla_proto::bootstrap::MAX_USER_DATA_BYTES);
    }
}
