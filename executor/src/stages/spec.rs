//! What the job asks for: image (entrypoint, pull policy, `docker: user/platform`),
//! services, registry credentials. Image and service names and aliases are expanded from
//! the job's variables (`docker:${DIND_VERSION}-dind`), as the docker executor does.
//!
//! Read from `JOB_RESPONSE_FILE` (GitLab's job payload: the only place with services'
//! variables, pull policies and credentials), with the `CUSTOM_ENV_CI_JOB_IMAGE` /
//! `CUSTOM_ENV_CI_JOB_SERVICES` variables as the source of expanded names and as the
//! fallback when the payload is missing. Secrets read here (passwords, the job token) are
//! never logged or put in error messages.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::credentials::{
    normalize_registry, parse_docker_auth_config, AuthConfig, Credentials, RegistryCredential,
};
use super::expand::expand;
use super::job::JobEnv;
use super::StageError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    pub name: String,
    /// `None`: the image's own entrypoint; `Some([])`: `entrypoint: [""]` (none at all).
    pub entrypoint: Option<Vec<String>>,
    /// Empty: the runner's configured policy.
    pub pull_policy: Vec<String>,
    /// `image: docker: user` (the runner's `[job.container] user` wins).
    pub user: Option<String>,
    /// `image: docker: platform` (`linux/arm64`), for the pull and the container.
    pub platform: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub image: ImageSpec,
    pub aliases: Vec<String>,
    pub command: Vec<String>,
    pub variables: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct JobSpec {
    pub image: Option<ImageSpec>,
    pub services: Vec<ServiceSpec>,
    pub credentials: Credentials,
    /// Job variables (key, value), for services.
    pub variables: Vec<(String, String)>,
    /// The payload's `job_info.project_id` (gitlab-runner's, not a variable): whose cache
    /// the job may see.
    pub project_id: Option<u64>,
    /// The payload's `git_info.protected`: protected refs get a cache of their own, as
    /// GitLab keeps their cache keys apart.
    pub protected: bool,
    /// The payload's `runner_info.timeout` (seconds): how long the job may run.
    pub timeout_secs: Option<u64>,
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
    #[serde(default)]
    job_info: Option<JobInfo>,
    #[serde(default)]
    git_info: Option<GitInfo>,
    #[serde(default)]
    runner_info: Option<RunnerInfo>,
}

#[derive(Deserialize, Default)]
struct RunnerInfo {
    #[serde(default)]
    timeout: Option<u64>,
}

#[derive(Deserialize, Default)]
struct JobInfo {
    #[serde(default)]
    project_id: Option<u64>,
}

#[derive(Deserialize, Default)]
struct GitInfo {
    #[serde(default)]
    protected: Option<bool>,
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
    #[serde(default)]
    executor_opts: Option<ExecutorOpts>,
}

/// The payload's `executor_opts` of an image or service (`image: docker: {user, platform}`).
#[derive(Deserialize, Default, Clone)]
struct ExecutorOpts {
    #[serde(default)]
    docker: Option<DockerOpts>,
}

#[derive(Deserialize, Default, Clone)]
struct DockerOpts {
    #[serde(default)]
    platform: Option<String>,
    #[serde(default)]
    user: Option<String>,
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

/// The job's variables for expansion: the payload's list (or the `CUSTOM_ENV_*` ones).
struct Vars<'a>(&'a [(String, String)]);

impl Vars<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        // A later definition wins, as in gitlab-runner's variable list.
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn expand(&self, value: &str) -> String {
        expand(value, |k| self.get(k))
    }
}

