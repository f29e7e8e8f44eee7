//! The S3 gateway endpoint on the private route tables, so runner hosts and build
//! machines reach the bucket (the flotilla binary, the cache) without the NAT gateway.

use std::collections::BTreeSet;

use aws_sdk_ec2::types::{ResourceType, VpcEndpointType};

use super::inventory::{find, id_list, name_of, tag_spec, Ec2Type, Inventory};
use crate::context::Ctx;
use crate::error::Result;
use crate::id::Id;
use crate::naming::logical;
use crate::plan::Action;

const KIND: &str = "ec2:vpc-endpoint";

/// How the engine prunes and deletes this type.
pub(crate) const TYPE: Ec2Type = Ec2Type {
    desired,
    delete: |ctx, inv| Box::pin(delete(ctx, inv)),
};

/// Logical ids this module keeps.
fn desired(_ctx: &Ctx<'_>) -> Vec<String> {
    vec![logical::S3_ENDPOINT.into()]
}

pub(crate) async fn converge(
    ctx: &Ctx<'_>,
    inv: &Inventory,
    vpc: &Id,
    route_tables: &[Id],
) -> Result<Id> {
    let name = logical::S3_ENDPOINT;
    let service = format!("com.amazonaws.{}.s3", ctx.aws.region);
    let found = find(
        &inv.endpoints,
        |e| e.tags(),
        |e| e.vpc_endpoint_id().unwrap_or(""),
        name,
    );
    let want_text: Vec<String> = route_tables.iter().map(Id::to_string).collect();
    if let Some(ep) = found {
        let id = ep.vpc_endpoint_id().unwrap_or_default().to_owned();
        let have: BTreeSet<&str> = ep.route_table_ids().iter().map(String::as_str).collect();
        let want: BTreeSet<&str> = want_text.iter().map(String::as_str).collect();
        if have == want {
            return Ok(Id::Known(id));
        }
        let add: Vec<String> = want.difference(&have).map(|s| s.to_string()).collect();
        let remove: Vec<String> = have.difference(&want).map(|s| s.to_string()).collect();
        let detail = format!("route tables +{add:?} -{remove:?}");
        let adds_pending = route_tables
            .iter()
            .any(|r| r.is_pending() && add.contains(&r.to_string()));
        if let Some(go) = ctx.change(Action::Update, KIND, name, detail) {
            if !adds_pending {
                ctx.aws
                    .write(
                        go,
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
        }
        return Ok(Id::Known(id));
    }
    let Some(go) = ctx.change(Action::Create, KIND, name, &service) else {
        return Ok(Id::pending(name));
    };
    let out = ctx
        .aws
        .write(
            go,
            "ec2:CreateVpcEndpoint",
            ctx.aws
                .ec2
                .create_vpc_endpoint()
                .set_vpc_id(vpc.known().map(str::to_owned))
                .service_name(&service)
                .vpc_endpoint_type(VpcEndpointType::Gateway)
                .set_route_table_ids(Some(want_text))
                .tag_specifications(tag_spec(ctx, ResourceType::VpcEndpoint, name, &[]))
                .send(),
        )
        .await?;
    let id = Id::from_aws(out.vpc_endpoint().and_then(|e| e.vpc_endpoint_id()));
    ctx.created(KIND, name, &id.to_string());
    Ok(id)
}

/// Records each endpoint's deletion, then deletes them in one call.
async fn delete(ctx: &Ctx<'_>, inv: &Inventory) -> Result<()> {
    let mut go = None;
    for e in &inv.endpoints {
        let id = e.vpc_endpoint_id().unwrap_or_default();
        go = ctx
            .change(Action::Delete, KIND, &name_of(e.tags(), id), id)
            .or(go);
    }
    let endpoints = id_list(&inv.endpoints, |e| e.vpc_endpoint_id());
    if let (Some(go), false) = (go, endpoints.is_empty()) {
        ctx.aws
            .write(
                go,
                "ec2:DeleteVpcEndpoints",
                ctx.aws
                    .ec2
                    .delete_vpc_endpoints()
                    .set_vpc_endpoint_ids(Some(endpoints))
                    .send(),
            )
            .await?;
    }
    Ok(())
}
