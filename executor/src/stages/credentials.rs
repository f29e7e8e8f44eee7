//! Registry credentials for pulls, resolved as gitlab-runner does: the job's
//! `DOCKER_AUTH_CONFIG` first, then the runner host's, then the payload's `credentials`
//! (the job token for GitLab's registry). A `DOCKER_AUTH_CONFIG` may name credential
//! helpers (`credHelpers` per registry, `credsStore` for all): `docker-credential-<name>
//! get` is run on the runner host, as gitlab-runner does (ECR's `ecr-login`).
//!
//! Secrets read here are never logged or put in error messages; a missing helper is a
//! build failure, never a silent anonymous pull.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::StageError;

#[derive(Clone, PartialEq, Eq)]
pub struct RegistryCredential {
    pub registry: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RegistryCredential({}, {}, <redacted>)",
            self.registry, self.username
        )
    }
}

/// One `DOCKER_AUTH_CONFIG` (Docker's `config.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    pub auths: Vec<RegistryCredential>,
    /// Helper for every registry without a `credHelpers` entry.
    pub creds_store: Option<String>,
    /// Registry host -> helper name.
    pub cred_helpers: BTreeMap<String, String>,
}

/// Where credentials come from, highest priority first.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    sources: Vec<AuthConfig>,
}

/// How long a credential helper may take (ECR's fetches a token from AWS).
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);

impl Credentials {
    /// `sources` in priority order: the job's DOCKER_AUTH_CONFIG, the runner's, the payload's.
    pub fn new(sources: Vec<AuthConfig>) -> Self {
        Self { sources }
    }

    /// The credential for the registry `image` lives on, if any source has one.
    pub async fn for_image(&self, image: &str) -> Result<Option<RegistryCredential>, StageError> {
        let registry = registry_of(image);
        for source in &self.sources {
            if let Some(helper) = source.cred_helpers.get(&registry) {
                return run_helper(helper, &registry).await;
            }
            if let Some(c) = source.auths.iter().find(|c| c.registry == registry) {
                return Ok(Some(c.clone()));
            }
            if let Some(store) = &source.creds_store {
                if let Some(c) = run_helper(store, &registry).await? {
                    return Ok(Some(c));
                }
            }
        }
        Ok(None)
    }
}

/// Runs `docker-credential-<name> get` with the registry on stdin; `None` when the helper
/// has no credentials for it.
async fn run_helper(name: &str, registry: &str) -> Result<Option<RegistryCredential>, StageError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(StageError::build_message(format!(
            "DOCKER_AUTH_CONFIG names the credential helper {name:?} for {registry}: a helper name is letters, digits, '-', '_' or '.'"
        )));
    }
    let program = format!("docker-credential-{name}");
    let server = if registry == "docker.io" {
        "https://index.docker.io/v1/"
    } else {
        registry
    };
    let child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StageError::build_message(format!(
                "DOCKER_AUTH_CONFIG uses the credential helper {name:?} for {registry}, but {program} is not installed on the runner host (not found in PATH)"
            )))
        }
        Err(e) => {
            return Err(StageError::system(format!(
                "cannot run the credential helper {program}: {e}"
            )))
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes()).await;
        let _ = stdin.shutdown().await;
    }
    let output = match tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            return Err(StageError::system(format!(
                "the credential helper {program} failed: {e}"
            )))
        }
        Err(_) => {
            return Err(StageError::system(format!(
                "the credential helper {program} did not answer for {registry} within {}s",
                HELPER_TIMEOUT.as_secs()
            )))
        }
    };
    if !output.status.success() {
        // Helpers print their error on stdout (docker-credential-helpers' protocol); it
        // never holds the secret, but keep it to one short line.
        let said = String::from_utf8_lossy(&output.stdout).to_string()
            + &String::from_utf8_lossy(&output.stderr);
        let said: String = said
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect();
        if said.to_lowercase().contains("credentials not found") {
            return Ok(None);
        }
        return Err(StageError::build_message(format!(
            "the credential helper {program} found no usable credentials for {registry} ({}): {said}",
            output.status
        )));
    }
    #[derive(Deserialize)]
    struct Answer {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let answer: Answer = serde_json::from_slice(&output.stdout).map_err(|_| {
        StageError::build_message(format!(
            "the credential helper {program} answered for {registry} with something that is not its JSON ({{\"Username\", \"Secret\"}})"
        ))
    })?;
    Ok(Some(RegistryCredential {
        registry: registry.to_owned(),
        username: answer.username,
        password: answer.secret,
    }))
}

/// The registry host of an image reference (Docker Hub when there is none).
pub fn registry_of(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first.to_owned()
        }
        _ => "docker.io".to_owned(),
    }
}

pub fn normalize_registry(url: &str) -> String {
    let host = url
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("")
        .to_owned();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "" => "docker.io".to_owned(),
        _ => host,
    }
}

