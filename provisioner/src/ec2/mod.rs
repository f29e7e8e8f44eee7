//! EC2: the stack's inventory (one tag-filtered Describe call per resource type, read
//! once per pass) and the tag helpers the EC2 resource modules share.
//!
//! Invariant: every Describe is filtered on `flotilla:stack = <stack>`, so nothing the
//! stack did not create is ever seen, changed or deleted here.

pub mod hosts;
pub mod launch_template;
pub mod network;
pub mod security_groups;

use aws_sdk_ec2::types::{
    Address, Filter, Instance, InternetGateway, LaunchTemplate, NatGateway, ResourceType,
    RouteTable, SecurityGroup, Subnet, Tag, TagSpecification, Vpc, VpcEndpoint,
};

use crate::aws::AwsError;
use crate::engine::Ctx;
use crate::naming::{RESOURCE_TAG, STACK_TAG};

/// Everything tagged with the stack, as EC2 reported it at the start of a pass.
#[derive(Debug, Default, Clone)]
pub struct Inventory {
    pub vpcs: Vec<Vpc>,
    pub subnets: Vec<Subnet>,
    pub igws: Vec<InternetGateway>,
    pub addresses: Vec<Address>,
    pub nats: Vec<NatGateway>,
    pub route_tables: Vec<RouteTable>,
    pub endpoints: Vec<VpcEndpoint>,
    pub security_groups: Vec<SecurityGroup>,
    pub templates: Vec<LaunchTemplate>,
    /// Instances not yet terminated.
    pub instances: Vec<Instance>,
}

pub fn tag<'a>(tags: &'a [Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// The stack's logical id of a resource (its `flotilla:resource` tag).
pub fn logical(tags: &[Tag]) -> Option<&str> {
    tag(tags, RESOURCE_TAG)
}

/// Tags for a new resource: the stack, the logical id, a console name, and `extra`.
pub fn tags_for(ctx: &Ctx<'_>, logical: &str, extra: &[(&str, &str)]) -> Vec<Tag> {
    let mut tags = vec![
        Tag::builder().key(STACK_TAG).value(&ctx.stack.name).build(),
        Tag::builder().key(RESOURCE_TAG).value(logical).build(),
        Tag::builder()
            .key("Name")
            .value(ctx.names.name_tag(logical))
            .build(),
    ];
    for (k, v) in extra {
        tags.push(Tag::builder().key(*k).value(*v).build());
    }
    tags
}

/// A tag specification so the resource is tagged in the create call itself (no window
/// in which it exists untagged).
pub fn tag_spec(
    ctx: &Ctx<'_>,
    rt: ResourceType,
    logical: &str,
    extra: &[(&str, &str)],
) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(rt)
        .set_tags(Some(tags_for(ctx, logical, extra)))
        .build()
}

pub fn stack_filter(stack: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{STACK_TAG}"))
        .values(stack)
        .build()
}

/// Reads the stack's EC2 resources: ten Describe calls (more only when a result pages).
pub async fn inventory(ctx: &Ctx<'_>) -> Result<Inventory, AwsError> {
    let ec2 = &ctx.aws.ec2;
    let f = || stack_filter(&ctx.stack.name);
    let aws = ctx.aws;
    let mut inv = Inventory {
        vpcs: aws
            .call("ec2:DescribeVpcs", ec2.describe_vpcs().filters(f()).send())
            .await?
            .vpcs
            .unwrap_or_default(),
        subnets: aws
            .call(
                "ec2:DescribeSubnets",
                ec2.describe_subnets().filters(f()).send(),
            )
            .await?
            .subnets
            .unwrap_or_default(),
        igws: aws
            .call(
                "ec2:DescribeInternetGateways",
                ec2.describe_internet_gateways().filters(f()).send(),
            )
            .await?
            .internet_gateways
            .unwrap_or_default(),
        addresses: aws
            .call(
                "ec2:DescribeAddresses",
                ec2.describe_addresses().filters(f()).send(),
            )
            .await?
            .addresses
            .unwrap_or_default(),
        nats: aws
            .call(
                "ec2:DescribeNatGateways",
                ec2.describe_nat_gateways().filter(f()).send(),
            )
            .await?
            .nat_gateways
            .unwrap_or_default(),
        route_tables: aws
            .call(
                "ec2:DescribeRouteTables",
                ec2.describe_route_tables().filters(f()).send(),
            )
            .await?
            .route_tables
            .unwrap_or_default(),
        endpoints: aws
            .call(
                "ec2:DescribeVpcEndpoints",
                ec2.describe_vpc_endpoints().filters(f()).send(),
            )
            .await?
            .vpc_endpoints
            .unwrap_or_default(),
        security_groups: aws
            .call(
                "ec2:DescribeSecurityGroups",
                ec2.describe_security_groups().filters(f()).send(),
            )
            .await?
            .security_groups
            .unwrap_or_default(),
        templates: aws
            .call(
                "ec2:DescribeLaunchTemplates",
                ec2.describe_launch_templates().filters(f()).send(),
            )
            .await?
            .launch_templates
            .unwrap_or_default(),
        instances: Vec::new(),
    };
    let mut token: Option<String> = None;
    loop {
        let out = aws
            .call(
                "ec2:DescribeInstances",
                ec2.describe_instances()
                    .filters(f())
                    .set_next_token(token.clone())
                    .send(),
            )
            .await?;
        for r in out.reservations() {
            inv.instances.extend(r.instances().iter().cloned());
        }
        token = out.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    // Never trust the server-side filter alone (moto, for one, ignores it on
    // DescribeNatGateways): keep only what carries the stack's tag.
    let ours = |tags: &[Tag]| tag(tags, STACK_TAG) == Some(ctx.stack.name.as_str());
    inv.vpcs.retain(|x| ours(x.tags()));
    inv.subnets.retain(|x| ours(x.tags()));
    inv.igws.retain(|x| ours(x.tags()));
    inv.addresses.retain(|x| ours(x.tags()));
    inv.nats.retain(|x| ours(x.tags()));
    inv.route_tables.retain(|x| ours(x.tags()));
    inv.endpoints.retain(|x| ours(x.tags()));
    inv.security_groups.retain(|x| ours(x.tags()));
    inv.templates.retain(|x| ours(x.tags()));
    inv.instances.retain(|x| ours(x.tags()));
    inv.instances.retain(|i| {
        !matches!(
            i.state().and_then(|s| s.name()).map(|n| n.as_str()),
            Some("terminated")
        )
    });
    inv.nats
        .retain(|n| !matches!(n.state().map(|s| s.as_str()), Some("deleted")));
    inv.endpoints.retain(|e| {
        !matches!(
            e.state()
                .map(|s| s.as_str().to_ascii_lowercase())
                .as_deref(),
            Some("deleted")
        )
    });
    Ok(inv)
}

/// Finds the one resource with a logical id; `id_of` gives the AWS id for sorting, so the
/// pick is stable when an interrupted run left a duplicate.
pub fn find<'a, T>(
    items: &'a [T],
    tags_of: impl Fn(&T) -> &[Tag],
    id_of: impl Fn(&T) -> &str,
    want: &str,
) -> Option<&'a T> {
    let mut found: Vec<&T> = items
        .iter()
        .filter(|i| logical(tags_of(i)) == Some(want))
        .collect();
    found.sort_by(|a, b| id_of(a).cmp(id_of(b)));
    if found.len() > 1 {
        tracing::warn!(
            resource = want,
            "{} resources carry this logical id; using {}",
            found.len(),
            id_of(found[0])
        );
    }
    found.first().copied()
}
