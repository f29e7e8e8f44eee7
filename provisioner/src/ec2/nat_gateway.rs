//! NAT gateways and their Elastic IPs: one in the first zone (`network.nat = "single"`)
//! or one per zone, in the public subnets, giving the private subnets their way out.
//! Creation and deletion both wait (NAT gateways take minutes either way); a failed one
//! is replaced by the next apply.

use std::time::Duration;

use aws_sdk_ec2::types::{DomainType, ResourceType};

use super::inventory::{self, find, name_of, tag_spec, Ec2Type, Inventory};
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::naming::logical;
use crate::plan::Action;
use crate::poll::{self, Backoff, Poll};
use crate::stack::NatMode;

const KIND: &str = "ec2:nat-gateway";
const EIP_KIND: &str = "ec2:elastic-ip";

/// How the engine prunes and deletes this type.
pub(crate) const TYPE: Ec2Type = Ec2Type {
    desired,
    delete: |ctx, inv| Box::pin(delete(ctx, inv)),
};

/// One NAT gateway as the rest of the stack sees it.
#[derive(Debug, Clone)]
pub(crate) struct Nat {
    pub(crate) zone: String,
    pub(crate) id: Id,
    pub(crate) public_ip: Id,
}

/// The zones that get a NAT gateway.
fn zones(ctx: &Ctx<'_>) -> Vec<String> {
    let zones = &ctx.stack.network.zones;
    match ctx.stack.network.nat {
        NatMode::Single => zones.iter().take(1).cloned().collect(),
        NatMode::PerZone => zones.clone(),
    }
}

/// Logical ids this module keeps (gateways and their addresses).
fn desired(ctx: &Ctx<'_>) -> Vec<String> {
    zones(ctx)
        .iter()
        .flat_map(|z| [logical::nat(z), logical::eip(z)])
        .collect()
}

/// The NAT gateways, in zone order; `public_subnets` in `network.zones` order.
pub(crate) async fn converge(
    ctx: &Ctx<'_>,
    inv: &Inventory,
    public_subnets: &[Id],
) -> Result<Vec<Nat>> {
    let mut out = Vec::new();
    for zone in zones(ctx) {
        let zi = ctx
            .stack
            .network
            .zones
            .iter()
            .position(|z| *z == zone)
            .unwrap_or_default();
        let (alloc, public_ip) = ensure_eip(ctx, inv, &zone).await?;
        let id = ensure_nat(ctx, inv, &zone, &public_subnets[zi], &alloc).await?;
        out.push(Nat {
            zone,
            id,
            public_ip,
        });
    }
    Ok(out)
}

/// The NAT gateway a zone's private route table uses.
pub(crate) fn for_zone(ctx: &Ctx<'_>, nats: &[Nat], zone_index: usize) -> Id {
    let nat = match ctx.stack.network.nat {
        NatMode::Single => nats.first(),
        NatMode::PerZone => nats.get(zone_index),
    };
    nat.map_or_else(|| Id::pending("nat"), |n| n.id.clone())
}

/// Returns (allocation id, public IP).
async fn ensure_eip(ctx: &Ctx<'_>, inv: &Inventory, zone: &str) -> Result<(Id, Id)> {
    let name = logical::eip(zone);
    let found = find(
        &inv.addresses,
        |a| a.tags(),
        |a| a.allocation_id().unwrap_or(""),
        &name,
    );
    if let Some(a) = found {
        return Ok((Id::from_aws(a.allocation_id()), Id::from_aws(a.public_ip())));
    }
    let Some(go) = ctx.change(Action::Create, EIP_KIND, &name, "for the NAT gateway") else {
        return Ok((Id::pending(&name), Id::pending(&name)));
    };
    let out = ctx
        .aws
        .write(
            go,
            "ec2:AllocateAddress",
            ctx.aws
                .ec2
                .allocate_address()
                .domain(DomainType::Vpc)
                .tag_specifications(tag_spec(ctx, ResourceType::ElasticIp, &name, &[]))
                .send(),
        )
        .await?;
    let id = Id::from_aws(out.allocation_id());
    ctx.created(EIP_KIND, &name, &id.to_string());
    Ok((id, Id::from_aws(out.public_ip())))
}

async fn ensure_nat(
    ctx: &Ctx<'_>,
    inv: &Inventory,
    zone: &str,
    subnet: &Id,
    allocation: &Id,
) -> Result<Id> {
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
            wait_available(ctx, &id).await?;
        }
        return Ok(Id::Known(id));
    }
    let failed = inv.nats.iter().any(|n| {
        inventory::logical(n.tags()) == Some(name.as_str())
            && n.state().map(|s| s.as_str()) == Some("failed")
    });
    let detail = if failed {
        format!("in {zone}; the previous one failed")
    } else {
        format!("in {zone}")
    };
    let Some(go) = ctx.change(Action::Create, KIND, &name, detail) else {
        return Ok(Id::pending(&name));
    };
    let out = ctx
        .aws
        .write(
            go,
            "ec2:CreateNatGateway",
            ctx.aws
                .ec2
                .create_nat_gateway()
                .set_subnet_id(subnet.known().map(str::to_owned))
                .set_allocation_id(allocation.known().map(str::to_owned))
                .tag_specifications(tag_spec(ctx, ResourceType::Natgateway, &name, &[]))
                .send(),
        )
        .await?;
    let id = out
        .nat_gateway()
        .and_then(|n| n.nat_gateway_id())
        .unwrap_or_default()
        .to_owned();
    ctx.created(KIND, &name, &id);
    wait_available(ctx, &id).await?;
    Ok(Id::Known(id))
}

/// NAT gateways take a minute or two to become available; routes wait for them.
async fn wait_available(ctx: &Ctx<'_>, id: &str) -> Result<()> {
    let what = format!("NAT gateway {id} to become available");
    poll::until(&what, Backoff::up_to(Duration::from_secs(600)), || async {
        let out = ctx
            .aws
            .read(
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

/// Deletes the NAT gateways (waiting until they are gone, with those already being
/// deleted), then releases their Elastic IPs.
async fn delete(ctx: &Ctx<'_>, inv: &Inventory) -> Result<()> {
    let mut nats = Vec::new();
    for n in &inv.nats {
        let id = n.nat_gateway_id().unwrap_or_default();
        if n.state().map(|s| s.as_str()) == Some("deleting") {
            nats.push(id.to_owned());
        } else if let Some(go) = ctx.change(Action::Delete, KIND, &name_of(n.tags(), id), id) {
            ctx.aws
                .write(
                    go,
                    "ec2:DeleteNatGateway",
                    ctx.aws.ec2.delete_nat_gateway().nat_gateway_id(id).send(),
                )
                .await?;
            nats.push(id.to_owned());
        }
    }
    if ctx.applying() && !nats.is_empty() {
        wait_deleted(ctx, nats).await?;
    }

    for a in &inv.addresses {
        let id = a.allocation_id().unwrap_or_default();
        if let Some(go) = ctx.change(Action::Delete, EIP_KIND, &name_of(a.tags(), id), id) {
            poll::while_in_use("releasing Elastic IP", || {
                ctx.aws.write(
                    go,
                    "ec2:ReleaseAddress",
                    ctx.aws.ec2.release_address().allocation_id(id).send(),
                )
            })
            .await?;
        }
    }
    Ok(())
}

async fn wait_deleted(ctx: &Ctx<'_>, ids: Vec<String>) -> Result<()> {
    let what = format!("NAT gateways {} to be deleted", ids.join(", "));
    poll::until(&what, Backoff::up_to(Duration::from_secs(600)), || async {
        let out = ctx
            .aws
            .read(
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
