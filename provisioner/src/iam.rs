//! IAM: the build-machine role and instance profile (no permissions at all: the cache
//! works through URLs the runner host pre-signs, artifacts go to GitLab) and the
//! runner-host role and instance profile (launch build machines only with the fleet's
//! tags, IMDSv2 with hop limit 1, encrypted volumes and the configured AMIs; tag only in
//! the launch call; terminate, stop and start only its fleets' instances; pass only the build-machine
//! role; read only its own SSM parameter; read and write the cache bucket's objects and
//! use its KMS key).
//!
//! The runner-host policy grants exactly the EC2 calls the daemon makes
//! (`executor/src/ec2.rs`: DescribeInstances, DescribeImages, RunInstances with tags in
//! the call, TerminateInstances, StopInstances and StartInstances for the stopped warm
//! pool, GetConsoleOutput) and nothing else.
//!
//! Roles and profiles have deterministic names; one that exists without the stack's tag
//! is never adopted. Inline policy documents are compared as JSON and rewritten on drift;
//! a role that needs no permissions has its inline policy deleted.

use aws_sdk_iam::types::Tag;
use flotilla_proto::journal::BUILD_MACHINE_STREAMS;
use serde_json::{json, Value};

use crate::context::Ctx;
use crate::error::{built, Error, Result};
use crate::id::Id;
use crate::naming::{RESOURCE_TAG, STACK_TAG};
use crate::plan::{Action, Go};

/// The inline policy name on both roles.
const POLICY_NAME: &str = "flotilla";

/// What the runner-host policy refers to.
#[derive(Debug, Clone)]
pub(crate) struct RunnerPolicyInputs {
    pub(crate) partition: String,
    pub(crate) region: String,
    pub(crate) account: String,
    /// Every fleet name a runner host may use (one per host).
    pub(crate) fleets: Vec<String>,
    pub(crate) private_subnets: Vec<String>,
    pub(crate) build_security_group: String,
    pub(crate) build_role: String,
    pub(crate) token_param: String,
    pub(crate) bucket: String,
    /// The AMIs of the fleet's classes: the only images build machines launch from.
    pub(crate) amis: Vec<String>,
    /// The highest `imds_hop_limit` of the fleet's classes: launches may ask for no more.
    pub(crate) max_hop_limit: u8,
    /// Some class launches from an operator's launch template (`launch_template`): allow
    /// the template and what such templates are for (placement groups, capacity
    /// reservations). Every other resource a launch touches is still held to the
    /// statements above, so a template cannot widen what a launch may do.
    pub(crate) launch_templates: bool,
    /// The bucket's SSE-KMS key (`bucket.kms_key`: key id, key ARN, `alias/...` or alias
    /// ARN), when set.
    pub(crate) kms_key: Option<String>,
    /// The classes' `root_volume.kms_key`s: launching with a customer-managed key needs
    /// the launching principal to let EC2 use it (a grant, data keys).
    pub(crate) volume_kms_keys: Vec<String>,
    /// The hosts install the flotilla binary apply uploads to the bucket: read
    /// `flotilla/bin/*` (false with `runner_hosts.flotilla_url`, and for hosts set up by
    /// hand).
    pub(crate) flotilla_from_bucket: bool,
    /// The hosts run the SSM agent, so apply can check a new host and drain an old one
    /// with Run Command (false for hosts set up by hand).
    pub(crate) ssm_agent: bool,
    /// The stack's CloudWatch Logs group (`[logs]`), when on.
    pub(crate) log_group: Option<String>,
}

/// The two roles' ARNs (pending in plan mode when not created yet).
#[derive(Debug, Clone)]
pub(crate) struct Roles {
    pub(crate) build_arn: Id,
    pub(crate) runner_arn: Id,
}

/// Both roles, their inline policies and instance profiles: the build machines' first
/// (the runner policy names it), then the runner hosts'.
pub(crate) async fn converge(ctx: &Ctx<'_>, runner: &RunnerPolicyInputs) -> Result<Roles> {
    let build_role = ctx.names.build_role();
    let runner_role = ctx.names.runner_role();
    let build_arn = ensure_role(
        ctx,
        &build_role,
        "Flotilla build machines: no AWS permissions",
    )
    .await?;
    match build_machine_policy(runner) {
        Some(doc) => ensure_policy(ctx, &build_role, &doc, &build_arn).await?,
        None => ensure_no_policy(ctx, &build_role, &build_arn, BUILD_MACHINE_NO_POLICY).await?,
    }
    ensure_profile(ctx, &build_role, &build_role).await?;
    let runner_arn = ensure_role(
        ctx,
        &runner_role,
        "Flotilla runner hosts: manage the fleet's build machines",
    )
    .await?;
    let policy = runner_host_policy(runner);
    ensure_policy(ctx, &runner_role, &policy, &runner_arn).await?;
    ensure_profile(ctx, &runner_role, &runner_role).await?;
    Ok(Roles {
        build_arn,
        runner_arn,
    })
}

/// Deletes both roles and profiles, runner hosts' first.
pub(crate) async fn destroy(ctx: &Ctx<'_>) -> Result<()> {
    destroy_pair(ctx, &ctx.names.runner_role()).await?;
    destroy_pair(ctx, &ctx.names.build_role()).await
}

/// What the SSM agent needs for Run Command and nothing more: register and report
/// (`ssm:UpdateInstanceInformation`, on instances) and take commands and send replies
/// (the message channels, which have no resource to scope to). Not the managed policy
/// `AmazonSSMManagedInstanceCore`: it also grants `ssm:GetParameter(s)` on every
/// parameter, which would let a host read every other stack's runner token.
const SSM_AGENT_CHANNEL_ACTIONS: [&str; 8] = [
    "ec2messages:AcknowledgeMessage",
    "ec2messages:DeleteMessage",
    "ec2messages:FailMessage",
    "ec2messages:GetEndpoint",
    "ec2messages:GetMessages",
    "ec2messages:SendReply",
    "ssmmessages:CreateControlChannel",
    "ssmmessages:OpenControlChannel",
];

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

