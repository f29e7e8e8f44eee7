//! GitLab OIDC in IAM (`[oidc]`): the account's OIDC provider for GitLab (created by the
//! stack, or an existing one) and one deploy role per `[[oidc.roles]]`, which a job
//! assumes with its `id_tokens` JWT (`sts:AssumeRoleWithWebIdentity`). Its trust policy
//! requires the audience and one of the role's `sub` patterns; its inline policy writes
//! one bucket prefix and nothing else.
//!
//! The provider is created without a thumbprint: IAM fetches one itself when none is
//! given and, for an issuer whose certificate chains to a well-known CA (any public
//! GitLab), trusts its root CA library instead. A GitLab behind a private CA needs its
//! thumbprint: create that provider by hand and use it with `provider = false`.
//!
//! Roles live under one IAM path per stack (`Names::deploy_role_path`), so a role the
//! stack no longer lists is found and deleted; like everything else, a provider or role
//! is adopted, changed or deleted only when it carries the stack's tag.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_iam::types::Role;
use serde::Serialize;
use serde_json::{json, Value};

use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::iam::{self, get_role, is_ours, stack_tags};
use crate::id::Id;
use crate::naming::STACK_TAG;
use crate::oidc_section::{DeployRole, Oidc};
use crate::plan::{Action, Go};

const PROVIDER_KIND: &str = "iam:oidc-provider";
const ROLE_KIND: &str = "iam:role";

/// What `output` shows of the OIDC side.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeployOutputs {
    /// The provider the roles trust (empty without `[oidc]`).
    pub provider_arn: String,
    /// Deploy role name (as in the stack file) → role ARN.
    pub roles: BTreeMap<String, String>,
}

/// The provider's ARN: IAM names it after the issuer's host and path.
fn provider_arn(partition: &str, account: &str, host: &str) -> String {
    format!("arn:{partition}:iam::{account}:oidc-provider/{host}")
}

/// Who may assume a deploy role: a GitLab job whose token has this audience and a `sub`
/// matching one of the patterns (`StringLike`: `*` is the only wildcard they use).
pub(crate) fn trust_policy(
    provider_arn: &str,
    host: &str,
    audience: &str,
    subjects: &[String],
) -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "GitlabJobsOfTheseProjectsAndRefs",
            "Effect": "Allow",
            "Principal": { "Federated": provider_arn },
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {
                "StringEquals": { format!("{host}:aud"): audience },
                "StringLike": { format!("{host}:sub"): subjects }
            }
        }]
    })
}

/// What a deploy role may do: write and delete objects under `<prefix>/`, and list
/// only that prefix (what `aws s3 sync --delete` needs). No reads of other keys, no
/// other bucket.
pub(crate) fn write_policy(partition: &str, role: &DeployRole) -> Value {
    let prefix = role.prefix.trim_end_matches('/');
    json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "WriteUnderPrefix",
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:DeleteObject"],
                "Resource": format!("arn:{partition}:s3:::{}/{prefix}/*", role.bucket)
            },
            {
                "Sid": "ListPrefix",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": format!("arn:{partition}:s3:::{}", role.bucket),
                "Condition": { "StringLike": { "s3:prefix": [prefix, format!("{prefix}/*")] } }
            }
        ]
    })
}

/// Converges the provider and the deploy roles, and deletes the stack's ones it no
/// longer asks for (all of them without `[oidc]`).
pub(crate) async fn converge(ctx: &Ctx<'_>, account: &str) -> Result<DeployOutputs> {
    let partition = ctx.aws.partition();
    let gitlab_url = ctx.stack.gitlab.url.as_str();
    let mut out = DeployOutputs::default();
    let mut keep_provider = None;
    if let Some(oidc) = &ctx.stack.oidc {
        let host = oidc.provider_host(gitlab_url).ok_or_else(|| {
            Error::Refused("oidc: no https:// issuer (validation should have refused)".into())
        })?;
        let arn = match &oidc.provider_arn {
            Some(arn) if !oidc.provider => arn.clone(),
            _ => provider_arn(partition, account, &host),
        };
        if oidc.provider {
            ensure_provider(ctx, oidc, &arn, &host).await?;
            keep_provider = Some(arn.clone());
        }
        let audience = oidc.audience(gitlab_url);
        for role in &oidc.roles {
            let name = ctx.names.deploy_role(&role.name);
            let trust = trust_policy(&arn, &host, &audience, &role.subjects);
            let id = ensure_role(ctx, &name, role, &trust).await?;
            iam::ensure_policy(ctx, &name, &write_policy(partition, role), &id).await?;
            out.roles.insert(role.name.clone(), id.to_string());
        }
        out.provider_arn = arn;
    }
    let wanted: BTreeSet<String> = ctx
        .stack
        .oidc
        .iter()
        .flat_map(|o| &o.roles)
        .map(|r| ctx.names.deploy_role(&r.name))
        .collect();
    prune_roles(ctx, &wanted).await?;
    prune_providers(ctx, keep_provider.as_deref()).await?;
    Ok(out)
}

