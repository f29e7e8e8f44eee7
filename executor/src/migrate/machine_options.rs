//! `MachineOptions` of the `amazonec2` docker-machine driver (and docker-machine's own
//! `engine-*` options): what each one becomes in a Flotilla class, or why it has none.
//! Every option gets a report line; AWS credentials are never shown.

use super::error::Bad;
use super::report::{shown, Kind, Report};

/// What a runner's `MachineOptions` say about its machines, in Flotilla's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Ec2Options {
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub ami: Option<String>,
    pub instance_type: Option<String>,
    pub vpc: Option<String>,
    pub zone: Option<String>,
    pub subnet: Option<String>,
    pub security_groups: Vec<String>,
    pub instance_profile: Option<String>,
    pub root_volume_gb: Option<u32>,
    /// `amazonec2-tags` (`key1,value1,key2,value2`), Flotilla's own keys left out.
    pub tags: std::collections::BTreeMap<String, String>,
    pub spot: bool,
    /// `amazonec2-private-address-only` or `amazonec2-use-private-address` was set.
    pub private_address: bool,
    /// `engine-registry-mirror`, `engine-insecure-registry`, `engine-opt` and `engine-env`
    /// settings Flotilla has (`[classes.X.dockerd]`).
    pub dockerd: flotilla_proto::dockerd::DockerdSettings,
}

/// docker-machine's region when `amazonec2-region` is not set.
pub(super) const DEFAULT_REGION: &str = "us-east-1";
/// docker-machine's instance type when `amazonec2-instance-type` is not set.
pub(super) const DEFAULT_INSTANCE_TYPE: &str = "t2.micro";
/// The security group docker-machine creates (open to the world on 22 and 2376) and uses
/// when `amazonec2-security-group` is not set.
pub(super) const DEFAULT_SECURITY_GROUP: &str = "docker-machine";

