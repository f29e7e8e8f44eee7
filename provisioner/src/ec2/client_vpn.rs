//! The AWS Client VPN endpoint of `[network.vpn]` (logical id `cvpn`): certificate
//! (mutual TLS) authentication from the stack file's ACM ARNs, the endpoint's own
//! security group, one target-network association per VPN subnet, an authorization rule
//! per private subnet, and per association the route to the VPC's block.
//!
//! Converged setting by setting: what `ModifyClientVpnEndpoint` can change (server
//! certificate, split tunnel, DNS servers, port, security group) is modified; what it
//! cannot (client block, transport, client root certificate) replaces the endpoint. A
//! missing association, authorization rule or route comes back; an extra association or
//! rule goes. Deleting disassociates every subnet, waits until AWS lets them go, then
//! deletes the endpoint (AWS refuses to delete one that is still associated).

use std::collections::BTreeSet;
use std::time::Duration;

use aws_sdk_ec2::types::{
    CertificateAuthenticationRequest, ClientVpnAuthenticationRequest, ClientVpnAuthenticationType,
    ClientVpnEndpoint, ConnectionLogOptions, DnsServersOptionsModifyStructure, ResourceType,
    TargetNetwork, TransportProtocol,
};

use super::inventory::{find, name_of, tag_spec, Ec2Type, Inventory};
use super::security_group::SecurityGroupIds;
use super::subnet::Subnets;
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::naming::logical;
use crate::plan::{Action, Go};
use crate::poll::{self, Backoff, Poll};
use crate::vpn::{Transport, Vpn};

const KIND: &str = "ec2:client-vpn-endpoint";
/// Page size of the per-endpoint Describe calls: a stack has a handful of subnets, so
/// one page always holds them all.
const PAGE: i32 = 1000;

/// How the engine prunes and deletes this type.
pub(crate) const TYPE: Ec2Type = Ec2Type {
    desired,
    delete: |ctx, inv| Box::pin(delete(ctx, inv)),
};

/// Logical ids this module keeps.
fn desired(ctx: &Ctx<'_>) -> Vec<String> {
    match ctx.stack.network.vpn {
        Some(_) => vec![logical::CLIENT_VPN.into()],
        None => Vec::new(),
    }
}

/// The endpoint's settings as the stack wants them, in the form `Describe` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    client_cidr: String,
    transport: String,
    client_root_certificate: String,
    server_certificate: String,
    split_tunnel: bool,
    dns_servers: Vec<String>,
    port: i32,
    security_groups: Vec<String>,
}

impl Settings {
    fn wanted(vpn: &Vpn, sg: &Id) -> Self {
        Self {
            client_cidr: vpn.client_cidr.clone(),
            transport: vpn.transport_protocol.as_str().into(),
            client_root_certificate: vpn.client_root_certificate_arn.clone(),
            server_certificate: vpn.server_certificate_arn.clone(),
            split_tunnel: vpn.split_tunnel,
            dns_servers: vpn.dns_servers.clone(),
            port: i32::from(vpn.port),
            security_groups: vec![sg.to_string()],
        }
    }

    fn of(e: &ClientVpnEndpoint) -> Self {
        Self {
            client_cidr: e.client_cidr_block().unwrap_or_default().into(),
            transport: e
                .transport_protocol()
                .map(|t| t.as_str())
                .unwrap_or_default()
                .into(),
            client_root_certificate: e
                .authentication_options()
                .iter()
                .find_map(|a| {
                    a.mutual_authentication()
                        .and_then(|m| m.client_root_certificate_chain())
                })
                .unwrap_or_default()
                .into(),
            server_certificate: e.server_certificate_arn().unwrap_or_default().into(),
            split_tunnel: e.split_tunnel().unwrap_or(false),
            dns_servers: e.dns_servers().to_vec(),
            port: e.vpn_port().unwrap_or(443),
            security_groups: e.security_group_ids().to_vec(),
        }
    }
}

/// What differs between an endpoint and the stack file: settings only a new endpoint
/// can change (`replace`), and those `ModifyClientVpnEndpoint` changes (`modify`).
#[derive(Debug, Default, PartialEq, Eq)]
struct Diff {
    replace: Vec<String>,
    modify: Vec<String>,
}

