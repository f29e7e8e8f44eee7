//! IAM: the build-machine role and instance profile (get/put on the cache bucket only)
//! and the runner-host role and instance profile (launch, tag and terminate build
//! machines only with the fleet's tags, pass only the build-machine role, read only its
//! own SSM parameter, use the cache bucket).
//!
//! Roles and profiles have deterministic names; one that exists without the stack's tag
//! is never adopted. Inline policy documents are compared as JSON and rewritten on drift.

use aws_sdk_iam::types::Tag;
use serde_json::{json, Value};

use crate::engine::Ctx;
use crate::error::{Error, Result};
use crate::naming::{RESOURCE_TAG, STACK_TAG};
use crate::plan::{pending, Action};

/// The inline policy name on both roles.
pub const POLICY_NAME: &str = "flotilla";

/// What the runner-host policy refers to.
#[derive(Debug, Clone)]
pub struct RunnerPolicyInputs {
    pub partition: String,
    pub region: String,
    pub account: String,
    /// Every fleet name a runner host may use (one per host).
    pub fleets: Vec<String>,
    pub private_subnets: Vec<String>,
    pub build_security_group: String,
    pub build_role: String,
    pub token_param: String,
    pub bucket: String,
}

fn trust_policy() -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": { "Service": "ec2.amazonaws.com" },
            "Action": "sts:AssumeRole"
        }]
    })
}

/// Build machines: objects in the cache bucket, nothing else.
pub fn build_machine_policy(partition: &str, bucket: &str) -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "CacheObjects",
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject"],
            "Resource": format!("arn:{partition}:s3:::{bucket}/*")
        }]
    })
}

/// Runner hosts: manage build machines of their own fleets only.
pub fn runner_host_policy(p: &RunnerPolicyInputs) -> Value {
    let ec2 = |resource: &str| {
        format!(
            "arn:{}:ec2:{}:{}:{resource}",
            p.partition, p.region, p.account
        )
    };
    let tagged = ["instance/*", "volume/*", "network-interface/*"].map(ec2);
    let mut launch_from: Vec<String> = vec![
        format!("arn:{}:ec2:{}::image/*", p.partition, p.region),
        ec2(&format!("security-group/{}", p.build_security_group)),
        ec2("launch-template/*"),
        ec2("fleet/*"),
        // Spot launches (class market = spot) create a request the daemon does not tag.
        ec2("spot-instances-request/*"),
    ];
    for s in &p.private_subnets {
        launch_from.push(ec2(&format!("subnet/{s}")));
    }
    json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Observe",
                "Effect": "Allow",
                "Action": [
                    "ec2:DescribeInstances", "ec2:DescribeInstanceStatus", "ec2:DescribeImages",
                    "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups",
                    "ec2:DescribeLaunchTemplates", "ec2:DescribeLaunchTemplateVersions",
                    "ec2:DescribeInstanceTypes", "ec2:DescribeAvailabilityZones"
                ],
                "Resource": "*"
            },
            {
                "Sid": "LaunchOnlyWithFleetTag",
                "Effect": "Allow",
                "Action": ["ec2:RunInstances", "ec2:CreateFleet"],
                "Resource": tagged,
                "Condition": { "StringEquals": { "aws:RequestTag/flotilla:fleet": p.fleets } }
            },
            {
                "Sid": "LaunchIntoStackNetwork",
                "Effect": "Allow",
                "Action": ["ec2:RunInstances", "ec2:CreateFleet"],
                "Resource": launch_from
            },
            {
                "Sid": "TagOnlyAtLaunch",
                "Effect": "Allow",
                "Action": "ec2:CreateTags",
                "Resource": tagged,
                "Condition": {
                    "StringEquals": {
                        "ec2:CreateAction": ["RunInstances", "CreateFleet"],
                        "aws:RequestTag/flotilla:fleet": p.fleets
                    }
                }
            },
            {
                "Sid": "TerminateOnlyOwnFleet",
                "Effect": "Allow",
                "Action": "ec2:TerminateInstances",
                "Resource": ec2("instance/*"),
                "Condition": { "StringEquals": { "ec2:ResourceTag/flotilla:fleet": p.fleets } }
            },
            {
                "Sid": "PassOnlyBuildMachineRole",
                "Effect": "Allow",
                "Action": "iam:PassRole",
                "Resource": format!("arn:{}:iam::{}:role/{}", p.partition, p.account, p.build_role),
                "Condition": { "StringEquals": { "iam:PassedToService": "ec2.amazonaws.com" } }
            },
            {
                "Sid": "ReadOwnRunnerToken",
                "Effect": "Allow",
                "Action": "ssm:GetParameter",
                "Resource": format!(
                    "arn:{}:ssm:{}:{}:parameter{}",
                    p.partition, p.region, p.account, p.token_param
                )
            },
            {
                "Sid": "RunnerCache",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                "Resource": format!("arn:{}:s3:::{}/*", p.partition, p.bucket)
            },
            {
                "Sid": "RunnerCacheList",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": format!("arn:{}:s3:::{}", p.partition, p.bucket)
            }
        ]
    })
}

