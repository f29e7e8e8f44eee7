//! What cloud-init does with the operator's parts of a build machine's user data
//! (`user_data_parts`), for the machine emulator: their `write_files`, their shell scripts
//! and their `runcmd`, in cloud-init's order and inside the machine's own root.
//!
//! cloud-init's order, which the emulator keeps: every part's `write_files` (Flotilla's
//! first; merged lists are appended) in its init stage, then in the final stage the
//! `scripts-user` scripts sorted by name: the shell parts (`part-001`, ...) before the one
//! `runcmd` script (Flotilla's commands, then the operator's). So an operator's shell part
//! runs before Flotilla's daemon.json merge and dockerd restart, and may prepare what they
//! read (that is what `user_data_parts` documents).
//!
//! Scripts and commands run as root, chrooted into the machine root, in a private mount
//! namespace where the host's `/usr`, `/bin`, `/sbin`, `/lib*` are bind-mounted read-only
//! and `/dev` as is: a script sees the machine's own `/etc`, `/var`, `/mnt`, never this
//! host's (the emulated machines' dockerd run here).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use flotilla_proto::boot_hooks;
use flotilla_proto::cloud_files::WriteFile;
use serde::Deserialize;

/// The operator's parts of one user data, parsed.
#[derive(Debug, Default)]
pub struct OperatorParts {
    pub write_files: Vec<WriteFile>,
    /// Shell parts, in user data order.
    pub scripts: Vec<String>,
    /// `runcmd` entries of the cloud-config parts, each as an argv (a string entry is
    /// `sh -c <entry>`, as cloud-init runs it).
    pub runcmd: Vec<Vec<String>>,
}

/// An operator cloud-config's `write_files` entry: `permissions` is optional (cloud-init's
/// default is 0644).
#[derive(Debug, Deserialize)]
struct OperatorFile {
    path: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    permissions: Option<String>,
    #[serde(default)]
    encoding: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct OperatorCloudConfig {
    #[serde(default)]
    write_files: Vec<OperatorFile>,
    #[serde(default)]
    runcmd: Vec<serde_json::Value>,
}

impl OperatorParts {
    /// The parts after Flotilla's own in `user_data` (none for a plain user data).
    pub fn parse(user_data: &str) -> Result<Self> {
        let (_, parts) =
            boot_hooks::split_multipart(user_data).context("malformed multipart user data")?;
        let mut out = Self::default();
        for (i, (content_type, body)) in parts.iter().enumerate() {
            match content_type.as_str() {
                "text/x-shellscript" => out.scripts.push(body.clone()),
                "text/cloud-config" => {
                    let cc = yaml_to_cloud_config(body)
                        .with_context(|| format!("user data part {}", i + 1))?;
                    for f in cc.write_files {
                        out.write_files.push(WriteFile {
                            path: f.path,
                            content: f.content,
                            permissions: f.permissions.unwrap_or_else(|| "0644".into()),
                            owner: "root:root".into(),
                            encoding: f.encoding,
                        });
                    }
                    for entry in cc.runcmd {
                        out.runcmd.push(runcmd_argv(&entry).with_context(|| {
                            format!("user data part {}: runcmd entry {entry}", i + 1)
                        })?);
                    }
                }
                other => bail!("user data part {}: unsupported content type {other}", i + 1),
            }
        }
        Ok(out)
    }
}

/// cloud-config is YAML; python3 with PyYAML is what cloud-init itself uses to read it
/// (and is on every host that has cloud-init).
fn yaml_to_cloud_config(body: &str) -> Result<OperatorCloudConfig> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps(yaml.safe_load(sys.argv[1]) or {}))",
            body,
        ])
        .output()
        .context("running python3 to read a cloud-config part")?;
    if !out.status.success() {
        bail!(
            "not valid YAML: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("not a cloud-config mapping")
}

fn runcmd_argv(entry: &serde_json::Value) -> Result<Vec<String>> {
    match entry {
        serde_json::Value::String(s) => Ok(vec!["sh".into(), "-c".into(), s.clone()]),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|v| match v {
                serde_json::Value::String(s) => Ok(s.clone()),
                other => Ok(other.to_string()),
            })
            .collect(),
        _ => bail!("must be a string or a list"),
    }
}

