//! The stack's VPC (`network.cidr`): created once, never changed in place (a CIDR that
//! differs from the stack file is an error saying to destroy first), deleted last. Its DNS
//! attributes (resolution and hostnames, both on: the hosts resolve AWS endpoints and
//! interface endpoints need private DNS) are converged like every other setting.

use aws_sdk_ec2::types::{AttributeBooleanValue, ResourceType, VpcAttributeName};

use super::inventory::{find, name_of, tag_spec, Ec2Type, Inventory};
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::naming::logical;
use crate::plan::{Action, Go};
use crate::poll;

const KIND: &str = "ec2:vpc";

/// How the engine prunes and deletes this type.
pub(crate) const TYPE: Ec2Type = Ec2Type {
    desired,
    delete: |ctx, inv| Box::pin(delete(ctx, inv)),
};

/// Logical ids this module keeps.
fn desired(_ctx: &Ctx<'_>) -> Vec<String> {
    vec![logical::VPC.into()]
}

pub(crate) async fn converge(ctx: &Ctx<'_>, inv: &Inventory) -> Result<Id> {
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
        converge_dns(ctx, &id, None).await?;
        return Ok(Id::Known(id));
    }
    let detail = format!("{want}, DNS resolution and hostnames on");
    let Some(go) = ctx.change(Action::Create, KIND, logical::VPC, detail) else {
        return Ok(Id::pending(logical::VPC));
    };
    let out = ctx
        .aws
        .write(
            go,
            "ec2:CreateVpc",
            ctx.aws
                .ec2
                .create_vpc()
                .cidr_block(want)
                .tag_specifications(tag_spec(ctx, ResourceType::Vpc, logical::VPC, &[]))
                .send(),
        )
        .await?;
    let id = Id::from_aws(out.vpc().and_then(|v| v.vpc_id()));
    ctx.created(KIND, logical::VPC, &id.to_string());
    if let Some(known) = id.known() {
        converge_dns(ctx, known, Some(go)).await?;
    }
    Ok(id)
}

/// The VPC's two DNS attributes, both on: read each, and turn on what is off (one
/// ModifyVpcAttribute per attribute, as the API takes them). `created` is the Go of the
/// VPC's own creation (its attributes are part of that change).
async fn converge_dns(ctx: &Ctx<'_>, vpc: &str, created: Option<Go>) -> Result<()> {
    for (attribute, label) in [
        (VpcAttributeName::EnableDnsSupport, "DNS resolution"),
        (VpcAttributeName::EnableDnsHostnames, "DNS hostnames"),
    ] {
        let out = ctx
            .aws
            .read(
                "ec2:DescribeVpcAttribute",
                ctx.aws
                    .ec2
                    .describe_vpc_attribute()
                    .vpc_id(vpc)
                    .attribute(attribute.clone())
                    .send(),
            )
            .await?;
        let on = match attribute {
            VpcAttributeName::EnableDnsSupport => out.enable_dns_support(),
            _ => out.enable_dns_hostnames(),
        }
        .and_then(|v| v.value())
        .unwrap_or(false);
        if on {
            continue;
        }
        let go = created.or_else(|| {
            ctx.change(
                Action::Update,
                KIND,
                logical::VPC,
                format!("turn {label} on"),
            )
        });
        let Some(go) = go else { continue };
        let value = AttributeBooleanValue::builder().value(true).build();
        let call = ctx.aws.ec2.modify_vpc_attribute().vpc_id(vpc);
        let call = match attribute {
            VpcAttributeName::EnableDnsSupport => call.enable_dns_support(value),
            _ => call.enable_dns_hostnames(value),
        };
        ctx.aws
            .write(go, "ec2:ModifyVpcAttribute", call.send())
            .await?;
    }
    Ok(())
}

async fn delete(ctx: &Ctx<'_>, inv: &Inventory) -> Result<()> {
    for v in &inv.vpcs {
        let id = v.vpc_id().unwrap_or_default();
        if let Some(go) = ctx.change(Action::Delete, KIND, &name_of(v.tags(), id), id) {
            poll::while_in_use("deleting VPC", || {
                ctx.aws.write(
                    go,
                    "ec2:DeleteVpc",
                    ctx.aws.ec2.delete_vpc().vpc_id(id).send(),
                )
            })
            .await?;
        }
    }
    Ok(())
}
