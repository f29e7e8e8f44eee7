//! The passes over a stack: `converge` (plan and apply share it: in plan mode the
//! resource modules only record changes, in apply mode they also make them), `destroy`
//! (deletion in dependency order, only what carries the stack's tag), and the outputs.
//!
//! Order of a converge pass: EC2 inventory and AMIs, network, security groups, bucket
//! (and the flotilla binary in it), IAM, runner registration, launch templates, runner
//! hosts (replaced one at a time, see `ec2::hosts`), then pruning of the stack's
//! resources the stack file no longer asks for.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, Instance};
use flotilla_proto::config::ClassConfig;
use serde::Serialize;

use crate::aws::Aws;
use crate::binary::LocalBinary;
use crate::cloudinit::{self, FlotillaSource, HostUserData};
use crate::ec2::hosts::{self, HostInfo, HostSpec, Launch};
use crate::ec2::{self, launch_template, network, security_groups, Inventory};
use crate::error::{Error, Result};
use crate::gitlab::{GitlabClient, NewRunner, Secret};
use crate::iam;
use crate::naming::{logical, Names};
use crate::plan::{is_pending, Action, Mode, Plan};
use crate::poll::{self, Backoff, Poll};
use crate::render::{self, FleetIds};
use crate::s3;
use crate::ssm;
use crate::stack::Stack;

/// What the command line adds to the stack file for the runner hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostOptions {
    /// The flotilla binary apply uploads and the hosts install; `None` when the stack
    /// sets `runner_hosts.flotilla_url` (and for destroy, which installs nothing).
    pub flotilla: Option<LocalBinary>,
    /// Replace hosts without the readiness check and the drain (`apply --no-drain`).
    pub no_drain: bool,
}

/// What every resource module is handed during one pass.
pub struct Ctx<'a> {
    pub aws: &'a Aws,
    pub stack: &'a Stack,
    pub names: Names,
    pub mode: Mode,
    pub plan: Plan,
    pub gitlab_token: Option<Secret>,
    /// The fleet's machine classes as the daemon will see them.
    pub classes: BTreeMap<String, ClassConfig>,
    pub hosts: HostOptions,
}

impl<'a> Ctx<'a> {
    pub fn new(aws: &'a Aws, stack: &'a Stack, mode: Mode, gitlab_token: Option<Secret>) -> Self {
        Self {
            aws,
            stack,
            names: Names::new(&stack.name),
            mode,
            plan: Plan::default(),
            gitlab_token,
            classes: stack
                .placeholder_config()
                .map(|c| c.classes)
                .unwrap_or_default(),
            hosts: HostOptions::default(),
        }
    }

    pub fn with_hosts(self, hosts: HostOptions) -> Self {
        Self { hosts, ..self }
    }

    pub fn applying(&self) -> bool {
        self.mode == Mode::Apply
    }

    /// Whether hosts are checked and drained over SSM when they are replaced.
    pub fn drain(&self) -> bool {
        !self.hosts.no_drain
    }

    /// Records a change; in apply mode also announces it and returns true (act now).
    pub fn change(
        &self,
        action: Action,
        kind: &str,
        name: &str,
        detail: impl Into<String>,
    ) -> bool {
        let detail = detail.into();
        if self.applying() {
            let verb = match action {
                Action::Create => "creating",
                Action::Update => "updating",
                Action::Replace => "replacing",
                Action::Delete => "deleting",
            };
            if detail.is_empty() {
                tracing::info!("{verb} {kind} {name}");
            } else {
                tracing::info!("{verb} {kind} {name} ({detail})");
            }
        }
        self.plan.record(action, kind, name, detail);
        self.applying()
    }

    /// Progress line after a create.
    pub fn created(&self, kind: &str, name: &str, id: &str) {
        tracing::info!("  created {kind} {name}: {id}");
    }
}

/// AWS partition of a region.
pub fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

