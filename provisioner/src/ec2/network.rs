//! The stack's network: VPC, a public and a private subnet per zone, the internet
//! gateway, NAT gateway(s) with their Elastic IPs, route tables (public: default route to
//! the internet gateway; private, one per zone: default route to a NAT gateway) and the
//! S3 gateway endpoint on the private route tables.
//!
//! Each `ensure_*` finds the resource by its logical id, records a change when it is
//! missing or drifted, and in apply mode makes the change. Properties that cannot change
//! in place (CIDRs, zones) are reported as errors, never silently replaced.

use std::collections::BTreeSet;
use std::time::Duration;

use aws_sdk_ec2::types::{DomainType, ResourceType, RouteTable, VpcEndpointType};

use super::{find, tag_spec, Inventory};
use crate::engine::Ctx;
use crate::error::{Error, Result};
use crate::naming::logical;
use crate::plan::{is_pending, pending, Action};
use crate::poll::{self, Backoff, Poll};
use crate::stack::NatMode;

/// The ids the rest of the stack refers to (pending placeholders in plan mode).
#[derive(Debug, Clone, Default)]
pub struct NetworkIds {
    pub vpc: String,
    /// In `network.zones` order.
    pub public_subnets: Vec<String>,
    pub private_subnets: Vec<String>,
    pub igw: String,
    /// (zone, NAT gateway id, public IP)
    pub nats: Vec<(String, String, String)>,
    pub public_rtb: String,
    pub private_rtbs: Vec<String>,
    pub s3_endpoint: String,
}

/// Logical ids of the network resources this stack wants (everything else is pruned).
pub fn desired(ctx: &Ctx<'_>) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = [
        logical::VPC,
        logical::IGW,
        logical::PUBLIC_RTB,
        logical::S3_ENDPOINT,
    ]
    .map(String::from)
    .into();
    for z in &ctx.stack.network.zones {
        out.insert(logical::public_subnet(z));
        out.insert(logical::private_subnet(z));
        out.insert(logical::private_rtb(z));
    }
    for z in nat_zones(ctx) {
        out.insert(logical::nat(&z));
        out.insert(logical::eip(&z));
    }
    out
}

fn nat_zones(ctx: &Ctx<'_>) -> Vec<String> {
    let zones = &ctx.stack.network.zones;
    match ctx.stack.network.nat {
        NatMode::Single => zones[..1].to_vec(),
        NatMode::PerZone => zones.clone(),
    }
}

pub async fn converge(ctx: &Ctx<'_>, inv: &Inventory) -> Result<NetworkIds> {
    let net = &ctx.stack.network;
    let vpc = ensure_vpc(ctx, inv).await?;
    let mut ids = NetworkIds {
        vpc: vpc.clone(),
        ..Default::default()
    };
    for (i, zone) in net.zones.iter().enumerate() {
        ids.public_subnets.push(
            ensure_subnet(
                ctx,
                inv,
                &vpc,
                &logical::public_subnet(zone),
                zone,
                &net.public_subnets[i],
            )
            .await?,
        );
        ids.private_subnets.push(
            ensure_subnet(
                ctx,
                inv,
                &vpc,
                &logical::private_subnet(zone),
                zone,
                &net.private_subnets[i],
            )
            .await?,
        );
    }
    ids.igw = ensure_igw(ctx, inv, &vpc).await?;
    for zone in nat_zones(ctx) {
        let zi = net.zones.iter().position(|z| *z == zone).expect("zone");
        let (alloc, ip) = ensure_eip(ctx, inv, &zone).await?;
        let nat = ensure_nat(ctx, inv, &zone, &ids.public_subnets[zi], &alloc).await?;
        ids.nats.push((zone, nat, ip));
    }
    ids.public_rtb = ensure_route_table(
        ctx,
        inv,
        logical::PUBLIC_RTB,
        &vpc,
        Target::Igw(ids.igw.clone()),
        &ids.public_subnets,
    )
    .await?;
    for (i, zone) in net.zones.iter().enumerate() {
        let nat = match net.nat {
            NatMode::Single => ids.nats[0].1.clone(),
            NatMode::PerZone => ids.nats[i].1.clone(),
        };
        let rtb = ensure_route_table(
            ctx,
            inv,
            &logical::private_rtb(zone),
            &vpc,
            Target::Nat(nat),
            std::slice::from_ref(&ids.private_subnets[i]),
        )
        .await?;
        ids.private_rtbs.push(rtb);
    }
    ids.s3_endpoint = ensure_s3_endpoint(ctx, inv, &vpc, &ids.private_rtbs).await?;
    Ok(ids)
}