/// Build machines: no AWS permissions at all (but their journal with `[logs]`, below),
/// so no inline policy. Jobs reach the cache
/// only through URLs the runner host pre-signs (gitlab-runner's distributed cache) and
/// send artifacts to GitLab; the role exists so operators can attach what their jobs
/// need (ECR pulls, say) and so the runner host can pass exactly it.
///
/// With `[logs]` on, they may ship their journal, and only into streams under
/// `build-machines/` of the stack's group (jobs that reach the instance's credentials
/// cannot write over the hosts' journals or the daemon's machine reports).
fn build_machine_policy(p: &RunnerPolicyInputs) -> Option<Value> {
    let group = p.log_group.as_deref()?;
    let arn = log_group_arn(p, group);
    Some(json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ShipJournalToOwnStreams",
                "Effect": "Allow",
                "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                "Resource": format!("{arn}:log-stream:{BUILD_MACHINE_STREAMS}*")
            },
            {
                "Sid": "FindOwnStreams",
                "Effect": "Allow",
                "Action": "logs:DescribeLogStreams",
                "Resource": format!("{arn}:*")
            }
        ]
    }))
}

/// `arn:<partition>:logs:<region>:<account>:log-group:<group>`.
fn log_group_arn(p: &RunnerPolicyInputs, group: &str) -> String {
    format!(
        "arn:{}:logs:{}:{}:log-group:{group}",
        p.partition, p.region, p.account
    )
}

/// Why the build-machine role has no inline policy (the plan line when an old one is
/// deleted).
const BUILD_MACHINE_NO_POLICY: &str =
    "build machines need no AWS permissions: the cache works through pre-signed URLs";

/// The IAM resource and extra condition that name a KMS key given as a key id, key ARN,
/// alias name or alias ARN. KMS permissions cannot name an alias as their resource:
/// an alias becomes "any key of the account and region carrying this alias".
fn kms_key_grant(partition: &str, region: &str, account: &str, key: &str) -> (String, Value) {
    let any_key = format!("arn:{partition}:kms:{region}:{account}:key/*");
    if let Some(rest) = key.strip_prefix("arn:") {
        // arn:<partition>:kms:<region>:<account>:alias/<name> or :key/<id>
        let parts: Vec<&str> = rest.splitn(5, ':').collect();
        if let [key_partition, _, key_region, key_account, resource] = parts[..] {
            if resource.starts_with("alias/") {
                return (
                    format!("arn:{key_partition}:kms:{key_region}:{key_account}:key/*"),
                    json!({ "ForAnyValue:StringEquals": { "kms:ResourceAliases": resource } }),
                );
            }
        }
        return (key.to_owned(), Value::Null);
    }
    if key.starts_with("alias/") {
        return (
            any_key,
            json!({ "ForAnyValue:StringEquals": { "kms:ResourceAliases": key } }),
        );
    }
    (
        format!("arn:{partition}:kms:{region}:{account}:key/{key}"),
        Value::Null,
    )
}

