//! Route tables: the public one (default route to the internet gateway, every public
//! subnet) and one private one per zone (default route to a NAT gateway, that zone's
//! private subnet). Converged setting by setting: the table itself, its default route,
//! its subnet associations (taken over from another of the stack's tables if need be).

use aws_sdk_ec2::types::{ResourceType, RouteTable};

use super::inventory::{find, name_of, tag_spec, Ec2Type, Inventory};
use super::nat_gateway::{self, Nat};
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::naming::logical;
use crate::plan::{Action, Go};
use crate::poll;

const KIND: &str = "ec2:route-table";

/// How the engine prunes and deletes this type.
pub(crate) const TYPE: Ec2Type = Ec2Type {
    desired,
    delete: |ctx, inv| Box::pin(delete(ctx, inv)),
};
const DEFAULT_ROUTE: &str = "0.0.0.0/0";

/// Where a table's default route goes.
#[derive(Debug, Clone)]
enum Target {
    Igw(Id),
    Nat(Id),
}

impl Target {
    fn id(&self) -> &Id {
        match self {
            Self::Igw(id) | Self::Nat(id) => id,
        }
    }
}

/// What the S3 endpoint needs of the tables: the private ones' ids, in
/// `network.zones` order.
#[derive(Debug, Clone)]
pub(crate) struct RouteTables {
    pub(crate) private: Vec<Id>,
}

/// Logical ids this module keeps.
fn desired(ctx: &Ctx<'_>) -> Vec<String> {
    let mut out = vec![logical::PUBLIC_RTB.to_owned()];
    out.extend(
        ctx.stack
            .network
            .zones
            .iter()
            .map(|z| logical::private_rtb(z)),
    );
    out
}

pub(crate) async fn converge(
    ctx: &Ctx<'_>,
    inv: &Inventory,
    vpc: &Id,
    igw: &Id,
    nats: &[Nat],
    subnets: &super::subnet::Subnets,
) -> Result<RouteTables> {
    let public = Table {
        name: logical::PUBLIC_RTB.to_owned(),
        target: Target::Igw(igw.clone()),
        subnets: subnets.public.clone(),
    };
    public.converge(ctx, inv, vpc).await?;
    let mut private = Vec::new();
    for (i, zone) in ctx.stack.network.zones.iter().enumerate() {
        let table = Table {
            name: logical::private_rtb(zone),
            target: Target::Nat(nat_gateway::for_zone(ctx, nats, i)),
            subnets: subnets.private.get(i).cloned().into_iter().collect(),
        };
        private.push(table.converge(ctx, inv, vpc).await?);
    }
    Ok(RouteTables { private })
}

/// One table as the stack wants it.
struct Table {
    name: String,
    target: Target,
    subnets: Vec<Id>,
}

/// A table found in the inventory, or created in this pass (with the creation's [`Go`]:
/// its route and associations are part of creating it, not separate updates).
enum Existing<'a> {
    Found(&'a RouteTable),
    Created(Go),
}

impl Existing<'_> {
    fn found(&self) -> Option<&RouteTable> {
        match self {
            Self::Found(rt) => Some(rt),
            Self::Created(_) => None,
        }
    }

    /// The [`Go`] for a setting: the creation's, or that of an update recorded now.
    fn go(&self, ctx: &Ctx<'_>, name: &str, detail: impl FnOnce() -> String) -> Option<Go> {
        match self {
            Self::Created(go) => Some(*go),
            Self::Found(_) => ctx.change(Action::Update, KIND, name, detail()),
        }
    }
}

impl Table {
    async fn converge(&self, ctx: &Ctx<'_>, inv: &Inventory, vpc: &Id) -> Result<Id> {
        let name = self.name.as_str();
        let found = find(
            &inv.route_tables,
            |r| r.tags(),
            |r| r.route_table_id().unwrap_or(""),
            name,
        );
        let (id, existing) = match found {
            Some(rt) => (
                rt.route_table_id().unwrap_or_default().to_owned(),
                Existing::Found(rt),
            ),
            None => match self.create(ctx, vpc).await? {
                Some(created) => created,
                None => return Ok(Id::pending(name)),
            },
        };
        if existing
            .found()
            .is_some_and(|rt| rt.vpc_id() != vpc.known())
        {
            return Err(Error::Immutable(format!(
                "route table {id} ({name}) is not in VPC {vpc}; run destroy, then apply"
            )));
        }
        self.default_route(ctx, &id, &existing).await?;
        self.associations(ctx, inv, &id, &existing).await?;
        Ok(Id::Known(id))
    }

    /// Creates the table; `None` in plan mode.
    async fn create(&self, ctx: &Ctx<'_>, vpc: &Id) -> Result<Option<(String, Existing<'_>)>> {
        let name = self.name.as_str();
        let detail = format!("{DEFAULT_ROUTE} -> {}", self.target.id());
        let Some(go) = ctx.change(Action::Create, KIND, name, detail) else {
            return Ok(None);
        };
        let out = ctx
            .aws
            .write(
                go,
                "ec2:CreateRouteTable",
                ctx.aws
                    .ec2
                    .create_route_table()
                    .set_vpc_id(vpc.known().map(str::to_owned))
                    .tag_specifications(tag_spec(ctx, ResourceType::RouteTable, name, &[]))
                    .send(),
            )
            .await?;
        let id = out
            .route_table()
            .and_then(|r| r.route_table_id())
            .unwrap_or_default()
            .to_owned();
        ctx.created(KIND, name, &id);
        Ok(Some((id, Existing::Created(go))))
    }

