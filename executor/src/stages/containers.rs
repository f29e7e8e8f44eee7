//! How the job's containers are configured from `[job]` (the class's merged one): who runs
//! privileged, which volumes each container mounts, and the `[job.container]` options, in
//! the docker executor's semantics. Pure: prepare and the services module turn these into
//! Docker calls; the rules are tested here.
//!
//! | container | privileged | volumes | options |
//! |---|---|---|---|
//! | build | `privileged` and image in `allowed_privileged_images` | builds, cache, `volumes` | all of `[job.container]` |
//! | helper | never | builds, cache, `volumes` | `dns`, `dns_search`, `extra_hosts` |
//! | service | `services_privileged` (default `privileged`) and image in `allowed_privileged_services` | builds, `volumes` | `services_*`, `service_*`, `shm_size`, dns, hosts |
//!
//! The cache volume is the project's (from the payload, never from variables), apart for
//! protected refs: a job never sees another project's cache.

use std::collections::HashMap;

use bollard::models::{DeviceMapping, DeviceRequest, HostConfig, ResourcesUlimits};
use flotilla_proto::config::JobConfig;
use flotilla_proto::container::{ByteSize, Cpus, Gpus, VolumeSpec};

use super::glob;
use super::job::{JobNames, CACHE_VOLUME_PREFIX};
use super::spec::JobSpec;
use super::StageError;

/// The job variable with which a job (or, in a service's `variables:`, a service) says it
/// needs to run privileged: the job then fails at once, naming the setting, on a runner
/// that would run it unprivileged, instead of failing obscurely inside Docker-in-Docker.
pub const PRIVILEGED_VAR: &str = "FLOTILLA_PRIVILEGED";

/// Whether the build container runs privileged (the docker executor's rule).
pub fn build_privileged(job: &JobConfig, image: &str) -> bool {
    job.privileged && glob::allowed(&job.allowed_privileged_images, image)
}

/// Whether a service runs privileged (the docker executor's rule).
pub fn service_privileged(job: &JobConfig, image: &str) -> bool {
    job.services_privileged.unwrap_or(job.privileged)
        && glob::allowed(&job.allowed_privileged_services, image)
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// Checks, before any machine is leased, that the images and services are allowed and
/// that every container that asks for privilege gets it. Refusals are build failures that
/// name the setting.
pub fn check_job(
    job: &JobConfig,
    class: &str,
    spec: &JobSpec,
    image: &str,
) -> Result<(), StageError> {
    if image != job.default_image && !glob::allowed(&job.allowed_images, image) {
        return Err(StageError::build_message(format!(
            "the {image:?} image is not present on the list of allowed images of this runner (`allowed_images` of class {class}): {}",
            job.allowed_images.join(", ")
        )));
    }
    for s in &spec.services {
        if !glob::allowed(&job.allowed_services, &s.image.name) {
            return Err(StageError::build_message(format!(
                "the {:?} service image is not present on the list of allowed services of this runner (`allowed_services` of class {class}): {}",
                s.image.name,
                job.allowed_services.join(", ")
            )));
        }
    }
    let asks = |vars: &[(String, String)]| {
        vars.iter()
            .rev()
            .find(|(k, _)| k == PRIVILEGED_VAR)
            .is_some_and(|(_, v)| truthy(v))
    };
    let job_asks = asks(&spec.variables);
    if job_asks && !build_privileged(job, image) {
        let why = if !job.privileged {
            format!("`privileged` is false for class {class}")
        } else {
            format!(
                "{image:?} matches none of `allowed_privileged_images` of class {class} ({})",
                job.allowed_privileged_images.join(", ")
            )
        };
        return Err(StageError::build_message(format!(
            "this job asks for a privileged build container ({PRIVILEGED_VAR}), but this runner runs it unprivileged: {why}"
        )));
    }
    for s in &spec.services {
        if (job_asks || asks(&s.variables)) && !service_privileged(job, &s.image.name) {
            let why = if !job.services_privileged.unwrap_or(job.privileged) {
                format!("`services_privileged` (default: `privileged`) is false for class {class}")
            } else {
                format!(
                    "it matches none of `allowed_privileged_services` of class {class} ({})",
                    job.allowed_privileged_services.join(", ")
                )
            };
            return Err(StageError::build_message(format!(
                "this job asks for the service {:?} to run privileged ({PRIVILEGED_VAR}), but this runner runs it unprivileged: {why}",
                s.image.name
            )));
        }
    }
    Ok(())
}

/// A Docker volume made for the job (`"/certs/client"`), removed at cleanup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerJobVolume {
    pub name: String,
    pub target: String,
}

