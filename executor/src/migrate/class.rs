//! One docker+machine runner read into a [`Plan`]: the Flotilla class its
//! `[runners.machine]` describes (machines from `MachineOptions`, the idle policy) and the
//! `[job]` settings of its `[runners.docker]`, checked as Flotilla will read them.

use flotilla_proto::config::{ClassConfig, ForecastConfig, Market};

use super::docker::{self, JobSetting};
use super::error::Bad;
use super::fields::{brief, is_empty_value, Fields};
use super::job::insert_at;
use super::machine_options::{self, DEFAULT_INSTANCE_TYPE, DEFAULT_REGION, DEFAULT_SECURITY_GROUP};
use super::options::Options;
use super::report::{Kind, Report};
use super::{idle, job, names};

/// One docker+machine runner on its way to being a class.
pub(super) struct Plan {
    pub index: usize,
    pub name: String,
    pub at: String,
    pub class_name: String,
    pub class: ClassConfig,
    pub settings: Vec<JobSetting>,
    pub job: toml::Table,
    pub region: String,
    pub endpoint: Option<String>,
    /// `MaxGrowthRate`, `None` or 0 for no limit.
    pub growth: Option<u32>,
    pub builds_dir: String,
    pub cache_dir: String,
}

/// Reads one docker+machine runner into a [`Plan`]: its class, its docker options.
pub(super) fn plan_runner(
    index: usize,
    runner: &toml::Table,
    concurrent: Option<u32>,
    taken: &[&str],
    options: &Options,
    report: &mut Report,
) -> Result<Plan, Bad> {
    let mut r = Fields::new(runner.clone(), format!("runners[{index}]"));
    let name = r.string("name")?.unwrap_or_default();
    let at = format!("runners[{index}] {name:?}");
    let class_name = names::unique(&names::tag_safe(&name, &format!("runner-{index}")), taken);
    let builds_dir = r.string("builds_dir")?.unwrap_or_else(|| "/builds".into());
    let cache_dir = r.string("cache_dir")?.unwrap_or_else(|| "/cache".into());
    let limit = r.count("limit")?.unwrap_or(0);
    let Some(machine) = r.table("machine")? else {
        return Err(Bad::new(
            r.key("machine"),
            "a docker+machine runner needs a [runners.machine] section",
        ));
    };
    let docker = r.table("docker")?.unwrap_or_default();
    let mut m = Fields::new(machine, r.key("machine"));
    let ckey = |k: &str| format!("classes.{class_name}.{k}");
    let mat = |k: &str| format!("{at} machine.{k}");

    match m.string("MachineDriver")?.as_deref() {
        Some("amazonec2") => {}
        Some(other) => {
            return Err(Bad::new(
                m.key("MachineDriver"),
                format!(
                    "{other:?} is not supported: Flotilla launches EC2 instances (the \
                     amazonec2 driver) only; migrate the other runners with --runner NAME \
                     (this one is then kept as it is)"
                ),
            ))
        }
        None => {
            return Err(Bad::new(
                m.key("MachineDriver"),
                "missing: expected \"amazonec2\"",
            ))
        }
    }
    if let Some(n) = m.string("MachineName")? {
        report.push(
            Kind::Note,
            format!("{} {n:?}", mat("MachineName")),
            "Flotilla names machines itself: EC2 tag Name = flotilla-<fleet>-<machine id>, \
             and tags flotilla:fleet, flotilla:class, flotilla:machine",
        );
    }
    let machine_options = m.strings("MachineOptions", false)?.unwrap_or_default();
    let ec2 = machine_options::parse(
        &machine_options,
        &m.key("MachineOptions"),
        &mat("MachineOptions"),
        &class_name,
        report,
    )?;

    let ami =
        match (ec2.ami.clone(), &options.ami) {
            (Some(a), _) => a,
            (None, Some(a)) => {
                report.push(
                    Kind::Default,
                    mat("MachineOptions"),
                    format!(
                    "no amazonec2-ami: {} = {a:?} from --ami (it must have Docker and cloud-init)",
                    ckey("ami")
                ),
                );
                a.clone()
            }
            (None, None) => return Err(Bad::new(
                m.key("MachineOptions"),
                "no amazonec2-ami: docker-machine used its own Ubuntu AMI and installed Docker \
                 over SSH, Flotilla needs an AMI with Docker 20.10+ and cloud-init: pass \
                 --ami AMI_ID (or add amazonec2-ami=AMI_ID)",
            )),
        };
    let subnets = match (ec2.subnet.clone(), options.subnets.is_empty()) {
        (Some(s), _) => vec![s],
        (None, false) => {
            report.push(
                Kind::Default,
                mat("MachineOptions"),
                format!(
                    "no amazonec2-subnet-id: {} = {:?} from --subnet",
                    ckey("subnets"),
                    options.subnets
                ),
            );
            options.subnets.clone()
        }
        (None, true) => {
            let region = ec2.region.as_deref().unwrap_or(DEFAULT_REGION);
            let zone = ec2.zone.as_deref().unwrap_or("a");
            let vpc = ec2.vpc.as_deref().unwrap_or("the default VPC");
            return Err(Bad::new(
                m.key("MachineOptions"),
                format!(
                    "no amazonec2-subnet-id: docker-machine picked a subnet of {vpc} in zone \
                     {region}{zone}, Flotilla needs subnet ids: pass --subnet SUBNET_ID \
                     (repeat it for subnets in several zones)"
                ),
            ));
        }
    };
    let instance_type = match ec2.instance_type.clone() {
        Some(t) => t,
        None => {
            report.push(
                Kind::Default,
                mat("MachineOptions"),
                format!(
                    "no amazonec2-instance-type: {} = [{DEFAULT_INSTANCE_TYPE:?}], \
                     docker-machine's default",
                    ckey("instance_types")
                ),
            );
            DEFAULT_INSTANCE_TYPE.to_owned()
        }
    };
    if ec2.security_groups.is_empty() {
        report.push(
            Kind::Action,
            mat("MachineOptions"),
            format!(
                "no amazonec2-security-group: docker-machine used (and created) the group \
                 {DEFAULT_SECURITY_GROUP:?}, open to the internet on ports 22 and 2376; with \
                 {} empty Flotilla launches into the VPC's default group: set it to a group \
                 that allows TCP 2376 from the runner host only",
                ckey("security_groups")
            ),
        );
    }
    if !ec2.private_address {
        report.push(
            Kind::Note,
            mat("MachineOptions"),
            "docker+machine gave the machines public IPs (no amazonec2-private-address-only): \
             Flotilla does not by default, so the subnets need a NAT gateway (or VPC \
             endpoints) to pull images; in public subnets without NAT set public_ip = true on \
             the class (dockerd is still reached on the private address, from the runner's \
             security group only)",
        );
    }
    let region = match &ec2.region {
        Some(r) => r.clone(),
        None => {
            report.push(
                Kind::Default,
                mat("MachineOptions"),
                format!("no amazonec2-region: aws.region = {DEFAULT_REGION:?}, docker-machine's default"),
            );
            DEFAULT_REGION.to_owned()
        }
    };

    let idle = idle::read(&mut m, &at, &class_name, (limit, concurrent), report)?;
    if let Some(v) = m.take("MaxRemovalAttempts") {
        report.push(
            Kind::Note,
            format!("{} = {}", mat("MaxRemovalAttempts"), brief(&v)),
            "not needed: Flotilla resends a termination until EC2 reports the instance \
             terminated",
        );
    }
    if let Some(v) = m.take("MachineOptionsWithName") {
        if is_empty_value(&v) {
            report.push(
                Kind::Kept,
                mat("MachineOptionsWithName"),
                "empty: nothing to convert",
            );
        } else {
            report.push(
                Kind::Unsupported,
                mat("MachineOptionsWithName"),
                "options naming the machine: Flotilla names machines itself (tag \
                 flotilla:machine); see the MachineOptions lines for what each option becomes",
            );
        }
    }
    for (k, _) in m.rest() {
        report.push(
            Kind::Unknown,
            mat(&k),
            "not a [runners.machine] key docker+machine knows: not converted",
        );
    }
    let settings = docker::convert(
        docker,
        &r.key("docker"),
        &at,
        (&builds_dir, &cache_dir),
        report,
    )?;

    let class = ClassConfig {
        ami,
        instance_types: vec![instance_type],
        subnets,
        security_groups: ec2.security_groups.clone(),
        instance_profile: ec2.instance_profile.clone(),
        root_volume_gb: ec2.root_volume_gb,
        tags: ec2.tags.clone(),
        dockerd: ec2.dockerd.clone(),
        market: if ec2.spot {
            Market::Spot
        } else {
            Market::OnDemand
        },
        idle_count: idle.idle_count,
        idle_count_min: idle.idle_count_min,
        idle_scale_factor: idle.idle_scale_factor,
        idle_time: idle.idle_time,
        max_machines: idle.max_machines,
        max_builds: idle.max_builds,
        schedules: idle.schedules,
        forecast: ForecastConfig {
            enabled: false,
            ..ForecastConfig::default()
        },
        ..ClassConfig::default()
    };
    let mut job_table = toml::Table::new();
    job_table.insert("builds_dir".into(), toml::Value::String(builds_dir.clone()));
    job_table.insert("cache_dir".into(), toml::Value::String(cache_dir.clone()));
    for s in &settings {
        insert_at(&mut job_table, &s.to, s.value.clone());
    }
    let plan = Plan {
        index,
        name,
        at,
        class_name,
        class,
        settings,
        job: job_table,
        region,
        endpoint: ec2.endpoint,
        growth: idle.growth,
        builds_dir,
        cache_dir,
    };
    job::check(
        plan.index,
        (&plan.class_name, &plan.class),
        &plan.job,
        &plan.settings,
    )?;
    Ok(plan)
}