/// Reads `options` (the `MachineOptions` array at input key `key`), reporting each one at
/// `at`; `class` names the Flotilla class they are converted into.
pub(super) fn parse(
    options: &[String],
    key: &str,
    at: &str,
    class: &str,
    report: &mut Report,
) -> Result<Ec2Options, Bad> {
    let mut o = Ec2Options::default();
    let ckey = |k: &str| format!("classes.{class}.{k}");
    let mut credentials = Vec::new();
    for (i, option) in options.iter().enumerate() {
        let (name, value) = match option.split_once('=') {
            Some((n, v)) => (n.trim(), v.trim()),
            None => (option.trim(), ""),
        };
        let here = format!("{at} {}", shown(name, value));
        let bad = |message: String| Bad::new(format!("{key}[{i}]"), message);
        let flag = || {
            parse_bool(value).ok_or_else(|| bad(format!("{name}: {value:?} is not true or false")))
        };
        let text = || {
            if value.is_empty() {
                Err(bad(format!("{name} needs a value ({name}=...)")))
            } else {
                Ok(value.to_owned())
            }
        };
        let mut say = |kind: Kind, message: String| report.push(kind, &here, message);
        match name {
            "amazonec2-access-key" | "amazonec2-secret-key" | "amazonec2-session-token" => {
                credentials.push(name.to_owned());
            }
            "amazonec2-region" => {
                o.region = Some(text()?);
                say(Kind::Converted, "aws.region".into());
            }
            "amazonec2-endpoint" => {
                let endpoint = text()?;
                let url = if endpoint.contains("://") {
                    endpoint
                } else {
                    format!("https://{endpoint}")
                };
                say(Kind::Converted, format!("aws.endpoint_url = {url:?}"));
                o.endpoint = Some(url);
            }
            "amazonec2-insecure-transport" => {
                if flag()? {
                    say(
                        Kind::Unsupported,
                        "no separate switch: write the endpoint as http://... in \
                         aws.endpoint_url"
                            .into(),
                    );
                } else {
                    say(Kind::Note, "false: the default".into());
                }
            }
            "amazonec2-ami" => {
                o.ami = Some(text()?);
                say(
                    Kind::Action,
                    format!(
                        "{}: docker-machine installed Docker on it over SSH at every boot, \
                         Flotilla does not: the AMI must already have Docker 20.10+ and \
                         cloud-init (build one from it, or set the new AMI id here)",
                        ckey("ami")
                    ),
                );
            }
            "amazonec2-instance-type" => {
                o.instance_type = Some(text()?);
                say(
                    Kind::Converted,
                    format!(
                        "{} (a list: add more types to fall back on when one has no capacity)",
                        ckey("instance_types")
                    ),
                );
            }
            "amazonec2-vpc-id" => {
                o.vpc = Some(text()?);
                say(
                    Kind::Converted,
                    format!(
                        "implied by {}: every subnet must be in this VPC",
                        ckey("subnets")
                    ),
                );
            }
            "amazonec2-zone" => {
                o.zone = Some(text()?);
                say(
                    Kind::Converted,
                    format!(
                        "implied by {}: each subnet is in one zone (list subnets of several \
                         zones to fall back on when one zone has no capacity)",
                        ckey("subnets")
                    ),
                );
            }
            "amazonec2-subnet-id" => {
                o.subnet = Some(text()?);
                say(Kind::Converted, ckey("subnets"));
            }
            "amazonec2-security-group" => {
                let group = text()?;
                if group.starts_with("sg-") {
                    say(Kind::Converted, ckey("security_groups"));
                } else {
                    say(
                        Kind::Action,
                        format!(
                            "{}: docker-machine takes group names, Flotilla launches with \
                             group ids: replace {group:?} with its id (aws ec2 \
                             describe-security-groups --filters Name=group-name,Values={group}); \
                             the group must allow TCP 2376 from the runner host only",
                            ckey("security_groups")
                        ),
                    );
                }
                o.security_groups.push(group);
            }
            "amazonec2-security-group-readonly" => say(
                Kind::Note,
                "Flotilla never changes security groups (as with this option)".into(),
            ),
            "amazonec2-open-port" => say(
                Kind::Unsupported,
                "Flotilla opens no ports: add the rule to the build machines' security group"
                    .into(),
            ),
            "amazonec2-tags" => {
                let parts: Vec<&str> = value.split(',').map(str::trim).collect();
                if value.is_empty() || !parts.len().is_multiple_of(2) {
                    return Err(bad(format!(
                        "{name}: {value:?} must be key,value pairs (key1,value1,key2,value2)"
                    )));
                }
                let mut own = Vec::new();
                for pair in parts.chunks(2) {
                    let (k, v) = (pair[0], pair[1]);
                    if k.starts_with("flotilla:") || k == "Name" || k.starts_with("aws:") {
                        own.push(k);
                    } else {
                        o.tags.insert(k.to_owned(), v.to_owned());
                    }
                }
                let mut what = format!("{} ({} tags)", ckey("tags"), o.tags.len());
                if !own.is_empty() {
                    what.push_str(&format!(
                        "; left out {}: Flotilla sets Name and flotilla:* itself, aws: is AWS's",
                        own.join(", ")
                    ));
                }
                say(Kind::Converted, what);
            }
            "amazonec2-iam-instance-profile" => {
                o.instance_profile = Some(text()?);
                say(
                    Kind::Converted,
                    format!(
                        "{}; job containers cannot use its credentials (IMDSv2 with hop \
                         limit 1): give jobs credentials with CI/CD variables or id_tokens",
                        ckey("instance_profile")
                    ),
                );
            }
            "amazonec2-root-size" => {
                let gb: u32 = value
                    .parse()
                    .map_err(|_| bad(format!("{name}: {value:?} must be a number of GiB")))?;
                o.root_volume_gb = Some(gb);
                say(
                    Kind::Converted,
                    format!("{} = {gb}", ckey("root_volume_gb")),
                );
            }
            "amazonec2-volume-type" => match value {
                "gp3" => say(Kind::Converted, "Flotilla's root volumes are gp3".into()),
                "gp2" | "" => say(
                    Kind::Note,
                    format!(
                        "Flotilla's root volumes are gp3 by default (cheaper and faster than \
                         gp2), encrypted; {} = {{ type = \"gp2\" }} keeps gp2",
                        ckey("root_volume")
                    ),
                ),
                "io1" | "io2" => say(
                    Kind::Unsupported,
                    format!(
                        "not converted: {value} needs provisioned IOPS, which docker-machine \
                         did not set; write {} = {{ gb = .., type = \"{value}\", iops = .. }} \
                         by hand (instead of root_volume_gb)",
                        ckey("root_volume")
                    ),
                ),
                _ => say(
                    Kind::Unsupported,
                    format!(
                        "{value:?} is not a root volume type Flotilla offers (gp3, gp2, io1, \
                         io2 in {}); the machines get gp3",
                        ckey("root_volume")
                    ),
                ),
            },
            "amazonec2-device-name" => say(
                Kind::Note,
                "Flotilla sizes the AMI's own root device; no device name is needed".into(),
            ),
            "amazonec2-request-spot-instance" => {
                o.spot = flag()?;
                if o.spot {
                    say(
                        Kind::Converted,
                        format!(
                            "{} = \"spot\" (\"spot-with-fallback\" launches on-demand when \
                             spot has no capacity)",
                            ckey("market")
                        ),
                    );
                } else {
                    say(
                        Kind::Converted,
                        format!("{} = \"on-demand\"", ckey("market")),
                    );
                }
            }
            "amazonec2-spot-price" => {
                if value.is_empty() {
                    say(
                        Kind::Converted,
                        "empty: capped at the on-demand price, as Flotilla's spot launches are"
                            .into(),
                    );
                } else {
                    say(
                        Kind::Unsupported,
                        "Flotilla sets no maximum spot price: it pays the spot price, capped \
                         at the on-demand price; use spot-with-fallback or on-demand if the \
                         price matters"
                            .into(),
                    );
                }
            }
            "amazonec2-block-duration-minutes" => {
                if value.is_empty() || value == "0" {
                    say(Kind::Note, "0: no spot block, the default".into());
                } else {
                    say(
                        Kind::Unsupported,
                        "spot blocks (defined-duration spot) are no longer offered by AWS; to \
                         replace machines after a while set the class's max_age"
                            .into(),
                    );
                }
            }
            "amazonec2-private-address-only" | "amazonec2-use-private-address" => {
                o.private_address = o.private_address || flag()?;
                say(
                    Kind::Converted,
                    "Flotilla machines get no public IP by default and are always reached \
                     on their private address: the subnets need a NAT gateway (or VPC \
                     endpoints) to pull images"
                        .into(),
                );
            }
            "amazonec2-monitoring" => {
                if flag()? {
                    say(
                        Kind::Unsupported,
                        "no detailed CloudWatch monitoring: use Flotilla's Prometheus \
                         metrics (metrics_addr)"
                            .into(),
                    );
                } else {
                    say(Kind::Note, "false: the default".into());
                }
            }
            "amazonec2-use-ebs-optimized-instance" => say(
                Kind::Unsupported,
                "Flotilla does not ask for EBS optimization: current instance types are \
                 EBS-optimized by default, pick one of those"
                    .into(),
            ),
            "amazonec2-metadata-token" => match value {
                "required" => say(
                    Kind::Converted,
                    "Flotilla always requires IMDSv2 tokens".into(),
                ),
                _ => say(
                    Kind::Unsupported,
                    "Flotilla always requires IMDSv2 tokens: anything on the machine that \
                     reads instance metadata must use IMDSv2"
                        .into(),
                ),
            },
            "amazonec2-metadata-token-response-hop-limit" => match value {
                "1" => say(Kind::Converted, "Flotilla's default hop limit is 1".into()),
                _ => say(
                    Kind::Unsupported,
                    format!(
                        "not carried over: Flotilla's IMDS hop limit is 1 unless a class sets \
                         {}, which also lets every job of the class read the machine's user \
                         data (its TLS key; see the README, \"Jobs and the machine's role\"): \
                         prefer id_tokens (OIDC) or CI/CD variables for jobs' credentials",
                        ckey("imds_hop_limit")
                    ),
                ),
            },
            "amazonec2-retries" => say(
                Kind::Note,
                "not needed: the daemon retries EC2 calls itself, within \
                 aws.max_requests_per_second"
                    .into(),
            ),
            "amazonec2-ssh-user"
            | "amazonec2-ssh-keypath"
            | "amazonec2-keypair-name"
            | "amazonec2-ssh-port" => say(
                Kind::Note,
                "not needed: Flotilla never uses SSH (it drives each machine's dockerd over \
                 mutual TLS)"
                    .into(),
            ),
            "amazonec2-userdata" => say(
                Kind::Unsupported,
                "Flotilla writes the machine's user data itself (certificates and dockerd's \
                 TLS settings): bake what this script did into the AMI"
                    .into(),
            ),
            "engine-registry-mirror" => {
                o.dockerd
                    .registry_mirrors
                    .get_or_insert_with(Vec::new)
                    .push(text()?);
                say(Kind::Converted, ckey("dockerd.registry_mirrors"));
            }
            "engine-insecure-registry" => {
                o.dockerd
                    .insecure_registries
                    .get_or_insert_with(Vec::new)
                    .push(text()?);
                say(Kind::Converted, ckey("dockerd.insecure_registries"));
            }
            "engine-opt" | "engine-env" if engine_setting(&mut o.dockerd, name, value) => {
                say(Kind::Converted, ckey("dockerd"));
            }
            "engine-opt" | "engine-storage-driver" | "engine-label" | "engine-env" => say(
                Kind::Unsupported,
                "no [dockerd] key for this setting (Flotilla has registry mirrors, insecure \
                 registries, mtu, data-root, log-driver, log-opt, default-address-pool and \
                 the proxy variables): put it in the AMI's /etc/docker/daemon.json, which \
                 Flotilla merges its own keys into"
                    .into(),
            ),
            "engine-install-url" => say(
                Kind::Note,
                "not needed: Flotilla installs nothing, Docker comes with the AMI".into(),
            ),
            n if n.starts_with("swarm") => say(
                Kind::Unsupported,
                "Docker Swarm options have no meaning for build machines".into(),
            ),
            n if n.starts_with("amazonec2-") => say(
                Kind::Unknown,
                "not an amazonec2 option Flotilla knows: not converted; check what it did and \
                 whether the AMI or the class should do it"
                    .into(),
            ),
            _ => say(
                Kind::Unknown,
                "not an amazonec2 or docker-machine engine option: not converted".into(),
            ),
        }
    }
    if let Err((k, message)) = o.dockerd.check() {
        return Err(Bad::new(
            key.to_owned(),
            format!("{} {k}: {message}", ckey("dockerd")),
        ));
    }
    if !credentials.is_empty() {
        report.push(
            Kind::Action,
            format!("{at} {}", credentials.join(", ")),
            "AWS keys are not carried over (values not shown): the daemon uses the AWS SDK's \
             credential chain; give the runner host the IAM role of the README's \
             \"Production setup\" and delete these keys from IAM once nothing else uses them",
        );
    }
    Ok(o)
}

