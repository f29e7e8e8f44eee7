//! Security groups: the runner hosts' (no inbound, or SSH from `network.ssh_cidr`) and
//! the build machines' (TCP 2376, dockerd's TLS port, from the runner group only). With
//! `[network.vpn]`, also the Client VPN endpoint's (no inbound), and the runner hosts'
//! SSH comes from that group only: Client VPN source-NATs client traffic to its own
//! network interfaces, so a rule on the client CIDR would never match.
//! Ingress and egress rules are converged exactly: missing ones are authorized, extra ones
//! revoked. Egress is all traffic to anywhere (AWS's default for a new group), which the
//! hosts need for the NAT gateway and the machines for registries; a rule someone removed
//! comes back, one someone added goes. Deleted after the rules naming other groups are
//! revoked (they keep those groups alive).

use std::collections::BTreeSet;
use std::fmt;

use aws_sdk_ec2::types::{IpPermission, IpRange, ResourceType, SecurityGroup, UserIdGroupPair};
use flotilla_proto::bootstrap::DOCKER_TLS_PORT;

use super::inventory::{find, name_of, tag_spec, Ec2Type, Inventory};
use crate::context::Ctx;
use crate::error::Result;
use crate::id::Id;
use crate::monitoring;
use crate::naming::logical;
use crate::plan::{Action, Go};
use crate::poll;

const KIND: &str = "ec2:security-group";

/// How the engine prunes and deletes this type.
pub(crate) const TYPE: Ec2Type = Ec2Type {
    desired,
    delete: |ctx, inv| Box::pin(delete(ctx, inv)),
};

#[derive(Debug, Clone)]
pub(crate) struct SecurityGroupIds {
    pub(crate) runner: Id,
    pub(crate) build: Id,
    /// The Client VPN endpoint's group (`[network.vpn]` only).
    pub(crate) vpn: Option<Id>,
}

/// Where an ingress rule admits traffic from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Cidr(String),
    /// Another security group (in plan mode, perhaps one not created yet).
    Group(Id),
}

impl Source {
    fn kind(&self) -> &'static str {
        match self {
            Self::Cidr(_) => "cidr",
            Self::Group(_) => "sg",
        }
    }

    /// The block or the group id alone (what the string form's `[3..]` was meant to
    /// cut out of `sg:<id>`, and cut wrong out of `cidr:<block>`).
    fn address(&self) -> String {
        match self {
            Self::Cidr(block) => block.clone(),
            Self::Group(id) => id.to_string(),
        }
    }
}

/// As plan lines show it: `cidr:<block>` or `sg:<group id>`.
impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind(), self.address())
    }
}

/// One ingress rule in a form that compares.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Rule {
    protocol: String,
    from: i32,
    to: i32,
    source: Source,
}

impl Rule {
    fn tcp(port: i32, source: Source) -> Self {
        Self {
            protocol: "tcp".into(),
            from: port,
            to: port,
            source,
        }
    }

    /// Whether the rule names a group apply has not created yet (it cannot be sent).
    fn is_pending(&self) -> bool {
        matches!(&self.source, Source::Group(id) if id.is_pending())
    }

    fn to_permission(&self) -> IpPermission {
        let b = IpPermission::builder()
            .ip_protocol(&self.protocol)
            .from_port(self.from)
            .to_port(self.to);
        match &self.source {
            Source::Group(id) => b
                .user_id_group_pairs(
                    UserIdGroupPair::builder()
                        .set_group_id(id.known().map(str::to_owned))
                        .build(),
                )
                .build(),
            Source::Cidr(block) => b
                .ip_ranges(IpRange::builder().cidr_ip(block).build())
                .build(),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.protocol == "-1" {
            return write!(f, "all traffic, {}", self.source);
        }
        write!(
            f,
            "{} {}-{} from {}",
            self.protocol, self.from, self.to, self.source
        )
    }
}

/// Which way a group's rules admit traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    /// How plan lines name the rules of this direction.
    fn label(self) -> &'static str {
        match self {
            Self::Ingress => "",
            Self::Egress => "egress ",
        }
    }
}

/// All traffic to anywhere: the egress every group of the stack has.
fn all_outbound() -> BTreeSet<Rule> {
    BTreeSet::from([Rule {
        protocol: "-1".into(),
        from: -1,
        to: -1,
        source: Source::Cidr("0.0.0.0/0".into()),
    }])
}

