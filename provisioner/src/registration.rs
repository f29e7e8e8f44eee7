//! Runner registration: one GitLab runner per stack, its authentication token in the
//! SSM parameter (`ssm`). apply registers (or takes over a runner an interrupted apply
//! left, or registers again one deleted in GitLab); destroy deletes the runner with the
//! parameter. Without a GitLab token, an existing registration is trusted and a missing
//! one is skipped with a note.

use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::gitlab::{GitlabClient, NewRunner};
use crate::plan::Action;
use crate::ssm;
use crate::stack::Stack;

const KIND: &str = "gitlab:runner";

/// Registration as found or done in this pass.
pub(crate) struct Registration {
    pub(crate) runner_id: Option<u64>,
    pub(crate) status: String,
}

fn new_runner(stack: &Stack) -> NewRunner {
    NewRunner {
        runner_type: stack.gitlab.runner_type,
        group_id: stack.gitlab.group_id,
        project_id: stack.gitlab.project_id,
        description: stack.runner_description(),
        tags: stack.gitlab.tags.clone(),
        run_untagged: stack.gitlab.run_untagged,
        locked: stack.gitlab.locked,
    }
}

/// Registers the stack's runner unless it is, storing its token.
pub(crate) async fn converge(ctx: &Ctx<'_>) -> Result<Registration> {
    let stack = ctx.stack;
    let param = ssm::read(ctx).await?;
    let param_name = ctx.names.token_param();
    if let Some(p) = &param {
        if !p.ours {
            return Err(Error::NotOurs(format!(
                "SSM parameter {param_name} exists but is not tagged as stack {}'s",
                stack.name
            )));
        }
    }
    let Some(token) = ctx.gitlab_token.clone() else {
        return Ok(match param {
            Some(p) => Registration {
                runner_id: p.runner_id,
                status: "registered (not verified: no GitLab token in the environment)".into(),
            },
            None => {
                let msg = format!(
                    "{} is not set: runner registration skipped; set it and apply again",
                    stack.gitlab.token_env
                );
                if ctx.applying() {
                    tracing::warn!("{msg}");
                }
                ctx.plan.note(msg);
                Registration {
                    runner_id: None,
                    status: "not registered".into(),
                }
            }
        });
    };
    let gitlab = GitlabClient::new(stack.gitlab_url(), token)?;
    let exists = param.is_some();
    let go = if let Some(id) = param.as_ref().and_then(|p| p.runner_id) {
        if gitlab.runner_exists(id).await? {
            return Ok(Registration {
                runner_id: Some(id),
                status: "registered".into(),
            });
        }
        let Some(go) = ctx.change(
            Action::Replace,
            KIND,
            &stack.runner_description(),
            format!("runner {id} no longer exists in GitLab"),
        ) else {
            return Ok(Registration {
                runner_id: None,
                status: "to be registered again".into(),
            });
        };
        go
    } else {
        // An apply interrupted after GitLab created the runner but before the token
        // was stored left a runner with our description: take it over (new token).
        let adopt = gitlab
            .find_by_description(&stack.runner_description(), stack.gitlab.runner_type)
            .await?;
        let detail = match adopt {
            Some(id) => format!("take over runner {id} (reset its token)"),
            None => format!(
                "{} via {}",
                stack.gitlab.runner_type.as_str(),
                stack.gitlab_url()
            ),
        };
        let Some(go) = ctx.change(Action::Create, KIND, &stack.runner_description(), detail) else {
            return Ok(Registration {
                runner_id: adopt,
                status: "to be registered".into(),
            });
        };
        if let Some(id) = adopt {
            let token = gitlab.reset_token(id).await?;
            ssm::store(ctx, go, &token, id, exists).await?;
            ctx.created(KIND, &stack.runner_description(), &id.to_string());
            return Ok(Registration {
                runner_id: Some(id),
                status: "registered".into(),
            });
        }
        go
    };
    let created = gitlab.create_runner(&new_runner(stack)).await?;
    ctx.created(KIND, &stack.runner_description(), &created.id.to_string());
    ssm::store(ctx, go, &created.token, created.id, exists).await?;
    tracing::info!("  stored the runner token in SSM parameter {param_name}");
    Ok(Registration {
        runner_id: Some(created.id),
        status: "registered".into(),
    })
}

/// Deletes the token parameter and, with a GitLab token, the runner it names.
pub(crate) async fn destroy(ctx: &Ctx<'_>) -> Result<()> {
    let runner_id = ssm::destroy(ctx).await?;
    if let Some(id) = runner_id {
        match &ctx.gitlab_token {
            Some(token) => {
                if let Some(_go) = ctx.change(Action::Delete, KIND, &id.to_string(), "") {
                    let gitlab = GitlabClient::new(ctx.stack.gitlab_url(), token.clone())?;
                    if !gitlab.delete_runner(id).await? {
                        tracing::info!("  runner {id} was already gone from GitLab");
                    }
                }
            }
            None => ctx.plan.note(format!(
                "GitLab runner {id} stays registered: set {} to delete it too",
                ctx.stack.gitlab.token_env
            )),
        }
    }

    Ok(())
}