async fn ensure_vpc(ctx: &Ctx<'_>, inv: &Inventory) -> Result<String> {
    let want = &ctx.stack.network.cidr;
    let found = find(
        &inv.vpcs,
        |v| v.tags(),
        |v| v.vpc_id().unwrap_or(""),
        logical::VPC,
    );
    if let Some(v) = found {
        let id = v.vpc_id().unwrap_or_default().to_owned();
        let have = v.cidr_block().unwrap_or("");
        if have != want {
            return Err(Error::Immutable(format!(
                "VPC {id} has CIDR {have} but network.cidr is {want}: a VPC's CIDR cannot \
                 change; run destroy, then apply"
            )));
        }
        return Ok(id);
    }
    if !ctx.change(Action::Create, "ec2:vpc", logical::VPC, want) {
        return Ok(pending(logical::VPC));
    }
    let out = ctx
        .aws
        .call(
            "ec2:CreateVpc",
            ctx.aws
                .ec2
                .create_vpc()
                .cidr_block(want)
                .tag_specifications(tag_spec(ctx, ResourceType::Vpc, logical::VPC, &[]))
                .send(),
        )
        .await?;
    let id = out
        .vpc()
        .and_then(|v| v.vpc_id())
        .unwrap_or_default()
        .to_owned();
    ctx.created("ec2:vpc", logical::VPC, &id);
    Ok(id)
}

async fn ensure_subnet(
    ctx: &Ctx<'_>,
    inv: &Inventory,
    vpc: &str,
    name: &str,
    zone: &str,
    cidr: &str,
) -> Result<String> {
    let found = find(
        &inv.subnets,
        |s| s.tags(),
        |s| s.subnet_id().unwrap_or(""),
        name,
    );
    if let Some(s) = found {
        let id = s.subnet_id().unwrap_or_default().to_owned();
        let (have_cidr, have_zone) = (
            s.cidr_block().unwrap_or(""),
            s.availability_zone().unwrap_or(""),
        );
        if have_cidr != cidr || have_zone != zone || s.vpc_id() != Some(vpc) {
            return Err(Error::Immutable(format!(
                "subnet {id} ({name}) is {have_cidr} in {have_zone} but the stack file says \
                 {cidr} in {zone}: a subnet cannot change in place; run destroy, then apply"
            )));
        }
        return Ok(id);
    }
    if !ctx.change(
        Action::Create,
        "ec2:subnet",
        name,
        format!("{cidr} in {zone}"),
    ) {
        return Ok(pending(name));
    }
    let out = ctx
        .aws
        .call(
            "ec2:CreateSubnet",
            ctx.aws
                .ec2
                .create_subnet()
                .vpc_id(vpc)
                .cidr_block(cidr)
                .availability_zone(zone)
                .tag_specifications(tag_spec(ctx, ResourceType::Subnet, name, &[]))
                .send(),
        )
        .await?;
    let id = out
        .subnet()
        .and_then(|s| s.subnet_id())
        .unwrap_or_default()
        .to_owned();
    ctx.created("ec2:subnet", name, &id);
    Ok(id)
}

async fn ensure_igw(ctx: &Ctx<'_>, inv: &Inventory, vpc: &str) -> Result<String> {
    let name = logical::IGW;
    let found = find(
        &inv.igws,
        |g| g.tags(),
        |g| g.internet_gateway_id().unwrap_or(""),
        name,
    );
    let id = match found {
        Some(g) => {
            let id = g.internet_gateway_id().unwrap_or_default().to_owned();
            let attached = g.attachments().iter().any(|a| a.vpc_id() == Some(vpc));
            if attached {
                return Ok(id);
            }
            if !ctx.change(
                Action::Update,
                "ec2:internet-gateway",
                name,
                format!("attach to {vpc}"),
            ) {
                return Ok(id);
            }
            id
        }
        None => {
            if !ctx.change(Action::Create, "ec2:internet-gateway", name, "") {
                return Ok(pending(name));
            }
            let out = ctx
                .aws
                .call(
                    "ec2:CreateInternetGateway",
                    ctx.aws
                        .ec2
                        .create_internet_gateway()
                        .tag_specifications(tag_spec(ctx, ResourceType::InternetGateway, name, &[]))
                        .send(),
                )
                .await?;
            let id = out
                .internet_gateway()
                .and_then(|g| g.internet_gateway_id())
                .unwrap_or_default()
                .to_owned();
            ctx.created("ec2:internet-gateway", name, &id);
            id
        }
    };
    ctx.aws
        .call(
            "ec2:AttachInternetGateway",
            ctx.aws
                .ec2
                .attach_internet_gateway()
                .internet_gateway_id(&id)
                .vpc_id(vpc)
                .send(),
        )
        .await?;
    Ok(id)
}

