//! The stack's EC2 inventory (one tag-filtered Describe call per resource type, read
//! once per pass, then handed to every EC2 resource module) and the tag helpers those
//! modules share.
//!
//! Invariant: every Describe is filtered on `flotilla:stack = <stack>`, and the result
//! filtered again on our side, so nothing the stack did not create is ever seen,
//! changed or deleted.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;

use aws_sdk_ec2::types::{
    Address, ClientVpnEndpoint, Filter, Instance, InternetGateway, LaunchTemplate, NatGateway,
    ResourceType, RouteTable, SecurityGroup, Subnet, Tag, TagSpecification, Vpc, VpcEndpoint,
};

use crate::aws::AwsError;
use crate::context::Ctx;
use crate::error::Result;
use crate::naming::{RESOURCE_TAG, STACK_TAG};

/// What the engine needs of an EC2 resource type besides its converge (whose inputs and
/// outputs differ from type to type): the logical ids the stack asks for, so the rest
/// is pruned, and its deletion. Each EC2 module has one, `TYPE`; the engine lists them
/// in deletion order.
pub(crate) struct Ec2Type {
    /// The logical ids of this type the stack asks for.
    pub(crate) desired: fn(&Ctx<'_>) -> Vec<String>,
    /// Deletes the given inventory's resources of this type (recording each).
    pub(crate) delete: for<'a> fn(&'a Ctx<'a>, &'a Inventory) -> Deletion<'a>,
}

/// A type's deletion, boxed so that every type's fits in one table.
pub(crate) type Deletion<'a> = Pin<Box<dyn Future<Output = Result<()>> + 'a>>;

/// Everything tagged with the stack, as EC2 reported it at the start of a pass.
#[derive(Debug, Default, Clone)]
pub(crate) struct Inventory {
    pub(crate) vpcs: Vec<Vpc>,
    pub(crate) subnets: Vec<Subnet>,
    pub(crate) igws: Vec<InternetGateway>,
    pub(crate) addresses: Vec<Address>,
    pub(crate) nats: Vec<NatGateway>,
    pub(crate) route_tables: Vec<RouteTable>,
    pub(crate) endpoints: Vec<VpcEndpoint>,
    pub(crate) security_groups: Vec<SecurityGroup>,
    pub(crate) templates: Vec<LaunchTemplate>,
    /// Instances not yet terminated.
    pub(crate) instances: Vec<Instance>,
    /// Client VPN endpoints not being deleted.
    pub(crate) client_vpns: Vec<ClientVpnEndpoint>,
}

/// An EC2 resource as Describe returns it: what the inventory filters and prunes by.
pub(crate) trait Tagged {
    fn tags(&self) -> &[Tag];
}

macro_rules! tagged {
    ($($t:ty),*) => {$(
        impl Tagged for $t {
            fn tags(&self) -> &[Tag] {
                <$t>::tags(self)
            }
        }
    )*};
}
tagged!(
    Vpc,
    Subnet,
    InternetGateway,
    Address,
    NatGateway,
    RouteTable,
    VpcEndpoint,
    SecurityGroup,
    LaunchTemplate,
    Instance,
    ClientVpnEndpoint
);

/// The items whose logical id is not in `desired`.
fn not_in<T: Tagged + Clone>(items: &[T], desired: &BTreeSet<String>) -> Vec<T> {
    items
        .iter()
        .filter(|x| !logical(x.tags()).is_some_and(|l| desired.contains(l)))
        .cloned()
        .collect()
}

impl Inventory {
    /// The resources whose logical id the stack does not ask for (instances are left
    /// out: the runner hosts' module retires its own).
    pub(crate) fn undesired(&self, desired: &BTreeSet<String>) -> Inventory {
        Inventory {
            vpcs: not_in(&self.vpcs, desired),
            subnets: not_in(&self.subnets, desired),
            igws: not_in(&self.igws, desired),
            addresses: not_in(&self.addresses, desired),
            nats: not_in(&self.nats, desired),
            route_tables: not_in(&self.route_tables, desired),
            endpoints: not_in(&self.endpoints, desired),
            security_groups: not_in(&self.security_groups, desired),
            templates: not_in(&self.templates, desired),
            instances: Vec::new(),
            client_vpns: not_in(&self.client_vpns, desired),
        }
    }
}

