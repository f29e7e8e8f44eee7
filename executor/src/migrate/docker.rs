//! `[runners.docker]`: the docker executor options Flotilla has (`[job]` and
//! `[job.container]` keep the docker executor's names), and for the others what to do
//! instead.

use flotilla_proto::config::PullPolicy;
use flotilla_proto::container::VolumeSpec;

use super::error::Bad;
use super::fields::{brief, is_empty_value};
use super::report::{Kind, Report};

/// One converted option: the `[runners.docker]` key it came from, where it goes in a
/// `[job]` table, and its value there.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct JobSetting {
    pub from: String,
    pub to: Vec<&'static str>,
    pub value: toml::Value,
}

impl JobSetting {
    /// The `[job]` key path, e.g. `container.shm_size`.
    pub(super) fn to_key(&self) -> String {
        self.to.join(".")
    }
}

/// `[runners.docker]` keys that are `[job]` keys of the same meaning.
const JOB_KEYS: &[(&str, &str)] = &[
    ("image", "default_image"),
    ("helper_image", "helper_image"),
    ("privileged", "privileged"),
    ("services_privileged", "services_privileged"),
    ("allowed_images", "allowed_images"),
    ("allowed_services", "allowed_services"),
    ("allowed_privileged_images", "allowed_privileged_images"),
    ("allowed_privileged_services", "allowed_privileged_services"),
];

/// `[runners.docker]` keys that are `[job.container]` keys.
const CONTAINER_KEYS: &[(&str, &str)] = &[
    ("shm_size", "shm_size"),
    ("tmpfs", "tmpfs"),
    ("services_tmpfs", "services_tmpfs"),
    ("extra_hosts", "extra_hosts"),
    ("dns", "dns"),
    ("dns_search", "dns_search"),
    ("cap_add", "cap_add"),
    ("cap_drop", "cap_drop"),
    ("devices", "devices"),
    ("services_devices", "services_devices"),
    ("security_opt", "security_opt"),
    ("services_security_opt", "services_security_opt"),
    ("sysctls", "sysctls"),
    ("ulimit", "ulimits"),
    ("user", "user"),
    ("memory", "memory"),
    ("cpus", "cpus"),
    ("gpus", "gpus"),
    ("service_memory", "service_memory"),
    ("service_cpus", "service_cpus"),
    ("service_gpus", "service_gpus"),
];

/// Options docker+machine needed to reach each machine's dockerd; Flotilla does that itself.
const NOT_NEEDED: &[&str] = &["host", "tls_cert_path", "tls_verify"];

/// Docker executor options Flotilla does not have, and what to do instead.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("cache_dir", "Flotilla keeps each project's cache in a Docker volume on the machine (pruned by cleanup past disk_high_water), not in a host directory"),
    ("disable_cache", "Flotilla always mounts the project's cache volume at cache_dir; use the distributed cache ([runners.cache]) for caches that outlive a machine"),
    ("services", "runner-defined services: declare them in .gitlab-ci.yml (services:)"),
    ("links", "use services: in .gitlab-ci.yml; every job has its own network"),
    ("volumes_from", "use volumes, or services: in .gitlab-ci.yml"),
    ("network_mode", "Flotilla always creates one network per job (FF_NETWORK_PER_BUILD)"),
    ("network_mtu", "set the MTU in the AMI's dockerd configuration"),
    ("enable_ipv6", "not available"),
    ("hostname", "not available: containers get Docker's generated hostname"),
    ("memory_swap", "only the hard limit exists: [job.container] memory"),
    ("memory_reservation", "only the hard limit exists: [job.container] memory"),
    ("service_memory_swap", "only the hard limit exists: [job.container] service_memory"),
    ("service_memory_reservation", "only the hard limit exists: [job.container] service_memory"),
    ("cpuset_cpus", "limit CPUs with [job.container] cpus, or pick an instance type of the right size"),
    ("cpuset_mems", "not available"),
    ("cpu_shares", "limit CPUs with [job.container] cpus"),
    ("service_cpuset_cpus", "limit services' CPUs with [job.container] service_cpus"),
    ("service_cpu_shares", "limit services' CPUs with [job.container] service_cpus"),
    ("oom_kill_disable", "not available (one job per machine: its memory is the machine's)"),
    ("oom_score_adjust", "not available"),
    ("userns_mode", "configure user namespaces in the AMI's dockerd"),
    ("isolation", "Windows only; Flotilla runs Linux machines"),
    ("cgroup_parent", "not available"),
    ("device_cgroup_rules", "list the devices in [job.container] devices"),
    ("group_add", "not available: set [job.container] user, or add the group in the image"),
    ("runtime", "set the default runtime in the AMI's dockerd configuration"),
    ("mac_address", "not available"),
    ("helper_image_flavor", "set [job] helper_image to the image of that flavour"),
    ("helper_image_autoset_arch_and_os", "set [job] helper_image for the machines' architecture"),
    ("disable_entrypoint_overwrite", "not available: jobs' image entrypoints run as on the docker executor's default"),
    ("log_options", "not available"),
    ("container_labels", "not available: Flotilla labels job containers flotilla.job and flotilla.job_id"),
    ("services_limit", "restrict services with [job] allowed_services"),
    ("volume_driver", "not available"),
    ("volume_keep", "Flotilla removes a job's volumes at cleanup; keep data on a machine with a named volume (\"name:/path\")"),
    ("pull_policy_retry", "not available"),
];