/// Returns (allocation id, public IP).
async fn ensure_eip(ctx: &Ctx<'_>, inv: &Inventory, zone: &str) -> Result<(String, String)> {
    let name = logical::eip(zone);
    let found = find(
        &inv.addresses,
        |a| a.tags(),
        |a| a.allocation_id().unwrap_or(""),
        &name,
    );
    if let Some(a) = found {
        return Ok((
            a.allocation_id().unwrap_or_default().to_owned(),
            a.public_ip().unwrap_or_default().to_owned(),
        ));
    }
    if !ctx.change(
        Action::Create,
        "ec2:elastic-ip",
        &name,
        "for the NAT gateway",
    ) {
        return Ok((pending(&name), pending(&name)));
    }
    let out = ctx
        .aws
        .call(
            "ec2:AllocateAddress",
            ctx.aws
                .ec2
                .allocate_address()
                .domain(DomainType::Vpc)
                .tag_specifications(tag_spec(ctx, ResourceType::ElasticIp, &name, &[]))
                .send(),
        )
        .await?;
    let id = out.allocation_id().unwrap_or_default().to_owned();
    ctx.created("ec2:elastic-ip", &name, &id);
    Ok((id, out.public_ip().unwrap_or_default().to_owned()))
}

async fn ensure_nat(
    ctx: &Ctx<'_>,
    inv: &Inventory,
    zone: &str,
    subnet: &str,
    allocation: &str,
) -> Result<String> {
    let name = logical::nat(zone);
    let live: Vec<_> = inv
        .nats
        .iter()
        .filter(|n| {
            !matches!(
                n.state().map(|s| s.as_str()),
                Some("failed" | "deleting" | "deleted")
            )
        })
        .cloned()
        .collect();
    if let Some(n) = find(
        &live,
        |n| n.tags(),
        |n| n.nat_gateway_id().unwrap_or(""),
        &name,
    ) {
        let id = n.nat_gateway_id().unwrap_or_default().to_owned();
        if ctx.applying() && n.state().map(|s| s.as_str()) == Some("pending") {
            wait_nat_available(ctx, &id).await?;
        }
        return Ok(id);
    }
    let failed = inv.nats.iter().any(|n| {
        super::logical(n.tags()) == Some(name.as_str())
            && n.state().map(|s| s.as_str()) == Some("failed")
    });
    let detail = if failed {
        format!("in {zone}; the previous one failed")
    } else {
        format!("in {zone}")
    };
    if !ctx.change(Action::Create, "ec2:nat-gateway", &name, detail) {
        return Ok(pending(&name));
    }
    let out = ctx
        .aws
        .call(
            "ec2:CreateNatGateway",
            ctx.aws
                .ec2
                .create_nat_gateway()
                .subnet_id(subnet)
                .allocation_id(allocation)
                .tag_specifications(tag_spec(ctx, ResourceType::Natgateway, &name, &[]))
                .send(),
        )
        .await?;
    let id = out
        .nat_gateway()
        .and_then(|n| n.nat_gateway_id())
        .unwrap_or_default()
        .to_owned();
    ctx.created("ec2:nat-gateway", &name, &id);
    wait_nat_available(ctx, &id).await?;
    Ok(id)
}