fn image_spec(p: &PayloadImage, vars: &Vars) -> ImageSpec {
    let docker = p
        .executor_opts
        .as_ref()
        .and_then(|o| o.docker.clone())
        .unwrap_or_default();
    let non_empty = |v: Option<String>| v.map(|v| vars.expand(&v)).filter(|v| !v.is_empty());
    ImageSpec {
        name: vars.expand(&p.name),
        entrypoint: p
            .entrypoint
            .as_ref()
            .map(|e| e.iter().filter(|s| !s.is_empty()).cloned().collect()),
        pull_policy: p.pull_policy.clone().unwrap_or_default(),
        user: non_empty(docker.user),
        platform: non_empty(docker.platform),
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
        let variables: Vec<(String, String)> = if payload.variables.is_empty() {
            env.vars
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            payload
                .variables
                .iter()
                .map(|v| (v.key.clone(), v.value.clone()))
                .collect()
        };
        let vars = Vars(&variables);
        // The variable carries the name gitlab-runner gives the job; the payload the rest.
        let image = match (env.var("CI_JOB_IMAGE"), &payload.image) {
            (Some(name), Some(p)) => Some(ImageSpec {
                name: vars.expand(name),
                ..image_spec(p, &vars)
            }),
            (Some(name), None) => Some(ImageSpec {
                name: vars.expand(name),
                entrypoint: None,
                pull_policy: Vec::new(),
                user: None,
                platform: None,
            }),
            (None, Some(p)) if !p.name.is_empty() => Some(image_spec(p, &vars)),
            _ => None,
        }
        .filter(|i| !i.name.is_empty());
        let services = if payload.services.is_empty() {
            services_from_env(env)?
        } else {
            payload.services.clone()
        };
        let services = services
            .into_iter()
            .filter(|s| !s.name.is_empty())
            .map(|s| {
                let image = image_spec(&s, &vars);
                let alias = s.alias.as_deref().map(|a| vars.expand(a));
                ServiceSpec {
                    aliases: service_aliases(&image.name, alias.as_deref()),
                    image,
                    command: s.command.clone().unwrap_or_default(),
                    variables: s
                        .variables
                        .clone()
                        .map(Variables::pairs)
                        .unwrap_or_default(),
                }
            })
            .filter(|s| !s.image.name.is_empty())
            .collect();
        // gitlab-runner's order: the job's DOCKER_AUTH_CONFIG, the runner host's, then the
        // payload's credentials (GitLab's own registry with the job token).
        let mut sources: Vec<AuthConfig> = Vec::new();
        if let Some(cfg) = env.var("DOCKER_AUTH_CONFIG") {
            sources.push(parse_docker_auth_config(cfg)?);
        }
        if let Some(cfg) = env.runner_docker_auth_config.as_deref() {
            sources.push(parse_docker_auth_config(cfg)?);
        }
        sources.push(AuthConfig {
            auths: payload
                .credentials
                .into_iter()
                .filter(|c| c.kind == "registry")
                .map(|c| RegistryCredential {
                    registry: normalize_registry(&c.url),
                    username: c.username,
                    password: c.password,
                })
                .collect(),
            ..Default::default()
        });
        Ok(Self {
            image,
            services,
            credentials: Credentials::new(sources),
            variables,
            project_id: payload.job_info.and_then(|j| j.project_id),
            protected: payload.git_info.and_then(|g| g.protected).unwrap_or(false),
            timeout_secs: payload.runner_info.and_then(|r| r.timeout),
        })
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

    #[test]
    fn names_aliases_and_docker_options_are_expanded_from_the_job_variables() {
        let env = JobEnv::from_vars([(
            "CUSTOM_ENV_CI_JOB_IMAGE".to_string(),
            "$CI_REGISTRY_IMAGE/builder:${TAG}".to_string(),
        )]);
        let payload: Payload = serde_json::from_str(
            r#"{"image": {"name": "$CI_REGISTRY_IMAGE/builder:${TAG}",
                          "executor_opts": {"docker": {"user": "$BUILD_USER", "platform": "linux/amd64"}}},
                "services": [{"name": "docker:${DIND_VERSION}-dind", "alias": "$SVC_ALIAS"}],
                "variables": [{"key": "CI_REGISTRY_IMAGE", "value": "reg.example.com/g/p"},
                              {"key": "TAG", "value": "v1"}, {"key": "DIND_VERSION", "value": "27"},
                              {"key": "SVC_ALIAS", "value": "docker"}, {"key": "BUILD_USER", "value": "1000"}]}"#,
        )
        .unwrap();
        let spec = JobSpec::from_parts(&env, payload).unwrap();
        let image = spec.image.unwrap();
        assert_eq!(image.name, "reg.example.com/g/p/builder:v1");
        assert_eq!(image.user.as_deref(), Some("1000"));
        assert_eq!(image.platform.as_deref(), Some("linux/amd64"));
        assert_eq!(spec.services[0].image.name, "docker:27-dind");
        assert_eq!(spec.services[0].aliases, vec!["docker"]);
    }
}