/// Policy documents come back URL-encoded from AWS (not from every emulator).
pub fn parse_policy(text: &str) -> Option<Value> {
    serde_json::from_str(text).ok().or_else(|| {
        let decoded = percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .ok()?;
        serde_json::from_str(&decoded).ok()
    })
}

fn stack_tags(ctx: &Ctx<'_>, logical: &str) -> Vec<Tag> {
    vec![
        Tag::builder()
            .key(STACK_TAG)
            .value(&ctx.stack.name)
            .build()
            .expect("tag"),
        Tag::builder()
            .key(RESOURCE_TAG)
            .value(logical)
            .build()
            .expect("tag"),
    ]
}

fn is_ours(ctx: &Ctx<'_>, tags: &[Tag]) -> bool {
    tags.iter()
        .any(|t| t.key() == STACK_TAG && t.value() == ctx.stack.name)
}

/// An existing role: its ARN, trust policy and whether it carries the stack's tag.
#[derive(Debug, Clone)]
pub struct RoleState {
    pub arn: String,
    pub trust: Option<Value>,
    pub ours: bool,
}

pub async fn get_role(ctx: &Ctx<'_>, name: &str) -> Result<Option<RoleState>> {
    match ctx
        .aws
        .call("iam:GetRole", ctx.aws.iam.get_role().role_name(name).send())
        .await
    {
        Ok(out) => {
            let role = out
                .role()
                .ok_or_else(|| Error::Refused(format!("GetRole {name} returned no role")))?;
            Ok(Some(RoleState {
                arn: role.arn().to_owned(),
                trust: role.assume_role_policy_document().and_then(parse_policy),
                ours: is_ours(ctx, role.tags()),
            }))
        }
        Err(e) if e.code_is(&["NoSuchEntity"]) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Account and partition from a role ARN (`arn:aws:iam::123456789012:role/x`).
pub fn arn_parts(arn: &str) -> (String, String) {
    let parts: Vec<&str> = arn.split(':').collect();
    (
        parts.get(1).copied().unwrap_or("aws").to_owned(),
        parts.get(4).copied().unwrap_or_default().to_owned(),
    )
}

/// Ensures the role exists (tagged) with the EC2 trust policy; returns its ARN.
pub async fn ensure_role(ctx: &Ctx<'_>, name: &str, description: &str) -> Result<String> {
    let kind = "iam:role";
    match get_role(ctx, name).await? {
        Some(r) if !r.ours => Err(Error::NotOurs(format!(
            "IAM role {name} exists but is not tagged {STACK_TAG}={}: refusing to adopt it",
            ctx.stack.name
        ))),
        Some(r) => {
            if r.trust.as_ref() != Some(&trust_policy())
                && ctx.change(Action::Update, kind, name, "trust policy")
            {
                ctx.aws
                    .call(
                        "iam:UpdateAssumeRolePolicy",
                        ctx.aws
                            .iam
                            .update_assume_role_policy()
                            .role_name(name)
                            .policy_document(trust_policy().to_string())
                            .send(),
                    )
                    .await?;
            }
            Ok(r.arn)
        }
        None => {
            if !ctx.change(Action::Create, kind, name, description) {
                return Ok(pending(name));
            }
            let out = ctx
                .aws
                .call(
                    "iam:CreateRole",
                    ctx.aws
                        .iam
                        .create_role()
                        .role_name(name)
                        .description(description)
                        .assume_role_policy_document(trust_policy().to_string())
                        .set_tags(Some(stack_tags(ctx, name)))
                        .send(),
                )
                .await?;
            let arn = out.role().map(|r| r.arn().to_owned()).unwrap_or_default();
            ctx.created(kind, name, &arn);
            Ok(arn)
        }
    }
}

/// Ensures the role's inline policy is exactly `doc`.
pub async fn ensure_policy(
    ctx: &Ctx<'_>,
    role: &str,
    doc: &Value,
    role_exists: bool,
) -> Result<()> {
    let have = if role_exists {
        match ctx
            .aws
            .call(
                "iam:GetRolePolicy",
                ctx.aws
                    .iam
                    .get_role_policy()
                    .role_name(role)
                    .policy_name(POLICY_NAME)
                    .send(),
            )
            .await
        {
            Ok(out) => parse_policy(out.policy_document()),
            Err(e) if e.code_is(&["NoSuchEntity"]) => None,
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    if have.as_ref() == Some(doc) {
        return Ok(());
    }
    let action = if have.is_some() {
        Action::Update
    } else {
        Action::Create
    };
    let name = format!("{role}/{POLICY_NAME}");
    let statements = doc["Statement"].as_array().map_or(0, Vec::len);
    if ctx.change(
        action,
        "iam:role-policy",
        &name,
        format!("{statements} statements"),
    ) {
        ctx.aws
            .call(
                "iam:PutRolePolicy",
                ctx.aws
                    .iam
                    .put_role_policy()
                    .role_name(role)
                    .policy_name(POLICY_NAME)
                    .policy_document(doc.to_string())
                    .send(),
            )
            .await?;
    }
    Ok(())
}

/// An existing instance profile: its roles and whether it carries the stack's tag.
#[derive(Debug, Clone)]
pub struct ProfileState {
    pub roles: Vec<String>,
    pub ours: bool,
}

pub async fn get_profile(ctx: &Ctx<'_>, name: &str) -> Result<Option<ProfileState>> {
    match ctx
        .aws
        .call(
            "iam:GetInstanceProfile",
            ctx.aws
                .iam
                .get_instance_profile()
                .instance_profile_name(name)
                .send(),
        )
        .await
    {
        Ok(out) => {
            let p = out.instance_profile();
            Ok(Some(ProfileState {
                roles: p
                    .map(|p| p.roles().iter().map(|r| r.role_name().to_owned()).collect())
                    .unwrap_or_default(),
                ours: p.is_some_and(|p| is_ours(ctx, p.tags())),
            }))
        }
        Err(e) if e.code_is(&["NoSuchEntity"]) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Ensures the instance profile (same name as the role) holds exactly that role.
pub async fn ensure_profile(ctx: &Ctx<'_>, name: &str, role: &str) -> Result<()> {
    let kind = "iam:instance-profile";
    let state = get_profile(ctx, name).await?;
    let created = state.is_none();
    let roles = match state {
        Some(p) if !p.ours => {
            return Err(Error::NotOurs(format!(
                "IAM instance profile {name} exists but is not tagged {STACK_TAG}={}: \
                 refusing to adopt it",
                ctx.stack.name
            )))
        }
        Some(p) => p.roles,
        None => {
            if !ctx.change(Action::Create, kind, name, format!("with role {role}")) {
                return Ok(());
            }
            ctx.aws
                .call(
                    "iam:CreateInstanceProfile",
                    ctx.aws
                        .iam
                        .create_instance_profile()
                        .instance_profile_name(name)
                        .set_tags(Some(stack_tags(ctx, name)))
                        .send(),
                )
                .await?;
            ctx.created(kind, name, name);
            Vec::new()
        }
    };
    for other in roles.iter().filter(|r| *r != role) {
        if ctx.change(Action::Update, kind, name, format!("remove role {other}")) {
            ctx.aws
                .call(
                    "iam:RemoveRoleFromInstanceProfile",
                    ctx.aws
                        .iam
                        .remove_role_from_instance_profile()
                        .instance_profile_name(name)
                        .role_name(other)
                        .send(),
                )
                .await?;
        }
    }
    if !roles.iter().any(|r| r == role) {
        let record = created || ctx.change(Action::Update, kind, name, format!("add role {role}"));
        if record && ctx.applying() {
            ctx.aws
                .call(
                    "iam:AddRoleToInstanceProfile",
                    ctx.aws
                        .iam
                        .add_role_to_instance_profile()
                        .instance_profile_name(name)
                        .role_name(role)
                        .send(),
                )
                .await?;
        }
    }
    Ok(())
}

/// Deletes a role and instance profile pair the stack owns (profile first).
pub async fn destroy_pair(ctx: &Ctx<'_>, name: &str) -> Result<()> {
    if let Some(p) = get_profile(ctx, name).await? {
        if p.ours && ctx.change(Action::Delete, "iam:instance-profile", name, "") {
            for r in &p.roles {
                ctx.aws
                    .call(
                        "iam:RemoveRoleFromInstanceProfile",
                        ctx.aws
                            .iam
                            .remove_role_from_instance_profile()
                            .instance_profile_name(name)
                            .role_name(r)
                            .send(),
                    )
                    .await?;
            }
            ctx.aws
                .call(
                    "iam:DeleteInstanceProfile",
                    ctx.aws
                        .iam
                        .delete_instance_profile()
                        .instance_profile_name(name)
                        .send(),
                )
                .await?;
        } else if !p.ours {
            ctx.plan.note(format!(
                "instance profile {name} is not the stack's: left alone"
            ));
        }
    }
    if let Some(r) = get_role(ctx, name).await? {
        if !r.ours {
            ctx.plan
                .note(format!("IAM role {name} is not the stack's: left alone"));
            return Ok(());
        }
        if ctx.change(Action::Delete, "iam:role", name, "") {
            let policies = ctx
                .aws
                .call(
                    "iam:ListRolePolicies",
                    ctx.aws.iam.list_role_policies().role_name(name).send(),
                )
                .await?;
            for p in policies.policy_names() {
                ctx.aws
                    .call(
                        "iam:DeleteRolePolicy",
                        ctx.aws
                            .iam
                            .delete_role_policy()
                            .role_name(name)
                            .policy_name(p)
                            .send(),
                    )
                    .await?;
            }
            // Managed policies someone attached would block DeleteRole.
            let attached = ctx
                .aws
                .call(
                    "iam:ListAttachedRolePolicies",
                    ctx.aws
                        .iam
                        .list_attached_role_policies()
                        .role_name(name)
                        .send(),
                )
                .await?;
            for p in attached.attached_policies() {
                if let Some(arn) = p.policy_arn() {
                    ctx.aws
                        .call(
                            "iam:DetachRolePolicy",
                            ctx.aws
                                .iam
                                .detach_role_policy()
                                .role_name(name)
                                .policy_arn(arn)
                                .send(),
                        )
                        .await?;
                }
            }
            ctx.aws
                .call(
                    "iam:DeleteRole",
                    ctx.aws.iam.delete_role().role_name(name).send(),
                )
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> RunnerPolicyInputs {
        RunnerPolicyInputs {
            partition: "aws".into(),
            region: "us-east-1".into(),
            account: "123456789012".into(),
            fleets: vec!["ci".into()],
            private_subnets: vec!["subnet-a".into(), "subnet-b".into()],
            build_security_group: "sg-1".into(),
            build_role: "flotilla-ci-build-machine".into(),
            token_param: "/flotilla/ci/runner-token".into(),
            bucket: "cache".into(),
        }
    }

    fn statement<'a>(doc: &'a Value, sid: &str) -> &'a Value {
        doc["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["Sid"] == sid)
            .unwrap_or_else(|| panic!("no statement {sid}"))
    }

    #[test]
    fn runner_policy_conditions_on_fleet_tags() {
        let doc = runner_host_policy(&inputs());
        let launch = statement(&doc, "LaunchOnlyWithFleetTag");
        assert_eq!(
            launch["Condition"]["StringEquals"]["aws:RequestTag/flotilla:fleet"],
            json!(["ci"])
        );
        let term = statement(&doc, "TerminateOnlyOwnFleet");
        assert_eq!(
            term["Condition"]["StringEquals"]["ec2:ResourceTag/flotilla:fleet"],
            json!(["ci"])
        );
        let tag = statement(&doc, "TagOnlyAtLaunch");
        assert_eq!(
            tag["Condition"]["StringEquals"]["ec2:CreateAction"],
            json!(["RunInstances", "CreateFleet"])
        );
        let pass = statement(&doc, "PassOnlyBuildMachineRole");
        assert_eq!(
            pass["Resource"],
            "arn:aws:iam::123456789012:role/flotilla-ci-build-machine"
        );
        let ssm = statement(&doc, "ReadOwnRunnerToken");
        assert_eq!(
            ssm["Resource"],
            "arn:aws:ssm:us-east-1:123456789012:parameter/flotilla/ci/runner-token"
        );
        // No statement grants an action on "*" except the Describe calls.
        for s in doc["Statement"].as_array().unwrap() {
            if s["Resource"] == "*" {
                for a in s["Action"].as_array().unwrap() {
                    assert!(a.as_str().unwrap().starts_with("ec2:Describe"), "{a}");
                }
            }
        }
    }

    #[test]
    fn build_policy_is_bucket_objects_only() {
        let doc = build_machine_policy("aws", "cache");
        assert_eq!(doc["Statement"].as_array().unwrap().len(), 1);
        assert_eq!(doc["Statement"][0]["Resource"], "arn:aws:s3:::cache/*");
    }

    #[test]
    fn url_encoded_policies_parse() {
        let doc = build_machine_policy("aws", "cache");
        let enc = percent_encoding::utf8_percent_encode(
            &doc.to_string(),
            percent_encoding::NON_ALPHANUMERIC,
        )
        .to_string();
        assert_eq!(parse_policy(&enc), Some(doc));
        assert_eq!(
            arn_parts("arn:aws:iam::123:role/x"),
            ("aws".into(), "123".into())
        );
    }
}