/// Runner hosts: manage build machines of their own fleets only, and the cache.
pub(crate) fn runner_host_policy(p: &RunnerPolicyInputs) -> Value {
    let ec2 = |resource: &str| {
        format!(
            "arn:{}:ec2:{}:{}:{resource}",
            p.partition, p.region, p.account
        )
    };
    let fleet_tag = json!({ "aws:RequestTag/flotilla:fleet": p.fleets });
    let tagged = ["instance/*", "volume/*", "network-interface/*"].map(ec2);
    let mut amis = p.amis.clone();
    amis.sort();
    amis.dedup();
    let images: Vec<String> = amis
        .iter()
        .map(|ami| format!("arn:{}:ec2:{}::image/{ami}", p.partition, p.region))
        .collect();
    let mut network: Vec<String> = p
        .private_subnets
        .iter()
        .map(|s| ec2(&format!("subnet/{s}")))
        .collect();
    network.push(ec2(&format!("security-group/{}", p.build_security_group)));
    // Spot launches (class market = spot) create a request the daemon does not tag.
    network.push(ec2("spot-instances-request/*"));
    if p.launch_templates {
        network.extend(
            [
                "launch-template/*",
                "placement-group/*",
                "capacity-reservation/*",
            ]
            .map(ec2),
        );
    }
    let mut statements = vec![
        json!({
            "Sid": "Observe",
            "Effect": "Allow",
            "Action": ["ec2:DescribeImages", "ec2:DescribeInstances"],
            "Resource": "*"
        }),
        json!({
            "Sid": "LaunchInstancesWithFleetTagAndImdsV2",
            "Effect": "Allow",
            "Action": "ec2:RunInstances",
            "Resource": ec2("instance/*"),
            "Condition": {
                "StringEquals": {
                    "aws:RequestTag/flotilla:fleet": p.fleets,
                    "ec2:MetadataHttpTokens": "required"
                },
                "NumericLessThanEquals": {
                    "ec2:MetadataHttpPutResponseHopLimit": p.max_hop_limit.max(1).to_string()
                }
            }
        }),
        json!({
            "Sid": "LaunchEncryptedVolumesWithFleetTag",
            "Effect": "Allow",
            "Action": "ec2:RunInstances",
            "Resource": ec2("volume/*"),
            "Condition": {
                "StringEquals": fleet_tag,
                "Bool": { "ec2:Encrypted": "true" }
            }
        }),
        json!({
            "Sid": "LaunchNetworkInterfacesWithFleetTag",
            "Effect": "Allow",
            "Action": "ec2:RunInstances",
            "Resource": ec2("network-interface/*"),
            "Condition": { "StringEquals": fleet_tag }
        }),
        json!({
            "Sid": "LaunchFromConfiguredImages",
            "Effect": "Allow",
            "Action": "ec2:RunInstances",
            "Resource": images
        }),
        json!({
            "Sid": "LaunchIntoStackNetwork",
            "Effect": "Allow",
            "Action": "ec2:RunInstances",
            "Resource": network
        }),
        json!({
            "Sid": "TagOnlyAtLaunch",
            "Effect": "Allow",
            "Action": "ec2:CreateTags",
            "Resource": tagged,
            "Condition": {
                "StringEquals": {
                    "ec2:CreateAction": "RunInstances",
                    "aws:RequestTag/flotilla:fleet": p.fleets
                }
            }
        }),
        json!({
            "Sid": "TerminateOnlyOwnFleet",
            "Effect": "Allow",
            "Action": "ec2:TerminateInstances",
            "Resource": ec2("instance/*"),
            "Condition": { "StringEquals": { "ec2:ResourceTag/flotilla:fleet": p.fleets } }
        }),
        // The stopped warm pool (`max_stopped`): same fleet-tag condition as terminate.
        json!({
            "Sid": "StopStartOnlyOwnFleet",
            "Effect": "Allow",
            "Action": ["ec2:StopInstances", "ec2:StartInstances"],
            "Resource": ec2("instance/*"),
            "Condition": { "StringEquals": { "ec2:ResourceTag/flotilla:fleet": p.fleets } }
        }),
        // The report saved when the daemon marks a machine broken or lost.
        json!({
            "Sid": "ConsoleOutputOfOwnFleet",
            "Effect": "Allow",
            "Action": "ec2:GetConsoleOutput",
            "Resource": ec2("instance/*"),
            "Condition": { "StringEquals": { "ec2:ResourceTag/flotilla:fleet": p.fleets } }
        }),
        json!({
            "Sid": "PassOnlyBuildMachineRole",
            "Effect": "Allow",
            "Action": "iam:PassRole",
            "Resource": format!("arn:{}:iam::{}:role/{}", p.partition, p.account, p.build_role),
            "Condition": { "StringEquals": { "iam:PassedToService": "ec2.amazonaws.com" } }
        }),
        json!({
            "Sid": "ReadOwnRunnerToken",
            "Effect": "Allow",
            "Action": "ssm:GetParameter",
            "Resource": format!(
                "arn:{}:ssm:{}:{}:parameter{}",
                p.partition, p.region, p.account, p.token_param
            )
        }),
        // gitlab-runner pre-signs GET/HEAD and PUT URLs for the build machines' cache
        // helper with these credentials.
        json!({
            "Sid": "RunnerCache",
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject"],
            "Resource": format!("arn:{}:s3:::{}/*", p.partition, p.bucket)
        }),
        // Without it a cache miss is a 403 (which the cache helper retries and reports
        // as a failure) instead of a 404 (a plain miss).
        json!({
            "Sid": "RunnerCacheMissIsNotFound",
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": format!("arn:{}:s3:::{}", p.partition, p.bucket)
        }),
    ];
    // The binary apply uploads (`binary::BIN_PREFIX`); the sum in the user data is what
    // makes it trusted, this is only the read.
    if p.flotilla_from_bucket {
        statements.push(json!({
            "Sid": "InstallFlotillaFromBucket",
            "Effect": "Allow",
            "Action": "s3:GetObject",
            "Resource": format!(
                "arn:{}:s3:::{}/{}*",
                p.partition,
                p.bucket,
                crate::binary::BIN_PREFIX
            )
        }));
    }
    if p.ssm_agent {
        statements.push(json!({
            "Sid": "SsmAgentRegisters",
            "Effect": "Allow",
            "Action": "ssm:UpdateInstanceInformation",
            "Resource": ec2("instance/*")
        }));
        statements.push(json!({
            "Sid": "SsmAgentRunCommand",
            "Effect": "Allow",
            "Action": SSM_AGENT_CHANNEL_ACTIONS,
            "Resource": "*"
        }));
    }
    // The hosts' journals and the daemon's machine reports, in the stack's group only.
    if let Some(group) = &p.log_group {
        statements.push(json!({
            "Sid": "ShipLogsToStackGroup",
            "Effect": "Allow",
            "Action": ["logs:CreateLogStream", "logs:DescribeLogStreams", "logs:PutLogEvents"],
            "Resource": format!("{}:*", log_group_arn(p, group))
        }));
    }
    // Root volumes encrypted with a class's key: EC2 (and only EC2, kms:ViaService) may
    // use the key on the daemon's behalf; grants only for AWS resources (the volume).
    let mut volume_keys = p.volume_kms_keys.clone();
    volume_keys.sort();
    volume_keys.dedup();
    for (i, key) in volume_keys.iter().enumerate() {
        let (resource, alias) = kms_key_grant(&p.partition, &p.region, &p.account, key);
        let via_ec2 = json!({ "kms:ViaService": format!("ec2.{}.amazonaws.com", p.region) });
        let mut use_key = json!({ "StringEquals": via_ec2.clone() });
        let mut grant = json!({
            "StringEquals": via_ec2,
            "Bool": { "kms:GrantIsForAWSResource": "true" }
        });
        if let Value::Object(extra) = alias {
            for (k, v) in extra {
                use_key[&k] = v.clone();
                grant[&k] = v;
            }
        }
        statements.push(json!({
            "Sid": format!("BuildVolumeKmsKey{i}"),
            "Effect": "Allow",
            "Action": [
                "kms:DescribeKey",
                "kms:GenerateDataKeyWithoutPlaintext",
                "kms:Decrypt",
                "kms:ReEncryptFrom",
                "kms:ReEncryptTo"
            ],
            "Resource": resource.clone(),
            "Condition": use_key
        }));
        statements.push(json!({
            "Sid": format!("BuildVolumeKmsGrant{i}"),
            "Effect": "Allow",
            "Action": "kms:CreateGrant",
            "Resource": resource,
            "Condition": grant
        }));
    }
    if let Some(key) = &p.kms_key {
        let (resource, condition) = kms_key_grant(&p.partition, &p.region, &p.account, key);
        let mut s = json!({
            "Sid": "RunnerCacheKmsKey",
            "Effect": "Allow",
            "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
            "Resource": resource
        });
        if !condition.is_null() {
            s["Condition"] = condition;
        }
        statements.push(s);
    }
    json!({ "Version": "2012-10-17", "Statement": statements })
}