pub(crate) fn tag<'a>(tags: &'a [Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// The stack's logical id of a resource (its `flotilla:resource` tag).
pub(crate) fn logical(tags: &[Tag]) -> Option<&str> {
    tag(tags, RESOURCE_TAG)
}

/// Tags for a new resource: the stack, the logical id, a console name, and `extra`.
fn tags_for(ctx: &Ctx<'_>, logical: &str, extra: &[(&str, &str)]) -> Vec<Tag> {
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
pub(crate) fn tag_spec(
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

fn stack_filter(stack: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{STACK_TAG}"))
        .values(stack)
        .build()
}

/// Reads the stack's EC2 resources: eleven Describe calls (more only when a result pages).
pub(crate) async fn read(ctx: &Ctx<'_>) -> Result<Inventory, AwsError> {
    let ec2 = &ctx.aws.ec2;
    let f = || stack_filter(&ctx.stack.name);
    let aws = ctx.aws;
    let mut inv = Inventory {
        vpcs: aws
            .read("ec2:DescribeVpcs", ec2.describe_vpcs().filters(f()).send())
            .await?
            .vpcs
            .unwrap_or_default(),
        subnets: aws
            .read(
                "ec2:DescribeSubnets",
                ec2.describe_subnets().filters(f()).send(),
            )
            .await?
            .subnets
            .unwrap_or_default(),
        igws: aws
            .read(
                "ec2:DescribeInternetGateways",
                ec2.describe_internet_gateways().filters(f()).send(),
            )
            .await?
            .internet_gateways
            .unwrap_or_default(),
        addresses: aws
            .read(
                "ec2:DescribeAddresses",
                ec2.describe_addresses().filters(f()).send(),
            )
            .await?
            .addresses
            .unwrap_or_default(),
        nats: aws
            .read(
                "ec2:DescribeNatGateways",
                ec2.describe_nat_gateways().filter(f()).send(),
            )
            .await?
            .nat_gateways
            .unwrap_or_default(),
        route_tables: aws
            .read(
                "ec2:DescribeRouteTables",
                ec2.describe_route_tables().filters(f()).send(),
            )
            .await?
            .route_tables
            .unwrap_or_default(),
        endpoints: aws
            .read(
                "ec2:DescribeVpcEndpoints",
                ec2.describe_vpc_endpoints().filters(f()).send(),
            )
            .await?
            .vpc_endpoints
            .unwrap_or_default(),
        security_groups: aws
            .read(
                "ec2:DescribeSecurityGroups",
                ec2.describe_security_groups().filters(f()).send(),
            )
            .await?
            .security_groups
            .unwrap_or_default(),
        templates: aws
            .read(
                "ec2:DescribeLaunchTemplates",
                ec2.describe_launch_templates().filters(f()).send(),
            )
            .await?
            .launch_templates
            .unwrap_or_default(),
        instances: Vec::new(),
        client_vpns: client_vpns(ctx).await?,
    };
    let mut token: Option<String> = None;
    loop {
        let out = aws
            .read(
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
    fn keep_ours<T: Tagged>(items: &mut Vec<T>, stack: &str) {
        items.retain(|x| tag(x.tags(), STACK_TAG) == Some(stack));
    }
    let stack = ctx.stack.name.as_str();
    keep_ours(&mut inv.vpcs, stack);
    keep_ours(&mut inv.subnets, stack);
    keep_ours(&mut inv.igws, stack);
    keep_ours(&mut inv.addresses, stack);
    keep_ours(&mut inv.nats, stack);
    keep_ours(&mut inv.route_tables, stack);
    keep_ours(&mut inv.endpoints, stack);
    keep_ours(&mut inv.security_groups, stack);
    keep_ours(&mut inv.templates, stack);
    keep_ours(&mut inv.instances, stack);
    keep_ours(&mut inv.client_vpns, stack);
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

/// Client VPN endpoints, every page: DescribeClientVpnEndpoints has no tag filter, so
/// [`read`] keeps the stack's own. Those being deleted are left out.
async fn client_vpns(ctx: &Ctx<'_>) -> Result<Vec<ClientVpnEndpoint>, AwsError> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = ctx
            .aws
            .read(
                "ec2:DescribeClientVpnEndpoints",
                ctx.aws
                    .ec2
                    .describe_client_vpn_endpoints()
                    .set_next_token(token.clone())
                    .send(),
            )
            .await?;
        out.extend(page.client_vpn_endpoints().iter().cloned());
        token = page.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    out.retain(|e| {
        !matches!(
            e.status().and_then(|s| s.code()).map(|c| c.as_str()),
            Some("deleting" | "deleted")
        )
    });
    Ok(out)
}

/// Finds the one resource with a logical id; `id_of` gives the AWS id for sorting, so the
/// pick is stable when an interrupted run left a duplicate.
pub(crate) fn find<'a, T>(
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
            found.first().map_or("", |f| id_of(f))
        );
    }
    found.first().copied()
}

/// The console name of a resource being deleted: its logical id, or its AWS id.
pub(crate) fn name_of(tags: &[Tag], id: &str) -> String {
    logical(tags).unwrap_or(id).to_owned()
}

/// The ids of some resources, for a batch call or a message.
pub(crate) fn id_list<T>(items: &[T], id: impl Fn(&T) -> Option<&str>) -> Vec<String> {
    items
        .iter()
        .filter_map(|i| id(i).map(str::to_owned))
        .collect()
}