/// Deletes the stack's deploy roles and its provider.
pub(crate) async fn destroy(ctx: &Ctx<'_>) -> Result<()> {
    prune_roles(ctx, &BTreeSet::new()).await?;
    prune_providers(ctx, None).await
}

/// An existing provider: its audiences and whether it is the stack's.
struct ProviderState {
    client_ids: Vec<String>,
    ours: bool,
}

async fn get_provider(ctx: &Ctx<'_>, arn: &str) -> Result<Option<ProviderState>> {
    match ctx
        .aws
        .read(
            "iam:GetOpenIDConnectProvider",
            ctx.aws
                .iam
                .get_open_id_connect_provider()
                .open_id_connect_provider_arn(arn)
                .send(),
        )
        .await
    {
        Ok(p) => Ok(Some(ProviderState {
            client_ids: p.client_id_list().to_vec(),
            ours: is_ours(ctx, p.tags()),
        })),
        Err(e) if e.code_is(&["NoSuchEntity"]) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Ensures the provider for `host` exists, is the stack's and accepts exactly the
/// configured audience.
async fn ensure_provider(ctx: &Ctx<'_>, oidc: &Oidc, arn: &str, host: &str) -> Result<()> {
    let audience = oidc.audience(&ctx.stack.gitlab.url);
    match get_provider(ctx, arn).await? {
        None => {
            let Some(go) = ctx.change(
                Action::Create,
                PROVIDER_KIND,
                host,
                format!("https://{host}, audience {audience}"),
            ) else {
                return Ok(());
            };
            ctx.aws
                .write(
                    go,
                    "iam:CreateOpenIDConnectProvider",
                    ctx.aws
                        .iam
                        .create_open_id_connect_provider()
                        .url(format!("https://{host}"))
                        .client_id_list(&audience)
                        .set_tags(Some(stack_tags(ctx, "oidc-provider")?))
                        .send(),
                )
                .await?;
            ctx.created(PROVIDER_KIND, host, arn);
        }
        Some(p) if !p.ours => {
            return Err(Error::NotOurs(format!(
                "the IAM OIDC provider {arn} exists but is not tagged {STACK_TAG}={}: \
                 refusing to adopt it; to use it, set oidc.provider = false and \
                 oidc.provider_arn = \"{arn}\"",
                ctx.stack.name
            )))
        }
        Some(p) => {
            if !p.client_ids.contains(&audience) {
                if let Some(go) = ctx.change(
                    Action::Update,
                    PROVIDER_KIND,
                    host,
                    format!("add audience {audience}"),
                ) {
                    ctx.aws
                        .write(
                            go,
                            "iam:AddClientIDToOpenIDConnectProvider",
                            ctx.aws
                                .iam
                                .add_client_id_to_open_id_connect_provider()
                                .open_id_connect_provider_arn(arn)
                                .client_id(&audience)
                                .send(),
                        )
                        .await?;
                }
            }
            for other in p.client_ids.iter().filter(|c| **c != audience) {
                if let Some(go) = ctx.change(
                    Action::Update,
                    PROVIDER_KIND,
                    host,
                    format!("remove audience {other}"),
                ) {
                    ctx.aws
                        .write(
                            go,
                            "iam:RemoveClientIDFromOpenIDConnectProvider",
                            ctx.aws
                                .iam
                                .remove_client_id_from_open_id_connect_provider()
                                .open_id_connect_provider_arn(arn)
                                .client_id(other)
                                .send(),
                        )
                        .await?;
                }
            }
        }
    }
    Ok(())
}

/// Ensures the deploy role exists (tagged, under the stack's path) with `trust`;
/// returns its ARN (pending in a plan that would create it).
async fn ensure_role(ctx: &Ctx<'_>, name: &str, role: &DeployRole, trust: &Value) -> Result<Id> {
    match get_role(ctx, name).await? {
        Some(r) if !r.ours => Err(Error::NotOurs(format!(
            "IAM role {name} exists but is not tagged {STACK_TAG}={}: refusing to adopt it",
            ctx.stack.name
        ))),
        Some(r) => {
            if r.trust.as_ref() != Some(trust) {
                let detail = format!("trust policy: subjects {}", role.subjects.join(", "));
                if let Some(go) = ctx.change(Action::Update, ROLE_KIND, name, detail) {
                    ctx.aws
                        .write(
                            go,
                            "iam:UpdateAssumeRolePolicy",
                            ctx.aws
                                .iam
                                .update_assume_role_policy()
                                .role_name(name)
                                .policy_document(trust.to_string())
                                .send(),
                        )
                        .await?;
                }
            }
            Ok(Id::Known(r.arn))
        }
        None => {
            let description = format!(
                "Flotilla deploy role: GitLab OIDC ({}), writes s3://{}/{}/",
                role.subjects.join(", "),
                role.bucket,
                role.prefix
            );
            let Some(go) = ctx.change(Action::Create, ROLE_KIND, name, description.as_str()) else {
                return Ok(Id::pending(name));
            };
            // IAM's limit on a description: keep it, cut (subjects can be many).
            let description: String = description.chars().take(1000).collect();
            let out = ctx
                .aws
                .write(
                    go,
                    "iam:CreateRole",
                    ctx.aws
                        .iam
                        .create_role()
                        .role_name(name)
                        .path(ctx.names.deploy_role_path())
                        .description(description)
                        .assume_role_policy_document(trust.to_string())
                        .set_tags(Some(stack_tags(ctx, &format!("deploy/{}", role.name))?))
                        .send(),
                )
                .await?;
            let arn = out.role().map(Role::arn).unwrap_or_default().to_owned();
            ctx.created(ROLE_KIND, name, &arn);
            Ok(Id::Known(arn))
        }
    }
}

/// Deletes the stack's deploy roles (found under its path, confirmed by tag) that are
/// not in `wanted`.
async fn prune_roles(ctx: &Ctx<'_>, wanted: &BTreeSet<String>) -> Result<()> {
    let listed = ctx
        .aws
        .read(
            "iam:ListRoles",
            ctx.aws
                .iam
                .list_roles()
                .path_prefix(ctx.names.deploy_role_path())
                .max_items(1000)
                .send(),
        )
        .await?;
    for role in listed.roles() {
        let name = role.role_name();
        if wanted.contains(name) {
            continue;
        }
        // ListRoles does not return tags: the role's own record decides.
        let Some(state) = get_role(ctx, name).await? else {
            continue;
        };
        if !state.ours {
            ctx.plan
                .note(format!("IAM role {name} is not the stack's: left alone"));
            continue;
        }
        if let Some(go) = ctx.change(Action::Delete, ROLE_KIND, name, "deploy role") {
            delete_role(ctx, go, name).await?;
        }
    }
    Ok(())
}

/// Deletes a role with its inline and attached policies (which block DeleteRole).
async fn delete_role(ctx: &Ctx<'_>, go: Go, name: &str) -> Result<()> {
    let iam = &ctx.aws.iam;
    let inline = ctx
        .aws
        .read(
            "iam:ListRolePolicies",
            iam.list_role_policies().role_name(name).send(),
        )
        .await?;
    for p in inline.policy_names() {
        ctx.aws
            .write(
                go,
                "iam:DeleteRolePolicy",
                iam.delete_role_policy()
                    .role_name(name)
                    .policy_name(p)
                    .send(),
            )
            .await?;
    }
    let attached = ctx
        .aws
        .read(
            "iam:ListAttachedRolePolicies",
            iam.list_attached_role_policies().role_name(name).send(),
        )
        .await?;
    for p in attached.attached_policies() {
        if let Some(arn) = p.policy_arn() {
            ctx.aws
                .write(
                    go,
                    "iam:DetachRolePolicy",
                    iam.detach_role_policy()
                        .role_name(name)
                        .policy_arn(arn)
                        .send(),
                )
                .await?;
        }
    }
    ctx.aws
        .write(
            go,
            "iam:DeleteRole",
            iam.delete_role().role_name(name).send(),
        )
        .await?;
    Ok(())
}

/// Deletes the stack's OIDC providers other than `keep` (one whose issuer changed, or
/// all of them once `[oidc]` is gone or uses an existing provider).
async fn prune_providers(ctx: &Ctx<'_>, keep: Option<&str>) -> Result<()> {
    let listed = ctx
        .aws
        .read(
            "iam:ListOpenIDConnectProviders",
            ctx.aws.iam.list_open_id_connect_providers().send(),
        )
        .await?;
    for entry in listed.open_id_connect_provider_list() {
        let Some(arn) = entry.arn() else { continue };
        if Some(arn) == keep {
            continue;
        }
        // Providers of other stacks and of the account are read, never touched.
        let Some(p) = get_provider(ctx, arn).await? else {
            continue;
        };
        if !p.ours {
            continue;
        }
        if let Some(go) = ctx.change(Action::Delete, PROVIDER_KIND, arn, "") {
            ctx.aws
                .write(
                    go,
                    "iam:DeleteOpenIDConnectProvider",
                    ctx.aws
                        .iam
                        .delete_open_id_connect_provider()
                        .open_id_connect_provider_arn(arn)
                        .send(),
                )
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role() -> DeployRole {
        DeployRole {
            name: "site".into(),
            subjects: vec![
                "project_path:web/site:ref_type:branch:ref:main".into(),
                "project_path:web/site:ref_type:tag:ref:v*".into(),
            ],
            bucket: "example-site".into(),
            prefix: "www".into(),
        }
    }

    #[test]
    fn trust_is_the_provider_the_audience_and_the_subjects_only() {
        let arn = provider_arn("aws", "123456789012", "gitlab.example.com");
        assert_eq!(
            arn,
            "arn:aws:iam::123456789012:oidc-provider/gitlab.example.com"
        );
        let doc = trust_policy(
            &arn,
            "gitlab.example.com",
            "https://gitlab.example.com",
            &role().subjects,
        );
        let statements = doc["Statement"].as_array().unwrap();
        assert_eq!(statements.len(), 1);
        let s = &statements[0];
        assert_eq!(s["Effect"], "Allow");
        assert_eq!(s["Action"], "sts:AssumeRoleWithWebIdentity");
        assert_eq!(s["Principal"], json!({ "Federated": arn }));
        assert_eq!(
            s["Condition"],
            json!({
                "StringEquals": { "gitlab.example.com:aud": "https://gitlab.example.com" },
                "StringLike": { "gitlab.example.com:sub": [
                    "project_path:web/site:ref_type:branch:ref:main",
                    "project_path:web/site:ref_type:tag:ref:v*"
                ] }
            })
        );
    }

    #[test]
    fn a_deploy_role_writes_its_prefix_and_nothing_else() {
        let doc = write_policy("aws", &role());
        let statements = doc["Statement"].as_array().unwrap();
        assert_eq!(statements.len(), 2);
        assert_eq!(
            statements[0]["Action"],
            json!(["s3:PutObject", "s3:DeleteObject"])
        );
        assert_eq!(statements[0]["Resource"], "arn:aws:s3:::example-site/www/*");
        assert!(statements[0].get("Condition").is_none());
        assert_eq!(statements[1]["Action"], "s3:ListBucket");
        assert_eq!(statements[1]["Resource"], "arn:aws:s3:::example-site");
        assert_eq!(
            statements[1]["Condition"]["StringLike"]["s3:prefix"],
            json!(["www", "www/*"])
        );
        let text = doc.to_string();
        assert!(!text.contains("s3:GetObject"), "{text}");
        assert!(
            !text.contains("\"*\""),
            "no action or resource on *: {text}"
        );
    }
}