/// Host directories a chrooted command needs to find its programs and libraries.
const HOST_DIRS: [&str; 6] = ["usr", "bin", "sbin", "lib", "lib64", "dev"];

/// Runs `argv` as root inside `fs_root` (see the module doc); a non-zero exit is an error
/// carrying its stderr, as a failed cloud-init module is in the machine's log.
pub fn run_in_machine(fs_root: &Path, argv: &[String]) -> Result<()> {
    std::fs::create_dir_all(fs_root.join("tmp"))?;
    let setup = format!(
        r#"set -e
root="$1"; shift
for d in {dirs}; do
  [ -e "/$d" ] || continue
  mkdir -p "$root/$d"
  mount --bind "/$d" "$root/$d"
  [ "$d" = dev ] || mount -o remount,bind,ro "$root/$d"
done
exec chroot "$root" "$@""#,
        dirs = HOST_DIRS.join(" ")
    );
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &setup,
            "sh",
        ])
        .arg(fs_root)
        .args(argv)
        .output()
        .with_context(|| format!("running {argv:?} in the machine"))?;
    if !out.status.success() {
        bail!(
            "{argv:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs each shell part as cloud-init's `scripts-user` does (written to
/// `/var/lib/cloud/instance/scripts/part-NNN`, executable, run by path).
pub fn run_scripts(fs_root: &Path, scripts: &[String]) -> Result<()> {
    for (i, script) in scripts.iter().enumerate() {
        let rel = format!("var/lib/cloud/instance/scripts/part-{:03}", i + 1);
        crate::util::write_file(&fs_root.join(&rel), script.as_bytes(), 0o700)?;
        run_in_machine(fs_root, &[format!("/{rel}")])
            .with_context(|| format!("shell part {}", i + 1))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::boot_hooks::{PartKind, UserDataPart};

    fn user_data(parts: &[UserDataPart]) -> String {
        boot_hooks::render_multipart("#cloud-config\n{}\n", parts)
    }

    #[test]
    fn operator_parts_are_read_in_order_with_yaml_runcmd_forms() {
        let text = user_data(&[
            UserDataPart {
                kind: PartKind::Shell,
                content: "#!/bin/sh\necho one\n".into(),
            },
            UserDataPart {
                kind: PartKind::CloudConfig,
                content: "#cloud-config\nwrite_files:\n  - path: /etc/x\n    content: |\n      hello\nruncmd:\n  - [touch, /a]\n  - echo b > /b\n".into(),
            },
        ]);
        let p = OperatorParts::parse(&text).unwrap();
        assert_eq!(p.scripts, vec!["#!/bin/sh\necho one\n".to_string()]);
        assert_eq!(p.write_files.len(), 1);
        assert_eq!(p.write_files[0].path, "/etc/x");
        assert_eq!(p.write_files[0].permissions, "0644");
        assert_eq!(p.write_files[0].bytes().unwrap(), b"hello\n");
        assert_eq!(
            p.runcmd,
            vec![
                vec!["touch".to_string(), "/a".into()],
                vec!["sh".into(), "-c".into(), "echo b > /b".into()]
            ]
        );
    }

    #[test]
    fn plain_user_data_has_no_operator_parts() {
        let p = OperatorParts::parse("#cloud-config\n{}\n").unwrap();
        assert!(p.scripts.is_empty() && p.write_files.is_empty() && p.runcmd.is_empty());
    }

    #[test]
    fn bad_yaml_names_the_part() {
        let text = user_data(&[UserDataPart {
            kind: PartKind::CloudConfig,
            content: "#cloud-config\nruncmd: [unclosed\n".into(),
        }]);
        let e = format!("{:#}", OperatorParts::parse(&text).unwrap_err());
        assert!(e.contains("user data part 1") && e.contains("YAML"), "{e}");
    }
}