/// An `engine-opt` (`mtu=1450`, `data-root=/x`, `log-driver=x`, `log-opt=k=v`,
/// `default-address-pool=base=CIDR,size=N`) or `engine-env` (`HTTP_PROXY=...`) Flotilla has
/// a `[dockerd]` key for, set in `d`; false when it has none.
fn engine_setting(
    d: &mut flotilla_proto::dockerd::DockerdSettings,
    option: &str,
    value: &str,
) -> bool {
    let Some((k, v)) = value.split_once('=') else {
        return false;
    };
    let v = v.to_owned();
    match (option, k) {
        ("engine-opt", "mtu") => match v.parse() {
            Ok(mtu) => d.mtu = Some(mtu),
            Err(_) => return false,
        },
        ("engine-opt", "data-root" | "graph") => d.data_root = Some(v),
        ("engine-opt", "log-driver") => d.log_driver = Some(v),
        ("engine-opt", "log-opt") => {
            let Some((ok, ov)) = v.split_once('=') else {
                return false;
            };
            d.log_opts
                .get_or_insert_with(Default::default)
                .insert(ok.to_owned(), ov.to_owned());
        }
        ("engine-opt", "default-address-pool") => {
            let mut base = None;
            let mut size = None;
            for kv in v.split(',') {
                match kv.split_once('=') {
                    Some(("base", b)) => base = Some(b.to_owned()),
                    Some(("size", s)) => size = s.parse().ok(),
                    _ => return false,
                }
            }
            let (Some(base), Some(size)) = (base, size) else {
                return false;
            };
            d.default_address_pools
                .get_or_insert_with(Vec::new)
                .push(flotilla_proto::dockerd::AddressPool { base, size });
        }
        ("engine-env", "HTTP_PROXY" | "http_proxy") => d.http_proxy = Some(v),
        ("engine-env", "HTTPS_PROXY" | "https_proxy") => d.https_proxy = Some(v),
        ("engine-env", "NO_PROXY" | "no_proxy") => d.no_proxy = Some(v),
        _ => return false,
    }
    true
}