fn diff(have: &Settings, want: &Settings) -> Diff {
    let mut d = Diff::default();
    let note = |list: &mut Vec<String>, what: &str, have: String, want: String| {
        if have != want {
            list.push(format!("{what} {have} -> {want}"));
        }
    };
    note(
        &mut d.replace,
        "client_cidr",
        have.client_cidr.clone(),
        want.client_cidr.clone(),
    );
    note(
        &mut d.replace,
        "transport_protocol",
        have.transport.clone(),
        want.transport.clone(),
    );
    note(
        &mut d.replace,
        "client_root_certificate_arn",
        have.client_root_certificate.clone(),
        want.client_root_certificate.clone(),
    );
    note(
        &mut d.modify,
        "server_certificate_arn",
        have.server_certificate.clone(),
        want.server_certificate.clone(),
    );
    note(
        &mut d.modify,
        "split_tunnel",
        have.split_tunnel.to_string(),
        want.split_tunnel.to_string(),
    );
    note(
        &mut d.modify,
        "dns_servers",
        format!("{:?}", have.dns_servers),
        format!("{:?}", want.dns_servers),
    );
    note(
        &mut d.modify,
        "port",
        have.port.to_string(),
        want.port.to_string(),
    );
    note(
        &mut d.modify,
        "security_groups",
        format!("{:?}", have.security_groups),
        format!("{:?}", want.security_groups),
    );
    d
}

/// The endpoint, found or made; `None` without `[network.vpn]`.
pub(crate) async fn converge(
    ctx: &Ctx<'_>,
    inv: &Inventory,
    vpc: &Id,
    sgs: &SecurityGroupIds,
    subnets: &Subnets,
) -> Result<Option<Id>> {
    let Some(vpn) = &ctx.stack.network.vpn else {
        return Ok(None);
    };
    let name = logical::CLIENT_VPN;
    let sg = sgs
        .vpn
        .clone()
        .unwrap_or_else(|| Id::pending(logical::VPN_SG));
    let want = Settings::wanted(vpn, &sg);
    let found = find(
        &inv.client_vpns,
        |e| e.tags(),
        |e| e.client_vpn_endpoint_id().unwrap_or(""),
        name,
    );
    let authorized = &ctx.stack.network.private_subnets;
    let endpoint = Endpoint {
        vpn,
        authorized,
        vpc,
        sg: &sg,
        subnets: &subnets.vpn,
    };
    let Some(found) = found else {
        let Some(go) = ctx.change(Action::Create, KIND, name, endpoint.summary()) else {
            return Ok(Some(Id::pending(name)));
        };
        return endpoint.create(ctx, go).await.map(Some);
    };
    let id = found
        .client_vpn_endpoint_id()
        .unwrap_or_default()
        .to_owned();
    let d = diff(&Settings::of(found), &want);
    if !d.replace.is_empty() {
        let detail = format!("{id}: {}", d.replace.join(", "));
        let Some(go) = ctx.change(Action::Replace, KIND, name, detail) else {
            return Ok(Some(Id::pending(name)));
        };
        delete_one(ctx, &id, go).await?;
        return endpoint.create(ctx, go).await.map(Some);
    }
    if !d.modify.is_empty() {
        let detail = format!("{id}: {}", d.modify.join(", "));
        if let Some(go) = ctx.change(Action::Update, KIND, name, detail) {
            if let Some(sg) = sg.known() {
                endpoint.modify(ctx, go, &id, sg).await?;
            }
        }
    }
    let existing = Existing { id: &id, name };
    let fresh = existing.associations(ctx, subnets).await?;
    existing.authorizations(ctx, authorized).await?;
    existing.routes(ctx, subnets, &fresh).await?;
    Ok(Some(Id::Known(id)))
}

/// What a new endpoint is made of.
struct Endpoint<'a> {
    vpn: &'a Vpn,
    /// The blocks clients are authorized to reach: the private subnets.
    authorized: &'a [String],
    vpc: &'a Id,
    sg: &'a Id,
    subnets: &'a [Id],
}