/// Converts one runner's `[runners.docker]` (at input key `path`, reported at `at`).
/// `cache_dir` and `builds_dir` are the runner's: volumes that would hide them are left out.
pub(super) fn convert(
    docker: toml::Table,
    path: &str,
    at: &str,
    dirs: (&str, &str),
    report: &mut Report,
) -> Result<Vec<JobSetting>, Bad> {
    let (builds_dir, cache_dir) = dirs;
    let mut out = Vec::new();
    let mut defaults = Vec::new();
    for (key, value) in docker {
        let here = format!("{at} docker.{key}");
        let input_key = format!("{path}.{key}");
        let job_key = JOB_KEYS.iter().find(|(k, _)| *k == key).map(|(_, t)| *t);
        let container_key = CONTAINER_KEYS
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, t)| *t);
        let mapped_bool = matches!(key.as_str(), "privileged" | "services_privileged");
        if is_empty_value(&value) && !mapped_bool {
            defaults.push(format!("{key} = {}", brief(&value)));
            continue;
        }
        if let Some(to) = job_key {
            out.push(JobSetting {
                from: key,
                to: vec![to],
                value,
            });
        } else if let Some(to) = container_key {
            out.push(JobSetting {
                from: key,
                to: vec!["container", to],
                value,
            });
        } else if key == "pull_policy" || key == "allowed_pull_policies" {
            let policies = pull_policies(&value, &input_key)?;
            out.push(JobSetting {
                from: key.clone(),
                to: vec![if key == "pull_policy" {
                    "pull_policy"
                } else {
                    "allowed_pull_policies"
                }],
                value: toml::Value::Array(policies),
            });
        } else if key == "volumes" {
            let volumes = volumes(&value, &input_key, &here, (builds_dir, cache_dir), report)?;
            if !volumes.is_empty() {
                out.push(JobSetting {
                    from: key,
                    to: vec!["volumes"],
                    value: toml::Value::Array(volumes),
                });
            }
        } else if key == "wait_for_services_timeout" {
            match value {
                toml::Value::Integer(s) if s > 0 => out.push(JobSetting {
                    from: key,
                    to: vec!["service_wait"],
                    value: toml::Value::String(format!("{s}s")),
                }),
                toml::Value::Integer(_) => report.push(
                    Kind::Unsupported,
                    here,
                    "Flotilla always checks services' ports, for at most [job] service_wait \
                     (30s by default); a failed check is only a warning",
                ),
                other => {
                    return Err(Bad::new(
                        input_key,
                        format!("expected a number of seconds, found {}", other.type_str()),
                    ))
                }
            }
        } else if NOT_NEEDED.contains(&key.as_str()) {
            report.push(
                Kind::Note,
                here,
                "not needed: Flotilla reaches each machine's dockerd over its own mutual TLS",
            );
        } else if let Some((_, advice)) = UNSUPPORTED.iter().find(|(k, _)| *k == key) {
            report.push(Kind::Unsupported, here, *advice);
        } else {
            report.push(
                Kind::Unknown,
                here,
                "not a [runners.docker] option Flotilla knows: not converted",
            );
        }
    }
    if !defaults.is_empty() {
        report.push(
            Kind::Kept,
            format!("{at} docker"),
            format!(
                "at their defaults, nothing to convert: {}",
                defaults.join(", ")
            ),
        );
    }
    Ok(out)
}

fn pull_policies(value: &toml::Value, key: &str) -> Result<Vec<toml::Value>, Bad> {
    let names: Vec<&toml::Value> = match value {
        toml::Value::Array(items) => items.iter().collect(),
        single => vec![single],
    };
    names
        .into_iter()
        .map(|v| match v.as_str().and_then(PullPolicy::parse) {
            Some(p) => Ok(toml::Value::String(p.as_str().into())),
            None => Err(Bad::new(
                key,
                format!(
                    "{} is not a pull policy (expected \"always\", \"if-not-present\" or \
                     \"never\")",
                    brief(v)
                ),
            )),
        })
        .collect()
}

