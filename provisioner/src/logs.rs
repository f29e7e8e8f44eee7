//! CloudWatch Logs: the stack's log group (`[logs]`), tagged with the stack at creation,
//! its retention put back when it drifts, deleted by destroy only when it carries the
//! stack's tag. A group of that name without the tag is never adopted.

use std::collections::HashMap;

use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::naming::{RESOURCE_TAG, STACK_TAG};
use crate::plan::Action;

const KIND: &str = "logs:log-group";

/// The group as it exists.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Group {
    arn: String,
    retention_days: Option<i32>,
    ours: bool,
}

async fn read(ctx: &Ctx<'_>, name: &str) -> Result<Option<Group>> {
    let logs = &ctx.aws.logs;
    let out = ctx
        .aws
        .read(
            "logs:DescribeLogGroups",
            logs.describe_log_groups()
                .log_group_name_prefix(name)
                .send(),
        )
        .await?;
    let Some(g) = out
        .log_groups()
        .iter()
        .find(|g| g.log_group_name() == Some(name))
    else {
        return Ok(None);
    };
    let arn = g
        .log_group_arn()
        .map(str::to_owned)
        .or_else(|| g.arn().map(|a| a.trim_end_matches(":*").to_owned()))
        .ok_or_else(|| Error::Refused(format!("DescribeLogGroups gave log group {name} no ARN")))?;
    let tags = ctx
        .aws
        .read(
            "logs:ListTagsForResource",
            logs.list_tags_for_resource().resource_arn(&arn).send(),
        )
        .await?;
    let ours = tags
        .tags()
        .and_then(|t| t.get(STACK_TAG))
        .map(String::as_str)
        == Some(ctx.stack.name());
    Ok(Some(Group {
        arn,
        retention_days: g.retention_in_days(),
        ours,
    }))
}

/// Creates the group (tags in the call) with its retention, or puts its retention back.
pub(crate) async fn converge(ctx: &Ctx<'_>) -> Result<()> {
    let (Some(settings), Some(name)) = (&ctx.stack.logs, ctx.stack.log_group()) else {
        return Ok(());
    };
    let days = i32::try_from(settings.retention_days).unwrap_or(i32::MAX);
    let logs = &ctx.aws.logs;
    match read(ctx, &name).await? {
        None => {
            if let Some(go) = ctx.change(
                Action::Create,
                KIND,
                &name,
                format!("retention {days} days"),
            ) {
                let tags = HashMap::from([
                    (STACK_TAG.to_owned(), ctx.stack.name().to_owned()),
                    (RESOURCE_TAG.to_owned(), "log-group".to_owned()),
                ]);
                ctx.aws
                    .write(
                        go,
                        "logs:CreateLogGroup",
                        logs.create_log_group()
                            .log_group_name(&name)
                            .set_tags(Some(tags))
                            .send(),
                    )
                    .await?;
                ctx.aws
                    .write(
                        go,
                        "logs:PutRetentionPolicy",
                        logs.put_retention_policy()
                            .log_group_name(&name)
                            .retention_in_days(days)
                            .send(),
                    )
                    .await?;
                ctx.created(KIND, &name, &name);
            }
        }
        Some(g) if !g.ours => {
            return Err(Error::NotOurs(format!(
                "CloudWatch Logs group {name} ({}) exists but is not tagged {STACK_TAG}={}: \
                 refusing to adopt it (set logs.group to another name, or tag it)",
                g.arn,
                ctx.stack.name()
            )))
        }
        Some(g) if g.retention_days != Some(days) => {
            let was = g
                .retention_days
                .map_or_else(|| "never expire".to_owned(), |d| format!("{d} days"));
            if let Some(go) = ctx.change(
                Action::Update,
                KIND,
                &name,
                format!("retention {was} -> {days} days"),
            ) {
                ctx.aws
                    .write(
                        go,
                        "logs:PutRetentionPolicy",
                        logs.put_retention_policy()
                            .log_group_name(&name)
                            .retention_in_days(days)
                            .send(),
                    )
                    .await?;
            }
        }
        Some(_) => {}
    }
    Ok(())
}

/// Deletes the group (and the events in it) if it carries the stack's tag.
pub(crate) async fn destroy(ctx: &Ctx<'_>) -> Result<()> {
    let Some(name) = ctx.stack.log_group() else {
        return Ok(());
    };
    let Some(g) = read(ctx, &name).await? else {
        return Ok(());
    };
    if !g.ours {
        ctx.plan.note(format!(
            "log group {name} is not tagged as the stack's: left alone"
        ));
        return Ok(());
    }
    if let Some(go) = ctx.change(Action::Delete, KIND, &name, "with its log events") {
        ctx.aws
            .write(
                go,
                "logs:DeleteLogGroup",
                ctx.aws.logs.delete_log_group().log_group_name(&name).send(),
            )
            .await?;
    }
    Ok(())
}