/// Policy documents come back URL-encoded from AWS (not from every emulator).
pub(crate) fn parse_policy(text: &str) -> Option<Value> {
    serde_json::from_str(text).ok().or_else(|| {
        let decoded = percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .ok()?;
        serde_json::from_str(&decoded).ok()
    })
}

pub(crate) fn stack_tags(ctx: &Ctx<'_>, logical: &str) -> Result<Vec<Tag>> {
    let tag = |k: &str, v: &str| built("IAM tag", Tag::builder().key(k).value(v).build());
    Ok(vec![
        tag(STACK_TAG, &ctx.stack.name)?,
        tag(RESOURCE_TAG, logical)?,
    ])
}

pub(crate) fn is_ours(ctx: &Ctx<'_>, tags: &[Tag]) -> bool {
    tags.iter()
        .any(|t| t.key() == STACK_TAG && t.value() == ctx.stack.name)
}

/// An existing role: its ARN, trust policy and whether it carries the stack's tag.
#[derive(Debug, Clone)]
pub(crate) struct RoleState {
    pub(crate) arn: String,
    pub(crate) trust: Option<Value>,
    pub(crate) ours: bool,
}

pub(crate) async fn get_role(ctx: &Ctx<'_>, name: &str) -> Result<Option<RoleState>> {
    match ctx
        .aws
        .read("iam:GetRole", ctx.aws.iam.get_role().role_name(name).send())
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

/// Ensures the role exists (tagged) with the EC2 trust policy; returns its ARN.
async fn ensure_role(ctx: &Ctx<'_>, name: &str, description: &str) -> Result<Id> {
    let kind = "iam:role";
    match get_role(ctx, name).await? {
        Some(r) if !r.ours => Err(Error::NotOurs(format!(
            "IAM role {name} exists but is not tagged {STACK_TAG}={}: refusing to adopt it",
            ctx.stack.name
        ))),
        Some(r) => {
            let go = if r.trust.as_ref() == Some(&trust_policy()) {
                None
            } else {
                ctx.change(Action::Update, kind, name, "trust policy")
            };
            if let Some(go) = go {
                ctx.aws
                    .write(
                        go,
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
            Ok(Id::Known(r.arn))
        }
        None => {
            let Some(go) = ctx.change(Action::Create, kind, name, description) else {
                return Ok(Id::pending(name));
            };
            let out = ctx
                .aws
                .write(
                    go,
                    "iam:CreateRole",
                    ctx.aws
                        .iam
                        .create_role()
                        .role_name(name)
                        .description(description)
                        .assume_role_policy_document(trust_policy().to_string())
                        .set_tags(Some(stack_tags(ctx, name)?))
                        .send(),
                )
                .await?;
            let arn = out.role().map(|r| r.arn().to_owned()).unwrap_or_default();
            ctx.created(kind, name, &arn);
            Ok(Id::Known(arn))
        }
    }
}

/// The role's inline policy, if it has one (none for a role not created yet).
async fn inline_policy(ctx: &Ctx<'_>, role: &str, arn: &Id) -> Result<Option<Value>> {
    if arn.is_pending() {
        return Ok(None);
    }
    match ctx
        .aws
        .read(
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
        // A document that does not parse is drift like any other.
        Ok(out) => Ok(Some(
            parse_policy(out.policy_document()).unwrap_or(Value::Null),
        )),
        Err(e) if e.code_is(&["NoSuchEntity"]) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Ensures the role has no inline policy: an existing one (an older stack's) is deleted,
/// the plan saying `why`.
async fn ensure_no_policy(ctx: &Ctx<'_>, role: &str, arn: &Id, why: &str) -> Result<()> {
    let have = inline_policy(ctx, role, arn).await?;
    let name = format!("{role}/{POLICY_NAME}");
    if have.is_none() {
        return Ok(());
    }
    if let Some(go) = ctx.change(Action::Delete, "iam:role-policy", &name, why) {
        ctx.aws
            .write(
                go,
                "iam:DeleteRolePolicy",
                ctx.aws
                    .iam
                    .delete_role_policy()
                    .role_name(role)
                    .policy_name(POLICY_NAME)
                    .send(),
            )
            .await?;
    }
    Ok(())
}

/// Ensures the role's inline policy is exactly `doc`.
pub(crate) async fn ensure_policy(ctx: &Ctx<'_>, role: &str, doc: &Value, arn: &Id) -> Result<()> {
    let have = inline_policy(ctx, role, arn).await?;
    let name = format!("{role}/{POLICY_NAME}");
    if have.as_ref() == Some(doc) {
        return Ok(());
    }
    let action = if have.is_some() {
        Action::Update
    } else {
        Action::Create
    };
    let statements = doc["Statement"].as_array().map_or(0, Vec::len);
    if let Some(go) = ctx.change(
        action,
        "iam:role-policy",
        &name,
        format!("{statements} statements"),
    ) {
        ctx.aws
            .write(
                go,
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
struct ProfileState {
    roles: Vec<String>,
    ours: bool,
}

async fn get_profile(ctx: &Ctx<'_>, name: &str) -> Result<Option<ProfileState>> {
    match ctx
        .aws
        .read(
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
async fn ensure_profile(ctx: &Ctx<'_>, name: &str, role: &str) -> Result<()> {
    let kind = "iam:instance-profile";
    let state = get_profile(ctx, name).await?;
    // A profile created now gets its role as part of its creation.
    let mut created: Option<Go> = None;
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
            let Some(go) = ctx.change(Action::Create, kind, name, format!("with role {role}"))
            else {
                return Ok(());
            };
            ctx.aws
                .write(
                    go,
                    "iam:CreateInstanceProfile",
                    ctx.aws
                        .iam
                        .create_instance_profile()
                        .instance_profile_name(name)
                        .set_tags(Some(stack_tags(ctx, name)?))
                        .send(),
                )
                .await?;
            ctx.created(kind, name, name);
            created = Some(go);
            Vec::new()
        }
    };
    for other in roles.iter().filter(|r| *r != role) {
        if let Some(go) = ctx.change(Action::Update, kind, name, format!("remove role {other}")) {
            ctx.aws
                .write(
                    go,
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
        let go =
            created.or_else(|| ctx.change(Action::Update, kind, name, format!("add role {role}")));
        if let Some(go) = go {
            ctx.aws
                .write(
                    go,
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
async fn destroy_pair(ctx: &Ctx<'_>, name: &str) -> Result<()> {
    if let Some(p) = get_profile(ctx, name).await? {
        let go = if p.ours {
            ctx.change(Action::Delete, "iam:instance-profile", name, "")
        } else {
            None
        };
        if let Some(go) = go {
            for r in &p.roles {
                ctx.aws
                    .write(
                        go,
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
                .write(
                    go,
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
        if let Some(go) = ctx.change(Action::Delete, "iam:role", name, "") {
            let policies = ctx
                .aws
                .read(
                    "iam:ListRolePolicies",
                    ctx.aws.iam.list_role_policies().role_name(name).send(),
                )
                .await?;
            for p in policies.policy_names() {
                ctx.aws
                    .write(
                        go,
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
                .read(
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
                        .write(
                            go,
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
                .write(
                    go,
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
    use std::collections::BTreeSet;

    use super::*;

    fn inputs() -> RunnerPolicyInputs {
        RunnerPolicyInputs {
            partition: "aws".into(),
            region: "us-east-1".into(),
            account: "123456789012".into(),
            fleets: vec!["ci".into(), "ci-1".into()],
            private_subnets: vec!["subnet-a".into(), "subnet-b".into()],
            build_security_group: "sg-1".into(),
            build_role: "flotilla-ci-build-machine".into(),
            token_param: "/flotilla/ci/runner-token".into(),
            bucket: "cache".into(),
            amis: vec!["ami-2".into(), "ami-1".into(), "ami-2".into()],
            max_hop_limit: 1,
            launch_templates: false,
            kms_key: None,
            volume_kms_keys: Vec::new(),
            flotilla_from_bucket: true,
            ssm_agent: true,
            log_group: None,
        }
    }

    /// The example the README's by-hand IAM section shows.
    fn readme_inputs() -> RunnerPolicyInputs {
        RunnerPolicyInputs {
            partition: "aws".into(),
            region: "eu-west-1".into(),
            account: "123456789012".into(),
            fleets: vec!["ci-prod".into()],
            private_subnets: vec![
                "subnet-0123456789abcdef0".into(),
                "subnet-0fedcba9876543210".into(),
            ],
            build_security_group: "sg-0123456789abcdef0".into(),
            build_role: "flotilla-build-machine".into(),
            token_param: "/flotilla/ci-prod/runner-token".into(),
            bucket: "ci-prod-flotilla-cache".into(),
            amis: vec!["ami-0123456789abcdef0".into()],
            max_hop_limit: 1,
            launch_templates: false,
            kms_key: Some(
                "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
                    .into(),
            ),
            volume_kms_keys: Vec::new(),
            // Hosts set up by hand get flotilla their own way and need no Run Command.
            flotilla_from_bucket: false,
            ssm_agent: false,
            log_group: None,
        }
    }

    #[test]
    fn a_class_volume_key_is_usable_only_through_ec2_and_grants_only_for_volumes() {
        assert!(!runner_host_policy(&inputs())
            .to_string()
            .contains("kms:CreateGrant"));
        let doc = runner_host_policy(&RunnerPolicyInputs {
            volume_kms_keys: vec![
                "alias/ci-volumes".into(),
                "1234abcd-12ab-34cd-56ef-1234567890ab".into(),
                "alias/ci-volumes".into(),
            ],
            ..inputs()
        });
        let grants: Vec<&Value> = statements(&doc)
            .iter()
            .filter(|s| s["Action"] == "kms:CreateGrant")
            .collect();
        assert_eq!(grants.len(), 2, "one per distinct key: {doc:#}");
        for g in &grants {
            assert_eq!(g["Condition"]["Bool"]["kms:GrantIsForAWSResource"], "true");
            assert_eq!(
                g["Condition"]["StringEquals"]["kms:ViaService"],
                "ec2.us-east-1.amazonaws.com"
            );
        }
        let by_alias = grants
            .iter()
            .find(|g| g["Resource"] == "arn:aws:kms:us-east-1:123456789012:key/*")
            .expect("an alias is any key of the account carrying it");
        assert_eq!(
            by_alias["Condition"]["ForAnyValue:StringEquals"]["kms:ResourceAliases"],
            "alias/ci-volumes"
        );
        let use_key: Vec<&Value> = statements(&doc)
            .iter()
            .filter(|s| {
                s["Sid"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("BuildVolumeKmsKey")
            })
            .collect();
        assert_eq!(use_key.len(), 2);
        for u in use_key {
            let actions = u["Action"].to_string();
            assert!(
                actions.contains("kms:GenerateDataKeyWithoutPlaintext"),
                "{actions}"
            );
            assert!(!actions.contains("\"kms:Encrypt\""), "{actions}");
            assert_eq!(
                u["Condition"]["StringEquals"]["kms:ViaService"],
                "ec2.us-east-1.amazonaws.com"
            );
        }
    }

    fn statements(doc: &Value) -> &Vec<Value> {
        doc["Statement"].as_array().unwrap()
    }

    fn statement<'a>(doc: &'a Value, sid: &str) -> &'a Value {
        statements(doc)
            .iter()
            .find(|s| s["Sid"] == sid)
            .unwrap_or_else(|| panic!("no statement {sid}"))
    }

    fn strings(v: &Value) -> Vec<String> {
        match v {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a.iter().flat_map(strings).collect(),
            other => panic!("not a string or list: {other}"),
        }
    }

    fn actions(doc: &Value) -> BTreeSet<String> {
        statements(doc)
            .iter()
            .flat_map(|s| strings(&s["Action"]))
            .collect()
    }

    /// Statements granting `action` on a resource matching `resource` (as IAM wildcards
    /// match it: a trailing `*` only, which is all these policies use).
    fn granting<'a>(doc: &'a Value, action: &str, resource: &str) -> Vec<&'a Value> {
        statements(doc)
            .iter()
            .filter(|s| strings(&s["Action"]).iter().any(|a| a == action))
            .filter(|s| {
                strings(&s["Resource"])
                    .iter()
                    .any(|r| match r.strip_suffix('*') {
                        Some(prefix) => resource.starts_with(prefix),
                        None => r == resource,
                    })
            })
            .collect()
    }

    #[test]
    fn runner_policy_grants_exactly_these_actions() {
        let want: BTreeSet<String> = [
            "ec2:DescribeImages",
            "ec2:DescribeInstances",
            "ec2:RunInstances",
            "ec2:CreateTags",
            "ec2:TerminateInstances",
            "ec2:StopInstances",
            "ec2:StartInstances",
            "ec2:GetConsoleOutput",
            "iam:PassRole",
            "ssm:GetParameter",
            "s3:GetObject",
            "s3:PutObject",
            "s3:ListBucket",
            "ssm:UpdateInstanceInformation",
        ]
        .into_iter()
        .chain(SSM_AGENT_CHANNEL_ACTIONS)
        .map(String::from)
        .collect();
        assert_eq!(actions(&runner_host_policy(&inputs())), want);
        let mut by_hand = inputs();
        by_hand.flotilla_from_bucket = false;
        by_hand.ssm_agent = false;
        let by_hand_actions = actions(&runner_host_policy(&by_hand));
        assert!(
            !by_hand_actions
                .iter()
                .any(|a| a.starts_with("ec2messages:") || a.starts_with("ssmmessages:")),
            "{by_hand_actions:?}"
        );
        assert!(!by_hand_actions.contains("ssm:UpdateInstanceInformation"));
        let mut with_kms = inputs();
        with_kms.kms_key = Some("alias/cache".into());
        let mut want_kms = want.clone();
        want_kms.insert("kms:Decrypt".into());
        want_kms.insert("kms:GenerateDataKey".into());
        assert_eq!(actions(&runner_host_policy(&with_kms)), want_kms);
        // Every Sid is unique, every statement allows.
        let doc = runner_host_policy(&with_kms);
        let sids: BTreeSet<&str> = statements(&doc)
            .iter()
            .map(|s| s["Sid"].as_str().unwrap())
            .collect();
        assert_eq!(sids.len(), statements(&doc).len());
        assert!(statements(&doc).iter().all(|s| s["Effect"] == "Allow"));
    }

    /// The EC2 actions granted are exactly the calls the daemon makes (its `ec2` module
    /// counts each one by name), plus CreateTags for the tags in its RunInstances call.
    #[test]
    fn runner_policy_ec2_actions_are_the_daemons_calls() {
        let daemon = include_str!("../../executor/src/ec2.rs");
        let mut calls: BTreeSet<String> = daemon
            .split("self.count(\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .map(|op| format!("ec2:{op}"))
            .collect();
        assert!(calls.contains("ec2:RunInstances"), "{calls:?}");
        assert!(
            daemon.contains("TagSpecification"),
            "tags in the launch call"
        );
        calls.insert("ec2:CreateTags".into());
        let granted: BTreeSet<String> = actions(&runner_host_policy(&inputs()))
            .into_iter()
            .filter(|a| a.starts_with("ec2:"))
            .collect();
        assert_eq!(granted, calls);
    }

    #[test]
    fn runner_launches_need_fleet_tags_imdsv2_encryption_and_the_configured_amis() {
        let doc = runner_host_policy(&inputs());
        let arn = |r: &str| format!("arn:aws:ec2:us-east-1:123456789012:{r}");
        let fleets = json!(["ci", "ci-1"]);

        let [instance] = granting(&doc, "ec2:RunInstances", &arn("instance/i-1"))[..] else {
            panic!("one statement for instances")
        };
        let c = &instance["Condition"];
        assert_eq!(c["StringEquals"]["aws:RequestTag/flotilla:fleet"], fleets);
        assert_eq!(c["StringEquals"]["ec2:MetadataHttpTokens"], "required");
        assert_eq!(
            c["NumericLessThanEquals"]["ec2:MetadataHttpPutResponseHopLimit"],
            "1"
        );
        // A class with imds_hop_limit = 2 raises the cap to exactly that, no further.
        let two = runner_host_policy(&RunnerPolicyInputs {
            max_hop_limit: 2,
            ..inputs()
        });
        let [instance] = granting(&two, "ec2:RunInstances", &arn("instance/i-1"))[..] else {
            panic!("one statement for instances")
        };
        assert_eq!(
            instance["Condition"]["NumericLessThanEquals"]["ec2:MetadataHttpPutResponseHopLimit"],
            "2"
        );

        // Launch templates only when a class names one.
        let lt = arn("launch-template/lt-0abc");
        assert!(granting(&doc, "ec2:RunInstances", &lt).is_empty());
        let with_lt = runner_host_policy(&RunnerPolicyInputs {
            launch_templates: true,
            ..inputs()
        });
        assert_eq!(granting(&with_lt, "ec2:RunInstances", &lt).len(), 1);
        assert_eq!(
            granting(&with_lt, "ec2:RunInstances", &arn("placement-group/ci")).len(),
            1
        );

        let [volume] = granting(&doc, "ec2:RunInstances", &arn("volume/vol-1"))[..] else {
            panic!("one statement for volumes")
        };
        assert_eq!(volume["Condition"]["Bool"]["ec2:Encrypted"], "true");
        assert_eq!(
            volume["Condition"]["StringEquals"]["aws:RequestTag/flotilla:fleet"],
            fleets
        );

        let [nic] = granting(&doc, "ec2:RunInstances", &arn("network-interface/eni-1"))[..] else {
            panic!("one statement for network interfaces")
        };
        assert_eq!(
            nic["Condition"]["StringEquals"]["aws:RequestTag/flotilla:fleet"],
            fleets
        );

        // Only the classes' AMIs, once each, in this region.
        let images = statement(&doc, "LaunchFromConfiguredImages");
        assert_eq!(
            images["Resource"],
            json!([
                "arn:aws:ec2:us-east-1::image/ami-1",
                "arn:aws:ec2:us-east-1::image/ami-2"
            ])
        );
        assert!(granting(
            &doc,
            "ec2:RunInstances",
            "arn:aws:ec2:us-east-1::image/ami-3"
        )
        .is_empty());

        // Exactly the stack's private subnets and build security group.
        for ok in [
            arn("subnet/subnet-a"),
            arn("subnet/subnet-b"),
            arn("security-group/sg-1"),
        ] {
            assert_eq!(granting(&doc, "ec2:RunInstances", &ok).len(), 1, "{ok}");
        }
        for no in [
            arn("subnet/subnet-public"),
            arn("security-group/sg-2"),
            arn("launch-template/lt-1"),
            arn("key-pair/k"),
        ] {
            assert!(granting(&doc, "ec2:RunInstances", &no).is_empty(), "{no}");
        }
        // Spot launches create a request.
        assert_eq!(
            granting(
                &doc,
                "ec2:RunInstances",
                &arn("spot-instances-request/sir-1")
            )
            .len(),
            1
        );
        // No other RunInstances statement is unconditional on a created resource.
        for s in statements(&doc) {
            if strings(&s["Action"]).contains(&"ec2:RunInstances".to_owned()) {
                let rs = strings(&s["Resource"]);
                if rs
                    .iter()
                    .any(|r| r.contains(":instance/") || r.contains(":volume/"))
                {
                    assert!(s["Condition"].is_object(), "{s}");
                }
            }
        }
    }

    #[test]
    fn runner_tags_only_at_launch_and_terminates_only_its_fleets() {
        let doc = runner_host_policy(&inputs());
        let tag = statement(&doc, "TagOnlyAtLaunch");
        assert_eq!(
            tag["Condition"]["StringEquals"]["ec2:CreateAction"],
            "RunInstances"
        );
        assert_eq!(
            tag["Condition"]["StringEquals"]["aws:RequestTag/flotilla:fleet"],
            json!(["ci", "ci-1"])
        );
        // Launch-time tags are conditioned on the fleet tag's value only, never on the set
        // of tag keys: the daemon's extra tags (`flotilla:daemon`, class, machine, Name)
        // stay allowed.
        assert!(
            !doc.to_string().contains("aws:TagKeys"),
            "a tag-key restriction would refuse flotilla:daemon: {doc}"
        );
        let term = statement(&doc, "TerminateOnlyOwnFleet");
        assert_eq!(
            term["Condition"]["StringEquals"]["ec2:ResourceTag/flotilla:fleet"],
            json!(["ci", "ci-1"])
        );
        // Stop and start (the stopped warm pool): the same fleet-tag condition, on
        // instances only, in one statement of exactly these two actions.
        let instance = "arn:aws:ec2:us-east-1:123456789012:instance/i-1";
        for action in ["ec2:StopInstances", "ec2:StartInstances"] {
            let [s] = granting(&doc, action, instance)[..] else {
                panic!("one statement grants {action}")
            };
            assert_eq!(s["Sid"], "StopStartOnlyOwnFleet");
            assert_eq!(s["Condition"], term["Condition"], "{action}");
            assert_eq!(s["Resource"], term["Resource"], "{action}");
            assert!(
                granting(
                    &doc,
                    action,
                    "arn:aws:ec2:us-east-1:123456789012:volume/v-1"
                )
                .is_empty(),
                "{action} on instances only"
            );
        }
        let pass = statement(&doc, "PassOnlyBuildMachineRole");
        assert_eq!(
            pass["Resource"],
            "arn:aws:iam::123456789012:role/flotilla-ci-build-machine"
        );
        assert_eq!(
            pass["Condition"]["StringEquals"]["iam:PassedToService"],
            "ec2.amazonaws.com"
        );
        let ssm = statement(&doc, "ReadOwnRunnerToken");
        assert_eq!(
            ssm["Resource"],
            "arn:aws:ssm:us-east-1:123456789012:parameter/flotilla/ci/runner-token"
        );
        // No statement grants an action on "*" except the Describe calls and the SSM
        // agent's message channels (actions with no resource type to scope to).
        for s in statements(&doc) {
            if s["Resource"] == "*" {
                for a in strings(&s["Action"]) {
                    assert!(
                        a.starts_with("ec2:Describe")
                            || SSM_AGENT_CHANNEL_ACTIONS.contains(&a.as_str()),
                        "{a}"
                    );
                }
            }
        }
        // The agent registers only as an instance of this account and region, and reads
        // no parameter but the token (not AmazonSSMManagedInstanceCore's GetParameter on *).
        assert_eq!(
            statement(&doc, "SsmAgentRegisters")["Resource"],
            "arn:aws:ec2:us-east-1:123456789012:instance/*"
        );
        assert_eq!(
            granting(
                &doc,
                "ssm:GetParameter",
                "arn:aws:ssm:us-east-1:123456789012:parameter/flotilla/other/runner-token"
            )
            .len(),
            0
        );
        assert!(!actions(&doc).contains("ssm:GetParameters"));
    }

    #[test]
    fn runner_cache_is_objects_of_the_bucket_and_its_listing() {
        let doc = runner_host_policy(&inputs());
        let objects = statement(&doc, "RunnerCache");
        assert_eq!(objects["Action"], json!(["s3:GetObject", "s3:PutObject"]));
        assert_eq!(objects["Resource"], "arn:aws:s3:::cache/*");
        let list = statement(&doc, "RunnerCacheMissIsNotFound");
        assert_eq!(list["Action"], "s3:ListBucket");
        assert_eq!(list["Resource"], "arn:aws:s3:::cache");
        assert!(!actions(&doc).iter().any(|a| a.starts_with("kms:")));
    }

    #[test]
    fn the_uploaded_binary_is_readable_under_exactly_its_prefix() {
        let doc = runner_host_policy(&inputs());
        let bin = statement(&doc, "InstallFlotillaFromBucket");
        assert_eq!(bin["Action"], "s3:GetObject");
        assert_eq!(bin["Resource"], "arn:aws:s3:::cache/flotilla/bin/*");
        assert!(bin.get("Condition").is_none());
        // No write to the prefix beyond the cache's own grant, and nothing for a stack
        // whose hosts download flotilla from a URL.
        assert_eq!(
            granting(
                &doc,
                "s3:GetObject",
                "arn:aws:s3:::cache/flotilla/bin/abc/flotilla"
            )
            .iter()
            .filter(|s| s["Sid"] != "RunnerCache")
            .count(),
            1
        );
        let mut url = inputs();
        url.flotilla_from_bucket = false;
        let doc = runner_host_policy(&url);
        assert!(statements(&doc)
            .iter()
            .all(|s| s["Sid"] != "InstallFlotillaFromBucket"));
    }

    #[test]
    fn a_bucket_kms_key_is_granted_to_the_runner_only() {
        let with = |key: &str| {
            let mut i = inputs();
            i.kms_key = Some(key.into());
            runner_host_policy(&i)
        };
        let key_arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab";
        let doc = with(key_arn);
        let kms = statement(&doc, "RunnerCacheKmsKey");
        assert_eq!(kms["Action"], json!(["kms:Decrypt", "kms:GenerateDataKey"]));
        assert_eq!(kms["Resource"], key_arn);
        assert!(kms.get("Condition").is_none());
        // A key id is this account's and region's key.
        let doc = with("1234abcd-12ab");
        assert_eq!(statement(&doc, "RunnerCacheKmsKey")["Resource"], key_arn);
        // An alias: any key carrying it.
        for alias in [
            "alias/cache",
            "arn:aws:kms:us-east-1:123456789012:alias/cache",
        ] {
            let doc = with(alias);
            let kms = statement(&doc, "RunnerCacheKmsKey");
            assert_eq!(
                kms["Resource"], "arn:aws:kms:us-east-1:123456789012:key/*",
                "{alias}"
            );
            assert_eq!(
                kms["Condition"]["ForAnyValue:StringEquals"]["kms:ResourceAliases"],
                "alias/cache"
            );
        }
        // The build machines get nothing at all, KMS included.
        let mut with_kms = inputs();
        with_kms.kms_key = Some("alias/cache".into());
        assert_eq!(build_machine_policy(&with_kms), None);
    }

    /// With `[logs]`: the hosts write any stream of the stack's group and nothing else;
    /// build machines only streams under `build-machines/`.
    #[test]
    fn log_grants_are_scoped_to_the_stack_group() {
        let mut p = inputs();
        p.log_group = Some("/flotilla/ci".into());
        let group = "arn:aws:logs:us-east-1:123456789012:log-group:/flotilla/ci";
        let host = runner_host_policy(&p);
        for action in ["logs:CreateLogStream", "logs:PutLogEvents"] {
            assert_eq!(
                granting(&host, action, &format!("{group}:log-stream:machines/m-1")).len(),
                1,
                "{action}"
            );
            assert!(granting(
                &host,
                action,
                "arn:aws:logs:us-east-1:123456789012:log-group:/other:log-stream:x"
            )
            .is_empty());
        }
        assert!(!actions(&host).contains("logs:CreateLogGroup"));
        assert!(!actions(&runner_host_policy(&inputs()))
            .iter()
            .any(|a| a.starts_with("logs:")));
        let build = build_machine_policy(&p).expect("a build machine policy with logs on");
        assert_eq!(
            granting(
                &build,
                "logs:PutLogEvents",
                &format!("{group}:log-stream:build-machines/i-1")
            )
            .len(),
            1
        );
        assert!(granting(
            &build,
            "logs:PutLogEvents",
            &format!("{group}:log-stream:machines/m-1")
        )
        .is_empty());
        assert!(granting(
            &build,
            "logs:PutLogEvents",
            &format!("{group}:log-stream:i-1/journal")
        )
        .is_empty());
        // Console output only of the host's own fleets.
        let [console] = granting(
            &host,
            "ec2:GetConsoleOutput",
            "arn:aws:ec2:us-east-1:123456789012:instance/i-1",
        )[..] else {
            panic!("one statement")
        };
        assert_eq!(
            console["Condition"]["StringEquals"]["ec2:ResourceTag/flotilla:fleet"],
            json!(["ci", "ci-1"])
        );
    }

    #[test]
    fn the_readme_shows_the_exact_runner_policy() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme
            .find("### By hand")
            .expect("README has a by-hand section")..];
        let section = &section[..section.find("\n## ").unwrap_or(section.len())];
        let start = section.find("```json\n").expect("a json block") + "```json\n".len();
        let text = &section[start..start + section[start..].find("```").expect("closed")];
        let shown: Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("README policy: {e}"));
        let want = runner_host_policy(&readme_inputs());
        assert!(
            shown == want,
            "the README's runner-host policy differs from the generated one; replace it with:\n{}",
            serde_json::to_string_pretty(&want).unwrap()
        );
    }

    #[test]
    fn url_encoded_policies_parse() {
        let doc = runner_host_policy(&inputs());
        let enc = percent_encoding::utf8_percent_encode(
            &doc.to_string(),
            percent_encoding::NON_ALPHANUMERIC,
        )
        .to_string();
        assert_eq!(parse_policy(&enc), Some(doc));
    }
}