impl Endpoint<'_> {
    fn summary(&self) -> String {
        let v = self.vpn;
        format!(
            "clients {}, {} {}, split tunnel {}, {} subnet(s), authorized to {}",
            v.client_cidr,
            v.transport_protocol.as_str(),
            v.port,
            v.split_tunnel,
            self.subnets.len(),
            self.authorized.join(" ")
        )
    }

    /// Creates the endpoint (tagged in the call), associates it with every VPN subnet,
    /// authorizes the private subnets and waits for the associations.
    async fn create(&self, ctx: &Ctx<'_>, go: Go) -> Result<Id> {
        let name = logical::CLIENT_VPN;
        let v = self.vpn;
        let transport = match v.transport_protocol {
            Transport::Udp => TransportProtocol::Udp,
            Transport::Tcp => TransportProtocol::Tcp,
        };
        let auth = ClientVpnAuthenticationRequest::builder()
            .r#type(ClientVpnAuthenticationType::CertificateAuthentication)
            .mutual_authentication(
                CertificateAuthenticationRequest::builder()
                    .client_root_certificate_chain_arn(&v.client_root_certificate_arn)
                    .build(),
            )
            .build();
        let out = ctx
            .aws
            .write(
                go,
                "ec2:CreateClientVpnEndpoint",
                ctx.aws
                    .ec2
                    .create_client_vpn_endpoint()
                    .client_cidr_block(&v.client_cidr)
                    .server_certificate_arn(&v.server_certificate_arn)
                    .authentication_options(auth)
                    .connection_log_options(ConnectionLogOptions::builder().enabled(false).build())
                    .set_dns_servers((!v.dns_servers.is_empty()).then(|| v.dns_servers.clone()))
                    .transport_protocol(transport)
                    .vpn_port(i32::from(v.port))
                    .split_tunnel(v.split_tunnel)
                    .description(ctx.names.name_tag(name))
                    .set_vpc_id(self.vpc.known().map(str::to_owned))
                    .set_security_group_ids(self.sg.known().map(|s| vec![s.to_owned()]))
                    .tag_specifications(tag_spec(ctx, ResourceType::ClientVpnEndpoint, name, &[]))
                    .send(),
            )
            .await?;
        let id = out.client_vpn_endpoint_id().unwrap_or_default().to_owned();
        ctx.created(KIND, name, &id);
        for subnet in self.subnets.iter().filter_map(Id::known) {
            associate(ctx, go, &id, subnet).await?;
        }
        for cidr in self.authorized {
            authorize(ctx, go, &id, cidr).await?;
        }
        wait_associated(ctx, &id).await?;
        Ok(Id::Known(id))
    }

    async fn modify(&self, ctx: &Ctx<'_>, go: Go, id: &str, sg: &str) -> Result<()> {
        let v = self.vpn;
        let dns = DnsServersOptionsModifyStructure::builder()
            .set_custom_dns_servers(Some(v.dns_servers.clone()))
            .enabled(!v.dns_servers.is_empty())
            .build();
        ctx.aws
            .write(
                go,
                "ec2:ModifyClientVpnEndpoint",
                ctx.aws
                    .ec2
                    .modify_client_vpn_endpoint()
                    .client_vpn_endpoint_id(id)
                    .server_certificate_arn(&v.server_certificate_arn)
                    .split_tunnel(v.split_tunnel)
                    .dns_servers(dns)
                    .vpn_port(i32::from(v.port))
                    .set_vpc_id(self.vpc.known().map(str::to_owned))
                    .security_group_ids(sg)
                    .send(),
            )
            .await?;
        Ok(())
    }
}

/// An endpoint that exists: its associations, rules and routes are each converged.
struct Existing<'a> {
    id: &'a str,
    name: &'a str,
}

