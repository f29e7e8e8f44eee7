//! The runner hosts' user data: `#cloud-config` followed by JSON (cloud-init reads JSON
//! as YAML). It installs gitlab-runner, flotilla (from the stack's bucket with the host
//! role, through the VPC's S3 gateway endpoint, or from `runner_hosts.flotilla_url`;
//! either way checked against its SHA-256, which is in the user data, so a new binary
//! is a new user-data hash) and the SSM agent (what apply drains the host through before
//! replacing it), writes `flotilla.toml` and the token-less gitlab-runner `config.toml`
//! template, a boot script that fills the token in from SSM Parameter Store, and
//! enables a systemd unit for each program.
//!
//! Invariant: the user data carries the parameter's NAME, never the token.

use flotilla_proto::journal::{self, ShipperConfig};
use serde_json::json;

use crate::paths::{
    FLOTILLA_BIN, FLOTILLA_TOML_PATH, GITLAB_RUNNER_BIN, PRIVATE_IPV4_PLACEHOLDER,
    RUNNER_CONFIG_PATH, RUNNER_CONFIG_TEMPLATE_PATH, STATE_DIR, TOKEN_PLACEHOLDER,
};
use crate::stack::RunnerHosts;

pub(crate) const TOKEN_SCRIPT_PATH: &str = "/usr/local/sbin/flotilla-runner-token";
pub(crate) const INSTALL_SCRIPT_PATH: &str = "/usr/local/sbin/flotilla-install";
pub(crate) const FLOTILLA_UNIT_PATH: &str = "/etc/systemd/system/flotilla.service";
pub(crate) const RUNNER_UNIT_PATH: &str = "/etc/systemd/system/gitlab-runner.service";

/// Where a host downloads the flotilla binary from; the sum is checked before it is
/// installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlotillaSource<'a> {
    /// `runner_hosts.flotilla_url` with `flotilla_sha256`.
    Url { url: &'a str, sha256: &'a str },
    /// An object of the stack's bucket (`aws s3 cp` with the host role).
    Bucket {
        bucket: &'a str,
        key: &'a str,
        sha256: &'a str,
    },
}

impl FlotillaSource<'_> {
    pub(crate) fn sha256(&self) -> &str {
        match self {
            Self::Url { sha256, .. } | Self::Bucket { sha256, .. } => sha256,
        }
    }

    /// `https://...` or `s3://bucket/key`.
    /// Whether the hosts read it from the stack's bucket (so their role may).
    pub(crate) fn is_bucket(&self) -> bool {
        matches!(self, Self::Bucket { .. })
    }

    pub(crate) fn location(&self) -> String {
        match self {
            Self::Url { url, .. } => (*url).to_owned(),
            Self::Bucket { bucket, key, .. } => format!("s3://{bucket}/{key}"),
        }
    }
}

/// What a runner host's user data is made of.
#[derive(Debug, Clone)]
pub(crate) struct HostUserData<'a> {
    pub(crate) hosts: &'a RunnerHosts,
    pub(crate) flotilla: FlotillaSource<'a>,
    pub(crate) region: &'a str,
    pub(crate) token_param: &'a str,
    pub(crate) flotilla_toml: &'a str,
    pub(crate) runner_config_toml: &'a str,
    /// `[logs]`: the journal shipper's configuration (streams `hosts/<instance-id>`).
    pub(crate) journal: Option<&'a ShipperConfig>,
}

