//! `[network.vpn]` against moto with the Client VPN model the test wrapper loads
//! (`client_vpn_model.py`: moto has no Client VPN). One stack from plan to destroy:
//! what apply creates, a no-op second apply, drift put back, changed settings modified
//! or replaced, the section removed (pruned) and added again, and a destroy that leaves
//! an endpoint not tagged with the stack alone.

use aws_sdk_ec2::types::{
    CertificateAuthenticationRequest, ClientVpnAuthenticationRequest, ClientVpnAuthenticationType,
    ClientVpnEndpoint, ConnectionLogOptions, Filter,
};

use crate::support::*;
use crate::{stack_filter, STACK_TAG};

const STACK: &str = "vpn";
const SERVER_CERT: &str =
    "arn:aws:acm:us-east-1:123456789012:certificate/11111111-2222-3333-4444-555555555555";
const CLIENT_CA: &str =
    "arn:aws:acm:us-east-1:123456789012:certificate/66666666-7777-8888-9999-000000000000";
const VPC_CIDR: &str = "127.60.0.0/16";
const PRIVATE: [&str; 2] = ["127.60.16.0/20", "127.60.32.0/20"];
const VPN_SUBNETS: [&str; 2] = ["127.60.2.0/26", "127.60.2.64/26"];

fn stack_text(gitlab: &str, client_cidr: &str, port: u16) -> String {
    format!(
        "{}\n[network.vpn]\nclient_cidr = \"{client_cidr}\"\nsubnets = [\"{}\", \"{}\"]\n\
         server_certificate_arn = \"{SERVER_CERT}\"\nclient_root_certificate_arn = \"{CLIENT_CA}\"\n\
         port = {port}\n",
        stack_toml(STACK, 60, gitlab),
        VPN_SUBNETS[0],
        VPN_SUBNETS[1],
    )
}

