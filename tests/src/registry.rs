//! A private Docker registry (Debian's `docker-registry`, distribution v2) on 127.0.0.1
//! and the test images, built in-process from busybox-static and pushed over the
//! registry's HTTP API v2 (no `docker build`).
//!
//! dockerd treats registries on 127.0.0.0/8 as insecure (plain HTTP) by default, so the
//! sandbox's machines pull these images for real.

use std::fs::File;
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
        self.push_built(repo, tag, &image)
    }

    /// Pushes a built image (e.g. from [`crate::images::HostImage`]) as `<repo>:<tag>`;
    /// returns the full reference `<host>/<repo>:<tag>`.
    pub fn push_built(&self, repo: &str, tag: &str, image: &BusyboxImage) -> Result<String> {
        self.push(repo, tag, image)
            .with_context(|| format!("pushing {repo}:{tag} to {}", self.host()))?;
        Ok(format!("{}/{repo}:{tag}", self.host()))
    }

    fn push(&self, repo: &str, tag: &str, image: &BusyboxImage) -> Result<()> {
        let layer_digest = digest(&image.layer_gz);
        let config_digest = digest(&image.config);
        self.push_blob(repo, &image.layer_gz, &layer_digest)?;
        self.push_blob(repo, &image.config, &config_digest)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": image.config.len(),
                "digest": config_digest,
            },
            "layers": [{
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "size": image.layer_gz.len(),
                "digest": layer_digest,
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

    fn push_blob(&self, repo: &str, blob: &[u8], d: &str) -> Result<()> {
        // Already there (a big layer pushed by an earlier call): skip the upload.
        let head = format!("{}/v2/{repo}/blobs/{d}", self.url());
        if ureq::head(&head)
            .timeout(Duration::from_secs(30))
            .call()
            .is_ok()
        {
            return Ok(());
        }
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
            .timeout(Duration::from_secs(300))
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
        crate::images::HostImage::new(flavour)
            .build()
            .context("building the busybox image (apt-get install busybox-static)")
    }
}