impl Existing<'_> {
    fn update(&self, ctx: &Ctx<'_>, detail: String) -> Option<Go> {
        ctx.change(
            Action::Update,
            KIND,
            self.name,
            format!("{}: {detail}", self.id),
        )
    }

    /// Associates the VPN subnets that are not, disassociates subnets that are not VPN
    /// subnets. Returns the subnets associated now (AWS adds their routes itself).
    async fn associations(&self, ctx: &Ctx<'_>, subnets: &Subnets) -> Result<BTreeSet<String>> {
        let have = target_networks(ctx, self.id).await?;
        let live: Vec<&TargetNetwork> = have.iter().filter(|t| is_live(t)).collect();
        let mut fresh = BTreeSet::new();
        for subnet in &subnets.vpn {
            if live
                .iter()
                .any(|t| t.target_network_id().is_some() && t.target_network_id() == subnet.known())
            {
                continue;
            }
            let go = self.update(ctx, format!("associate {subnet}"));
            if let (Some(go), Some(subnet)) = (go, subnet.known()) {
                associate(ctx, go, self.id, subnet).await?;
                fresh.insert(subnet.to_owned());
            }
        }
        for t in &live {
            let subnet = t.target_network_id().unwrap_or_default();
            if subnets.vpn.iter().any(|s| s.known() == Some(subnet)) {
                continue;
            }
            let assoc = t.association_id().unwrap_or_default();
            if let Some(go) = self.update(ctx, format!("disassociate {subnet} ({assoc})")) {
                disassociate(ctx, go, self.id, assoc).await?;
            }
        }
        if !fresh.is_empty() {
            wait_associated(ctx, self.id).await?;
        }
        Ok(fresh)
    }

    /// Authorizes every private subnet's block for all clients; revokes other rules.
    async fn authorizations(&self, ctx: &Ctx<'_>, want: &[String]) -> Result<()> {
        let out = ctx
            .aws
            .read(
                "ec2:DescribeClientVpnAuthorizationRules",
                ctx.aws
                    .ec2
                    .describe_client_vpn_authorization_rules()
                    .client_vpn_endpoint_id(self.id)
                    .max_results(PAGE)
                    .send(),
            )
            .await?;
        let rules: Vec<(String, bool)> = out
            .authorization_rules()
            .iter()
            .filter(|r| {
                !matches!(
                    r.status().and_then(|s| s.code()).map(|c| c.as_str()),
                    Some("revoking" | "failed")
                )
            })
            .map(|r| {
                (
                    r.destination_cidr().unwrap_or_default().to_owned(),
                    r.access_all() == Some(true) && r.group_id().is_none_or(str::is_empty),
                )
            })
            .collect();
        for cidr in want {
            if rules.iter().any(|(c, all)| c == cidr && *all) {
                continue;
            }
            if let Some(go) = self.update(ctx, format!("authorize {cidr}")) {
                authorize(ctx, go, self.id, cidr).await?;
            }
        }
        for (cidr, all) in &rules {
            if want.contains(cidr) && *all {
                continue;
            }
            if let Some(go) = self.update(ctx, format!("revoke authorization to {cidr}")) {
                ctx.aws
                    .write(
                        go,
                        "ec2:RevokeClientVpnIngress",
                        ctx.aws
                            .ec2
                            .revoke_client_vpn_ingress()
                            .client_vpn_endpoint_id(self.id)
                            .target_network_cidr(cidr)
                            .revoke_all_groups(true)
                            .send(),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// The route to the VPC's block through each VPN subnet that was associated before
    /// this pass (AWS adds it with the association; one someone deleted comes back).
    async fn routes(
        &self,
        ctx: &Ctx<'_>,
        subnets: &Subnets,
        fresh: &BTreeSet<String>,
    ) -> Result<()> {
        let out = ctx
            .aws
            .read(
                "ec2:DescribeClientVpnRoutes",
                ctx.aws
                    .ec2
                    .describe_client_vpn_routes()
                    .client_vpn_endpoint_id(self.id)
                    .max_results(PAGE)
                    .send(),
            )
            .await?;
        let vpc_cidr = &ctx.stack.network.cidr;
        for subnet in subnets.vpn.iter().filter_map(Id::known) {
            let present = out.routes().iter().any(|r| {
                r.destination_cidr() == Some(vpc_cidr.as_str())
                    && r.target_subnet() == Some(subnet)
                    && !matches!(
                        r.status().and_then(|s| s.code()).map(|c| c.as_str()),
                        Some("deleting" | "failed")
                    )
            });
            if present || fresh.contains(subnet) {
                continue;
            }
            if let Some(go) = self.update(ctx, format!("route {vpc_cidr} via {subnet}")) {
                ctx.aws
                    .write(
                        go,
                        "ec2:CreateClientVpnRoute",
                        ctx.aws
                            .ec2
                            .create_client_vpn_route()
                            .client_vpn_endpoint_id(self.id)
                            .destination_cidr_block(vpc_cidr)
                            .target_vpc_subnet_id(subnet)
                            .description("the VPC")
                            .send(),
                    )
                    .await?;
            }
        }
        Ok(())
    }
}

/// An association that counts (not failed, not on its way out).
fn is_live(t: &TargetNetwork) -> bool {
    !matches!(
        t.status().and_then(|s| s.code()).map(|c| c.as_str()),
        Some("association-failed" | "disassociating" | "disassociated")
    )
}

async fn target_networks(ctx: &Ctx<'_>, id: &str) -> Result<Vec<TargetNetwork>> {
    let out = ctx
        .aws
        .read(
            "ec2:DescribeClientVpnTargetNetworks",
            ctx.aws
                .ec2
                .describe_client_vpn_target_networks()
                .client_vpn_endpoint_id(id)
                .max_results(PAGE)
                .send(),
        )
        .await?;
    Ok(out.client_vpn_target_networks().to_vec())
}

async fn associate(ctx: &Ctx<'_>, go: Go, id: &str, subnet: &str) -> Result<()> {
    ctx.aws
        .write(
            go,
            "ec2:AssociateClientVpnTargetNetwork",
            ctx.aws
                .ec2
                .associate_client_vpn_target_network()
                .client_vpn_endpoint_id(id)
                .subnet_id(subnet)
                .send(),
        )
        .await?;
    Ok(())
}

async fn disassociate(ctx: &Ctx<'_>, go: Go, id: &str, association: &str) -> Result<()> {
    ctx.aws
        .write(
            go,
            "ec2:DisassociateClientVpnTargetNetwork",
            ctx.aws
                .ec2
                .disassociate_client_vpn_target_network()
                .client_vpn_endpoint_id(id)
                .association_id(association)
                .send(),
        )
        .await?;
    Ok(())
}

async fn authorize(ctx: &Ctx<'_>, go: Go, id: &str, cidr: &str) -> Result<()> {
    ctx.aws
        .write(
            go,
            "ec2:AuthorizeClientVpnIngress",
            ctx.aws
                .ec2
                .authorize_client_vpn_ingress()
                .client_vpn_endpoint_id(id)
                .target_network_cidr(cidr)
                .authorize_all_groups(true)
                .description("a private subnet of the stack")
                .send(),
        )
        .await?;
    Ok(())
}

/// Associations take minutes in AWS; apply waits so the VPN is usable when it ends.
async fn wait_associated(ctx: &Ctx<'_>, id: &str) -> Result<()> {
    let what = format!("Client VPN endpoint {id}'s subnets to be associated");
    poll::until(&what, Backoff::up_to(Duration::from_secs(900)), || async {
        let nets = target_networks(ctx, id).await?;
        let codes: Vec<&str> = nets
            .iter()
            .filter(|t| is_live(t) || status(t) == "association-failed")
            .map(status)
            .collect();
        if let Some(failed) = nets.iter().find(|t| status(t) == "association-failed") {
            return Err(Error::Refused(format!(
                "Client VPN endpoint {id}: associating {} failed: {}; the next apply tries again",
                failed.target_network_id().unwrap_or_default(),
                failed
                    .status()
                    .and_then(|s| s.message())
                    .unwrap_or("no reason given")
            )));
        }
        if codes.iter().all(|c| *c == "associated") {
            Ok(Poll::Done(()))
        } else {
            Ok(Poll::Wait(format!(
                "waiting for Client VPN endpoint {id}'s associations ({})",
                codes.join(", ")
            )))
        }
    })
    .await
}

fn status(t: &TargetNetwork) -> &str {
    t.status()
        .and_then(|s| s.code())
        .map(|c| c.as_str())
        .unwrap_or("")
}

/// Disassociates every subnet, waits until none is left, deletes the endpoint.
async fn delete_one(ctx: &Ctx<'_>, id: &str, go: Go) -> Result<()> {
    for t in target_networks(ctx, id).await? {
        if matches!(status(&t), "disassociating" | "disassociated") {
            continue;
        }
        if let Some(assoc) = t.association_id() {
            disassociate(ctx, go, id, assoc).await?;
        }
    }
    let what = format!("Client VPN endpoint {id}'s subnets to be disassociated");
    poll::until(&what, Backoff::up_to(Duration::from_secs(900)), || async {
        let left: Vec<String> = target_networks(ctx, id)
            .await?
            .iter()
            .filter(|t| status(t) != "disassociated")
            .map(|t| t.target_network_id().unwrap_or_default().to_owned())
            .collect();
        if left.is_empty() {
            Ok(Poll::Done(()))
        } else {
            Ok(Poll::Wait(format!(
                "waiting for Client VPN endpoint {id} to let go of {}",
                left.join(", ")
            )))
        }
    })
    .await?;
    ctx.aws
        .write(
            go,
            "ec2:DeleteClientVpnEndpoint",
            ctx.aws
                .ec2
                .delete_client_vpn_endpoint()
                .client_vpn_endpoint_id(id)
                .send(),
        )
        .await?;
    Ok(())
}

/// Deletes the given endpoints (only ever the stack's: the inventory holds no other).
async fn delete(ctx: &Ctx<'_>, inv: &Inventory) -> Result<()> {
    for e in &inv.client_vpns {
        let id = e.client_vpn_endpoint_id().unwrap_or_default();
        if let Some(go) = ctx.change(Action::Delete, KIND, &name_of(e.tags(), id), id) {
            delete_one(ctx, id, go).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            client_cidr: "172.16.0.0/22".into(),
            transport: "udp".into(),
            client_root_certificate: "arn:aws:acm:us-east-1:123456789012:certificate/ca".into(),
            server_certificate: "arn:aws:acm:us-east-1:123456789012:certificate/server".into(),
            split_tunnel: true,
            dns_servers: Vec::new(),
            port: 443,
            security_groups: vec!["sg-1".into()],
        }
    }

    #[test]
    fn the_same_settings_change_nothing() {
        assert_eq!(diff(&settings(), &settings()), Diff::default());
    }

    #[test]
    fn what_modify_cannot_change_replaces_the_rest_is_modified() {
        let have = settings();
        let mut want = settings();
        want.client_cidr = "172.20.0.0/22".into();
        want.transport = "tcp".into();
        want.split_tunnel = false;
        want.port = 1194;
        let d = diff(&have, &want);
        assert_eq!(
            d.replace,
            [
                "client_cidr 172.16.0.0/22 -> 172.20.0.0/22",
                "transport_protocol udp -> tcp"
            ]
        );
        assert_eq!(d.modify, ["split_tunnel true -> false", "port 443 -> 1194"]);

        let mut want = settings();
        want.client_root_certificate = "arn:aws:acm:us-east-1:123456789012:certificate/ca2".into();
        want.server_certificate = "arn:aws:acm:us-east-1:123456789012:certificate/s2".into();
        want.dns_servers = vec!["10.0.0.2".into()];
        want.security_groups = vec!["sg-2".into()];
        let d = diff(&have, &want);
        assert_eq!(d.replace.len(), 1, "{d:?}");
        assert!(d.replace[0].starts_with("client_root_certificate_arn"));
        assert_eq!(d.modify.len(), 3, "{d:?}");
    }

    #[test]
    fn settings_read_back_from_ec2_compare_equal_to_the_wanted_ones() {
        use aws_sdk_ec2::types::{CertificateAuthentication, ClientVpnAuthentication};
        let want = settings();
        let e = ClientVpnEndpoint::builder()
            .client_cidr_block(&want.client_cidr)
            .transport_protocol(TransportProtocol::Udp)
            .authentication_options(
                ClientVpnAuthentication::builder()
                    .r#type(ClientVpnAuthenticationType::CertificateAuthentication)
                    .mutual_authentication(
                        CertificateAuthentication::builder()
                            .client_root_certificate_chain(&want.client_root_certificate)
                            .build(),
                    )
                    .build(),
            )
            .server_certificate_arn(&want.server_certificate)
            .split_tunnel(true)
            .vpn_port(443)
            .security_group_ids("sg-1")
            .build();
        assert_eq!(Settings::of(&e), want);
    }
}
