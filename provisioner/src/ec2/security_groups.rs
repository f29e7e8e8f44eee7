//! Security groups: the runner hosts' (no inbound, or SSH from `network.ssh_cidr`) and
//! the build machines' (TCP 2376, dockerd's TLS port, from the runner group only).
//! Ingress rules are converged exactly: missing ones are authorized, extra ones revoked.
//! Egress is AWS's default (all), which the hosts need for the NAT gateway.

use std::collections::BTreeSet;

use aws_sdk_ec2::types::{IpPermission, IpRange, ResourceType, SecurityGroup, UserIdGroupPair};
use flotilla_proto::bootstrap::DOCKER_TLS_PORT;

use super::{find, tag_spec, Inventory};
use crate::engine::Ctx;
use crate::error::Result;
use crate::naming::logical;
use crate::plan::{is_pending, pending, Action};

#[derive(Debug, Clone, Default)]
pub struct SecurityGroupIds {
    pub runner: String,
    pub build: String,
}

/// One ingress rule in a form that compares.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Rule {
    protocol: String,
    from: i32,
    to: i32,
    /// `cidr:<block>` or `sg:<group id>`.
    source: String,
}

impl Rule {
    fn to_permission(&self) -> IpPermission {
        let b = IpPermission::builder()
            .ip_protocol(&self.protocol)
            .from_port(self.from)
            .to_port(self.to);
        match self.source.split_once(':') {
            Some(("sg", id)) => b
                .user_id_group_pairs(UserIdGroupPair::builder().group_id(id).build())
                .build(),
            Some((_, cidr)) => b
                .ip_ranges(IpRange::builder().cidr_ip(cidr).build())
                .build(),
            None => b.build(),
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}-{} from {}",
            self.protocol, self.from, self.to, self.source
        )
    }
}

fn current_rules(sg: &SecurityGroup) -> BTreeSet<Rule> {
    let mut out = BTreeSet::new();
    for p in sg.ip_permissions() {
        let protocol = p.ip_protocol().unwrap_or("-1").to_owned();
        let (from, to) = (p.from_port().unwrap_or(-1), p.to_port().unwrap_or(-1));
        for r in p.ip_ranges() {
            out.insert(Rule {
                protocol: protocol.clone(),
                from,
                to,
                source: format!("cidr:{}", r.cidr_ip().unwrap_or("")),
            });
        }
        for g in p.user_id_group_pairs() {
            out.insert(Rule {
                protocol: protocol.clone(),
                from,
                to,
                source: format!("sg:{}", g.group_id().unwrap_or("")),
            });
        }
    }
    out
}

pub async fn converge(ctx: &Ctx<'_>, inv: &Inventory, vpc: &str) -> Result<SecurityGroupIds> {
    let mut runner_rules = BTreeSet::new();
    if let Some(cidr) = &ctx.stack.network.ssh_cidr {
        runner_rules.insert(Rule {
            protocol: "tcp".into(),
            from: 22,
            to: 22,
            source: format!("cidr:{cidr}"),
        });
    }
    let runner = ensure_group(
        ctx,
        inv,
        vpc,
        logical::RUNNER_SG,
        "Flotilla runner hosts: no inbound except optional SSH",
        runner_rules,
    )
    .await?;
    let build_rules = BTreeSet::from([Rule {
        protocol: "tcp".into(),
        from: i32::from(DOCKER_TLS_PORT),
        to: i32::from(DOCKER_TLS_PORT),
        source: format!("sg:{runner}"),
    }]);
    let build = ensure_group(
        ctx,
        inv,
        vpc,
        logical::BUILD_SG,
        "Flotilla build machines: dockerd TLS from the runner hosts only",
        build_rules,
    )
    .await?;
    Ok(SecurityGroupIds { runner, build })
}

async fn ensure_group(
    ctx: &Ctx<'_>,
    inv: &Inventory,
    vpc: &str,
    name: &str,
    description: &str,
    want: BTreeSet<Rule>,
) -> Result<String> {
    let found = find(
        &inv.security_groups,
        |g| g.tags(),
        |g| g.group_id().unwrap_or(""),
        name,
    );
    let (id, have) = match found {
        Some(g) => (
            g.group_id().unwrap_or_default().to_owned(),
            current_rules(g),
        ),
        None => {
            let rules: Vec<String> = want.iter().map(Rule::to_string).collect();
            if !ctx.change(
                Action::Create,
                "ec2:security-group",
                name,
                format!(
                    "ingress: {}",
                    if rules.is_empty() {
                        "none".into()
                    } else {
                        rules.join(", ")
                    }
                ),
            ) {
                return Ok(pending(name));
            }
            let out = ctx
                .aws
                .call(
                    "ec2:CreateSecurityGroup",
                    ctx.aws
                        .ec2
                        .create_security_group()
                        .group_name(ctx.names.name_tag(name))
                        .description(description)
                        .vpc_id(vpc)
                        .tag_specifications(tag_spec(ctx, ResourceType::SecurityGroup, name, &[]))
                        .send(),
                )
                .await?;
            let id = out.group_id().unwrap_or_default().to_owned();
            ctx.created("ec2:security-group", name, &id);
            (id, BTreeSet::new())
        }
    };
    let missing: Vec<&Rule> = want.difference(&have).collect();
    let extra: Vec<&Rule> = have.difference(&want).collect();
    let fresh = found.is_none();
    if !missing.is_empty() {
        let detail = format!(
            "allow {}",
            missing
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let act = fresh || ctx.change(Action::Update, "ec2:security-group", name, detail);
        if act && ctx.applying() && !missing.iter().any(|r| is_pending(&r.source[3..])) {
            ctx.aws
                .call(
                    "ec2:AuthorizeSecurityGroupIngress",
                    ctx.aws
                        .ec2
                        .authorize_security_group_ingress()
                        .group_id(&id)
                        .set_ip_permissions(Some(
                            missing.iter().map(|r| r.to_permission()).collect(),
                        ))
                        .send(),
                )
                .await?;
        }
    }
    if !extra.is_empty() {
        let detail = format!(
            "revoke {}",
            extra
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if ctx.change(Action::Update, "ec2:security-group", name, detail) {
            ctx.aws
                .call(
                    "ec2:RevokeSecurityGroupIngress",
                    ctx.aws
                        .ec2
                        .revoke_security_group_ingress()
                        .group_id(&id)
                        .set_ip_permissions(Some(extra.iter().map(|r| r.to_permission()).collect()))
                        .send(),
                )
                .await?;
        }
    }
    Ok(id)
}
