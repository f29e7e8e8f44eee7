//! The passes over a stack, and nothing but their order: `converge` (plan and apply
//! share it; the mode lives in the context's plan) and `destroy`. Each step is a
//! resource module's own converge or delete; what one resource needs of another (ids)
//! is passed along here.
//!
//! Converge order: EC2 inventory and AMIs, network (VPC, subnets, internet gateway, NAT
//! gateways, route tables, S3 endpoint), security groups, the Client VPN endpoint
//! (`[network.vpn]`), bucket (and the flotilla binary in it), log group, IAM, runner
//! registration, launch templates, runner hosts (replaced
//! one at a time), then deletion of the stack's EC2 resources it no longer asks for.
//! Deletion order: [`EC2_TYPES`] (instances first, the VPC last); destroy deletes the
//! hosts and the launch templates, then the registration, IAM, the bucket and the log
//! group, then the network.
//!
//! Adding a resource: its module (converge and delete side by side; an EC2 type also
//! has a `TYPE` with the logical ids it keeps and its deletion), its call in `converge`
//! (or `destroy`), and for an EC2 type its line in [`EC2_TYPES`] and its Describe call
//! in `ec2::inventory`.

use std::collections::BTreeSet;

use crate::binary::LocalBinary;
use crate::context::Ctx;
use crate::ec2::inventory::{self, Ec2Type, Inventory};
use crate::ec2::{
    client_vpn, image, instance, internet_gateway, launch_template, nat_gateway, route_table,
    security_group, subnet, vpc, vpc_endpoint,
};
use crate::error::Result;
use crate::host_config;
use crate::iam::{self, RunnerPolicyInputs};
use crate::logs;
use crate::oidc;
use crate::outputs::{self, Outputs};
use crate::registration;
use crate::s3;
use crate::stack::FleetIds;

/// One converge pass (plan or apply, per the context's mode).
pub async fn converge(ctx: &Ctx<'_>) -> Result<Outputs> {
    let stack = ctx.stack;
    let region = ctx.aws.region.clone();
    tracing::info!("reading stack {} in {region}", stack.name);
    if let Some(note) = stack.concurrency_note() {
        ctx.plan.note(note);
    }
    let inv = inventory::read(ctx).await?;
    let images = image::images(ctx).await?;
    let host_image = images.get(&stack.runner_hosts.ami);
    let bin_key = ctx.hosts.flotilla.as_ref().map(LocalBinary::key);
    let flotilla = host_config::flotilla_source(ctx, bin_key.as_deref(), host_image)?;
    let account = ctx.aws.account().await?;

    let vpc = vpc::converge(ctx, &inv).await?;
    let subnets = subnet::converge(ctx, &inv, &vpc).await?;
    let igw = internet_gateway::converge(ctx, &inv, &vpc).await?;
    let nats = nat_gateway::converge(ctx, &inv, &subnets.public).await?;
    let rtbs = route_table::converge(ctx, &inv, &vpc, &igw, &nats, &subnets).await?;
    let s3_endpoint = vpc_endpoint::converge(ctx, &inv, &vpc, &rtbs.private).await?;
    let sgs = security_group::converge(ctx, &inv, &vpc).await?;
    let client_vpn = client_vpn::converge(ctx, &inv, &vpc, &sgs, &subnets).await?;
    s3::converge(ctx, ctx.aws.partition(), &account).await?;
    if let Some(bin) = &ctx.hosts.flotilla {
        s3::ensure_binary(ctx, &account, bin).await?;
    }
    logs::converge(ctx).await?;
    let private_subnets = outputs::ids(&subnets.private);
    let roles = iam::converge(
        ctx,
        &RunnerPolicyInputs {
            partition: ctx.aws.partition().into(),
            region: region.clone(),
            account,
            fleets: stack.host_fleets(),
            private_subnets: private_subnets.clone(),
            build_security_group: sgs.build.to_string(),
            build_role: ctx.names.build_role(),
            token_param: ctx.names.token_param(),
            bucket: stack.bucket.name.clone(),
            amis: ctx.classes.values().map(|c| c.ami.clone()).collect(),
            max_hop_limit: ctx
                .classes
                .values()
                .map(|c| c.imds_hop_limit)
                .max()
                .unwrap_or(1),
            launch_templates: ctx.classes.values().any(|c| c.launch_template.is_some()),
            kms_key: stack.bucket.kms_key.clone(),
            volume_kms_keys: ctx
                .classes
                .values()
                .filter_map(|c| c.root_volume.as_ref()?.kms_key.clone())
                .collect(),
            flotilla_from_bucket: flotilla.is_bucket(),
            ssm_agent: true,
            log_group: stack.log_group(),
        },
    )
    .await?;
    let deploy = oidc::converge(ctx, &ctx.aws.account().await?).await?;
    let registration = registration::converge(ctx).await?;

    let ids = FleetIds {
        private_subnets,
        build_security_group: sgs.build.to_string(),
        build_instance_profile: ctx.names.build_role(),
        region: Some(region.clone()),
    };
    let (specs, configs): (Vec<_>, Vec<_>) =
        host_config::hosts(ctx, flotilla, &ids, &subnets.private)?
            .into_iter()
            .map(|h| (h.spec, (h.fleet, h.flotilla_toml)))
            .unzip();
    let launch = instance::Launch {
        runner_sg: &sgs.runner,
        profile: &ctx.names.runner_role(),
        root_device: host_image.map_or("/dev/xvda", |i| i.root_device.as_str()),
    };
    let hosts = instance::converge(ctx, &inv, &specs, &launch).await?;

    // What the stack no longer asks for.
    let desired: BTreeSet<String> = EC2_TYPES.iter().flat_map(|t| (t.desired)(ctx)).collect();
    delete_ec2(ctx, &inv.undesired(&desired)).await?;

    let runner_hosts = outputs::hosts(hosts, configs);
    Ok(Outputs {
        scrape_targets: outputs::scrape_targets(stack.monitoring.as_ref(), &runner_hosts),
        client_vpn_endpoint: client_vpn.map(|id| id.to_string()),
        deploy,
        stack: stack.name.clone(),
        region: region.clone(),
        vpc: vpc.to_string(),
        public_subnets: outputs::ids(&subnets.public),
        private_subnets: ids.private_subnets.clone(),
        nat_gateways: outputs::nats(&nats),
        s3_endpoint: s3_endpoint.to_string(),
        runner_security_group: sgs.runner.to_string(),
        build_security_group: sgs.build.to_string(),
        bucket: stack.bucket.name.clone(),
        flotilla_binary: flotilla.location(),
        flotilla_sha256: flotilla.sha256().to_owned(),
        runner_role_arn: roles.runner_arn.to_string(),
        build_role_arn: roles.build_arn.to_string(),
        runner_instance_profile: ctx.names.runner_role(),
        build_instance_profile: ctx.names.build_role(),
        runner_hosts,
        token_parameter: ctx.names.token_param(),
        gitlab_runner_id: registration.runner_id,
        registration: registration.status,
        gitlab_runner_config_toml: host_config::runner_config_toml(ctx, &ids)?,
    })
}

