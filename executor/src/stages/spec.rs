//! What the job asks for: image (entrypoint, pull policy), services, registry credentials.
//!
//! Read from `JOB_RESPONSE_FILE` (GitLab's job payload: the only place with services'
//! variables, pull policies and credentials), with the `CUSTOM_ENV_CI_JOB_IMAGE` /
//! `CUSTOM_ENV_CI_JOB_SERVICES` variables as the source of expanded names and as the
//! fallback when the payload is missing. Secrets read here (passwords, the job token) are
//! never logged or put in error messages.

use std::collections::BTreeMap;

use base64::Engine;
use serde::Deserialize;

use super::job::JobEnv;
use super::StageError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    pub name: String,
    /// `None`: the image's own entrypoint; `Some([])`: `entrypoint: [""]` (none at all).
    pub entrypoint: Option<Vec<String>>,
    /// Empty: the runner's configured policy.
    pub pull_policy: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub image: ImageSpec,
    pub aliases: Vec<String>,
    pub command: Vec<String>,
    pub variables: Vec<(String, String)>,
}

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

#[derive(Debug, Clone)]
pub struct JobSpec {
    pub image: Option<ImageSpec>,
    pub services: Vec<ServiceSpec>,
    pub credentials: Vec<RegistryCredential>,
    /// Job variables (key, value), for services.
    pub variables: Vec<(String, String)>,
}

// --- the job payload, as much of it as Flotilla needs ---

#[derive(Deserialize, Default)]
struct Payload {
    #[serde(default)]
    image: Option<PayloadImage>,
    #[serde(default)]
    services: Vec<PayloadImage>,
    #[serde(default)]
    credentials: Vec<PayloadCredential>,
    #[serde(default)]
    variables: Vec<PayloadVariable>,
}

#[derive(Deserialize, Default, Clone)]
struct PayloadImage {
    #[serde(default)]
    name: String,
    #[serde(default)]
    alias: Option<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    pull_policy: Option<Vec<String>>,
    #[serde(default)]
    variables: Option<Variables>,
}

/// Services' variables arrive as GitLab's list of `{key, value}`; accept a plain map too.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum Variables {
    List(Vec<PayloadVariable>),
    Map(BTreeMap<String, String>),
}

impl Variables {
    fn pairs(self) -> Vec<(String, String)> {
        match self {
            Self::List(l) => l.into_iter().map(|v| (v.key, v.value)).collect(),
            Self::Map(m) => m.into_iter().collect(),
        }
    }
}

#[derive(Deserialize, Clone)]
struct PayloadVariable {
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
struct PayloadCredential {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

fn image_spec(p: &PayloadImage) -> ImageSpec {
    ImageSpec {
        name: p.name.clone(),
        entrypoint: p
            .entrypoint
            .as_ref()
            .map(|e| e.iter().filter(|s| !s.is_empty()).cloned().collect()),
        pull_policy: p.pull_policy.clone().unwrap_or_default(),
    }
}

impl JobSpec {
    pub fn from_env(
        env: &JobEnv,
        response_file: Option<&std::path::Path>,
    ) -> Result<Self, StageError> {
        let payload: Payload = match response_file {
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                    StageError::system(format!(
                        "cannot parse the job payload {}: {e}",
                        path.display()
                    ))
                })?,
                Err(_) => Payload::default(),
            },
            None => Payload::default(),
        };
        Self::from_parts(env, payload)
    }

    fn from_parts(env: &JobEnv, payload: Payload) -> Result<Self, StageError> {
        // The variable carries the expanded name; the payload carries the rest.
        let image = match (env.var("CI_JOB_IMAGE"), &payload.image) {
            (Some(name), Some(p)) => Some(ImageSpec {
                name: name.to_owned(),
                ..image_spec(p)
            }),
            (Some(name), None) => Some(ImageSpec {
                name: name.to_owned(),
                entrypoint: None,
                pull_policy: Vec::new(),
            }),
            (None, Some(p)) if !p.name.is_empty() => Some(image_spec(p)),
            _ => None,
        };
        let services = if payload.services.is_empty() {
            services_from_env(env)?
        } else {
            payload.services.clone()
        };
        let services = services
            .into_iter()
            .filter(|s| !s.name.is_empty())
            .map(|s| ServiceSpec {
                image: image_spec(&s),
                aliases: service_aliases(&s.name, s.alias.as_deref()),
                command: s.command.clone().unwrap_or_default(),
                variables: s
                    .variables
                    .clone()
                    .map(Variables::pairs)
                    .unwrap_or_default(),
            })
            .collect();
        let mut credentials: Vec<RegistryCredential> = payload
            .credentials
            .into_iter()
            .filter(|c| c.kind == "registry")
            .map(|c| RegistryCredential {
                registry: normalize_registry(&c.url),
                username: c.username,
                password: c.password,
            })
            .collect();
        // The runner host's own DOCKER_AUTH_CONFIG (its `environment`), then the job's.
        if let Some(cfg) = env.runner_docker_auth_config.as_deref() {
            credentials.extend(parse_docker_auth_config(cfg)?);
        }
        if let Some(cfg) = env.var("DOCKER_AUTH_CONFIG") {
            credentials.extend(parse_docker_auth_config(cfg)?);
        }
        let variables = if payload.variables.is_empty() {
            env.vars
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            payload
                .variables
                .into_iter()
                .map(|v| (v.key, v.value))
                .collect()
        };
        Ok(Self {
            image,
            services,
            credentials,
            variables,
        })
    }

    /// Credentials for the registry `image` lives on; DOCKER_AUTH_CONFIG entries (added
    /// last) win, as on gitlab-runner.
    pub fn credential_for(&self, image: &str) -> Option<&RegistryCredential> {
        let registry = registry_of(image);
        self.credentials
            .iter()
            .rev()
            .find(|c| c.registry == registry)
    }
}

