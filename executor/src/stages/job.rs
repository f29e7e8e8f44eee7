//! What a stage knows about its job: gitlab-runner's environment contract, and the names
//! of the Docker objects the job owns on its machine.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Label on every container, network and volume a job creates; cleanup removes by it.
pub const JOB_LABEL: &str = "flotilla.job";
/// GitLab's job id (from the payload) on the same objects, for operators looking for a
/// job on a machine (`docker ps --filter label=flotilla.job_id=123`). Informational only:
/// nothing is removed or trusted by it.
pub const JOB_ID_LABEL: &str = "flotilla.job_id";
/// Prefix of the cache volumes on a machine: one per project (and apart for protected
/// refs), shared by that project's jobs that run on the machine one after another.
pub const CACHE_VOLUME_PREFIX: &str = "flotilla-cache";

#[derive(Debug, Clone)]
pub struct JobEnv {
    pub build_failure_code: i32,
    pub system_failure_code: i32,
    pub build_exit_code_file: Option<PathBuf>,
    /// GitLab's job payload (mode 0600; holds the job token).
    pub job_response_file: Option<PathBuf>,
    /// `DOCKER_AUTH_CONFIG` from the runner's own environment (secret).
    pub runner_docker_auth_config: Option<String>,
    pub tmpdir: PathBuf,
    /// Job variables (`CUSTOM_ENV_<NAME>` with the prefix stripped). May hold secrets:
    /// never log values.
    pub vars: BTreeMap<String, String>,
}

impl JobEnv {
    pub fn from_env() -> Self {
        Self::from_vars(std::env::vars())
    }

    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut env = Self {
            build_failure_code: 1,
            system_failure_code: 2,
            build_exit_code_file: None,
            job_response_file: None,
            runner_docker_auth_config: None,
            tmpdir: std::env::temp_dir(),
            vars: BTreeMap::new(),
        };
        let mut tmpdir = None;
        for (k, v) in vars {
            match k.as_str() {
                "BUILD_FAILURE_EXIT_CODE" => env.build_failure_code = v.trim().parse().unwrap_or(1),
                "SYSTEM_FAILURE_EXIT_CODE" => {
                    env.system_failure_code = v.trim().parse().unwrap_or(2)
                }
                "BUILD_EXIT_CODE_FILE" if !v.is_empty() => {
                    env.build_exit_code_file = Some(v.into())
                }
                "TMPDIR" if !v.is_empty() => tmpdir = Some(PathBuf::from(v)),
                "JOB_RESPONSE_FILE" if !v.is_empty() => env.job_response_file = Some(v.into()),
                "DOCKER_AUTH_CONFIG" if !v.is_empty() => env.runner_docker_auth_config = Some(v),
                _ => {
                    if let Some(name) = k.strip_prefix("CUSTOM_ENV_") {
                        env.vars.insert(name.to_owned(), v);
                    }
                }
            }
        }
        // gitlab-runner makes the per-job temp dir both cwd and TMPDIR.
        env.tmpdir = tmpdir
            .or_else(|| std::env::current_dir().ok())
            .unwrap_or_else(std::env::temp_dir);
        env
    }

    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// Identifies the job to the daemon and names its Docker objects: built only from what
    /// gitlab-runner controls (the payload's job id and the per-job temp dir), never from
    /// job variables.
    ///
    /// The payload's job id is read here, not when the environment is: only prepare and
    /// cleanup need it, so `config` and `run` (most of a job's stage calls) never read it.
    pub fn job_key(&self) -> String {
        let id = self.job_response_file.as_deref().and_then(read_job_id);
        job_key_for(id, &self.tmpdir)
    }
}

/// The job key for a payload job id and the per-job temp dir: `job-<id>-<8 hex>` (readable,
/// and unique even if two GitLab instances reuse a job id), or `tmp-<16 hex>` without a
/// payload (a stage driven by hand).
pub fn job_key_for(job_id: Option<u64>, tmpdir: &std::path::Path) -> String {
    // FNV-1a: stable across processes, unlike std's randomized hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tmpdir.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    match job_id {
        Some(id) => format!("job-{id}-{:08x}", (h >> 32) as u32 ^ h as u32),
        None => format!("tmp-{h:016x}"),
    }
}