fn tag<'a>(tags: &'a [aws_sdk_ec2::types::Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// The stack's endpoints (by tag: the API has no tag filter).
async fn endpoints(c: &Clients) -> Vec<ClientVpnEndpoint> {
    c.ec2
        .describe_client_vpn_endpoints()
        .send()
        .await
        .unwrap()
        .client_vpn_endpoints()
        .iter()
        .filter(|e| tag(e.tags(), STACK_TAG) == Some(STACK))
        .cloned()
        .collect()
}

/// The id of the stack's resource with this logical id, by type.
async fn subnet_id(c: &Clients, logical: &str) -> Option<String> {
    c.ec2
        .describe_subnets()
        .filters(stack_filter(STACK))
        .filters(
            Filter::builder()
                .name("tag:flotilla:resource")
                .values(logical)
                .build(),
        )
        .send()
        .await
        .unwrap()
        .subnets()
        .first()
        .and_then(|s| s.subnet_id().map(str::to_owned))
}

async fn group(c: &Clients, logical: &str) -> Option<aws_sdk_ec2::types::SecurityGroup> {
    c.ec2
        .describe_security_groups()
        .filters(stack_filter(STACK))
        .filters(
            Filter::builder()
                .name("tag:flotilla:resource")
                .values(logical)
                .build(),
        )
        .send()
        .await
        .unwrap()
        .security_groups()
        .first()
        .cloned()
}

/// (subnet, association id) of each association, sorted.
async fn associations(c: &Clients, endpoint: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = c
        .ec2
        .describe_client_vpn_target_networks()
        .client_vpn_endpoint_id(endpoint)
        .send()
        .await
        .unwrap()
        .client_vpn_target_networks()
        .iter()
        .map(|t| {
            (
                t.target_network_id().unwrap().to_owned(),
                t.association_id().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Destination blocks of the all-groups authorization rules, sorted.
async fn authorized(c: &Clients, endpoint: &str) -> Vec<String> {
    let mut out: Vec<String> = c
        .ec2
        .describe_client_vpn_authorization_rules()
        .client_vpn_endpoint_id(endpoint)
        .send()
        .await
        .unwrap()
        .authorization_rules()
        .iter()
        .filter(|r| r.access_all() == Some(true))
        .map(|r| r.destination_cidr().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

/// (destination, target subnet) of each route, sorted.
async fn routes(c: &Clients, endpoint: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = c
        .ec2
        .describe_client_vpn_routes()
        .client_vpn_endpoint_id(endpoint)
        .send()
        .await
        .unwrap()
        .routes()
        .iter()
        .map(|r| {
            (
                r.destination_cidr().unwrap().to_owned(),
                r.target_subnet().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The runner hosts' ingress as (protocol, port, source group, source blocks).
async fn runner_ingress(c: &Clients) -> Vec<(String, i32, Vec<String>, Vec<String>)> {
    group(c, "sg/runner-host")
        .await
        .unwrap()
        .ip_permissions()
        .iter()
        .map(|p| {
            (
                p.ip_protocol().unwrap_or_default().to_owned(),
                p.from_port().unwrap_or(-1),
                p.user_id_group_pairs()
                    .iter()
                    .filter_map(|g| g.group_id().map(str::to_owned))
                    .collect(),
                p.ip_ranges()
                    .iter()
                    .filter_map(|r| r.cidr_ip().map(str::to_owned))
                    .collect(),
            )
        })
        .collect()
}

fn count(ops: &[String], op: &str) -> usize {
    ops.iter().filter(|o| o.as_str() == op).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vpn_is_planned_applied_kept_and_destroyed() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).await;
    let proxy = Proxy::start(&moto.url).await;
    let gitlab = GitlabStub::start().await;
    let c = Clients::new(&moto.url).await;
    let text = stack_text(&gitlab.url, "172.16.0.0/22", 443);
    let stack = write_stack(dir.path(), "s.toml", &text);

    // Plan: the VPN's resources are listed, nothing is written.
    let plan = run(&stack, &proxy.url, true, &["plan"]).await;
    assert!(plan.ok, "{}", plan.stderr);
    assert!(
        proxy.writes().is_empty(),
        "plan wrote: {:?}",
        proxy.writes()
    );
    for line in [
        "ec2:client-vpn-endpoint",
        "cvpn",
        "subnet/vpn/us-east-1a",
        "subnet/vpn/us-east-1b",
        "sg/vpn-endpoint",
        "clients 172.16.0.0/22",
    ] {
        assert!(
            plan.stdout.contains(line),
            "plan lacks {line}:\n{}",
            plan.stdout
        );
    }

    // Apply creates them, tagged in the create call.
    proxy.reset();
    let apply = run(&stack, &proxy.url, true, &["apply"]).await;
    assert!(apply.ok, "{}", apply.stderr);
    let (apply_calls, apply_writes) = (proxy.calls().len(), proxy.writes());
    let create = proxy
        .calls()
        .into_iter()
        .find(|c| c.op == "ec2:CreateClientVpnEndpoint")
        .expect("apply created the endpoint");
    assert!(
        create
            .body
            .contains("TagSpecification.1.ResourceType=client-vpn-endpoint"),
        "not tagged at creation: {}",
        create.body
    );
    let eps = endpoints(&c).await;
    assert_eq!(eps.len(), 1, "{eps:?}");
    let ep = &eps[0];
    let id = ep.client_vpn_endpoint_id().unwrap().to_owned();
    assert_eq!(tag(ep.tags(), "flotilla:resource"), Some("cvpn"));
    assert_eq!(tag(ep.tags(), "Name"), Some("flotilla-vpn-cvpn"));
    assert_eq!(ep.client_cidr_block(), Some("172.16.0.0/22"));
    assert_eq!(ep.server_certificate_arn(), Some(SERVER_CERT));
    let chain = ep.authentication_options()[0]
        .mutual_authentication()
        .and_then(|m| m.client_root_certificate_chain());
    assert_eq!(chain, Some(CLIENT_CA));
    assert_eq!(ep.split_tunnel(), Some(true));
    assert_eq!(ep.vpn_port(), Some(443));
    assert_eq!(ep.transport_protocol().map(|t| t.as_str()), Some("udp"));
    let vpn_sg = group(&c, "sg/vpn-endpoint")
        .await
        .expect("the endpoint's group");
    let vpn_sg_id = vpn_sg.group_id().unwrap().to_owned();
    assert_eq!(ep.security_group_ids(), std::slice::from_ref(&vpn_sg_id));
    assert!(vpn_sg.ip_permissions().is_empty(), "{vpn_sg:?}");
    let mut vpn_subnets = vec![
        subnet_id(&c, "subnet/vpn/us-east-1a").await.unwrap(),
        subnet_id(&c, "subnet/vpn/us-east-1b").await.unwrap(),
    ];
    vpn_subnets.sort();
    let assoc = associations(&c, &id).await;
    assert_eq!(
        assoc.iter().map(|a| a.0.clone()).collect::<Vec<_>>(),
        vpn_subnets
    );
    assert_eq!(authorized(&c, &id).await, PRIVATE);
    let want_routes: Vec<(String, String)> = vpn_subnets
        .iter()
        .map(|s| (VPC_CIDR.to_owned(), s.clone()))
        .collect();
    assert_eq!(routes(&c, &id).await, want_routes);
    // SSH to the runner hosts only from the endpoint (which source-NATs its clients).
    assert_eq!(
        runner_ingress(&c).await,
        [("tcp".to_owned(), 22, vec![vpn_sg_id.clone()], vec![])]
    );

    // `output` names the endpoint (what a VPN client configuration is exported from).
    let out = run(&stack, &proxy.url, true, &["output"]).await;
    assert!(out.ok, "{}", out.all());
    assert!(
        out.stdout
            .contains(&format!("client_vpn_endpoint      {id}")),
        "{}",
        out.stdout
    );

    // A second apply changes nothing.
    proxy.reset();
    let again = run(&stack, &proxy.url, true, &["apply"]).await;
    assert!(again.ok, "{}", again.stderr);
    assert_eq!(proxy.writes(), Vec::<String>::new(), "second apply wrote");
    let noop_calls = proxy.calls().len();

    // Drift: a rule revoked, an association removed, a route deleted, the port changed.
    c.ec2
        .revoke_client_vpn_ingress()
        .client_vpn_endpoint_id(&id)
        .target_network_cidr(PRIVATE[0])
        .revoke_all_groups(true)
        .send()
        .await
        .unwrap();
    c.ec2
        .disassociate_client_vpn_target_network()
        .client_vpn_endpoint_id(&id)
        .association_id(&assoc[1].1)
        .send()
        .await
        .unwrap();
    c.ec2
        .delete_client_vpn_route()
        .client_vpn_endpoint_id(&id)
        .destination_cidr_block(VPC_CIDR)
        .target_vpc_subnet_id(&assoc[0].0)
        .send()
        .await
        .unwrap();
    c.ec2
        .modify_client_vpn_endpoint()
        .client_vpn_endpoint_id(&id)
        .vpn_port(1194)
        .send()
        .await
        .unwrap();
    proxy.reset();
    let plan = run(&stack, &proxy.url, true, &["plan"]).await;
    assert!(plan.ok, "{}", plan.stderr);
    assert!(proxy.writes().is_empty());
    for line in [
        format!("authorize {}", PRIVATE[0]),
        format!("associate {}", assoc[1].0),
        format!("route {VPC_CIDR} via {}", assoc[0].0),
        "port 1194 -> 443".to_owned(),
    ] {
        assert!(
            plan.stdout.contains(&line),
            "plan lacks {line}:\n{}",
            plan.stdout
        );
    }
    let fixed = run(&stack, &proxy.url, true, &["apply"]).await;
    assert!(fixed.ok, "{}", fixed.stderr);
    assert_eq!(endpoints(&c).await.len(), 1);
    assert_eq!(endpoints(&c).await[0].vpn_port(), Some(443));
    assert_eq!(
        associations(&c, &id)
            .await
            .iter()
            .map(|a| a.0.clone())
            .collect::<Vec<_>>(),
        vpn_subnets
    );
    assert_eq!(authorized(&c, &id).await, PRIVATE);
    assert_eq!(routes(&c, &id).await, want_routes);
    proxy.reset();
    assert!(run(&stack, &proxy.url, true, &["apply"]).await.ok);
    assert_eq!(proxy.writes(), Vec::<String>::new(), "apply after drift");

    // The stack file changes the port (modified in place), then the client block
    // (Client VPN cannot change it: the endpoint is replaced).
    let stack = write_stack(
        dir.path(),
        "s.toml",
        &stack_text(&gitlab.url, "172.16.0.0/22", 1194),
    );
    proxy.reset();
    assert!(run(&stack, &proxy.url, true, &["apply"]).await.ok);
    let w = proxy.writes();
    assert_eq!(count(&w, "ec2:ModifyClientVpnEndpoint"), 1, "{w:?}");
    assert_eq!(count(&w, "ec2:CreateClientVpnEndpoint"), 0, "{w:?}");
    assert_eq!(endpoints(&c).await[0].vpn_port(), Some(1194));
    let stack = write_stack(
        dir.path(),
        "s.toml",
        &stack_text(&gitlab.url, "172.20.0.0/22", 1194),
    );
    proxy.reset();
    let replaced = run(&stack, &proxy.url, true, &["apply"]).await;
    assert!(replaced.ok, "{}", replaced.stderr);
    let w = proxy.writes();
    assert_eq!(
        count(&w, "ec2:DisassociateClientVpnTargetNetwork"),
        2,
        "{w:?}"
    );
    assert_eq!(count(&w, "ec2:DeleteClientVpnEndpoint"), 1, "{w:?}");
    assert_eq!(count(&w, "ec2:CreateClientVpnEndpoint"), 1, "{w:?}");
    let eps = endpoints(&c).await;
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert_eq!(eps[0].client_cidr_block(), Some("172.20.0.0/22"));
    let id = eps[0].client_vpn_endpoint_id().unwrap().to_owned();
    assert_eq!(associations(&c, &id).await.len(), 2);
    assert_eq!(authorized(&c, &id).await, PRIVATE);

    // Without the section, apply removes the endpoint, its group, the VPN subnets and
    // the SSH rule.
    let plain = write_stack(
        dir.path(),
        "plain.toml",
        &stack_toml(STACK, 60, &gitlab.url),
    );
    let pruned = run(&plain, &proxy.url, true, &["apply"]).await;
    assert!(pruned.ok, "{}", pruned.stderr);
    assert!(endpoints(&c).await.is_empty());
    assert!(group(&c, "sg/vpn-endpoint").await.is_none());
    assert!(subnet_id(&c, "subnet/vpn/us-east-1a").await.is_none());
    assert!(runner_ingress(&c).await.is_empty());

    // Back on; then an endpoint that is not the stack's, and destroy.
    assert!(run(&stack, &proxy.url, true, &["apply"]).await.ok);
    let foreign = c
        .ec2
        .create_client_vpn_endpoint()
        .client_cidr_block("172.24.0.0/22")
        .server_certificate_arn(SERVER_CERT)
        .authentication_options(
            ClientVpnAuthenticationRequest::builder()
                .r#type(ClientVpnAuthenticationType::CertificateAuthentication)
                .mutual_authentication(
                    CertificateAuthenticationRequest::builder()
                        .client_root_certificate_chain_arn(CLIENT_CA)
                        .build(),
                )
                .build(),
        )
        .connection_log_options(ConnectionLogOptions::builder().enabled(false).build())
        .send()
        .await
        .unwrap()
        .client_vpn_endpoint_id()
        .unwrap()
        .to_owned();
    proxy.reset();
    let destroy = run(&stack, &proxy.url, true, &["destroy", "--yes"]).await;
    assert!(destroy.ok, "{}", destroy.stderr);
    let (destroy_calls, destroy_writes) = (proxy.calls().len(), proxy.writes());
    assert!(endpoints(&c).await.is_empty());
    assert!(group(&c, "sg/vpn-endpoint").await.is_none());
    let left: Vec<String> = c
        .ec2
        .describe_client_vpn_endpoints()
        .send()
        .await
        .unwrap()
        .client_vpn_endpoints()
        .iter()
        .filter_map(|e| e.client_vpn_endpoint_id().map(str::to_owned))
        .collect();
    assert_eq!(
        left,
        [foreign],
        "destroy touched an endpoint not of the stack"
    );

    for (what, calls, writes) in [
        ("apply from scratch", apply_calls, apply_writes.len()),
        ("no-op apply", noop_calls, 0),
        ("destroy", destroy_calls, destroy_writes.len()),
    ] {
        println!("measured with [network.vpn]: {what}: {calls} AWS calls, {writes} writes");
    }
    let vpn_ops = |w: &[String]| w.iter().filter(|o| o.contains("ClientVpn")).count();
    println!(
        "measured: Client VPN writes: apply {}, destroy {}",
        vpn_ops(&apply_writes),
        vpn_ops(&destroy_writes)
    );
}