fn volumes(
    value: &toml::Value,
    key: &str,
    here: &str,
    dirs: (&str, &str),
    report: &mut Report,
) -> Result<Vec<toml::Value>, Bad> {
    let (builds_dir, cache_dir) = dirs;
    let toml::Value::Array(items) = value else {
        return Err(Bad::new(
            key,
            format!("expected an array of strings, found {}", value.type_str()),
        ));
    };
    let mut kept = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let ikey = format!("{key}[{i}]");
        let Some(v) = item.as_str() else {
            return Err(Bad::new(
                ikey,
                format!("expected a string, found {}", item.type_str()),
            ));
        };
        let spec = VolumeSpec::parse(v).map_err(|m| Bad::new(&ikey, m))?;
        let target = spec.target().trim_end_matches('/');
        let at = format!("{here}[{i}] {v:?}");
        if target == cache_dir.trim_end_matches('/') {
            report.push(
                Kind::Converted,
                at,
                "left out: Flotilla mounts the project's cache volume at cache_dir itself",
            );
            continue;
        }
        if target == builds_dir.trim_end_matches('/') {
            report.push(
                Kind::Converted,
                at,
                "left out: Flotilla mounts the job's builds volume at builds_dir itself",
            );
            continue;
        }
        let message = match &spec {
            VolumeSpec::PerJob { .. } => {
                "[job] volumes; the docker executor kept this volume from job to job, \
                 Flotilla makes it for the job and removes it at cleanup: use cache: in \
                 .gitlab-ci.yml, or a named volume (\"name:/path\") to keep data on a machine"
            }
            VolumeSpec::Bind { source, .. } if source.starts_with('/') => {
                "[job] volumes; the source is a path on the build machine, as before: it \
                 must exist in the AMI"
            }
            VolumeSpec::Bind { .. } => "[job] volumes (a named volume, kept on the machine)",
        };
        report.push(Kind::Converted, at, message);
        kept.push(toml::Value::String(v.to_owned()));
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str) -> (Result<Vec<JobSetting>, Bad>, Report) {
        let mut report = Report::default();
        let t: toml::Table = toml::from_str(text).unwrap();
        let r = convert(
            t,
            "runners[0].docker",
            "at",
            ("/builds", "/cache"),
            &mut report,
        );
        (r, report)
    }

    #[test]
    fn maps_job_and_container_keys_in_flotillas_names() {
        let (s, report) = run(
            "image = \"ruby:3.3\"\nprivileged = false\nshm_size = 300000\npull_policy = \"if-not-present\"\n\
             [ulimit]\nnofile = \"1024:2048\"\n",
        );
        let s = s.unwrap();
        let keys: Vec<String> = s.iter().map(JobSetting::to_key).collect();
        assert_eq!(
            keys,
            [
                "default_image",
                "privileged",
                "container.shm_size",
                "pull_policy",
                "container.ulimits"
            ]
        );
        assert_eq!(report.entries().len(), 0);
    }

    #[test]
    fn the_cache_volume_is_left_out_and_others_are_explained() {
        let (s, report) = run("volumes = [\"/cache\", \"/data\", \"/srv:/srv:ro\"]\n");
        let s = s.unwrap();
        assert_eq!(s[0].value.as_array().unwrap().len(), 2);
        let lines = report.lines(Kind::Converted);
        assert!(
            lines[0].contains("\"/cache\"") && lines[0].contains("left out"),
            "{lines:?}"
        );
        assert!(lines[1].contains("removes it at cleanup"), "{lines:?}");
    }

    #[test]
    fn defaults_unsupported_and_unknown_keys_are_all_reported() {
        let (s, report) = run(
            "disable_cache = false\nlinks = [\"a:b\"]\ntls_verify = false\nfancy = 1\nhost = \"tcp://x\"\n",
        );
        assert!(s.unwrap().is_empty());
        assert_eq!(report.count(Kind::Unsupported), 1);
        assert_eq!(report.count(Kind::Unknown), 1);
        assert_eq!(report.count(Kind::Note), 1);
        let kept = report.lines(Kind::Kept);
        assert!(
            kept[0].contains("disable_cache = false, tls_verify = false"),
            "{kept:?}"
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let (s, _) = run("pull_policy = [\"sometimes\"]\n");
        let e = s.unwrap_err();
        assert_eq!(e.key, "runners[0].docker.pull_policy");
        assert!(e.message.contains("if-not-present"));
        let (s, _) = run("volumes = [\"relative\"]\n");
        assert_eq!(s.unwrap_err().key, "runners[0].docker.volumes[0]");
    }
}