/// The stack's EC2 resource types, dependents first: the order they are deleted in (by
/// destroy, and when the stack no longer asks for them).
const EC2_TYPES: [Ec2Type; 10] = [
    instance::TYPE,
    launch_template::TYPE,
    client_vpn::TYPE,
    vpc_endpoint::TYPE,
    nat_gateway::TYPE,
    route_table::TYPE,
    internet_gateway::TYPE,
    security_group::TYPE,
    subnet::TYPE,
    vpc::TYPE,
];

/// Deletes the given EC2 resources in [`EC2_TYPES`] order.
async fn delete_ec2(ctx: &Ctx<'_>, inv: &Inventory) -> Result<()> {
    for t in &EC2_TYPES {
        (t.delete)(ctx, inv).await?;
    }
    Ok(())
}

/// One destroy pass (plan or act, per the context's mode): build machines (refused
/// unless `terminate_build_machines`), runner hosts, launch templates, the runner
/// registration and its parameter, IAM, the bucket, then the network.
pub async fn destroy(ctx: &Ctx<'_>, terminate_build_machines: bool) -> Result<()> {
    tracing::info!("reading stack {} in {}", ctx.stack.name, ctx.aws.region);
    let inv = inventory::read(ctx).await?;
    instance::delete_build_machines(ctx, &inv, terminate_build_machines).await?;
    let hosts = Inventory {
        instances: inv.instances.clone(),
        ..Inventory::default()
    };
    delete_ec2(ctx, &hosts).await?;
    let templates = Inventory {
        templates: inv.templates.clone(),
        ..Inventory::default()
    };
    delete_ec2(ctx, &templates).await?;
    registration::destroy(ctx).await?;
    iam::destroy(ctx).await?;
    oidc::destroy(ctx).await?;
    s3::destroy(ctx, &ctx.aws.account().await?).await?;
    logs::destroy(ctx).await?;
    let network = Inventory {
        instances: Vec::new(),
        templates: Vec::new(),
        ..inv
    };
    delete_ec2(ctx, &network).await
}
