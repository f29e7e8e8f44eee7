//! What the docker-executor compatibility tests need beyond [`crate::registry`]: busybox
//! images with a patched image config (entrypoint, user, exposed ports, command), pushed
//! to any registry over the HTTP API v2 with or without a login; and a second
//! `docker-registry` that requires one (htpasswd auth, bcrypt entries from
//! `htpasswd -B`, Debian's apache2-utils).
//!
//! The authenticated registry serves plain HTTP on 127.0.0.1 like the sandbox's own: dockerd
//! treats 127.0.0.0/8 as insecure and sends basic auth there, so no CA has to be installed
//! on the host.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;

use crate::registry::{digest, BusyboxImage};
use crate::util::{free_port, record_pid, stop_child, wait_for_http};

/// A busybox image (see [`BusyboxImage::build`]) whose config has the keys of `config`
/// (Docker's image config names: `Entrypoint`, `Cmd`, `User`, `ExposedPorts`, `Env`...)
/// set over the defaults.
pub fn busybox_image_with(flavour: &str, config: serde_json::Value) -> Result<BusyboxImage> {
    let mut image = BusyboxImage::build(flavour)?;
    let mut doc: serde_json::Value = serde_json::from_slice(&image.config)?;
    let (Some(target), Some(patch)) = (
        doc.get_mut("config").and_then(|c| c.as_object_mut()),
        config.as_object(),
    ) else {
        bail!("image config patch must be a JSON object");
    };
    for (k, v) in patch {
        target.insert(k.clone(), v.clone());
    }
    image.config = serde_json::to_vec(&doc)?;
    Ok(image)
}

/// The image id dockerd will report for `image` (`sha256:` of its config).
pub fn image_id(image: &BusyboxImage) -> String {
    digest(&image.config)
}

/// Pushes `image` as `<repo>:<tag>` to the registry at `url` (`http://host:port`), with
/// basic auth when `login` is given.
pub fn push_image(
    url: &str,
    login: Option<(&str, &str)>,
    repo: &str,
    tag: &str,
    image: &BusyboxImage,
) -> Result<()> {
    let auth = login.map(|(u, p)| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    });
    let with_auth = |r: ureq::Request| match &auth {
        Some(a) => r.set("Authorization", a),
        None => r,
    };
    for blob in [&image.layer_gz, &image.config] {
        let start = format!("{url}/v2/{repo}/blobs/uploads/");
        let resp = with_auth(ureq::post(&start).timeout(Duration::from_secs(30)))
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
            format!("{url}{location}")
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{sep}digest={}", digest(blob));
        with_auth(ureq::put(&put).timeout(Duration::from_secs(60)))
            .set("Content-Type", "application/octet-stream")
            .send_bytes(blob)
            .map_err(describe)
            .with_context(|| format!("PUT blob {}", digest(blob)))?;
    }
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
    let manifest_url = format!("{url}/v2/{repo}/manifests/{tag}");
    with_auth(ureq::put(&manifest_url).timeout(Duration::from_secs(30)))
        .set(
            "Content-Type",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .send_bytes(&serde_json::to_vec(&manifest)?)
        .map_err(describe)
        .with_context(|| format!("PUT {manifest_url}"))?;
    Ok(())
}

fn describe(e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, r) => {
            anyhow::anyhow!("HTTP {code}: {}", r.into_string().unwrap_or_default())
        }
        other => other.into(),
    }
}

/// A `docker-registry` on 127.0.0.1 that answers only requests with a valid login.
#[derive(Debug)]
pub struct AuthRegistry {
    child: Child,
    port: u16,
    log: PathBuf,
    pub username: String,
    password: String,
}

impl AuthRegistry {
    /// Starts a registry under `dir` with one user and waits until `GET /v2/` answers 401.
    /// Its pid is recorded in `pid_dir` (the sandbox dir) for crash recovery.
    pub async fn start(dir: &Path, pid_dir: &Path, username: &str, password: &str) -> Result<Self> {
        std::fs::create_dir_all(dir.join("storage"))?;
        let out = Command::new("htpasswd")
            .args(["-nbB", "-C", "4", username, password])
            .output()
            .context("running htpasswd (apt-get install apache2-utils)")?;
        if !out.status.success() {
            bail!("htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let htpasswd = dir.join("htpasswd");
        std::fs::write(&htpasswd, &out.stdout)?;
        let port = free_port()?;
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 auth:\n  htpasswd:\n    realm: flotilla-sandbox\n    path: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.join("storage").display(),
                htpasswd.display()
            ),
        )?;
        let log = dir.join("registry.log");
        let stdout = File::create(&log)?;
        let stderr = stdout.try_clone()?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .context("starting docker-registry (apt-get install docker-registry)")?;
        record_pid(pid_dir, "docker-registry", child.id());
        let mut reg = Self {
            child,
            port,
            log,
            username: username.to_owned(),
            password: password.to_owned(),
        };
        let url = format!("{}/v2/", reg.url());
        wait_for_http(
            "docker-registry (htpasswd)",
            &mut reg.child,
            &url,
            Duration::from_secs(30),
            &reg.log,
            |code| match code {
                401 => Ok(true),
                other => bail!("GET /v2/ without a login answered {other}, not 401"),
            },
        )
        .await?;
        Ok(reg)
    }

    /// `127.0.0.1:<port>`, the registry part of image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// Pushes with the registry's login; returns the full reference.
    pub fn push(&self, repo: &str, tag: &str, image: &BusyboxImage) -> Result<String> {
        push_image(
            &self.url(),
            Some((&self.username, &self.password)),
            repo,
            tag,
            image,
        )
        .with_context(|| format!("pushing {repo}:{tag} to {}", self.host()))?;
        Ok(format!("{}/{repo}:{tag}", self.host()))
    }

    /// A `DOCKER_AUTH_CONFIG` value (Docker's config.json) with this registry's login, or
    /// with `password` instead of the right one.
    pub fn docker_auth_config(&self, password: Option<&str>) -> String {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            self.username,
            password.unwrap_or(&self.password)
        ));
        serde_json::json!({"auths": {self.host(): {"auth": auth}}}).to_string()
    }

    /// The login as a job payload `credentials` entry (`type: registry`).
    pub fn payload_credential(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "registry",
            "url": self.host(),
            "username": self.username,
            "password": self.password,
        })
    }

    /// Stops the registry now (also done on drop).
    pub fn stop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5), false);
    }
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}
