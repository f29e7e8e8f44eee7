//! The stack's subnets: a public and a private one per zone (`network.zones`,
//! `network.public_subnets`, `network.private_subnets`). A subnet cannot change in
//! place: a CIDR or zone that differs is an error saying to destroy first. With
//! `[network.vpn]`, also a VPN subnet per zone (`network.vpn.subnets`) for the Client
//! VPN endpoint's associations; it keeps the VPC's main route table (local routes only).

use aws_sdk_ec2::types::ResourceType;

use super::inventory::{find, name_of, tag_spec, Ec2Type, Inventory};
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::naming::logical;
use crate::plan::Action;
use crate::poll;

const KIND: &str = "ec2:subnet";

/// How the engine prunes and deletes this type.
pub(crate) const TYPE: Ec2Type = Ec2Type {
    desired,
    delete: |ctx, inv| Box::pin(delete(ctx, inv)),
};

/// Subnet ids in `network.zones` order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Subnets {
    pub(crate) public: Vec<Id>,
    pub(crate) private: Vec<Id>,
    /// Empty without `[network.vpn]`.
    pub(crate) vpn: Vec<Id>,
}

/// Logical ids this module keeps.
fn desired(ctx: &Ctx<'_>) -> Vec<String> {
    let zones = &ctx.stack.network.zones;
    let vpn = ctx.stack.network.vpn.is_some();
    zones
        .iter()
        .flat_map(|z| [logical::public_subnet(z), logical::private_subnet(z)])
        .chain(zones.iter().filter(|_| vpn).map(|z| logical::vpn_subnet(z)))
        .collect()
}

pub(crate) async fn converge(ctx: &Ctx<'_>, inv: &Inventory, vpc: &Id) -> Result<Subnets> {
    let net = &ctx.stack.network;
    let mut out = Subnets::default();
    for (i, zone) in net.zones.iter().enumerate() {
        let public = &logical::public_subnet(zone);
        out.public
            .push(ensure(ctx, inv, vpc, public, zone, &net.public_subnets[i]).await?);
        let private = &logical::private_subnet(zone);
        out.private
            .push(ensure(ctx, inv, vpc, private, zone, &net.private_subnets[i]).await?);
        if let Some(cidr) = net.vpn.as_ref().and_then(|v| v.subnets.get(i)) {
            let name = &logical::vpn_subnet(zone);
            out.vpn.push(ensure(ctx, inv, vpc, name, zone, cidr).await?);
        }
    }
    Ok(out)
}

async fn ensure(
    ctx: &Ctx<'_>,
    inv: &Inventory,
    vpc: &Id,
    name: &str,
    zone: &str,
    cidr: &str,
) -> Result<Id> {
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
        if have_cidr != cidr || have_zone != zone || s.vpc_id() != vpc.known() {
            return Err(Error::Immutable(format!(
                "subnet {id} ({name}) is {have_cidr} in {have_zone} but the stack file says \
                 {cidr} in {zone}: a subnet cannot change in place; run destroy, then apply"
            )));
        }
        return Ok(Id::Known(id));
    }
    let Some(go) = ctx.change(Action::Create, KIND, name, format!("{cidr} in {zone}")) else {
        return Ok(Id::pending(name));
    };
    let out = ctx
        .aws
        .write(
            go,
            "ec2:CreateSubnet",
            ctx.aws
                .ec2
                .create_subnet()
                .set_vpc_id(vpc.known().map(str::to_owned))
                .cidr_block(cidr)
                .availability_zone(zone)
                .tag_specifications(tag_spec(ctx, ResourceType::Subnet, name, &[]))
                .send(),
        )
        .await?;
    let id = Id::from_aws(out.subnet().and_then(|s| s.subnet_id()));
    ctx.created(KIND, name, &id.to_string());
    Ok(id)
}

async fn delete(ctx: &Ctx<'_>, inv: &Inventory) -> Result<()> {
    for s in &inv.subnets {
        let id = s.subnet_id().unwrap_or_default();
        if let Some(go) = ctx.change(Action::Delete, KIND, &name_of(s.tags(), id), id) {
            poll::while_in_use("deleting subnet", || {
                ctx.aws.write(
                    go,
                    "ec2:DeleteSubnet",
                    ctx.aws.ec2.delete_subnet().subnet_id(id).send(),
                )
            })
            .await?;
        }
    }
    Ok(())
}
