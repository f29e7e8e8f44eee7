//! SSM Parameter Store: the runner authentication token, kept as a SecureString at
//! `/flotilla/<stack>/runner-token`, tagged with the stack and the GitLab runner id it
//! belongs to. The runner hosts read it at boot; user data only names it.
//!
//! Invariant: the value is only ever written, never read back by this tool (reads use
//! DescribeParameters and ListTagsForResource, which return no value).

use aws_sdk_ssm::types::{ParameterStringFilter, ParameterType, ResourceTypeForTagging, Tag};

use crate::context::Ctx;
use crate::error::{built, Result};
use crate::gitlab::Secret;
use crate::naming::{RESOURCE_TAG, RUNNER_ID_TAG, STACK_TAG};
use crate::plan::{Action, Go};

const KIND: &str = "ssm:parameter";

/// The token parameter as it exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenParam {
    pub(crate) ours: bool,
    pub(crate) runner_id: Option<u64>,
}

pub(crate) async fn read(ctx: &Ctx<'_>) -> Result<Option<TokenParam>> {
    let name = ctx.names.token_param();
    let filter = built(
        "parameter filter",
        ParameterStringFilter::builder()
            .key("Name")
            .option("Equals")
            .values(&name)
            .build(),
    )?;
    let out = ctx
        .aws
        .read(
            "ssm:DescribeParameters",
            ctx.aws
                .ssm
                .describe_parameters()
                .parameter_filters(filter)
                .send(),
        )
        .await?;
    if !out.parameters().iter().any(|p| p.name() == Some(&name)) {
        return Ok(None);
    }
    let tags = ctx
        .aws
        .read(
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

fn tag(k: &str, v: &str) -> Result<Tag> {
    built("tag", Tag::builder().key(k).value(v).build())
}

/// Writes the token (creating the parameter, or overwriting it) and the runner id tag.
pub(crate) async fn store(
    ctx: &Ctx<'_>,
    go: Go,
    token: &Secret,
    runner_id: u64,
    exists: bool,
) -> Result<()> {
    let name = ctx.names.token_param();
    let ssm = &ctx.aws.ssm;
    let description = format!(
        "GitLab runner {runner_id} authentication token (flotilla stack {})",
        ctx.stack.name
    );
    let id = runner_id.to_string();
    if exists {
        ctx.aws
            .write(
                go,
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
            .write(
                go,
                "ssm:AddTagsToResource",
                ssm.add_tags_to_resource()
                    .resource_type(ResourceTypeForTagging::Parameter)
                    .resource_id(&name)
                    .tags(tag(RUNNER_ID_TAG, &id)?)
                    .send(),
            )
            .await?;
    } else {
        ctx.aws
            .write(
                go,
                "ssm:PutParameter",
                ssm.put_parameter()
                    .name(&name)
                    .description(description)
                    .r#type(ParameterType::SecureString)
                    .value(token.expose())
                    .tags(tag(STACK_TAG, &ctx.stack.name)?)
                    .tags(tag(RESOURCE_TAG, "runner-token")?)
                    .tags(tag(RUNNER_ID_TAG, &id)?)
                    .send(),
            )
            .await?;
    }
    Ok(())
}

/// Deletes the parameter if it is the stack's; returns the runner id it named.
pub(crate) async fn destroy(ctx: &Ctx<'_>) -> Result<Option<u64>> {
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
    if let Some(go) = ctx.change(Action::Delete, KIND, &name, "") {
        ctx.aws
            .write(
                go,
                "ssm:DeleteParameter",
                ctx.aws.ssm.delete_parameter().name(&name).send(),
            )
            .await?;
    }
    Ok(p.runner_id)
}
