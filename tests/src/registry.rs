//! A private Docker registry (Debian's `docker-registry`, distribution v2) on 127.0.0.1
//! and the test images, built in-process from busybox-static and pushed over the
//! registry's HTTP API v2 (no `docker build`).
//!
//! dockerd treats registries on 127.0.0.0/8 as insecure (plain HTTP) by default, so the
//! sandbox's machines pull these images for real.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::util::{free_port, stop_child, wait_for_http};

/// A running registry.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Registry {
    /// Starts `docker-registry` with its storage under `dir` and waits for `GET /v2/`.
    pub async fn start(dir: &Path) -> Result<Self> {
        let port = free_port()?;
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage)?;
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                 delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )?;
        let log = dir.join("registry.log");
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting docker-registry (apt-get install docker-registry)")?;
        let mut reg = Self { child, port, log };
        let url = format!("{}/v2/", reg.url());
        wait_for_http(
            "docker-registry",
            &mut reg.child,
            &url,
            Duration::from_secs(30),
            &reg.log,
            |code| Ok(code < 400),
        )
        .await?;
        Ok(reg)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `127.0.0.1:<port>`, the registry part of image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// Builds an image from busybox-static and pushes it as `<repo>:<tag>`; returns the
    /// full reference, e.g. `127.0.0.1:5000/flotilla/busybox:latest`.
    pub fn push_busybox_image(&self, repo: &str, tag: &str, flavour: &str) -> Result<String> {
        let image = BusyboxImage::build(flavour)?;
        self.push(repo, tag, &image)
            .with_context(|| format!("pushing {repo}:{tag} to {}", self.host()))?;
        Ok(format!("{}/{repo}:{tag}", self.host()))
    }

    fn push(&self, repo: &str, tag: &str, image: &BusyboxImage) -> Result<()> {
        self.push_blob(repo, &image.layer_gz)?;
        self.push_blob(repo, &image.config)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": image.config.len(),
                "digest": digest(&image.config),
            },
            "layers": [{
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "size": image.layer_gz.len(),
                "digest": digest(&image.layer_gz),
            }],
        });
        let body = serde_json::to_vec(&manifest)?;
        let url = format!("{}/v2/{repo}/manifests/{tag}", self.url());
        ureq::put(&url)
            .set(
                "Content-Type",
                "application/vnd.docker.distribution.manifest.v2+json",
            )
            .timeout(Duration::from_secs(30))
            .send_bytes(&body)
            .map_err(describe)
            .with_context(|| format!("PUT {url}"))?;
        Ok(())
    }

    fn push_blob(&self, repo: &str, blob: &[u8]) -> Result<()> {
        let d = digest(blob);
        let start = format!("{}/v2/{repo}/blobs/uploads/", self.url());
        let resp = ureq::post(&start)
            .timeout(Duration::from_secs(30))
            .call()
            .map_err(describe)
            .with_context(|| format!("POST {start}"))?;
        let location = resp
            .header("Location")
            .context("blob upload start returned no Location")?
            .to_owned();
        let location = if location.starts_with("http") {
            location
        } else {
            format!("{}{location}", self.url())
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{sep}digest={d}");
        ureq::put(&put)
            .set("Content-Type", "application/octet-stream")
            .timeout(Duration::from_secs(60))
            .send_bytes(blob)
            .map_err(describe)
            .with_context(|| format!("PUT blob {d}"))?;
        Ok(())
    }

    /// Stops the registry now (also done on drop).
    pub fn stop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5), false);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn describe(e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, r) => {
            anyhow::anyhow!("HTTP {code}: {}", r.into_string().unwrap_or_default())
        }
        other => other.into(),
    }
}

/// `sha256:<hex>` of some bytes.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Applets linked to /bin/busybox in the test images.
pub const APPLETS: &[&str] = &[
    "sh",
    "ash",
    "ls",
    "cat",
    "echo",
    "sleep",
    "id",
    "kill",
    "mkdir",
    "touch",
    "rm",
    "env",
    "head",
    "tail",
    "dd",
    "yes",
    "seq",
    "sha256sum",
    "wc",
    "ps",
    "true",
    "false",
    "test",
    "[",
    "[[",
    "printf",
    "chmod",
    "chown",
    "stat",
    "whoami",
    "tr",
    "grep",
    "sed",
    "hostname",
    "pwd",
    "cp",
    "mv",
    "ln",
    "uname",
    "date",
    "awk",
    "find",
    "xargs",
    "timeout",
    "nc",
    "wget",
    "tee",
    "sort",
    "uniq",
    "cut",
    "basename",
    "dirname",
    "readlink",
    "which",
    "ping",
    "httpd",
    "nslookup",
];

/// The pieces of a one-layer image.
pub struct BusyboxImage {
    /// The gzipped layer tar.
    pub layer_gz: Vec<u8>,
    /// The image config JSON.
    pub config: Vec<u8>,
}

impl BusyboxImage {
    /// Builds the image; `flavour` is written to /etc/flotilla-image so a test can tell
    /// the job image from the helper image.
    pub fn build(flavour: &str) -> Result<Self> {
        let busybox = std::fs::read("/bin/busybox")
            .context("reading /bin/busybox (apt-get install busybox-static)")?;
        let tar = layer_tar(&busybox, flavour)?;
        let diff_id = digest(&tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar)?;
        let layer_gz = gz.finish()?;
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "created": "2026-01-01T00:00:00Z",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["sh"],
                "Labels": {"org.flotilla.sandbox.image": flavour},
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": "2026-01-01T00:00:00Z", "created_by": "flotilla-sandbox"}],
        });
        Ok(Self {
            layer_gz,
            config: serde_json::to_vec(&config)?,
        })
    }
}

fn layer_tar(busybox: &[u8], flavour: &str) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64, uid: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(1_767_225_600);
        h
    };
    for (dir, mode, uid) in [
        ("bin", 0o755, 0),
        ("dev", 0o755, 0),
        ("etc", 0o755, 0),
        ("home", 0o755, 0),
        ("home/build", 0o755, 1000),
        ("proc", 0o555, 0),
        ("root", 0o700, 0),
        ("sys", 0o555, 0),
        ("tmp", 0o1777, 0),
        ("usr", 0o755, 0),
        ("usr/bin", 0o755, 0),
        ("var", 0o755, 0),
        ("var/tmp", 0o1777, 0),
    ] {
        let mut h = header(tar::EntryType::Directory, mode, 0, uid);
        b.append_data(&mut h, format!("{dir}/"), std::io::empty())?;
    }
    let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64, 0);
    b.append_data(&mut h, "bin/busybox", busybox)?;
    for applet in APPLETS {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
    }
    let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0);
    b.append_link(&mut h, "usr/bin/env", "/bin/busybox")?;
    let files: [(&str, String); 4] = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nbuild:x:1000:1000:build:/home/build:/bin/sh\n\
             nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
                .into(),
        ),
        (
            "etc/group",
            "root:x:0:\nbuild:x:1000:\nnogroup:x:65534:\n".into(),
        ),
        ("etc/flotilla-image", format!("{flavour}\n")),
        ("etc/hostname", "sandbox\n".into()),
    ];
    for (path, text) in files {
        let mut h = header(tar::EntryType::Regular, 0o644, text.len() as u64, 0);
        b.append_data(&mut h, path, text.as_bytes())?;
    }
    Ok(b.into_inner()?)
}