fn current_rules(sg: &SecurityGroup, direction: Direction) -> BTreeSet<Rule> {
    let mut out = BTreeSet::new();
    let permissions = match direction {
        Direction::Ingress => sg.ip_permissions(),
        Direction::Egress => sg.ip_permissions_egress(),
    };
    for p in permissions {
        let protocol = p.ip_protocol().unwrap_or("-1").to_owned();
        let (from, to) = (p.from_port().unwrap_or(-1), p.to_port().unwrap_or(-1));
        let rule = |source| Rule {
            protocol: protocol.clone(),
            from,
            to,
            source,
        };
        for r in p.ip_ranges() {
            out.insert(rule(Source::Cidr(r.cidr_ip().unwrap_or("").to_owned())));
        }
        for g in p.user_id_group_pairs() {
            out.insert(rule(Source::Group(Id::from_aws(g.group_id()))));
        }
    }
    out
}

/// Logical ids this module keeps.
fn desired(ctx: &Ctx<'_>) -> Vec<String> {
    let mut out = vec![logical::RUNNER_SG.into(), logical::BUILD_SG.into()];
    if ctx.stack.network.vpn.is_some() {
        out.push(logical::VPN_SG.into());
    }
    out
}

pub(crate) async fn converge(ctx: &Ctx<'_>, inv: &Inventory, vpc: &Id) -> Result<SecurityGroupIds> {
    let vpn = match ctx.stack.network.vpn {
        Some(_) => Some(
            ensure_group(
                ctx,
                inv,
                vpc,
                logical::VPN_SG,
                "Flotilla Client VPN endpoint: no inbound",
                BTreeSet::new(),
            )
            .await?,
        ),
        None => None,
    };
    let mut runner_rules: BTreeSet<Rule> = ctx
        .stack
        .network
        .ssh_cidr
        .iter()
        .map(|cidr| Rule::tcp(22, Source::Cidr(cidr.clone())))
        .collect();
    runner_rules.extend(monitoring_rules(ctx));
    runner_rules.extend(vpn.iter().map(|g| Rule::tcp(22, Source::Group(g.clone()))));
    let runner = ensure_group(
        ctx,
        inv,
        vpc,
        logical::RUNNER_SG,
        "Flotilla runner hosts: no inbound except optional SSH",
        runner_rules,
    )
    .await?;
    let build_rules = BTreeSet::from([Rule::tcp(
        i32::from(DOCKER_TLS_PORT),
        Source::Group(runner.clone()),
    )]);
    let build = ensure_group(
        ctx,
        inv,
        vpc,
        logical::BUILD_SG,
        "Flotilla build machines: dockerd TLS from the runner hosts only",
        build_rules,
    )
    .await?;
    Ok(SecurityGroupIds { runner, build, vpn })
}

/// `[monitoring]`: the two metrics ports, from the monitoring CIDR and/or group only.
fn monitoring_rules(ctx: &Ctx<'_>) -> Vec<Rule> {
    let Some(m) = &ctx.stack.monitoring else {
        return Vec::new();
    };
    m.ingress()
        .into_iter()
        .map(|(port, source)| {
            let source = match source {
                monitoring::Source::Cidr(block) => Source::Cidr(block),
                monitoring::Source::Group(id) => Source::Group(Id::Known(id)),
            };
            Rule::tcp(i32::from(port), source)
        })
        .collect()
}