/// The `id` of GitLab's job payload (a number; a numeric string is accepted too).
fn read_job_id(path: &std::path::Path) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Id {
        id: serde_json::Value,
    }
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice::<Id>(&bytes).ok()?.id {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Docker object names for one job.
pub struct JobNames {
    pub key: String,
    pub network: String,
    pub builds_volume: String,
    pub helper: String,
    pub build: String,
}

impl JobNames {
    /// GitLab's job id, for keys made from a payload (`job-<id>-<hash>`).
    pub fn job_id(&self) -> Option<u64> {
        self.key
            .strip_prefix("job-")?
            .split('-')
            .next()?
            .parse()
            .ok()
    }

    /// The labels of every Docker object of the job.
    pub fn labels(&self, role: &str) -> std::collections::HashMap<String, String> {
        let mut labels = std::collections::HashMap::from([
            (JOB_LABEL.to_owned(), self.key.clone()),
            ("flotilla.role".to_owned(), role.to_owned()),
        ]);
        if let Some(id) = self.job_id() {
            labels.insert(JOB_ID_LABEL.to_owned(), id.to_string());
        }
        labels
    }

    pub fn new(job_key: &str) -> Self {
        let base = format!("flotilla-{job_key}");
        Self {
            key: job_key.to_owned(),
            network: base.clone(),
            builds_volume: format!("{base}-builds"),
            helper: format!("{base}-helper"),
            build: format!("{base}-build"),
        }
    }
}

/// Stages the job image's container runs; every other stage (the predefined ones and any
/// stage name gitlab-runner adds later) runs in the helper container, as on the docker
/// executor.
pub fn runs_in_build_container(stage: &str) -> bool {
    stage == "build_script" || stage == "after_script" || stage.starts_with("step_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> JobEnv {
        JobEnv::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn reads_exit_codes_from_the_runner_not_hard_coded() {
        let e = env(&[
            ("BUILD_FAILURE_EXIT_CODE", "7"),
            ("SYSTEM_FAILURE_EXIT_CODE", "9"),
        ]);
        assert_eq!((e.build_failure_code, e.system_failure_code), (7, 9));
    }

    #[test]
    fn job_variables_lose_their_prefix() {
        let e = env(&[
            ("CUSTOM_ENV_CI_JOB_ID", "42"),
            ("PATH", "/bin"),
            ("TMPDIR", "/tmp/x"),
        ]);
        assert_eq!(e.var("CI_JOB_ID"), Some("42"));
        assert_eq!(e.var("PATH"), None);
    }

    #[test]
    fn job_key_comes_from_the_payload_and_temp_dir_never_from_variables() {
        let dir = tempfile::tempdir().unwrap();
        let payload = dir.path().join("response.json");
        std::fs::write(&payload, r#"{"id": 7001, "token": "x"}"#).unwrap();
        let tmp = dir.path().display().to_string();
        let vars = |job_id: &str| {
            JobEnv::from_vars(
                [
                    ("TMPDIR", tmp.as_str()),
                    ("JOB_RESPONSE_FILE", payload.to_str().unwrap()),
                    ("CUSTOM_ENV_CI_JOB_ID", job_id),
                ]
                .map(|(k, v)| (k.to_string(), v.to_string())),
            )
        };
        let honest = vars("7001");
        let liar = vars("6999");
        assert!(
            honest.job_key().starts_with("job-7001-"),
            "{}",
            honest.job_key()
        );
        assert_eq!(honest.job_key(), liar.job_key(), "CI_JOB_ID is ignored");
        // The same job id in another temp dir (another runner) is another key.
        assert_ne!(
            job_key_for(Some(7001), std::path::Path::new("/tmp/custom-executor1")),
            job_key_for(Some(7001), std::path::Path::new("/tmp/custom-executor2"))
        );
    }

    #[test]
    fn job_key_without_job_id_is_stable_per_temp_dir() {
        let a = env(&[("TMPDIR", "/tmp/custom-executor1")]);
        let b = env(&[("TMPDIR", "/tmp/custom-executor1")]);
        let c = env(&[("TMPDIR", "/tmp/custom-executor2")]);
        assert_eq!(a.job_key(), b.job_key());
        assert_ne!(a.job_key(), c.job_key());
        assert!(a.job_key().starts_with("tmp-"));
    }

    #[test]
    fn stages_route_like_the_docker_executor() {
        for s in [
            "build_script",
            "step_script",
            "step_release",
            "after_script",
        ] {
            assert!(runs_in_build_container(s), "{s}");
        }
        for s in [
            "prepare_script",
            "get_sources",
            "restore_cache",
            "archive_cache_on_failure",
            "upload_artifacts_on_success",
            "cleanup_file_variables",
            "some_future_stage",
        ] {
            assert!(!runs_in_build_container(s), "{s}");
        }
    }
}