/// Renders the user data. Every value interpolated into a shell script was validated to
/// contain no quotes or whitespace (URLs, checksums) or is a fixed name.
pub(crate) fn render(input: &HostUserData<'_>) -> String {
    let mut doc = json!({
        "package_update": true,
        "packages": input.hosts.packages,
        "write_files": [
            file(FLOTILLA_TOML_PATH, input.flotilla_toml, "0644"),
            file(RUNNER_CONFIG_TEMPLATE_PATH, input.runner_config_toml, "0600"),
            file(INSTALL_SCRIPT_PATH, &install_script(input), "0755"),
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
    if let Some(journal) = input.journal {
        for f in journal::cloud_init_files(journal) {
            if let (Some(files), Ok(f)) =
                (doc["write_files"].as_array_mut(), serde_json::to_value(f))
            {
                files.push(f);
            }
        }
        if let Some(cmds) = doc["runcmd"].as_array_mut() {
            cmds.push(json!(journal::enable_command()));
        }
    }
    // `{:#}` is serde_json's pretty printer, as `to_string_pretty` (which cannot fail
    // on a `Value` either).
    format!("#cloud-config\n{doc:#}\n")
}

fn file(path: &str, content: &str, permissions: &str) -> serde_json::Value {
    json!({
        "path": path,
        "content": content,
        "permissions": permissions,
        "owner": "root:root",
    })
}

fn install_script(input: &HostUserData<'_>) -> String {
    let h = input.hosts;
    let flotilla = match input.flotilla {
        FlotillaSource::Url { url, sha256 } => format!("fetch '{url}' {FLOTILLA_BIN} '{sha256}'"),
        FlotillaSource::Bucket {
            bucket,
            key,
            sha256,
        } => format!("fetch_s3 's3://{bucket}/{key}' {FLOTILLA_BIN} '{sha256}'"),
    };
    format!(
        r#"#!/bin/sh
# Installs gitlab-runner, flotilla and the SSM agent (written by flotilla-provision).
set -eu
install_checked() {{
  dest=$1 sum=$2
  if [ -n "$sum" ]; then echo "$sum  $dest.tmp" | sha256sum -c -; fi
  chmod 0755 "$dest.tmp"
  mv "$dest.tmp" "$dest"
}}
fetch() {{
  url=$1 dest=$2 sum=$3
  curl --fail --silent --show-error --location --retry 5 --output "$dest.tmp" "$url"
  install_checked "$dest" "$sum"
}}
# From the stack's bucket with the instance role (through the VPC's S3 endpoint).
fetch_s3() {{
  src=$1 dest=$2 sum=$3 n=0
  until aws s3 cp --region '{region}' --only-show-errors "$src" "$dest.tmp"; do
    n=$((n + 1))
    [ "$n" -lt 5 ] || return 1
    sleep 10
  done
  install_checked "$dest" "$sum"
}}
# apply checks a new host and drains an old one through SSM Run Command, which needs
# the agent; Debian's AMIs do not ship it.
ssm_agent() {{
  if command -v amazon-ssm-agent >/dev/null 2>&1 || [ -d /snap/amazon-ssm-agent ]; then
    return 0
  fi
  arch=$(dpkg --print-architecture) || return 1
  curl --fail --silent --show-error --location --retry 5 \
    --output /tmp/amazon-ssm-agent.deb \
    "https://s3.{region}.amazonaws.com/amazon-ssm-{region}/latest/debian_$arch/amazon-ssm-agent.deb" \
    || return 1
  dpkg -i /tmp/amazon-ssm-agent.deb || return 1
  # --no-block: never wait here on a unit ordered after cloud-init itself.
  systemctl enable amazon-ssm-agent && systemctl start --no-block amazon-ssm-agent
}}
fetch '{runner_url}' {runner_bin} '{runner_sum}'
{flotilla}
install -d -m 0700 {state_dir} /var/lib/gitlab-runner
{private_addr}{flotilla_bin} check-config
ssm_agent || echo "flotilla-install: no SSM agent: apply cannot check or drain this host" >&2
"#,
        region = input.region,
        runner_url = h.gitlab_runner_url,
        runner_bin = GITLAB_RUNNER_BIN,
        runner_sum = h.gitlab_runner_sha256.clone().unwrap_or_default(),
        flotilla_bin = FLOTILLA_BIN,
        state_dir = STATE_DIR,
        private_addr = private_addr_script(input),
    )
}

/// With `[monitoring]` the configs carry [`PRIVATE_IPV4_PLACEHOLDER`]: fill in the
/// host's private address from IMDSv2 (it never changes while the instance lives, so
/// once at first boot is enough). Empty otherwise, so stacks without it keep their user
/// data, and their hosts.
fn private_addr_script(input: &HostUserData<'_>) -> String {
    let uses = |text: &str| text.contains(PRIVATE_IPV4_PLACEHOLDER);
    if !uses(input.flotilla_toml) && !uses(input.runner_config_toml) {
        return String::new();
    }
    format!(
        r#"# The metrics endpoints listen on this host's private address, known only here.
imds=http://169.254.169.254/latest
imds_token=$(curl --fail --silent --show-error --retry 5 -X PUT \
  -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$imds/api/token")
ip=$(curl --fail --silent --show-error --retry 5 \
  -H "X-aws-ec2-metadata-token: $imds_token" "$imds/meta-data/local-ipv4")
case "$ip" in *[!0-9.]*|'') echo "flotilla-install: no private address: $ip" >&2; exit 1;; esac
sed -i "s/{placeholder}/$ip/g" {flotilla_toml} {runner_template}
"#,
        placeholder = PRIVATE_IPV4_PLACEHOLDER,
        flotilla_toml = FLOTILLA_TOML_PATH,
        runner_template = RUNNER_CONFIG_TEMPLATE_PATH,
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

    const SUM: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn render_with(flotilla: FlotillaSource<'_>) -> String {
        let stack = Stack::from_toml(GOOD).unwrap();
        render(&HostUserData {
            hosts: &stack.runner_hosts,
            flotilla,
            region: "us-east-1",
            token_param: "/flotilla/ci/runner-token",
            flotilla_toml: "fleet = \"ci\"\n",
            runner_config_toml: "concurrent = 1\n",
            journal: None,
        })
    }

    fn install(ud: &str) -> String {
        let v: serde_json::Value =
            serde_json::from_str(ud.strip_prefix("#cloud-config\n").unwrap()).unwrap();
        v["write_files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"] == INSTALL_SCRIPT_PATH)
            .and_then(|f| f["content"].as_str())
            .unwrap()
            .to_owned()
    }

    #[test]
    fn user_data_is_cloud_config_json_with_param_name_only() {
        let ud = render_with(FlotillaSource::Bucket {
            bucket: "ci-cache",
            key: "flotilla/bin/x/flotilla",
            sha256: SUM,
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

    #[test]
    fn the_binary_comes_from_the_bucket_with_its_sum_checked() {
        let key = format!("flotilla/bin/{SUM}/flotilla");
        let ud = render_with(FlotillaSource::Bucket {
            bucket: "ci-cache",
            key: &key,
            sha256: SUM,
        });
        let script = install(&ud);
        assert!(
            script.contains(&format!(
                "fetch_s3 's3://ci-cache/{key}' /usr/local/bin/flotilla '{SUM}'"
            )),
            "{script}"
        );
        assert!(
            script.contains("aws s3 cp --region 'us-east-1'"),
            "{script}"
        );
        assert!(script.contains("sha256sum -c -"), "{script}");
        // The sum is checked before the file is moved into place.
        let check = script.find("sha256sum -c -").unwrap();
        let mv = script.find("mv \"$dest.tmp\" \"$dest\"").unwrap();
        assert!(check < mv, "{script}");
        // A different binary is a different user data (so a different hash).
        let other = render_with(FlotillaSource::Bucket {
            bucket: "ci-cache",
            key: "flotilla/bin/y/flotilla",
            sha256: &"f".repeat(64),
        });
        assert_ne!(ud, other);
    }

    #[test]
    fn a_url_in_the_stack_is_downloaded_with_curl() {
        let ud = render_with(FlotillaSource::Url {
            url: "https://downloads.example.com/flotilla",
            sha256: SUM,
        });
        let script = install(&ud);
        assert!(
            script.contains(&format!(
                "fetch 'https://downloads.example.com/flotilla' /usr/local/bin/flotilla '{SUM}'"
            )),
            "{script}"
        );
        assert!(!script.contains("fetch_s3 '"), "{script}");
    }

    #[test]
    fn the_ssm_agent_is_installed_when_missing_and_never_blocks_the_runner() {
        let script = install(&render_with(FlotillaSource::Url {
            url: "https://downloads.example.com/flotilla",
            sha256: SUM,
        }));
        assert!(
            script.contains("amazon-ssm-us-east-1/latest/debian_$arch/amazon-ssm-agent.deb"),
            "{script}"
        );
        assert!(script.contains("ssm_agent || echo"), "{script}");
        // After flotilla is installed and checked.
        assert!(script.find("check-config").unwrap() < script.find("ssm_agent ||").unwrap());
    }

    #[test]
    fn the_private_address_is_filled_in_before_the_config_is_checked_and_only_when_asked() {
        let stack = Stack::from_toml(GOOD).unwrap();
        let with = |toml: &str| {
            install(&render(&HostUserData {
                hosts: &stack.runner_hosts,
                flotilla: FlotillaSource::Url {
                    url: "https://downloads.example.com/flotilla",
                    sha256: SUM,
                },
                region: "us-east-1",
                token_param: "/flotilla/ci/runner-token",
                flotilla_toml: toml,
                runner_config_toml: "concurrent = 1\n",
                journal: None,
            }))
        };
        let script = with("metrics_addr = \"@FLOTILLA_PRIVATE_IPV4@:9402\"\n");
        let sed = script
            .find("sed -i \"s/@FLOTILLA_PRIVATE_IPV4@/$ip/g\" /etc/flotilla/flotilla.toml /etc/gitlab-runner/config.toml.in")
            .unwrap_or_else(|| panic!("{script}"));
        assert!(sed < script.find("check-config").unwrap(), "{script}");
        assert!(script.contains("meta-data/local-ipv4"), "{script}");
        assert!(!with("fleet = \"ci\"\n").contains("local-ipv4"));
    }

    #[test]
    fn with_logs_the_host_ships_its_journal_to_its_own_stream() {
        let stack = Stack::from_toml(GOOD).unwrap();
        let journal =
            ShipperConfig::new("/flotilla/ci", journal::HOST_STREAMS, journal::HOST_UNITS);
        let ud = render(&HostUserData {
            hosts: &stack.runner_hosts,
            flotilla: FlotillaSource::Url {
                url: "https://downloads.example.com/flotilla",
                sha256: SUM,
            },
            region: "us-east-1",
            token_param: "/flotilla/ci/runner-token",
            flotilla_toml: "fleet = \"ci\"\n",
            runner_config_toml: "concurrent = 1\n",
            journal: Some(&journal),
        });
        let v: serde_json::Value =
            serde_json::from_str(ud.strip_prefix("#cloud-config\n").unwrap()).unwrap();
        let files: Vec<flotilla_proto::cloud_files::WriteFile> =
            serde_json::from_value(v["write_files"].clone()).unwrap();
        let program = files
            .iter()
            .find(|f| f.path == journal::SHIPPER_PATH)
            .unwrap();
        assert_eq!(program.bytes().unwrap(), journal::SHIPPER.as_bytes());
        let config = files
            .iter()
            .find(|f| f.path == journal::CONFIG_PATH)
            .unwrap();
        let config: ShipperConfig = serde_json::from_str(&config.content).unwrap();
        assert_eq!(config, journal);
        let cmds = v["runcmd"].as_array().unwrap();
        let last = cmds.last().unwrap().to_string();
        assert!(last.contains(journal::UNIT_NAME), "{last}");
        // After the unit files are known to systemd.
        assert!(cmds.iter().any(|c| c.to_string().contains("daemon-reload")));
        assert!(ud.len() < flotilla_proto::bootstrap::MAX_USER_DATA_BYTES);
        assert!(!render_with(FlotillaSource::Url {
            url: "https://downloads.example.com/flotilla",
            sha256: SUM,
        })
        .contains(journal::UNIT_NAME));
    }
}