/// `DOCKER_AUTH_CONFIG` as Docker writes `config.json`: `auths` (`auth` = base64 of
/// `user:pass`, or `username`/`password`), `credsStore`, `credHelpers`. Errors never echo
/// the content.
pub fn parse_docker_auth_config(text: &str) -> Result<AuthConfig, StageError> {
    #[derive(Deserialize)]
    struct Config {
        #[serde(default)]
        auths: BTreeMap<String, Entry>,
        #[serde(default, rename = "credsStore")]
        creds_store: Option<String>,
        #[serde(default, rename = "credHelpers")]
        cred_helpers: BTreeMap<String, String>,
    }
    #[derive(Deserialize)]
    struct Entry {
        #[serde(default)]
        auth: Option<String>,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<String>,
    }
    let bad =
        |what: &str| StageError::build_message(format!("DOCKER_AUTH_CONFIG is invalid: {what}"));
    let config: Config = serde_json::from_str(text)
        .map_err(|_| bad("not a JSON object with \"auths\", \"credsStore\" or \"credHelpers\""))?;
    let mut auths = Vec::new();
    for (registry, entry) in config.auths {
        let (username, password) = match (entry.auth, entry.username, entry.password) {
            (Some(auth), _, _) => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| bad(&format!("the auth of {registry} is not base64")))?;
                let decoded = String::from_utf8(decoded)
                    .map_err(|_| bad(&format!("the auth of {registry} is not UTF-8")))?;
                let (u, p) = decoded
                    .split_once(':')
                    .ok_or_else(|| bad(&format!("the auth of {registry} is not user:password")))?;
                (u.to_owned(), p.to_owned())
            }
            (None, Some(u), Some(p)) => (u, p),
            _ => continue,
        };
        auths.push(RegistryCredential {
            registry: normalize_registry(&registry),
            username,
            password,
        });
    }
    Ok(AuthConfig {
        auths,
        creds_store: config.creds_store.filter(|s| !s.is_empty()),
        cred_helpers: config
            .cred_helpers
            .into_iter()
            .map(|(k, v)| (normalize_registry(&k), v))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_host_of_image() {
        assert_eq!(
            registry_of("127.0.0.1:5000/flotilla/busybox:latest"),
            "127.0.0.1:5000"
        );
        assert_eq!(registry_of("library/alpine"), "docker.io");
        assert_eq!(registry_of("alpine:3"), "docker.io");
        assert_eq!(registry_of("localhost/x"), "localhost");
    }

    #[test]
    fn docker_auth_config_decodes_auth_and_never_echoes_secrets() {
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3cret");
        let cfg = format!(r#"{{"auths": {{"https://127.0.0.1:5000": {{"auth": "{auth}"}}}}}}"#);
        let creds = parse_docker_auth_config(&cfg).unwrap().auths;
        assert_eq!(creds[0].registry, "127.0.0.1:5000");
        assert_eq!(
            (creds[0].username.as_str(), creds[0].password.as_str()),
            ("bob", "s3cret")
        );
        assert!(!format!("{creds:?}").contains("s3cret"));
        let Err(StageError::Build {
            message: Some(m), ..
        }) = parse_docker_auth_config("{\"auths\": {\"r\": {\"auth\": \"!!secret!!\"}}}")
        else {
            panic!("expected a build error");
        };
        assert!(!m.contains("secret"), "{m}");
    }

    #[test]
    fn helpers_are_read_per_registry_and_for_all() {
        let cfg = parse_docker_auth_config(
            r#"{"credsStore": "desktop", "credHelpers": {"https://123.dkr.ecr.eu-west-1.amazonaws.com": "ecr-login"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.creds_store.as_deref(), Some("desktop"));
        assert_eq!(
            cfg.cred_helpers["123.dkr.ecr.eu-west-1.amazonaws.com"],
            "ecr-login"
        );
    }

    #[tokio::test]
    async fn a_missing_helper_is_a_build_failure_naming_it() {
        let creds = Credentials::new(vec![AuthConfig {
            cred_helpers: BTreeMap::from([(
                "registry.example.com".to_string(),
                "flotilla-test-absent".to_string(),
            )]),
            ..Default::default()
        }]);
        let Err(StageError::Build {
            message: Some(m), ..
        }) = creds.for_image("registry.example.com/app:1").await
        else {
            panic!("expected a build failure");
        };
        assert!(m.contains("docker-credential-flotilla-test-absent"), "{m}");
        // Other registries are not affected by that helper.
        assert_eq!(creds.for_image("alpine:3").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_helper_name_cannot_be_a_path() {
        let creds = Credentials::new(vec![AuthConfig {
            creds_store: Some("../../bin/sh".into()),
            ..Default::default()
        }]);
        assert!(matches!(
            creds.for_image("alpine:3").await,
            Err(StageError::Build { .. })
        ));
    }
}