fn services_from_env(env: &JobEnv) -> Result<Vec<PayloadImage>, StageError> {
    match env.var("CI_JOB_SERVICES") {
        None => Ok(Vec::new()),
        Some(text) if text.trim().is_empty() || text.trim() == "null" => Ok(Vec::new()),
        Some(text) => serde_json::from_str(text)
            .map_err(|e| StageError::system(format!("CI_JOB_SERVICES is not valid JSON ({e})"))),
    }
}

/// gitlab-runner's service aliases: the image name without tag or digest, with `/`
/// replaced by `__` and by `-`, then the user's aliases (comma or space separated).
pub fn service_aliases(image: &str, user_alias: Option<&str>) -> Vec<String> {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    let without_tag = match without_digest[last_slash..].find(':') {
        Some(i) => &without_digest[..last_slash + i],
        None => without_digest,
    };
    let mut aliases = vec![
        without_tag.replace('/', "__"),
        without_tag.replace('/', "-"),
    ];
    if let Some(user) = user_alias {
        aliases.extend(
            user.split([',', ' '])
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_owned),
        );
    }
    aliases.dedup();
    let mut seen = std::collections::BTreeSet::new();
    aliases.retain(|a| seen.insert(a.clone()));
    aliases
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

fn normalize_registry(url: &str) -> String {
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

/// `DOCKER_AUTH_CONFIG` as Docker writes `config.json`: `{"auths": {"host": {"auth":
/// base64("user:pass")}}}` (or `username`/`password`). Errors never echo the content.
pub fn parse_docker_auth_config(text: &str) -> Result<Vec<RegistryCredential>, StageError> {
    #[derive(Deserialize)]
    struct Config {
        #[serde(default)]
        auths: BTreeMap<String, Entry>,
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
    let config: Config =
        serde_json::from_str(text).map_err(|_| bad("not a JSON object with an \"auths\" map"))?;
    let mut out = Vec::new();
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
        out.push(RegistryCredential {
            registry: normalize_registry(&registry),
            username,
            password,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_follow_gitlab_runner() {
        assert_eq!(
            service_aliases(
                "registry.example.com:5000/group/postgres:13@sha256:abc",
                Some("db, pg")
            ),
            vec![
                "registry.example.com:5000__group__postgres",
                "registry.example.com:5000-group-postgres",
                "db",
                "pg"
            ]
        );
        assert_eq!(service_aliases("redis:7", None), vec!["redis"]);
    }

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
        let creds = parse_docker_auth_config(&cfg).unwrap();
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
    fn payload_entrypoint_empty_string_means_none() {
        let env = JobEnv::from_vars([("CUSTOM_ENV_CI_JOB_IMAGE".to_string(), "img:1".to_string())]);
        let payload: Payload = serde_json::from_str(r#"{"image": {"name": "img:$V", "entrypoint": [""], "pull_policy": ["if-not-present"]}}"#).unwrap();
        let spec = JobSpec::from_parts(&env, payload).unwrap();
        let image = spec.image.unwrap();
        assert_eq!(image.name, "img:1");
        assert_eq!(image.entrypoint, Some(vec![]));
        assert_eq!(image.pull_policy, vec!["if-not-present"]);
    }

    #[test]
    fn services_come_from_the_variable_without_a_payload() {
        let env = JobEnv::from_vars([(
            "CUSTOM_ENV_CI_JOB_SERVICES".to_string(),
            r#"[{"name":"reg.io/x/redis:7","alias":"cache","entrypoint":null,"command":["--port","7000"]}]"#.to_string(),
        )]);
        let spec = JobSpec::from_parts(&env, Payload::default()).unwrap();
        assert_eq!(
            spec.services[0].aliases,
            vec!["reg.io__x__redis", "reg.io-x-redis", "cache"]
        );
        assert_eq!(spec.services[0].command, vec!["--port", "7000"]);
    }
}