/// NAT gateways take a minute or two to become available; routes wait for them.
async fn wait_nat_available(ctx: &Ctx<'_>, id: &str) -> Result<()> {
    let what = format!("NAT gateway {id} to become available");
    poll::until(&what, Backoff::up_to(Duration::from_secs(600)), || async {
        let out = ctx
            .aws
            .call(
                "ec2:DescribeNatGateways",
                ctx.aws
                    .ec2
                    .describe_nat_gateways()
                    .nat_gateway_ids(id)
                    .send(),
            )
            .await?;
        let nat = out.nat_gateways().first();
        match nat.and_then(|n| n.state()).map(|s| s.as_str()) {
            Some("available") => Ok(Poll::Done(())),
            Some("failed") => {
                let why = nat
                    .and_then(|n| n.failure_message())
                    .unwrap_or("no reason given");
                Err(Error::Refused(format!(
                    "NAT gateway {id} failed: {why}; the next apply replaces it"
                )))
            }
            _ => Ok(Poll::Wait(format!(
                "waiting for NAT gateway {id} to become available"
            ))),
        }
    })
    .await
}

#[derive(Debug, Clone)]
enum Target {
    Igw(String),
    Nat(String),
}

impl Target {
    fn id(&self) -> &str {
        match self {
            Self::Igw(id) | Self::Nat(id) => id,
        }
    }
}

const DEFAULT_ROUTE: &str = "0.0.0.0/0";

async fn ensure_route_table(
    ctx: &Ctx<'_>,
    inv: &Inventory,
    name: &str,
    vpc: &str,
    target: Target,
    subnets: &[String],
) -> Result<String> {
    let found = find(
        &inv.route_tables,
        |r| r.tags(),
        |r| r.route_table_id().unwrap_or(""),
        name,
    );
    let (id, existing): (String, Option<&RouteTable>) = match found {
        Some(rt) => (rt.route_table_id().unwrap_or_default().to_owned(), Some(rt)),
        None => {
            let detail = format!("{DEFAULT_ROUTE} -> {}", target.id());
            if !ctx.change(Action::Create, "ec2:route-table", name, detail) {
                return Ok(pending(name));
            }
            let out = ctx
                .aws
                .call(
                    "ec2:CreateRouteTable",
                    ctx.aws
                        .ec2
                        .create_route_table()
                        .vpc_id(vpc)
                        .tag_specifications(tag_spec(ctx, ResourceType::RouteTable, name, &[]))
                        .send(),
                )
                .await?;
            let id = out
                .route_table()
                .and_then(|r| r.route_table_id())
                .unwrap_or_default()
                .to_owned();
            ctx.created("ec2:route-table", name, &id);
            (id, None)
        }
    };
    if existing.is_some_and(|rt| rt.vpc_id() != Some(vpc)) {
        return Err(Error::Immutable(format!(
            "route table {id} ({name}) is not in VPC {vpc}; run destroy, then apply"
        )));
    }

    // The default route.
    let current = existing.and_then(|rt| {
        rt.routes()
            .iter()
            .find(|r| r.destination_cidr_block() == Some(DEFAULT_ROUTE))
    });
    let current_target = current.and_then(|r| r.nat_gateway_id().or(r.gateway_id()));
    if current_target != Some(target.id()) {
        let replace = current.is_some();
        let record = existing.is_none()
            || ctx.change(
                Action::Update,
                "ec2:route-table",
                name,
                format!(
                    "{DEFAULT_ROUTE} -> {} (was {})",
                    target.id(),
                    current_target.unwrap_or("none")
                ),
            );
        if record && ctx.applying() && !is_pending(target.id()) {
            let ec2 = &ctx.aws.ec2;
            match (&target, replace) {
                (Target::Igw(g), false) => {
                    ctx.aws
                        .call(
                            "ec2:CreateRoute",
                            ec2.create_route()
                                .route_table_id(&id)
                                .destination_cidr_block(DEFAULT_ROUTE)
                                .gateway_id(g)
                                .send(),
                        )
                        .await?;
                }
                (Target::Nat(n), false) => {
                    ctx.aws
                        .call(
                            "ec2:CreateRoute",
                            ec2.create_route()
                                .route_table_id(&id)
                                .destination_cidr_block(DEFAULT_ROUTE)
                                .nat_gateway_id(n)
                                .send(),
                        )
                        .await?;
                }
                (Target::Igw(g), true) => {
                    ctx.aws
                        .call(
                            "ec2:ReplaceRoute",
                            ec2.replace_route()
                                .route_table_id(&id)
                                .destination_cidr_block(DEFAULT_ROUTE)
                                .gateway_id(g)
                                .send(),
                        )
                        .await?;
                }
                (Target::Nat(n), true) => {
                    ctx.aws
                        .call(
                            "ec2:ReplaceRoute",
                            ec2.replace_route()
                                .route_table_id(&id)
                                .destination_cidr_block(DEFAULT_ROUTE)
                                .nat_gateway_id(n)
                                .send(),
                        )
                        .await?;
                }
            }
        }
    }

    // Subnet associations.
    for subnet in subnets {
        let here = existing.is_some_and(|rt| {
            rt.associations()
                .iter()
                .any(|a| a.subnet_id() == Some(subnet.as_str()))
        });
        if here {
            continue;
        }
        // Associated with another of the stack's tables (e.g. one left by a change)?
        let elsewhere = inv.route_tables.iter().find_map(|rt| {
            rt.associations()
                .iter()
                .find(|a| a.subnet_id() == Some(subnet.as_str()))
                .and_then(|a| a.route_table_association_id())
        });
        let record = existing.is_none()
            || ctx.change(
                Action::Update,
                "ec2:route-table",
                name,
                format!("associate {subnet}"),
            );
        if !(record && ctx.applying()) || is_pending(subnet) {
            continue;
        }
        match elsewhere {
            Some(assoc) => {
                ctx.aws
                    .call(
                        "ec2:ReplaceRouteTableAssociation",
                        ctx.aws
                            .ec2
                            .replace_route_table_association()
                            .association_id(assoc)
                            .route_table_id(&id)
                            .send(),
                    )
                    .await?;
            }
            None => {
                ctx.aws
                    .call(
                        "ec2:AssociateRouteTable",
                        ctx.aws
                            .ec2
                            .associate_route_table()
                            .route_table_id(&id)
                            .subnet_id(subnet)
                            .send(),
                    )
                    .await?;
            }
        }
    }
    Ok(id)
}

