//! What a job's containers may be and do, in the docker executor's names: privilege,
//! volumes and `[job.container]` options (resources, kernel and network settings), and
//! the value types they are written in (`"2g"`, `"1.5"` CPUs, `"/src:/dst:ro"`).
//!
//! Values are checked when the file is read, so a typo is a config error naming the key,
//! never a failed job.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `[job.container]`: options of the build container, with `services_*` counterparts
/// where gitlab-runner's docker executor has them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerOptions {
    /// `/dev/shm` size of the build and service containers (Docker's default is 64m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<ByteSize>,
    /// tmpfs mounts of the build container: path -> mount options (`"rw,noexec"`, or "").
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tmpfs: BTreeMap<String, String>,
    /// tmpfs mounts of every service container.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services_tmpfs: BTreeMap<String, String>,
    /// `host:ip` entries added to /etc/hosts of the job's containers (helper included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_hosts: Vec<String>,
    /// DNS servers of the job's containers (helper included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_search: Vec<String>,
    /// Linux capabilities added to / dropped from the build container (`NET_ADMIN`, `ALL`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// Host devices for the build container: `/dev/fuse`, `/dev/x:/dev/y`, `/dev/x:/dev/y:rwm`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// Host devices for services whose image matches the glob (key), as the docker executor.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services_devices: BTreeMap<String, Vec<String>>,
    /// `--security-opt` of the build container (`seccomp=unconfined`, `no-new-privileges`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_opt: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services_security_opt: Vec<String>,
    /// Namespaced kernel parameters of the build container (`net.ipv4.ip_forward = "1"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sysctls: BTreeMap<String, String>,
    /// Resource limits of the build container: name -> `"soft"` or `"soft:hard"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ulimits: BTreeMap<String, Ulimit>,
    /// User the build container runs as; wins over the job's `image: docker: user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Memory limit of the build container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// CPU limit of the build container (`"1.5"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Cpus>,
    /// GPUs for the build container (Docker DeviceRequests): `"all"`, a count, or
    /// `"device=0,1"`. Only on classes whose machines have GPUs and the NVIDIA runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<Gpus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_memory: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_cpus: Option<Cpus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_gpus: Option<Gpus>,
}

impl ContainerOptions {
    /// Checks the values serde cannot (formats inside strings); `Err((key, message))`
    /// with the key relative to `[job.container]`.
    pub fn check(&self) -> Result<(), (String, String)> {
        for (i, h) in self.extra_hosts.iter().enumerate() {
            match h.split_once(':') {
                Some((host, ip)) if !host.is_empty() && !ip.is_empty() => {}
                _ => {
                    return Err((
                        format!("extra_hosts[{i}]"),
                        format!("{h:?} must be \"host:ip\""),
                    ))
                }
            }
        }
        for (i, d) in self.devices.iter().enumerate() {
            DeviceMapping::parse(d).map_err(|m| (format!("devices[{i}]"), m))?;
        }
        for (glob, devices) in &self.services_devices {
            for (i, d) in devices.iter().enumerate() {
                DeviceMapping::parse(d)
                    .map_err(|m| (format!("services_devices.{glob:?}[{i}]"), m))?;
            }
        }
        for (path, _) in self.tmpfs.iter().chain(&self.services_tmpfs) {
            if !path.starts_with('/') {
                return Err(("tmpfs".into(), format!("{path:?} must be an absolute path")));
            }
        }
        for (k, v) in [("user", &self.user)] {
            if v.as_deref().is_some_and(|u| u.trim().is_empty()) {
                return Err((k.into(), "must not be empty".into()));
            }
        }
        Ok(())
    }
}

/// A volume of `[job] volumes`, in the docker executor's syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSpec {
    /// `"/certs/client"`: a volume made for the job at that path, shared by the build
    /// container and the services, removed at cleanup.
    PerJob { target: String },
    /// `"/src:/dst[:ro]"` (a path on the build machine) or `"name:/dst[:ro]"` (a named
    /// Docker volume that outlives the job: shared by every job on the machine).
    Bind {
        source: String,
        target: String,
        mode: Option<String>,
    },
}