fn listed(rules: &[&Rule]) -> String {
    rules
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn ensure_group(
    ctx: &Ctx<'_>,
    inv: &Inventory,
    vpc: &Id,
    name: &str,
    description: &str,
    want: BTreeSet<Rule>,
) -> Result<Id> {
    let found = find(
        &inv.security_groups,
        |g| g.tags(),
        |g| g.group_id().unwrap_or(""),
        name,
    );
    // A group created now gets its rules as part of its creation.
    let (id, have, have_egress, created): (String, BTreeSet<Rule>, BTreeSet<Rule>, Option<Go>) =
        match found {
            Some(g) => (
                g.group_id().unwrap_or_default().to_owned(),
                current_rules(g, Direction::Ingress),
                current_rules(g, Direction::Egress),
                None,
            ),
            None => {
                let rules: Vec<&Rule> = want.iter().collect();
                let ingress = if rules.is_empty() {
                    "none".into()
                } else {
                    listed(&rules)
                };
                let Some(go) = ctx.change(
                    Action::Create,
                    KIND,
                    name,
                    format!("ingress: {ingress}; egress: all"),
                ) else {
                    return Ok(Id::pending(name));
                };
                let out = ctx
                    .aws
                    .write(
                        go,
                        "ec2:CreateSecurityGroup",
                        ctx.aws
                            .ec2
                            .create_security_group()
                            .group_name(ctx.names.name_tag(name))
                            .description(description)
                            .set_vpc_id(vpc.known().map(str::to_owned))
                            .tag_specifications(tag_spec(
                                ctx,
                                ResourceType::SecurityGroup,
                                name,
                                &[],
                            ))
                            .send(),
                    )
                    .await?;
                let id = out.group_id().unwrap_or_default().to_owned();
                ctx.created(KIND, name, &id);
                // AWS gives a new group the all-outbound rule itself.
                (id, BTreeSet::new(), all_outbound(), Some(go))
            }
        };
    let group = Group { id: &id, name };
    converge_rules(ctx, &group, Direction::Ingress, &want, &have, created).await?;
    converge_rules(
        ctx,
        &group,
        Direction::Egress,
        &all_outbound(),
        &have_egress,
        created,
    )
    .await?;
    Ok(Id::Known(id))
}

/// A group being converged: its id and logical name.
struct Group<'a> {
    id: &'a str,
    name: &'a str,
}

/// Authorizes the rules of `direction` the group lacks and revokes those it should not
/// have. `created`: the Go of the group's own creation (its first rules are part of it).
async fn converge_rules(
    ctx: &Ctx<'_>,
    group: &Group<'_>,
    direction: Direction,
    want: &BTreeSet<Rule>,
    have: &BTreeSet<Rule>,
    created: Option<Go>,
) -> Result<()> {
    let missing: Vec<&Rule> = want.difference(have).collect();
    let extra: Vec<&Rule> = have.difference(want).collect();
    let label = direction.label();
    if !missing.is_empty() {
        let go = created.or_else(|| {
            ctx.change(
                Action::Update,
                KIND,
                group.name,
                format!("allow {label}{}", listed(&missing)),
            )
        });
        if let (Some(go), false) = (go, missing.iter().any(|r| r.is_pending())) {
            let permissions = Some(missing.iter().map(|r| r.to_permission()).collect());
            let ec2 = &ctx.aws.ec2;
            match direction {
                Direction::Ingress => {
                    ctx.aws
                        .write(
                            go,
                            "ec2:AuthorizeSecurityGroupIngress",
                            ec2.authorize_security_group_ingress()
                                .group_id(group.id)
                                .set_ip_permissions(permissions)
                                .send(),
                        )
                        .await?;
                }
                Direction::Egress => {
                    ctx.aws
                        .write(
                            go,
                            "ec2:AuthorizeSecurityGroupEgress",
                            ec2.authorize_security_group_egress()
                                .group_id(group.id)
                                .set_ip_permissions(permissions)
                                .send(),
                        )
                        .await?;
                }
            }
        }
    }
    if !extra.is_empty() {
        let detail = format!("revoke {label}{}", listed(&extra));
        if let Some(go) = ctx.change(Action::Update, KIND, group.name, detail) {
            let permissions = Some(extra.iter().map(|r| r.to_permission()).collect());
            let ec2 = &ctx.aws.ec2;
            match direction {
                Direction::Ingress => {
                    ctx.aws
                        .write(
                            go,
                            "ec2:RevokeSecurityGroupIngress",
                            ec2.revoke_security_group_ingress()
                                .group_id(group.id)
                                .set_ip_permissions(permissions)
                                .send(),
                        )
                        .await?;
                }
                Direction::Egress => {
                    ctx.aws
                        .write(
                            go,
                            "ec2:RevokeSecurityGroupEgress",
                            ec2.revoke_security_group_egress()
                                .group_id(group.id)
                                .set_ip_permissions(permissions)
                                .send(),
                        )
                        .await?;
                }
            }
        }
    }
    Ok(())
}