/// The job's `volumes` as Docker binds, the per-job volumes to create first, and the cache
/// volume it mounts at `cache_dir`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobVolumes {
    pub create: Vec<PerJobVolume>,
    pub binds: Vec<String>,
    pub cache: CacheVolume,
}

/// Where the job's local cache lives on the machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheVolume {
    pub name: String,
    /// The project, when known; without one the cache is the job's own (removed at cleanup).
    pub project_id: Option<u64>,
}

/// `flotilla-cache-p<project>` (`-protected` for protected refs); a job whose payload names
/// no project gets a cache of its own.
pub fn cache_volume(names: &JobNames, project_id: Option<u64>, protected: bool) -> CacheVolume {
    let name = match project_id {
        Some(p) if protected => format!("{CACHE_VOLUME_PREFIX}-p{p}-protected"),
        Some(p) => format!("{CACHE_VOLUME_PREFIX}-p{p}"),
        None => format!("{}-cache", names.network),
    };
    CacheVolume { name, project_id }
}

pub fn job_volumes(
    job: &JobConfig,
    names: &JobNames,
    spec: &JobSpec,
) -> Result<JobVolumes, StageError> {
    let mut out = JobVolumes {
        cache: cache_volume(names, spec.project_id, spec.protected),
        ..Default::default()
    };
    for (i, v) in job.volumes.iter().enumerate() {
        let spec = VolumeSpec::parse(v)
            .map_err(|m| StageError::system(format!("[job] volumes[{i}]: {m}")))?;
        match spec {
            VolumeSpec::PerJob { target } => {
                let name = format!("{}-vol{i}", names.network);
                out.binds.push(format!("{name}:{target}"));
                out.create.push(PerJobVolume { name, target });
            }
            VolumeSpec::Bind {
                source,
                target,
                mode,
            } => out.binds.push(match mode {
                Some(m) => format!("{source}:{target}:{m}"),
                None => format!("{source}:{target}"),
            }),
        }
    }
    Ok(out)
}

fn builds_bind(job: &JobConfig, names: &JobNames) -> String {
    format!("{}:{}", names.builds_volume, job.builds_dir)
}

fn cache_bind(job: &JobConfig, volumes: &JobVolumes) -> String {
    format!("{}:{}", volumes.cache.name, job.cache_dir)
}

fn non_empty<T: Clone>(v: &[T]) -> Option<Vec<T>> {
    (!v.is_empty()).then(|| v.to_vec())
}