impl VolumeSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let absolute = |p: &str| p.starts_with('/') && !p.contains("..");
        match parts.as_slice() {
            [target] if absolute(target) => Ok(Self::PerJob {
                target: (*target).to_owned(),
            }),
            [source, target] | [source, target, _] if absolute(target) && !source.is_empty() => {
                let mode = parts.get(2).map(|m| (*m).to_owned());
                if let Some(m) = &mode {
                    let ok = m.split(',').all(|o| {
                        matches!(
                            o,
                            "ro" | "rw"
                                | "z"
                                | "Z"
                                | "shared"
                                | "rshared"
                                | "slave"
                                | "rslave"
                                | "private"
                                | "rprivate"
                                | "nocopy"
                        )
                    });
                    if !ok {
                        return Err(format!(
                            "{s:?}: mode {m:?} must be ro or rw (optionally with z, Z or a propagation)"
                        ));
                    }
                }
                Ok(Self::Bind {
                    source: (*source).to_owned(),
                    target: (*target).to_owned(),
                    mode,
                })
            }
            _ => Err(format!(
                "{s:?} must be \"/path\" (a volume for the job), \"/host/path:/path[:ro]\" or \"name:/path[:ro]\""
            )),
        }
    }

    pub fn target(&self) -> &str {
        match self {
            Self::PerJob { target } | Self::Bind { target, .. } => target,
        }
    }
}

/// A host device mapping `host[:container[:permissions]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMapping {
    pub host: String,
    pub container: String,
    pub permissions: String,
}

impl DeviceMapping {
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad =
            || format!("{s:?} must be \"/dev/x\", \"/dev/x:/dev/y\" or \"/dev/x:/dev/y:rwm\"");
        let (host, container, permissions) = match parts.as_slice() {
            [h] => (*h, *h, "rwm"),
            [h, c] => (*h, *c, "rwm"),
            [h, c, p] => (*h, *c, *p),
            _ => return Err(bad()),
        };
        if !host.starts_with('/')
            || !container.starts_with('/')
            || permissions.is_empty()
            || !permissions.chars().all(|c| matches!(c, 'r' | 'w' | 'm'))
        {
            return Err(bad());
        }
        Ok(Self {
            host: host.into(),
            container: container.into(),
            permissions: permissions.into(),
        })
    }
}

/// A size in bytes, written as a number of bytes or with a unit: `"64m"`, `"2g"`, `"512MiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || format!("{s:?} is not a size like \"512m\", \"2g\" or a number of bytes");
        let n: f64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            _ => return Err(bad()),
        };
        let bytes = n * mult as f64;
        if !bytes.is_finite() || bytes < 1.0 || bytes > i64::MAX as f64 {
            return Err(bad());
        }
        Ok(Self(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, size) in [("g", 1u64 << 30), ("m", 1 << 20), ("k", 1 << 10)] {
            if b >= size && b.is_multiple_of(size) {
                return write!(f, "{}{unit}", b / size);
            }
        }
        write!(f, "{b}")
    }
}

/// A CPU count (`1.5`), kept as Docker's NanoCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpus(pub i64);

impl Cpus {
    pub fn parse(s: &str) -> Result<Self, String> {
        let n: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a number of CPUs like \"1.5\""))?;
        if !(n > 0.0 && n <= 1024.0) {
            return Err(format!("{s:?} must be more than 0 and at most 1024 CPUs"));
        }
        Ok(Self((n * 1e9).round() as i64))
    }
}

impl fmt::Display for Cpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0 as f64 / 1e9)
    }
}

/// `ulimits` value: soft and hard limit (`"1024"` means both; `"1024:2048"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ulimit {
    pub soft: i64,
    pub hard: i64,
}

impl Ulimit {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} must be \"soft\" or \"soft:hard\" (integers, -1 = unlimited)");
        let (soft, hard) = match s.trim().split_once(':') {
            Some((a, b)) => (a, b),
            None => (s.trim(), s.trim()),
        };
        let soft: i64 = soft.trim().parse().map_err(|_| bad())?;
        let hard: i64 = hard.trim().parse().map_err(|_| bad())?;
        if soft < -1 || hard < -1 || (hard != -1 && (soft == -1 || soft > hard)) {
            return Err(bad());
        }
        Ok(Self { soft, hard })
    }
}

impl fmt::Display for Ulimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.soft == self.hard {
            write!(f, "{}", self.soft)
        } else {
            write!(f, "{}:{}", self.soft, self.hard)
        }
    }
}

/// `gpus`: Docker's `--gpus` forms Flotilla supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gpus {
    All,
    Count(u32),
    Devices(Vec<String>),
}

