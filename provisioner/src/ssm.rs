//! SSM Parameter Store: the runner authentication token, kept as a SecureString at
//! `/flotilla/<stack>/runner-token`, tagged with the stack and the GitLab runner id it
//! belongs to. The runner hosts read it at boot; user data only names it.
//!
//! Invariant: the value is only ever written, never read back by this tool (reads use
//! DescribeParameters and ListTagsForResource, which return no value).

use aws_sdk_ssm::types::{ParameterStringFilter, ParameterType, ResourceTypeForTagging, Tag};

use crate::engine::Ctx;
use crate::error::Result;
use crate::gitlab::Secret;
use crate::naming::{RESOURCE_TAG, RUNNER_ID_TAG, STACK_TAG};
use crate::plan::Action;

pub const KIND: &str = "ssm:parameter";

/// The token parameter as it exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenParam {
    pub ours: bool,
    pub runner_id: Option<u64>,
}

pub async fn read(ctx: &Ctx<'_>) -> Result<Option<TokenParam>> {
    let name = ctx.names.token_param();
    let out = ctx
        .aws
        .call(
            "ssm:DescribeParameters",
            ctx.aws
                .ssm
                .describe_parameters()
                .parameter_filters(
                    ParameterStringFilter::builder()
                        .key("Name")
                        .option("Equals")
                        .values(&name)
                        .build()
                        .expect("filter"),
                )
                .send(),
        )
        .await?;
    if !out.parameters().iter().any(|p| p.name() == Some(&name)) {
        return Ok(None);
    }
    let tags = ctx
        .aws
        .call(
            "ssm:ListTagsForResource",
            ctx.aws
                .ssm
                .list_tags_for_resource()
                .resource_type(ResourceTypeForTagging::Parameter)
                .resource_id(&name)
                .send(),
        )
        .await?;
    let tag = |k: &str| {
        tags.tag_list()
            .iter()
            .find(|t| t.key() == k)
            .map(|t| t.value().to_owned())
    };
    Ok(Some(TokenParam {
        ours: tag(STACK_TAG).as_deref() == Some(ctx.stack.name.as_str()),
        runner_id: tag(RUNNER_ID_TAG).and_then(|v| v.parse().ok()),
    }))
}

fn tag(k: &str, v: &str) -> Tag {
    Tag::builder().key(k).value(v).build().expect("tag")
}

/// Writes the token (creating the parameter, or overwriting it) and the runner id tag.
pub async fn store(ctx: &Ctx<'_>, token: &Secret, runner_id: u64, exists: bool) -> Result<()> {
    let name = ctx.names.token_param();
    let ssm = &ctx.aws.ssm;
    let description = format!(
        "GitLab runner {runner_id} authentication token (flotilla stack {})",
        ctx.stack.name
    );
    let id = runner_id.to_string();
    if exists {
        ctx.aws
            .call(
                "ssm:PutParameter",
                ssm.put_parameter()
                    .name(&name)
                    .description(description)
                    .r#type(ParameterType::SecureString)
                    .value(token.expose())
                    .overwrite(true)
                    .send(),
            )
            .await?;
        ctx.aws
            .call(
                "ssm:AddTagsToResource",
                ssm.add_tags_to_resource()
                    .resource_type(ResourceTypeForTagging::Parameter)
                    .resource_id(&name)
                    .tags(tag(RUNNER_ID_TAG, &id))
                    .send(),
            )
            .await?;
    } else {
        ctx.aws
            .call(
                "ssm:PutParameter",
                ssm.put_parameter()
                    .name(&name)
                    .description(description)
                    .r#type(ParameterType::SecureString)
                    .value(token.expose())
                    .tags(tag(STACK_TAG, &ctx.stack.name))
                    .tags(tag(RESOURCE_TAG, "runner-token"))
                    .tags(tag(RUNNER_ID_TAG, &id))
                    .send(),
            )
            .await?;
    }
    Ok(())
}

/// Deletes the parameter if it is the stack's; returns the runner id it named.
pub async fn destroy(ctx: &Ctx<'_>) -> Result<Option<u64>> {
    let name = ctx.names.token_param();
    let Some(p) = read(ctx).await? else {
        return Ok(None);
    };
    if !p.ours {
        ctx.plan.note(format!(
            "parameter {name} is not tagged as the stack's: left alone"
        ));
        return Ok(None);
    }
    if ctx.change(Action::Delete, KIND, &name, "") {
        ctx.aws
            .call(
                "ssm:DeleteParameter",
                ctx.aws.ssm.delete_parameter().name(&name).send(),
            )
            .await?;
    }
    Ok(p.runner_id)
}