/// What `output` prints: ids, addresses and the generated configuration files.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outputs {
    pub stack: String,
    pub region: String,
    pub vpc: String,
    pub public_subnets: Vec<String>,
    pub private_subnets: Vec<String>,
    pub nat_gateways: Vec<NatOutput>,
    pub s3_endpoint: String,
    pub runner_security_group: String,
    pub build_security_group: String,
    pub bucket: String,
    /// Where the hosts install flotilla from (`s3://...` or `runner_hosts.flotilla_url`).
    pub flotilla_binary: String,
    pub flotilla_sha256: String,
    pub runner_role_arn: String,
    pub build_role_arn: String,
    pub runner_instance_profile: String,
    pub build_instance_profile: String,
    pub launch_templates: BTreeMap<String, String>,
    pub runner_hosts: Vec<HostOutput>,
    pub token_parameter: String,
    pub gitlab_runner_id: Option<u64>,
    pub registration: String,
    pub gitlab_runner_config_toml: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct NatOutput {
    pub zone: String,
    pub id: String,
    pub public_ip: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostOutput {
    pub name: String,
    pub fleet: String,
    pub instance_id: String,
    pub private_ip: String,
    pub state: String,
    pub flotilla_toml: String,
}

/// Registration as found or done in this pass.
struct Registration {
    runner_id: Option<u64>,
    status: String,
}

/// One converge pass (plan or apply, per `ctx.mode`).
pub async fn converge(ctx: &Ctx<'_>) -> Result<Outputs> {
    let stack = ctx.stack;
    let region = ctx.aws.region.clone();
    let partition = partition(&region);
    tracing::info!("reading stack {} in {region}", stack.name);
    let inv = ec2::inventory(ctx).await?;
    let images = launch_template::images(ctx).await?;
    let host_image = &images[&stack.runner_hosts.ami];

    // Where the hosts get flotilla: the stack's URL, or the binary apply uploads.
    let bin_key = ctx.hosts.flotilla.as_ref().map(LocalBinary::key);
    let flotilla = match (
        &stack.runner_hosts.flotilla_url,
        &ctx.hosts.flotilla,
        &bin_key,
    ) {
        (Some(url), _, _) => FlotillaSource::Url {
            url,
            sha256: stack
                .runner_hosts
                .flotilla_sha256
                .as_deref()
                .unwrap_or_default(),
        },
        (None, Some(bin), Some(key)) => {
            if !host_image.architecture.is_empty() && bin.arch != host_image.architecture {
                return Err(Error::Refused(format!(
                    "the flotilla binary {} is built for {} but runner_hosts.ami {} is {}: \
                     pass --flotilla-bin with a {} Linux build",
                    bin.path.display(),
                    bin.arch,
                    stack.runner_hosts.ami,
                    host_image.architecture,
                    host_image.architecture
                )));
            }
            FlotillaSource::Bucket {
                bucket: &stack.bucket.name,
                key,
                sha256: &bin.sha256,
            }
        }
        _ => {
            return Err(Error::Refused(
                "no flotilla binary for the runner hosts: pass --flotilla-bin PATH, or set \
                 runner_hosts.flotilla_url and runner_hosts.flotilla_sha256"
                    .into(),
            ))
        }
    };

    let account = ctx.aws.account().await?;

    let net = network::converge(ctx, &inv).await?;
    let sgs = security_groups::converge(ctx, &inv, &net.vpc).await?;
    s3::converge(ctx, partition, &account).await?;
    if let Some(bin) = &ctx.hosts.flotilla {
        s3::ensure_binary(ctx, &account, bin).await?;
    }

    let build_role = ctx.names.build_role();
    let runner_role = ctx.names.runner_role();
    let build_arn = iam::ensure_role(
        ctx,
        &build_role,
        "Flotilla build machines: no AWS permissions",
    )
    .await?;
    match iam::build_machine_policy() {
        Some(doc) => iam::ensure_policy(ctx, &build_role, &doc, !is_pending(&build_arn)).await?,
        None => {
            iam::ensure_no_policy(
                ctx,
                &build_role,
                !is_pending(&build_arn),
                iam::BUILD_MACHINE_NO_POLICY,
            )
            .await?
        }
    }
    iam::ensure_profile(ctx, &build_role, &build_role).await?;
    let runner_arn = iam::ensure_role(
        ctx,
        &runner_role,
        "Flotilla runner hosts: manage the fleet's build machines",
    )
    .await?;
    let fleets = render::host_fleets(stack);
    let policy = iam::runner_host_policy(&iam::RunnerPolicyInputs {
        partition: partition.into(),
        region: region.clone(),
        account,
        fleets: fleets.clone(),
        private_subnets: net.private_subnets.clone(),
        build_security_group: sgs.build.clone(),
        build_role: build_role.clone(),
        token_param: ctx.names.token_param(),
        bucket: stack.bucket.name.clone(),
        amis: ctx.classes.values().map(|c| c.ami.clone()).collect(),
        kms_key: stack.bucket.kms_key.clone(),
        flotilla_from_bucket: matches!(flotilla, FlotillaSource::Bucket { .. }),
        ssm_agent: true,
    });
    iam::ensure_policy(ctx, &runner_role, &policy, !is_pending(&runner_arn)).await?;
    iam::ensure_profile(ctx, &runner_role, &runner_role).await?;

    let registration = register(ctx).await?;
    let templates = launch_template::converge(ctx, &inv, &images, &sgs.build).await?;

    // Runner hosts, each with its own fleet name and so its own user data.
    let ids = FleetIds {
        private_subnets: net.private_subnets.clone(),
        build_security_group: sgs.build.clone(),
        build_instance_profile: build_role.clone(),
        region: Some(region.clone()),
    };
    let mut specs = Vec::new();
    let mut tomls = Vec::new();
    for i in 0..stack.runner_hosts.count {
        let fleet = &fleets[i as usize];
        let config = render::flotilla_config(stack, &ids, fleet).map_err(Error::Refused)?;
        let flotilla_toml = render::flotilla_toml(&config);
        let runner_toml = render::runner_config_toml(stack, &config, &region);
        let token_param = ctx.names.token_param();
        let user_data = cloudinit::render(&HostUserData {
            hosts: &stack.runner_hosts,
            flotilla,
            region: &region,
            token_param: &token_param,
            flotilla_toml: &flotilla_toml,
            runner_config_toml: &runner_toml,
        });
        if user_data.len() > flotilla_proto::bootstrap::MAX_USER_DATA_BYTES {
            return Err(Error::Refused(format!(
                "runner host user data is {} bytes, over EC2's 16 KiB limit",
                user_data.len()
            )));
        }
        let zone_index = i as usize % stack.network.zones.len();
        specs.push(HostSpec {
            logical: logical::host(i),
            subnet: net.private_subnets[zone_index].clone(),
            user_data,
            flotilla_sha256: flotilla.sha256().to_owned(),
        });
        tomls.push((fleet.clone(), flotilla_toml));
    }
    let hosts = hosts::converge(
        ctx,
        &inv,
        &specs,
        &Launch {
            runner_sg: &sgs.runner,
            profile: &runner_role,
            root_device: &host_image.root_device,
        },
    )
    .await?;

    // What the stack no longer asks for.
    let mut desired = network::desired(ctx);
    desired.insert(logical::RUNNER_SG.into());
    desired.insert(logical::BUILD_SG.into());
    for class in ctx.classes.keys() {
        desired.insert(logical::launch_template(class));
    }
    let stale = undesired(&inv, &desired);
    delete_ec2(ctx, &stale).await?;

    // Outputs.
    let config_for_runner =
        render::flotilla_config(stack, &ids, &fleets[0]).map_err(Error::Refused)?;
    Ok(Outputs {
        stack: stack.name.clone(),
        region: region.clone(),
        vpc: net.vpc.clone(),
        public_subnets: net.public_subnets.clone(),
        private_subnets: net.private_subnets.clone(),
        nat_gateways: net
            .nats
            .iter()
            .map(|(zone, id, ip)| NatOutput {
                zone: zone.clone(),
                id: id.clone(),
                public_ip: ip.clone(),
            })
            .collect(),
        s3_endpoint: net.s3_endpoint.clone(),
        runner_security_group: sgs.runner.clone(),
        build_security_group: sgs.build.clone(),
        bucket: stack.bucket.name.clone(),
        flotilla_binary: flotilla.location(),
        flotilla_sha256: flotilla.sha256().to_owned(),
        runner_role_arn: runner_arn,
        build_role_arn: build_arn,
        runner_instance_profile: runner_role,
        build_instance_profile: build_role,
        launch_templates: templates,
        runner_hosts: hosts
            .into_iter()
            .zip(tomls)
            .map(
                |(h, (fleet, toml)): (HostInfo, (String, String))| HostOutput {
                    name: h.logical,
                    fleet,
                    instance_id: h.instance_id,
                    private_ip: h.private_ip,
                    state: h.state,
                    flotilla_toml: toml,
                },
            )
            .collect(),
        token_parameter: ctx.names.token_param(),
        gitlab_runner_id: registration.runner_id,
        registration: registration.status,
        gitlab_runner_config_toml: render::runner_config_toml(stack, &config_for_runner, &region),
    })
}

fn new_runner(stack: &Stack) -> NewRunner {
    NewRunner {
        runner_type: stack.gitlab.runner_type,
        group_id: stack.gitlab.group_id,
        project_id: stack.gitlab.project_id,
        description: stack.runner_description(),
        tags: stack.gitlab.tags.clone(),
        run_untagged: stack.gitlab.run_untagged,
        locked: stack.gitlab.locked,
    }
}

/// Runner registration: one GitLab runner per stack, its token in SSM. Without a GitLab
/// token, an existing registration is trusted and a missing one is skipped with a note.
async fn register(ctx: &Ctx<'_>) -> Result<Registration> {
    let stack = ctx.stack;
    let param = ssm::read(ctx).await?;
    let param_name = ctx.names.token_param();
    if let Some(p) = &param {
        if !p.ours {
            return Err(Error::NotOurs(format!(
                "SSM parameter {param_name} exists but is not tagged as stack {}'s",
                stack.name
            )));
        }
    }
    let Some(token) = ctx.gitlab_token.clone() else {
        return Ok(match param {
            Some(p) => Registration {
                runner_id: p.runner_id,
                status: "registered (not verified: no GitLab token in the environment)".into(),
            },
            None => {
                let msg = format!(
                    "{} is not set: runner registration skipped; set it and apply again",
                    stack.gitlab.token_env
                );
                if ctx.applying() {
                    tracing::warn!("{msg}");
                }
                ctx.plan.note(msg);
                Registration {
                    runner_id: None,
                    status: "not registered".into(),
                }
            }
        });
    };
    let gitlab = GitlabClient::new(stack.gitlab_url(), token)?;
    let exists = param.is_some();
    if let Some(id) = param.as_ref().and_then(|p| p.runner_id) {
        if gitlab.runner_exists(id).await? {
            return Ok(Registration {
                runner_id: Some(id),
                status: "registered".into(),
            });
        }
        if !ctx.change(
            Action::Replace,
            "gitlab:runner",
            &stack.runner_description(),
            format!("runner {id} no longer exists in GitLab"),
        ) {
            return Ok(Registration {
                runner_id: None,
                status: "to be registered again".into(),
            });
        }
    } else {
        // An apply interrupted after GitLab created the runner but before the token
        // was stored left a runner with our description: take it over (new token).
        let adopt = gitlab
            .find_by_description(&stack.runner_description(), stack.gitlab.runner_type)
            .await?;
        let detail = match adopt {
            Some(id) => format!("take over runner {id} (reset its token)"),
            None => format!(
                "{} via {}",
                stack.gitlab.runner_type.as_str(),
                stack.gitlab_url()
            ),
        };
        if !ctx.change(
            Action::Create,
            "gitlab:runner",
            &stack.runner_description(),
            detail,
        ) {
            return Ok(Registration {
                runner_id: adopt,
                status: "to be registered".into(),
            });
        }
        if let Some(id) = adopt {
            let token = gitlab.reset_token(id).await?;
            ssm::store(ctx, &token, id, exists).await?;
            ctx.created(
                "gitlab:runner",
                &stack.runner_description(),
                &id.to_string(),
            );
            return Ok(Registration {
                runner_id: Some(id),
                status: "registered".into(),
            });
        }
    }
    let created = gitlab.create_runner(&new_runner(stack)).await?;
    ctx.created(
        "gitlab:runner",
        &stack.runner_description(),
        &created.id.to_string(),
    );
    ssm::store(ctx, &created.token, created.id, exists).await?;
    tracing::info!("  stored the runner token in SSM parameter {param_name}");
    Ok(Registration {
        runner_id: Some(created.id),
        status: "registered".into(),
    })
}

/// The inventory's resources whose logical id the stack does not ask for (hosts are
/// handled by the hosts module and left out).
fn undesired(inv: &Inventory, desired: &BTreeSet<String>) -> Inventory {
    let keep =
        |tags: &[aws_sdk_ec2::types::Tag]| ec2::logical(tags).is_some_and(|l| desired.contains(l));
    Inventory {
        vpcs: inv
            .vpcs
            .iter()
            .filter(|x| !keep(x.tags()))
            .cloned()
            .collect(),
        subnets: inv
            .subnets
            .iter()
            .filter(|x| !keep(x.tags()))
            .cloned()
            .collect(),
        igws: inv
            .igws
            .iter()
            .filter(|x| !keep(x.tags()))
            .cloned()
            .collect(),
        addresses: inv
            .addresses
            .iter()
            .filter(|x| !keep(x.tags()))
            .cloned()
            .collect(),
        nats: inv
            .nats
            .iter()
            .filter(|x| !keep(x.tags()))
            .cloned()
            .collect(),
        route_tables: inv
            .route_tables
            .iter()
            .filter(|x| !keep(x.tags()))
            .cloned()
            .collect(),
        endpoints: inv
            .endpoints
            .iter()
            .filter(|x| !keep(x.tags()))
            .cloned()
            .collect(),
        security_groups: inv
            .security_groups
            .iter()
            .filter(|x| !keep(x.tags()))
            .cloned()
            .collect(),
        templates: inv
            .templates
            .iter()
            .filter(|x| !keep(x.tags()))
            .cloned()
            .collect(),
        instances: Vec::new(),
    }
}

/// Retries a deletion while AWS still reports dependencies being released (up to 5
/// minutes).
async fn retry_dependency<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::aws::AwsError>>,
{
    let backoff = Backoff {
        first: Duration::from_secs(2),
        max: Duration::from_secs(15),
        limit: Duration::from_secs(300),
    };
    poll::until(what, backoff, || {
        let attempt = f();
        async move {
            match attempt.await {
                Ok(v) => Ok(Poll::Done(v)),
                Err(e) if e.code_is(&["DependencyViolation", "InvalidRouteTableID.InUse"]) => {
                    Ok(Poll::Wait(format!("{what}: still in use ({e})")))
                }
                Err(e) => Err(e.into()),
            }
        }
    })
    .await
}

fn id_list<T>(items: &[T], id: impl Fn(&T) -> Option<&str>) -> Vec<String> {
    items
        .iter()
        .filter_map(|i| id(i).map(str::to_owned))
        .collect()
}

/// Terminates instances and waits until EC2 reports them terminated.
async fn terminate_and_wait(ctx: &Ctx<'_>, ids: Vec<String>) -> Result<()> {
    if ids.is_empty() || !ctx.applying() {
        return Ok(());
    }
    ctx.aws
        .call(
            "ec2:TerminateInstances",
            ctx.aws
                .ec2
                .terminate_instances()
                .set_instance_ids(Some(ids.clone()))
                .send(),
        )
        .await?;
    hosts::wait_terminated(ctx, &ids).await
}

/// Deletes the given EC2 resources in dependency order (instances first, VPC last),
/// recording one change per resource.
async fn delete_ec2(ctx: &Ctx<'_>, inv: &Inventory) -> Result<()> {
    let ec2 = &ctx.aws.ec2;
    let aws = ctx.aws;
    let name_of =
        |tags: &[aws_sdk_ec2::types::Tag], id: &str| ec2::logical(tags).unwrap_or(id).to_owned();

    let mut instances = Vec::new();
    for i in &inv.instances {
        let id = i.instance_id().unwrap_or_default();
        if ctx.change(Action::Delete, "ec2:instance", &name_of(i.tags(), id), id) {
            instances.push(id.to_owned());
        }
    }
    terminate_and_wait(ctx, instances).await?;

    for t in &inv.templates {
        let id = t.launch_template_id().unwrap_or_default();
        let name = t.launch_template_name().unwrap_or(id);
        if ctx.change(Action::Delete, "ec2:launch-template", name, id) {
            aws.call(
                "ec2:DeleteLaunchTemplate",
                ec2.delete_launch_template().launch_template_id(id).send(),
            )
            .await?;
        }
    }

    let endpoints: Vec<String> = id_list(&inv.endpoints, |e| e.vpc_endpoint_id());
    for e in &inv.endpoints {
        let id = e.vpc_endpoint_id().unwrap_or_default();
        ctx.change(
            Action::Delete,
            "ec2:vpc-endpoint",
            &name_of(e.tags(), id),
            id,
        );
    }
    if ctx.applying() && !endpoints.is_empty() {
        aws.call(
            "ec2:DeleteVpcEndpoints",
            ec2.delete_vpc_endpoints()
                .set_vpc_endpoint_ids(Some(endpoints))
                .send(),
        )
        .await?;
    }

    let mut nats = Vec::new();
    for n in &inv.nats {
        let id = n.nat_gateway_id().unwrap_or_default();
        let deleting = n.state().map(|s| s.as_str()) == Some("deleting");
        if deleting {
            nats.push(id.to_owned());
        } else if ctx.change(
            Action::Delete,
            "ec2:nat-gateway",
            &name_of(n.tags(), id),
            id,
        ) {
            aws.call(
                "ec2:DeleteNatGateway",
                ec2.delete_nat_gateway().nat_gateway_id(id).send(),
            )
            .await?;
            nats.push(id.to_owned());
        }
    }
    if ctx.applying() && !nats.is_empty() {
        wait_nats_deleted(ctx, nats).await?;
    }

    for a in &inv.addresses {
        let id = a.allocation_id().unwrap_or_default();
        if ctx.change(Action::Delete, "ec2:elastic-ip", &name_of(a.tags(), id), id) {
            retry_dependency("releasing Elastic IP", || {
                aws.call(
                    "ec2:ReleaseAddress",
                    ec2.release_address().allocation_id(id).send(),
                )
            })
            .await?;
        }
    }

    for rt in &inv.route_tables {
        let id = rt.route_table_id().unwrap_or_default();
        if ctx.change(
            Action::Delete,
            "ec2:route-table",
            &name_of(rt.tags(), id),
            id,
        ) {
            for a in rt.associations() {
                if a.main() == Some(true) {
                    continue;
                }
                if let Some(assoc) = a.route_table_association_id() {
                    aws.call(
                        "ec2:DisassociateRouteTable",
                        ec2.disassociate_route_table().association_id(assoc).send(),
                    )
                    .await?;
                }
            }
            retry_dependency("deleting route table", || {
                aws.call(
                    "ec2:DeleteRouteTable",
                    ec2.delete_route_table().route_table_id(id).send(),
                )
            })
            .await?;
        }
    }

    for g in &inv.igws {
        let id = g.internet_gateway_id().unwrap_or_default();
        if ctx.change(
            Action::Delete,
            "ec2:internet-gateway",
            &name_of(g.tags(), id),
            id,
        ) {
            for a in g.attachments() {
                if let Some(vpc) = a.vpc_id() {
                    retry_dependency("detaching internet gateway", || {
                        aws.call(
                            "ec2:DetachInternetGateway",
                            ec2.detach_internet_gateway()
                                .internet_gateway_id(id)
                                .vpc_id(vpc)
                                .send(),
                        )
                    })
                    .await?;
                }
            }
            aws.call(
                "ec2:DeleteInternetGateway",
                ec2.delete_internet_gateway().internet_gateway_id(id).send(),
            )
            .await?;
        }
    }

    // Rules that name another group keep that group alive: revoke them first.
    let mut doomed_groups = Vec::new();
    for g in &inv.security_groups {
        let id = g.group_id().unwrap_or_default();
        if ctx.change(
            Action::Delete,
            "ec2:security-group",
            &name_of(g.tags(), id),
            id,
        ) {
            doomed_groups.push(g.clone());
        }
    }
    for g in &doomed_groups {
        let refs: Vec<_> = g
            .ip_permissions()
            .iter()
            .filter(|p| !p.user_id_group_pairs().is_empty())
            .cloned()
            .collect();
        if !refs.is_empty() {
            aws.call(
                "ec2:RevokeSecurityGroupIngress",
                ec2.revoke_security_group_ingress()
                    .group_id(g.group_id().unwrap_or_default())
                    .set_ip_permissions(Some(refs))
                    .send(),
            )
            .await?;
        }
    }
    for g in &doomed_groups {
        let id = g.group_id().unwrap_or_default();
        retry_dependency("deleting security group", || {
            aws.call(
                "ec2:DeleteSecurityGroup",
                ec2.delete_security_group().group_id(id).send(),
            )
        })
        .await?;
    }

    for s in &inv.subnets {
        let id = s.subnet_id().unwrap_or_default();
        if ctx.change(Action::Delete, "ec2:subnet", &name_of(s.tags(), id), id) {
            retry_dependency("deleting subnet", || {
                aws.call("ec2:DeleteSubnet", ec2.delete_subnet().subnet_id(id).send())
            })
            .await?;
        }
    }

    for v in &inv.vpcs {
        let id = v.vpc_id().unwrap_or_default();
        if ctx.change(Action::Delete, "ec2:vpc", &name_of(v.tags(), id), id) {
            retry_dependency("deleting VPC", || {
                aws.call("ec2:DeleteVpc", ec2.delete_vpc().vpc_id(id).send())
            })
            .await?;
        }
    }
    Ok(())
}

async fn wait_nats_deleted(ctx: &Ctx<'_>, ids: Vec<String>) -> Result<()> {
    let what = format!("NAT gateways {} to be deleted", ids.join(", "));
    poll::until(&what, Backoff::up_to(Duration::from_secs(600)), || async {
        let out = ctx
            .aws
            .call(
                "ec2:DescribeNatGateways",
                ctx.aws
                    .ec2
                    .describe_nat_gateways()
                    .set_nat_gateway_ids(Some(ids.clone()))
                    .send(),
            )
            .await?;
        let left = out
            .nat_gateways()
            .iter()
            .filter(|n| !matches!(n.state().map(|s| s.as_str()), Some("deleted" | "failed")))
            .count();
        Ok(if left == 0 {
            Poll::Done(())
        } else {
            Poll::Wait(format!("waiting for {left} NAT gateway(s) to be deleted"))
        })
    })
    .await
}

/// Instances in the stack's VPC that are not its runner hosts: build machines of the
/// stack's fleets (fleet tag `<fleet>` or `<fleet>-<n>`, as the daemons launch them) and
/// anything else.
async fn other_instances(ctx: &Ctx<'_>, inv: &Inventory) -> Result<(Vec<Instance>, Vec<Instance>)> {
    let Some(vpc) = inv.vpcs.first().and_then(|v| v.vpc_id()) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let mut found = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let out = ctx
            .aws
            .call(
                "ec2:DescribeInstances",
                ctx.aws
                    .ec2
                    .describe_instances()
                    .filters(Filter::builder().name("vpc-id").values(vpc).build())
                    .set_next_token(token.clone())
                    .send(),
            )
            .await?;
        found.extend(
            out.reservations()
                .iter()
                .flat_map(|r| r.instances())
                .filter(|i| i.vpc_id() == Some(vpc))
                .filter(|i| {
                    !matches!(
                        i.state().and_then(|s| s.name()).map(|n| n.as_str()),
                        Some("terminated")
                    )
                })
                .filter(|i| {
                    ec2::tag(i.tags(), crate::naming::STACK_TAG) != Some(ctx.stack.name.as_str())
                })
                .cloned(),
        );
        token = out.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    Ok(found.into_iter().partition(|i| {
        ec2::tag(i.tags(), flotilla_proto::tags::FLEET)
            .is_some_and(|f| render::is_stack_fleet(ctx.stack, f))
    }))
}

/// One destroy pass (plan or act, per `ctx.mode`): runner hosts, build machines (only
/// with `terminate_build_machines`), launch templates, the runner registration and its
/// parameter, IAM, the bucket, then the network.
pub async fn destroy(ctx: &Ctx<'_>, terminate_build_machines: bool) -> Result<()> {
    tracing::info!("reading stack {} in {}", ctx.stack.name, ctx.aws.region);
    let inv = ec2::inventory(ctx).await?;

    let (machines, foreign) = other_instances(ctx, &inv).await?;
    if !foreign.is_empty() {
        return Err(Error::Refused(format!(
            "instances that are not the stack's run in its VPC ({}): they are never \
             touched; remove them first",
            id_list(&foreign, |i| i.instance_id()).join(", ")
        )));
    }
    if !machines.is_empty() {
        let ids = id_list(&machines, |i| i.instance_id());
        if !terminate_build_machines {
            return Err(Error::Refused(format!(
                "build machines of the stack's fleet still run in its VPC ({}): drain the \
                 runner hosts (`flotilla drain`) first, or pass --terminate-build-machines",
                ids.join(", ")
            )));
        }
        for id in &ids {
            ctx.change(
                Action::Delete,
                "ec2:build-machine",
                id,
                "fleet tag, in the stack's VPC",
            );
        }
        terminate_and_wait(ctx, ids).await?;
    }
    let hosts_only = Inventory {
        instances: inv.instances.clone(),
        ..Default::default()
    };
    delete_ec2(ctx, &hosts_only).await?;
    let templates_only = Inventory {
        templates: inv.templates.clone(),
        ..Default::default()
    };
    delete_ec2(ctx, &templates_only).await?;

    let runner_id = ssm::destroy(ctx).await?;
    if let Some(id) = runner_id {
        match &ctx.gitlab_token {
            Some(token) => {
                if ctx.change(Action::Delete, "gitlab:runner", &id.to_string(), "") {
                    let gitlab = GitlabClient::new(ctx.stack.gitlab_url(), token.clone())?;
                    if !gitlab.delete_runner(id).await? {
                        tracing::info!("  runner {id} was already gone from GitLab");
                    }
                }
            }
            None => ctx.plan.note(format!(
                "GitLab runner {id} stays registered: set {} to delete it too",
                ctx.stack.gitlab.token_env
            )),
        }
    }

    iam::destroy_pair(ctx, &ctx.names.runner_role()).await?;
    iam::destroy_pair(ctx, &ctx.names.build_role()).await?;
    s3::destroy(ctx, &ctx.aws.account().await?).await?;

    let network = Inventory {
        instances: Vec::new(),
        templates: Vec::new(),
        ..inv
    };
    delete_ec2(ctx, &network).await?;
    Ok(())
}