/// Go's strconv.ParseBool, plus a bare flag (no value) meaning true.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "" | "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(options: &[&str]) -> (Result<Ec2Options, Bad>, Report) {
        let options: Vec<String> = options.iter().map(|s| s.to_string()).collect();
        let mut report = Report::default();
        let r = parse(
            &options,
            "runners[0].machine.MachineOptions",
            "at",
            "c",
            &mut report,
        );
        (r, report)
    }

    #[test]
    fn maps_the_machine_options_flotilla_has() {
        let (o, report) = run(&[
            "amazonec2-region=eu-west-1",
            "amazonec2-ami=ami-1",
            "amazonec2-instance-type=m5.large",
            "amazonec2-subnet-id=subnet-1",
            "amazonec2-security-group=sg-1",
            "amazonec2-security-group=sg-2",
            "amazonec2-iam-instance-profile=build",
            "amazonec2-root-size=50",
            "amazonec2-request-spot-instance",
            "amazonec2-endpoint=ec2.internal:4566",
        ]);
        let o = o.unwrap();
        assert_eq!(o.region.as_deref(), Some("eu-west-1"));
        assert_eq!(o.security_groups, ["sg-1", "sg-2"]);
        assert_eq!(o.root_volume_gb, Some(50));
        assert!(o.spot, "a bare flag is true");
        assert_eq!(o.endpoint.as_deref(), Some("https://ec2.internal:4566"));
        assert_eq!(report.count(Kind::Unsupported), 0);
        assert_eq!(report.count(Kind::Action), 1, "the AMI needs Docker");
    }

    #[test]
    fn volume_types_point_at_root_volume() {
        let (o, report) = run(&["amazonec2-volume-type=io2", "amazonec2-root-size=80"]);
        assert_eq!(o.unwrap().root_volume_gb, Some(80));
        let text = report.render("r");
        assert_eq!(report.count(Kind::Unsupported), 1, "{text}");
        assert!(
            text.contains("classes.c.root_volume = { gb = .., type = \"io2\", iops = .. }"),
            "{text}"
        );
        let (_, report) = run(&["amazonec2-volume-type=gp2"]);
        assert_eq!(report.count(Kind::Note), 1);
        assert!(report.render("r").contains("type = \"gp2\" } keeps gp2"));
    }

    #[test]
    fn credentials_are_reported_once_and_never_shown() {
        let (o, report) = run(&[
            "amazonec2-access-key=AKIAEXAMPLE",
            "amazonec2-secret-key=SECRETVALUE",
        ]);
        o.unwrap();
        let text = report.render("r");
        assert!(
            !text.contains("AKIAEXAMPLE") && !text.contains("SECRETVALUE"),
            "{text}"
        );
        assert_eq!(report.count(Kind::Action), 1);
        assert!(
            text.contains("at amazonec2-access-key, amazonec2-secret-key: AWS keys"),
            "{text}"
        );
    }

    #[test]
    fn unknown_and_unsupported_options_are_reported_not_dropped() {
        let (o, report) = run(&[
            "amazonec2-open-port=8080",
            "amazonec2-frobnicate=1",
            "engine-label=a=b",
            "amazonec2-security-group=builders",
        ]);
        o.unwrap();
        assert_eq!(report.count(Kind::Unsupported), 2);
        assert_eq!(report.count(Kind::Unknown), 1);
        let actions = report.lines(Kind::Action);
        assert!(actions[0].contains("group ids"), "{actions:?}");
    }

    #[test]
    fn engine_options_flotilla_has_become_the_classs_dockerd_settings() {
        let (o, report) = run(&[
            "engine-registry-mirror=https://mirror:5000",
            "engine-insecure-registry=registry.internal:5000",
            "engine-opt=mtu=1450",
            "engine-opt=data-root=/mnt/docker",
            "engine-opt=log-opt=max-size=10m",
            "engine-opt=default-address-pool=base=172.80.0.0/16,size=24",
            "engine-env=HTTP_PROXY=http://proxy:3128",
            "engine-env=NO_PROXY=localhost",
            "engine-opt=storage-driver=overlay2",
        ]);
        let d = o.unwrap().dockerd;
        assert_eq!(
            d.registry_mirrors,
            Some(vec!["https://mirror:5000".to_string()])
        );
        assert_eq!(d.insecure_registries.unwrap()[0], "registry.internal:5000");
        assert_eq!(
            (d.mtu, d.data_root.as_deref()),
            (Some(1450), Some("/mnt/docker"))
        );
        assert_eq!(d.log_opts.unwrap()["max-size"], "10m");
        assert_eq!(d.default_address_pools.unwrap()[0].size, 24);
        assert_eq!(d.http_proxy.as_deref(), Some("http://proxy:3128"));
        assert_eq!(d.no_proxy.as_deref(), Some("localhost"));
        assert_eq!(report.count(Kind::Converted), 8);
        assert_eq!(report.count(Kind::Unsupported), 1);
        // A value Flotilla would refuse is an error naming the option list and the key.
        let (bad, _) = run(&["engine-opt=mtu=20"]);
        assert!(bad.unwrap_err().message.contains("dockerd mtu"));
    }

    #[test]
    fn tags_become_class_tags_without_flotillas_own() {
        let (o, report) = run(&["amazonec2-tags=team,ci,Name,x,flotilla:fleet,y,env,prod"]);
        let o = o.unwrap();
        assert_eq!(
            o.tags,
            std::collections::BTreeMap::from([
                ("env".to_string(), "prod".to_string()),
                ("team".to_string(), "ci".to_string()),
            ])
        );
        let converted = report.lines(Kind::Converted).join("\n");
        assert!(
            converted.contains("left out Name, flotilla:fleet"),
            "{converted}"
        );
        let (o, _) = run(&["amazonec2-tags=lonely"]);
        assert!(o.unwrap_err().message.contains("key,value pairs"));
    }

    #[test]
    fn bad_values_name_the_option_index() {
        let (o, _) = run(&["amazonec2-region=x", "amazonec2-root-size=big"]);
        let e = o.unwrap_err();
        assert_eq!(e.key, "runners[0].machine.MachineOptions[1]");
        assert!(e.message.contains("GiB"), "{e:?}");
        let (o, _) = run(&["amazonec2-request-spot-instance=maybe"]);
        assert!(o.unwrap_err().message.contains("true or false"));
    }
}