    /// `0.0.0.0/0` to the target: created, or replaced when it points elsewhere.
    async fn default_route(&self, ctx: &Ctx<'_>, id: &str, existing: &Existing<'_>) -> Result<()> {
        let current = existing.found().and_then(|rt| {
            rt.routes()
                .iter()
                .find(|r| r.destination_cidr_block() == Some(DEFAULT_ROUTE))
        });
        let current_target = current.and_then(|r| r.nat_gateway_id().or(r.gateway_id()));
        let target = self.target.id();
        if current_target.is_some() && current_target == target.known() {
            return Ok(());
        }
        let go = existing.go(ctx, &self.name, || {
            format!(
                "{DEFAULT_ROUTE} -> {target} (was {})",
                current_target.unwrap_or("none")
            )
        });
        let (Some(go), Some(target_id)) = (go, target.known()) else {
            return Ok(());
        };
        let ec2 = &ctx.aws.ec2;
        let (igw, nat) = match &self.target {
            Target::Igw(_) => (Some(target_id.to_owned()), None),
            Target::Nat(_) => (None, Some(target_id.to_owned())),
        };
        if current.is_some() {
            ctx.aws
                .write(
                    go,
                    "ec2:ReplaceRoute",
                    ec2.replace_route()
                        .route_table_id(id)
                        .destination_cidr_block(DEFAULT_ROUTE)
                        .set_gateway_id(igw)
                        .set_nat_gateway_id(nat)
                        .send(),
                )
                .await?;
        } else {
            ctx.aws
                .write(
                    go,
                    "ec2:CreateRoute",
                    ec2.create_route()
                        .route_table_id(id)
                        .destination_cidr_block(DEFAULT_ROUTE)
                        .set_gateway_id(igw)
                        .set_nat_gateway_id(nat)
                        .send(),
                )
                .await?;
        }
        Ok(())
    }

    /// Each subnet associated with this table, taken over from another of the stack's
    /// tables (one left by a change) when it is associated there.
    async fn associations(
        &self,
        ctx: &Ctx<'_>,
        inv: &Inventory,
        id: &str,
        existing: &Existing<'_>,
    ) -> Result<()> {
        for subnet in &self.subnets {
            let here = existing.found().is_some_and(|rt| {
                rt.associations()
                    .iter()
                    .any(|a| a.subnet_id().is_some() && a.subnet_id() == subnet.known())
            });
            if here {
                continue;
            }
            let elsewhere = inv.route_tables.iter().find_map(|rt| {
                rt.associations()
                    .iter()
                    .find(|a| a.subnet_id().is_some() && a.subnet_id() == subnet.known())
                    .and_then(|a| a.route_table_association_id())
            });
            let go = existing.go(ctx, &self.name, || format!("associate {subnet}"));
            let (Some(go), Some(subnet_id)) = (go, subnet.known()) else {
                continue;
            };
            match elsewhere {
                Some(assoc) => {
                    ctx.aws
                        .write(
                            go,
                            "ec2:ReplaceRouteTableAssociation",
                            ctx.aws
                                .ec2
                                .replace_route_table_association()
                                .association_id(assoc)
                                .route_table_id(id)
                                .send(),
                        )
                        .await?;
                }
                None => {
                    ctx.aws
                        .write(
                            go,
                            "ec2:AssociateRouteTable",
                            ctx.aws
                                .ec2
                                .associate_route_table()
                                .route_table_id(id)
                                .subnet_id(subnet_id)
                                .send(),
                        )
                        .await?;
                }
            }
        }
        Ok(())
    }
}

/// Disassociates each table's subnets, then deletes it.
async fn delete(ctx: &Ctx<'_>, inv: &Inventory) -> Result<()> {
    for rt in &inv.route_tables {
        let id = rt.route_table_id().unwrap_or_default();
        let Some(go) = ctx.change(Action::Delete, KIND, &name_of(rt.tags(), id), id) else {
            continue;
        };
        for a in rt.associations() {
            if a.main() == Some(true) {
                continue;
            }
            if let Some(assoc) = a.route_table_association_id() {
                ctx.aws
                    .write(
                        go,
                        "ec2:DisassociateRouteTable",
                        ctx.aws
                            .ec2
                            .disassociate_route_table()
                            .association_id(assoc)
                            .send(),
                    )
                    .await?;
            }
        }
        poll::while_in_use("deleting route table", || {
            ctx.aws.write(
                go,
                "ec2:DeleteRouteTable",
                ctx.aws.ec2.delete_route_table().route_table_id(id).send(),
            )
        })
        .await?;
    }
    Ok(())
}