async fn ensure_s3_endpoint(
    ctx: &Ctx<'_>,
    inv: &Inventory,
    vpc: &str,
    route_tables: &[String],
) -> Result<String> {
    let name = logical::S3_ENDPOINT;
    let service = format!("com.amazonaws.{}.s3", ctx.aws.region);
    let found = find(
        &inv.endpoints,
        |e| e.tags(),
        |e| e.vpc_endpoint_id().unwrap_or(""),
        name,
    );
    if let Some(ep) = found {
        let id = ep.vpc_endpoint_id().unwrap_or_default().to_owned();
        let have: BTreeSet<&str> = ep.route_table_ids().iter().map(String::as_str).collect();
        let want: BTreeSet<&str> = route_tables.iter().map(String::as_str).collect();
        if have == want {
            return Ok(id);
        }
        let add: Vec<String> = want.difference(&have).map(|s| s.to_string()).collect();
        let remove: Vec<String> = have.difference(&want).map(|s| s.to_string()).collect();
        let detail = format!("route tables +{add:?} -{remove:?}");
        if ctx.change(Action::Update, "ec2:vpc-endpoint", name, detail)
            && !add.iter().any(|r| is_pending(r))
        {
            ctx.aws
                .call(
                    "ec2:ModifyVpcEndpoint",
                    ctx.aws
                        .ec2
                        .modify_vpc_endpoint()
                        .vpc_endpoint_id(&id)
                        .set_add_route_table_ids((!add.is_empty()).then_some(add))
                        .set_remove_route_table_ids((!remove.is_empty()).then_some(remove))
                        .send(),
                )
                .await?;
        }
        return Ok(id);
    }
    if !ctx.change(Action::Create, "ec2:vpc-endpoint", name, &service) {
        return Ok(pending(name));
    }
    let out = ctx
        .aws
        .call(
            "ec2:CreateVpcEndpoint",
            ctx.aws
                .ec2
                .create_vpc_endpoint()
                .vpc_id(vpc)
                .service_name(&service)
                .vpc_endpoint_type(VpcEndpointType::Gateway)
                .set_route_table_ids(Some(route_tables.to_vec()))
                .tag_specifications(tag_spec(ctx, ResourceType::VpcEndpoint, name, &[]))
                .send(),
        )
        .await?;
    let id = out
        .vpc_endpoint()
        .and_then(|e| e.vpc_endpoint_id())
        .unwrap_or_default()
        .to_owned();
    ctx.created("ec2:vpc-endpoint", name, &id);
    Ok(id)
}