/// Revokes the rules that name another group (they keep it alive), then deletes.
async fn delete(ctx: &Ctx<'_>, inv: &Inventory) -> Result<()> {
    let mut doomed: Vec<(&SecurityGroup, Go)> = Vec::new();
    for g in &inv.security_groups {
        let id = g.group_id().unwrap_or_default();
        if let Some(go) = ctx.change(Action::Delete, KIND, &name_of(g.tags(), id), id) {
            doomed.push((g, go));
        }
    }
    for (g, go) in &doomed {
        let refs: Vec<_> = g
            .ip_permissions()
            .iter()
            .filter(|p| !p.user_id_group_pairs().is_empty())
            .cloned()
            .collect();
        if !refs.is_empty() {
            ctx.aws
                .write(
                    *go,
                    "ec2:RevokeSecurityGroupIngress",
                    ctx.aws
                        .ec2
                        .revoke_security_group_ingress()
                        .group_id(g.group_id().unwrap_or_default())
                        .set_ip_permissions(Some(refs))
                        .send(),
                )
                .await?;
        }
    }
    for (g, go) in &doomed {
        let id = g.group_id().unwrap_or_default();
        poll::while_in_use("deleting security group", || {
            ctx.aws.write(
                *go,
                "ec2:DeleteSecurityGroup",
                ctx.aws.ec2.delete_security_group().group_id(id).send(),
            )
        })
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The old string form sliced `[3..]` off every source to find a pending group id,
    /// which for `cidr:10.0.0.0/8` gave `r:10.0.0.0/8`: a rule's source is now typed, so
    /// a CIDR is sent as exactly its block and only a group can be pending.
    #[test]
    fn a_cidr_rule_is_sent_as_its_block_and_only_a_new_group_waits() {
        let block = Source::Cidr("10.0.0.0/8".into());
        assert_eq!(block.address(), "10.0.0.0/8", "not r:10.0.0.0/8");
        assert_eq!(
            Source::Group(Id::pending("sg/runner-host")).address(),
            "(known after apply: sg/runner-host)"
        );
        let ssh = Rule::tcp(22, block);
        assert_eq!(ssh.to_string(), "tcp 22-22 from cidr:10.0.0.0/8");
        assert!(!ssh.is_pending());
        let p = ssh.to_permission();
        assert_eq!(p.ip_ranges()[0].cidr_ip(), Some("10.0.0.0/8"));
        assert!(p.user_id_group_pairs().is_empty());

        let from_new = Rule::tcp(2376, Source::Group(Id::pending("sg/runner-host")));
        assert!(from_new.is_pending());
        assert_eq!(
            from_new.to_string(),
            "tcp 2376-2376 from sg:(known after apply: sg/runner-host)"
        );
        let from_known = Rule::tcp(2376, Source::Group(Id::Known("sg-1".into())));
        assert!(!from_known.is_pending());
        let p = from_known.to_permission();
        assert_eq!(p.user_id_group_pairs()[0].group_id(), Some("sg-1"));
        assert!(p.ip_ranges().is_empty());
    }

    #[test]
    fn rules_read_back_from_ec2_compare_equal_to_the_wanted_ones() {
        let sg = SecurityGroup::builder()
            .ip_permissions(Rule::tcp(22, Source::Cidr("192.0.2.0/24".into())).to_permission())
            .ip_permissions(
                Rule::tcp(2376, Source::Group(Id::Known("sg-1".into()))).to_permission(),
            )
            // As EC2 lists AWS's default egress: protocol -1, no ports.
            .ip_permissions_egress(
                IpPermission::builder()
                    .ip_protocol("-1")
                    .ip_ranges(IpRange::builder().cidr_ip("0.0.0.0/0").build())
                    .build(),
            )
            .build();
        assert_eq!(current_rules(&sg, Direction::Egress), all_outbound());
        assert_eq!(
            all_outbound()
                .iter()
                .next()
                .map(|r| r.to_string())
                .as_deref(),
            Some("all traffic, cidr:0.0.0.0/0")
        );
        assert_eq!(
            current_rules(&sg, Direction::Ingress),
            BTreeSet::from([
                Rule::tcp(22, Source::Cidr("192.0.2.0/24".into())),
                Rule::tcp(2376, Source::Group(Id::Known("sg-1".into()))),
            ])
        );
    }
}