impl Gpus {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t == "all" {
            return Ok(Self::All);
        }
        if let Ok(n) = t.parse::<u32>() {
            if n > 0 {
                return Ok(Self::Count(n));
            }
        }
        if let Some(ids) = t.strip_prefix("device=") {
            let ids: Vec<String> = ids
                .trim_matches('"')
                .split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .map(str::to_owned)
                .collect();
            if !ids.is_empty() {
                return Ok(Self::Devices(ids));
            }
        }
        Err(format!(
            "{s:?} must be \"all\", a number of GPUs, or \"device=0,1\""
        ))
    }
}

impl fmt::Display for Gpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => write!(f, "all"),
            Self::Count(n) => write!(f, "{n}"),
            Self::Devices(ids) => write!(f, "device={}", ids.join(",")),
        }
    }
}

/// The string-or-number value types: written back as strings, read from either.
macro_rules! string_value {
    ($t:ty, $expect:literal) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expect)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$t, E> {
                        <$t>::parse(v).map_err(E::custom)
                    }
                    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<$t, E> {
                        <$t>::parse(&v.to_string()).map_err(E::custom)
                    }
                    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<$t, E> {
                        <$t>::parse(&v.to_string()).map_err(E::custom)
                    }
                    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<$t, E> {
                        <$t>::parse(&v.to_string()).map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

string_value!(ByteSize, "a size like \"512m\" or \"2g\"");
string_value!(Cpus, "a number of CPUs like 1.5");
string_value!(Ulimit, "\"soft\" or \"soft:hard\"");
string_value!(Gpus, "\"all\", a number of GPUs or \"device=0,1\"");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_docker_units() {
        assert_eq!(ByteSize::parse("64m").unwrap().0, 64 << 20);
        assert_eq!(ByteSize::parse("2g").unwrap().0, 2 << 30);
        assert_eq!(ByteSize::parse("512MiB").unwrap().0, 512 << 20);
        assert_eq!(ByteSize::parse("1.5g").unwrap().0, 3 << 29);
        assert_eq!(ByteSize::parse("4096").unwrap().0, 4096);
        for bad in ["", "g", "-1m", "2 parsecs", "0"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(ByteSize(2 << 30).to_string(), "2g");
    }

    #[test]
    fn cpus_become_nanocpus() {
        assert_eq!(Cpus::parse("1.5").unwrap().0, 1_500_000_000);
        assert!(Cpus::parse("0").is_err());
        assert!(Cpus::parse("lots").is_err());
    }

    #[test]
    fn ulimits_and_gpus_parse_like_docker() {
        assert_eq!(
            Ulimit::parse("1024:2048").unwrap(),
            Ulimit {
                soft: 1024,
                hard: 2048
            }
        );
        assert_eq!(Ulimit::parse("-1").unwrap().hard, -1);
        assert!(Ulimit::parse("2048:1024").is_err());
        assert_eq!(Gpus::parse("all").unwrap(), Gpus::All);
        assert_eq!(Gpus::parse("2").unwrap(), Gpus::Count(2));
        assert_eq!(
            Gpus::parse("device=0,1").unwrap(),
            Gpus::Devices(vec!["0".into(), "1".into()])
        );
        assert!(Gpus::parse("some").is_err());
    }

    #[test]
    fn volumes_follow_the_docker_executor_syntax() {
        assert_eq!(
            VolumeSpec::parse("/certs/client").unwrap(),
            VolumeSpec::PerJob {
                target: "/certs/client".into()
            }
        );
        assert_eq!(
            VolumeSpec::parse("/srv/data:/data:ro").unwrap(),
            VolumeSpec::Bind {
                source: "/srv/data".into(),
                target: "/data".into(),
                mode: Some("ro".into())
            }
        );
        assert!(VolumeSpec::parse("relative").is_err());
        assert!(VolumeSpec::parse("/a:/b:rx").is_err());
        assert!(VolumeSpec::parse("/a:b").is_err());
    }

    #[test]
    fn devices_and_hosts_are_checked_with_their_key() {
        let opts = ContainerOptions {
            devices: vec!["/dev/fuse".into(), "fuse".into()],
            ..Default::default()
        };
        assert_eq!(opts.check().unwrap_err().0, "devices[1]");
        let opts = ContainerOptions {
            extra_hosts: vec!["gitlab.internal".into()],
            ..Default::default()
        };
        assert_eq!(opts.check().unwrap_err().0, "extra_hosts[0]");
    }
}
