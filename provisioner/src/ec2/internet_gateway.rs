//! The stack's internet gateway, attached to its VPC (the public route table's default
//! route). Detached, then deleted, by destroy.

use aws_sdk_ec2::types::ResourceType;

use super::inventory::{find, name_of, tag_spec, Ec2Type, Inventory};
use crate::context::Ctx;
use crate::error::Result;
use crate::id::Id;
use crate::naming::logical;
use crate::plan::Action;
use crate::poll;

const KIND: &str = "ec2:internet-gateway";

/// How the engine prunes and deletes this type.
pub(crate) const TYPE: Ec2Type = Ec2Type {
    desired,
    delete: |ctx, inv| Box::pin(delete(ctx, inv)),
};

/// Logical ids this module keeps.
fn desired(_ctx: &Ctx<'_>) -> Vec<String> {
    vec![logical::IGW.into()]
}

pub(crate) async fn converge(ctx: &Ctx<'_>, inv: &Inventory, vpc: &Id) -> Result<Id> {
    let name = logical::IGW;
    let found = find(
        &inv.igws,
        |g| g.tags(),
        |g| g.internet_gateway_id().unwrap_or(""),
        name,
    );
    let (id, go) = match found {
        Some(g) => {
            let id = g.internet_gateway_id().unwrap_or_default().to_owned();
            let attached = g.attachments().iter().any(|a| a.vpc_id() == vpc.known());
            if attached {
                return Ok(Id::Known(id));
            }
            let Some(go) = ctx.change(Action::Update, KIND, name, format!("attach to {vpc}"))
            else {
                return Ok(Id::Known(id));
            };
            (id, go)
        }
        None => {
            let Some(go) = ctx.change(Action::Create, KIND, name, "") else {
                return Ok(Id::pending(name));
            };
            let out = ctx
                .aws
                .write(
                    go,
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
            ctx.created(KIND, name, &id);
            (id, go)
        }
    };
    ctx.aws
        .write(
            go,
            "ec2:AttachInternetGateway",
            ctx.aws
                .ec2
                .attach_internet_gateway()
                .internet_gateway_id(&id)
                .set_vpc_id(vpc.known().map(str::to_owned))
                .send(),
        )
        .await?;
    Ok(Id::Known(id))
}

async fn delete(ctx: &Ctx<'_>, inv: &Inventory) -> Result<()> {
    for g in &inv.igws {
        let id = g.internet_gateway_id().unwrap_or_default();
        let Some(go) = ctx.change(Action::Delete, KIND, &name_of(g.tags(), id), id) else {
            continue;
        };
        for a in g.attachments() {
            if let Some(vpc) = a.vpc_id() {
                poll::while_in_use("detaching internet gateway", || {
                    ctx.aws.write(
                        go,
                        "ec2:DetachInternetGateway",
                        ctx.aws
                            .ec2
                            .detach_internet_gateway()
                            .internet_gateway_id(id)
                            .vpc_id(vpc)
                            .send(),
                    )
                })
                .await?;
            }
        }
        ctx.aws
            .write(
                go,
                "ec2:DeleteInternetGateway",
                ctx.aws
                    .ec2
                    .delete_internet_gateway()
                    .internet_gateway_id(id)
                    .send(),
            )
            .await?;
    }
    Ok(())
}