fn map<K: Clone + Eq + std::hash::Hash + Ord, V: Clone>(
    m: &std::collections::BTreeMap<K, V>,
) -> Option<HashMap<K, V>> {
    (!m.is_empty()).then(|| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

fn devices(list: &[String]) -> Vec<DeviceMapping> {
    list.iter()
        .filter_map(|d| flotilla_proto::container::DeviceMapping::parse(d).ok())
        .map(|d| DeviceMapping {
            path_on_host: Some(d.host),
            path_in_container: Some(d.container),
            cgroup_permissions: Some(d.permissions),
        })
        .collect()
}

fn device_requests(gpus: &Option<Gpus>) -> Option<Vec<DeviceRequest>> {
    let (count, device_ids) = match gpus.as_ref()? {
        Gpus::All => (Some(-1), None),
        Gpus::Count(n) => (Some(i64::from(*n)), None),
        Gpus::Devices(ids) => (None, Some(ids.clone())),
    };
    Some(vec![DeviceRequest {
        driver: Some(String::new()),
        count,
        device_ids,
        capabilities: Some(vec![vec!["gpu".into()]]),
        options: None,
    }])
}

/// The network-facing options every container of the job shares.
fn network_options(job: &JobConfig, network: &str) -> HostConfig {
    let c = &job.container;
    HostConfig {
        network_mode: Some(network.to_owned()),
        dns: non_empty(&c.dns),
        dns_search: non_empty(&c.dns_search),
        extra_hosts: non_empty(&c.extra_hosts),
        ..Default::default()
    }
}

pub fn build_host_config(
    job: &JobConfig,
    names: &JobNames,
    volumes: &JobVolumes,
    privileged: bool,
) -> HostConfig {
    let c = &job.container;
    let mut binds = vec![builds_bind(job, names), cache_bind(job, volumes)];
    binds.extend(volumes.binds.iter().cloned());
    HostConfig {
        binds: Some(binds),
        privileged: privileged.then_some(true),
        shm_size: c.shm_size.map(|s| s.0 as i64),
        tmpfs: map(&c.tmpfs),
        cap_add: non_empty(&c.cap_add),
        cap_drop: non_empty(&c.cap_drop),
        devices: non_empty(&devices(&c.devices)),
        security_opt: non_empty(&c.security_opt),
        sysctls: map(&c.sysctls),
        ulimits: non_empty(
            &c.ulimits
                .iter()
                .map(|(name, u)| ResourcesUlimits {
                    name: Some(name.clone()),
                    soft: Some(u.soft),
                    hard: Some(u.hard),
                })
                .collect::<Vec<_>>(),
        ),
        memory: c.memory.map(|m| m.0 as i64),
        nano_cpus: c.cpus.map(|n| n.0),
        device_requests: device_requests(&c.gpus),
        ..network_options(job, &names.network)
    }
}

/// The helper container's: its job's share of a machine it shares, else no limit.
pub fn helper_host_config(
    job: &JobConfig,
    names: &JobNames,
    volumes: &JobVolumes,
    share: Option<&MachineShare>,
) -> HostConfig {
    let mut binds = vec![builds_bind(job, names), cache_bind(job, volumes)];
    binds.extend(volumes.binds.iter().cloned());
    HostConfig {
        binds: Some(binds),
        memory: share.map(|s| s.memory),
        nano_cpus: share.map(|s| s.nano_cpus),
        ..network_options(job, &names.network)
    }
}

/// A job's share of a machine that runs `jobs_per_machine` jobs at once: its CPUs and
/// memory divided evenly, so one job cannot starve the others on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineShare {
    pub nano_cpus: i64,
    pub memory: i64,
}

impl MachineShare {
    /// The share of one of `slots` jobs on a machine with `cpus` CPUs and `memory` bytes
    /// (as dockerd reports them); `None` with one job per machine or nothing reported.
    pub fn of(cpus: i64, memory: i64, slots: u32) -> Option<Self> {
        if slots <= 1 || cpus <= 0 || memory <= 0 {
            return None;
        }
        let slots = i64::from(slots);
        Some(Self {
            nano_cpus: (cpus.saturating_mul(1_000_000_000) / slots).max(1),
            memory: (memory / slots).max(1),
        })
    }

    /// Limits every container of the job (build and services) to the share, where
    /// `[job.container]` does not set its own.
    pub fn limit(&self, job: &mut JobConfig) {
        let c = &mut job.container;
        let memory = ByteSize(self.memory.unsigned_abs());
        c.memory.get_or_insert(memory);
        c.service_memory.get_or_insert(memory);
        c.cpus.get_or_insert(Cpus(self.nano_cpus));
        c.service_cpus.get_or_insert(Cpus(self.nano_cpus));
    }
}

pub fn service_host_config(
    job: &JobConfig,
    names: &JobNames,
    volumes: &JobVolumes,
    image: &str,
) -> HostConfig {
    let c = &job.container;
    let mut binds = vec![builds_bind(job, names)];
    binds.extend(volumes.binds.iter().cloned());
    let service_devices: Vec<String> = c
        .services_devices
        .iter()
        .filter(|(pattern, _)| glob::matches(pattern, image))
        .flat_map(|(_, d)| d.iter().cloned())
        .collect();
    HostConfig {
        binds: Some(binds),
        privileged: service_privileged(job, image).then_some(true),
        shm_size: c.shm_size.map(|s| s.0 as i64),
        tmpfs: map(&c.services_tmpfs),
        security_opt: non_empty(&c.services_security_opt),
        devices: non_empty(&devices(&service_devices)),
        memory: c.service_memory.map(|m| m.0 as i64),
        nano_cpus: c.service_cpus.map(|n| n.0),
        device_requests: device_requests(&c.service_gpus),
        ..network_options(job, &names.network)
    }
}

/// The build container's user: the runner's `[job.container] user` wins over the job's
/// `image: docker: user`, as on the docker executor.
pub fn build_user(job: &JobConfig, image_user: Option<&str>) -> Option<String> {
    job.container
        .user
        .clone()
        .or_else(|| image_user.map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::job::JobEnv;
    use flotilla_proto::config::Config;

    fn job(extra: &str) -> JobConfig {
        let text = format!(
            "fleet = \"f\"\nstate_dir = \"/s\"\ndefault_class = \"c\"\n[classes.c]\nami = \"a\"\n\
             instance_types = [\"t\"]\nsubnets = [\"s\"]\n[job]\ndefault_image = \"alpine:3\"\n{extra}"
        );
        let config = Config::from_toml(&text).unwrap();
        config.validate().unwrap();
        config.job
    }

    fn spec(services: &str, variables: &str) -> JobSpec {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("payload.json");
        std::fs::write(
            &path,
            format!(r#"{{"services": {services}, "variables": {variables}}}"#),
        )
        .unwrap();
        JobSpec::from_env(&JobEnv::from_vars([]), Some(&path)).unwrap()
    }

    fn build_error(r: Result<(), StageError>) -> String {
        match r {
            Err(StageError::Build {
                message: Some(m), ..
            }) => m,
            other => panic!("expected a build failure, got {other:?}"),
        }
    }

    #[test]
    fn privileged_follows_the_allow_lists_like_the_docker_executor() {
        let j = job("privileged = true\nallowed_privileged_images = [\"docker:*\"]\nallowed_privileged_services = [\"**/dind:*\"]");
        assert!(build_privileged(&j, "docker:27"));
        assert!(!build_privileged(&j, "alpine:3"));
        assert!(service_privileged(&j, "reg.io/tools/dind:27"));
        assert!(!service_privileged(&j, "postgres:16"));
        let j = job("privileged = false\nservices_privileged = true");
        assert!(!build_privileged(&j, "docker:27"));
        assert!(service_privileged(&j, "docker:27-dind"));
        let j = job("privileged = true\nservices_privileged = false");
        assert!(!service_privileged(&j, "docker:27-dind"));
    }

    #[test]
    fn images_and_services_outside_the_allow_lists_are_refused_naming_the_list() {
        let j = job(
            "allowed_images = [\"registry.example.com/**\"]\nallowed_services = [\"postgres:*\"]",
        );
        let m = build_error(check_job(&j, "c", &spec("[]", "[]"), "ubuntu:24.04"));
        assert!(
            m.contains("allowed_images") && m.contains("registry.example.com/**"),
            "{m}"
        );
        check_job(&j, "c", &spec("[]", "[]"), "alpine:3")
            .expect("the default image is always allowed");
        check_job(&j, "c", &spec("[]", "[]"), "registry.example.com/a/b:1").unwrap();
        let s = spec(r#"[{"name": "redis:7"}]"#, "[]");
        let m = build_error(check_job(&j, "c", &s, "registry.example.com/a:1"));
        assert!(
            m.contains("allowed_services") && m.contains("redis:7"),
            "{m}"
        );
    }

    #[test]
    fn asking_for_privileged_where_it_is_not_given_names_the_setting() {
        let ask = r#"[{"key": "FLOTILLA_PRIVILEGED", "value": "true"}]"#;
        let m = build_error(check_job(&job(""), "c", &spec("[]", ask), "docker:27"));
        assert!(m.contains("`privileged` is false"), "{m}");
        let j = job("privileged = true\nallowed_privileged_images = [\"docker:*\"]");
        let m = build_error(check_job(&j, "c", &spec("[]", ask), "alpine:3"));
        assert!(m.contains("allowed_privileged_images"), "{m}");
        check_job(&j, "c", &spec("[]", ask), "docker:27").unwrap();
        // A service asks in its own variables; other services are not concerned.
        let s = spec(
            r#"[{"name": "docker:27-dind", "variables": [{"key": "FLOTILLA_PRIVILEGED", "value": "1"}]}, {"name": "postgres:16"}]"#,
            "[]",
        );
        let m = build_error(check_job(&job(""), "c", &s, "docker:27"));
        assert!(
            m.contains("services_privileged") && m.contains("docker:27-dind"),
            "{m}"
        );
        let j = job("privileged = true\nallowed_privileged_services = [\"docker:*-dind\"]");
        check_job(&j, "c", &s, "docker:27").unwrap();
        // Without asking, an unprivileged run is the docker executor's silent behaviour.
        check_job(&job(""), "c", &spec("[]", "[]"), "docker:27").unwrap();
    }

    #[test]
    fn volumes_become_binds_and_per_job_volumes() {
        let j = job("volumes = [\"/certs/client\", \"/srv/ca:/ca:ro\", \"shared:/shared\"]");
        let names = JobNames::new("job-7");
        let v = job_volumes(&j, &names, &spec("[]", "[]")).unwrap();
        assert_eq!(
            v.create,
            vec![PerJobVolume {
                name: "flotilla-job-7-vol0".into(),
                target: "/certs/client".into()
            }]
        );
        assert_eq!(
            v.binds,
            vec![
                "flotilla-job-7-vol0:/certs/client",
                "/srv/ca:/ca:ro",
                "shared:/shared"
            ]
        );
        let build = build_host_config(&j, &names, &v, false);
        let binds = build.binds.unwrap();
        assert!(binds.contains(&"flotilla-job-7-builds:/builds".to_string()));
        assert!(binds.contains(&"flotilla-job-7-vol0:/certs/client".to_string()));
        let service = service_host_config(&j, &names, &v, "docker:dind");
        let binds = service.binds.unwrap();
        assert!(binds.contains(&"flotilla-job-7-vol0:/certs/client".to_string()));
        assert!(
            !binds.iter().any(|b| b.starts_with(CACHE_VOLUME_PREFIX)),
            "services do not see the cache"
        );
    }

    #[test]
    fn the_cache_is_the_projects_and_protected_refs_have_their_own() {
        let names = JobNames::new("job-1");
        assert_eq!(
            cache_volume(&names, Some(42), false).name,
            "flotilla-cache-p42"
        );
        assert_eq!(
            cache_volume(&names, Some(42), true).name,
            "flotilla-cache-p42-protected"
        );
        assert_ne!(
            cache_volume(&names, Some(42), false),
            cache_volume(&names, Some(43), false)
        );
        // No project in the payload: a cache nobody else mounts.
        assert_eq!(
            cache_volume(&names, None, false).name,
            "flotilla-job-1-cache"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("payload.json");
        std::fs::write(
            &path,
            r#"{"job_info": {"project_id": 42}, "git_info": {"protected": true},
                "variables": [{"key": "CI_PROJECT_ID", "value": "43"}]}"#,
        )
        .unwrap();
        let spec = JobSpec::from_env(&JobEnv::from_vars([]), Some(&path)).unwrap();
        let v = job_volumes(&job(""), &names, &spec).unwrap();
        assert_eq!(
            v.cache.name, "flotilla-cache-p42-protected",
            "variables never choose the cache"
        );
    }

    #[test]
    fn container_options_reach_the_right_containers() {
        let j = job(
            "[job.container]\nshm_size = \"2g\"\ncap_add = [\"NET_ADMIN\"]\ncap_drop = [\"MKNOD\"]\n\
             devices = [\"/dev/fuse\"]\nsecurity_opt = [\"no-new-privileges\"]\nsysctls = { \"net.ipv4.ip_forward\" = \"1\" }\n\
             ulimits = { nofile = \"1024:2048\" }\nmemory = \"1g\"\ncpus = \"1.5\"\ngpus = \"all\"\n\
             tmpfs = { \"/scratch\" = \"rw\" }\nservices_tmpfs = { \"/var/lib/postgresql/data\" = \"rw\" }\n\
             extra_hosts = [\"gitlab.internal:10.0.0.5\"]\ndns = [\"10.0.0.2\"]\n\
             services_devices = { \"postgres:*\" = [\"/dev/null:/dev/x\"] }\nservice_memory = \"512m\"\n",
        );
        let names = JobNames::new("job-1");
        let v = JobVolumes::default();
        let b = build_host_config(&j, &names, &v, true);
        assert_eq!(b.privileged, Some(true));
        assert_eq!(b.shm_size, Some(2 << 30));
        assert_eq!(b.cap_add, Some(vec!["NET_ADMIN".to_string()]));
        assert_eq!(b.memory, Some(1 << 30));
        assert_eq!(b.nano_cpus, Some(1_500_000_000));
        let u = &b.ulimits.unwrap()[0];
        assert_eq!((u.soft, u.hard), (Some(1024), Some(2048)));
        let gpu = &b.device_requests.unwrap()[0];
        assert_eq!(gpu.count, Some(-1));
        assert_eq!(gpu.capabilities, Some(vec![vec!["gpu".to_string()]]));
        assert_eq!(
            b.devices.unwrap()[0].path_on_host.as_deref(),
            Some("/dev/fuse")
        );
        assert_eq!(
            b.extra_hosts,
            Some(vec!["gitlab.internal:10.0.0.5".to_string()])
        );
        let h = helper_host_config(&j, &names, &v, None);
        assert_eq!(h.privileged, None);
        assert_eq!(h.cap_add, None);
        assert_eq!(
            h.dns,
            Some(vec!["10.0.0.2".to_string()]),
            "the helper resolves like the job"
        );
        let s = service_host_config(&j, &names, &v, "postgres:16");
        assert_eq!(s.shm_size, Some(2 << 30));
        assert!(s.tmpfs.unwrap().contains_key("/var/lib/postgresql/data"));
        assert_eq!(s.memory, Some(512 << 20));
        assert_eq!(s.devices.unwrap().len(), 1);
        assert_eq!(s.cap_add, None);
        let s = service_host_config(&j, &names, &v, "redis:7");
        assert_eq!(s.devices, None);
        assert_eq!(
            build_user(&j, Some("1000")).as_deref(),
            Some("1000"),
            "the image's user when the runner sets none"
        );
    }

    #[test]
    fn a_shared_machine_is_divided_evenly_unless_the_config_says() {
        assert_eq!(MachineShare::of(4, 16 << 30, 1), None, "one job: no limit");
        assert_eq!(MachineShare::of(0, 16 << 30, 4), None, "nothing reported");
        let share = MachineShare::of(4, 16 << 30, 4).unwrap();
        assert_eq!(share.nano_cpus, 1_000_000_000);
        assert_eq!(share.memory, 4 << 30);
        let mut j = JobConfig::default();
        j.container.memory = Some(ByteSize(1 << 30));
        share.limit(&mut j);
        let names = JobNames::new("runner-1-job-9");
        let v = job_volumes(&j, &names, &spec("[]", "[]")).unwrap();
        let build = build_host_config(&j, &names, &v, false);
        assert_eq!(build.memory, Some(1 << 30), "the config's own limit wins");
        assert_eq!(build.nano_cpus, Some(1_000_000_000));
        let service = service_host_config(&j, &names, &v, "postgres:16");
        assert_eq!(
            (service.memory, service.nano_cpus),
            (Some(4 << 30), Some(1_000_000_000))
        );
        let helper = helper_host_config(&j, &names, &v, Some(&share));
        assert_eq!(
            (helper.memory, helper.nano_cpus),
            (Some(4 << 30), Some(1_000_000_000))
        );
        let alone = helper_host_config(&j, &names, &v, None);
        assert_eq!((alone.memory, alone.nano_cpus), (None, None));
    }
}
