//! flotilla-provision against moto on 127.0.0.1 and a stub of GitLab's runner API.
//!
//! Every test runs the real binary with the AWS SDK's standard environment
//! (`AWS_ENDPOINT_URL` pointing at a counting proxy in front of moto) and checks the
//! result with its own AWS clients, straight to moto. `lifecycle` runs one stack from
//! plan to destroy once and checks it in separate tests; the others each run their own
//! scenario on their own moto.

mod deploy;
mod everything;
mod lifecycle;
mod logs;
mod selfinstall;
mod support;
mod vpn;

use std::path::Path;

use aws_sdk_ec2::types::Filter;
use base64::Engine;
use flotilla_proto::config::Config;
use serde_json::Value;
use support::*;

const STACK_TAG: &str = "flotilla:stack";
const KMS_KEY: &str = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";

fn stack_filter(stack: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{STACK_TAG}"))
        .values(stack)
        .build()
}

/// The stack's live EC2 resources, counted by type (terminated instances and deleted NAT
/// gateways, which AWS keeps listing for a while, are not live).
async fn ec2_counts(c: &Clients, stack: &str) -> std::collections::BTreeMap<&'static str, usize> {
    let f = || stack_filter(stack);
    let ec2 = &c.ec2;
    let mut m = std::collections::BTreeMap::new();
    m.insert(
        "vpc",
        ec2.describe_vpcs()
            .filters(f())
            .send()
            .await
            .unwrap()
            .vpcs()
            .len(),
    );
    m.insert(
        "subnet",
        ec2.describe_subnets()
            .filters(f())
            .send()
            .await
            .unwrap()
            .subnets()
            .len(),
    );
    m.insert(
        "igw",
        ec2.describe_internet_gateways()
            .filters(f())
            .send()
            .await
            .unwrap()
            .internet_gateways()
            .len(),
    );
    m.insert(
        "eip",
        ec2.describe_addresses()
            .filters(f())
            .send()
            .await
            .unwrap()
            .addresses()
            .len(),
    );
    m.insert(
        "nat",
        ec2.describe_nat_gateways()
            .filter(f())
            .send()
            .await
            .unwrap()
            .nat_gateways()
            .iter()
            // moto ignores the tag filter here: check the tag ourselves.
            .filter(|n| {
                n.tags()
                    .iter()
                    .any(|t| t.key() == Some(STACK_TAG) && t.value() == Some(stack))
            })
            .filter(|n| !matches!(n.state().map(|s| s.as_str()), Some("deleted" | "deleting")))
            .count(),
    );
    m.insert(
        "route-table",
        ec2.describe_route_tables()
            .filters(f())
            .send()
            .await
            .unwrap()
            .route_tables()
            .len(),
    );
    m.insert(
        "vpc-endpoint",
        ec2.describe_vpc_endpoints()
            .filters(f())
            .send()
            .await
            .unwrap()
            .vpc_endpoints()
            .iter()
            .filter(|e| {
                e.state().map(|s| s.as_str().to_ascii_lowercase()) != Some("deleted".into())
            })
            .count(),
    );
    m.insert(
        "security-group",
        ec2.describe_security_groups()
            .filters(f())
            .send()
            .await
            .unwrap()
            .security_groups()
            .len(),
    );
    m.insert(
        "launch-template",
        ec2.describe_launch_templates()
            .filters(f())
            .send()
            .await
            .unwrap()
            .launch_templates()
            .len(),
    );
    m.insert("instance", live_instances(c, stack).await.len());
    m
}

async fn live_instances(c: &Clients, stack: &str) -> Vec<aws_sdk_ec2::types::Instance> {
    c.ec2
        .describe_instances()
        .filters(stack_filter(stack))
        .send()
        .await
        .unwrap()
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| {
            !matches!(
                i.state().and_then(|s| s.name()).map(|n| n.as_str()),
                Some("terminated" | "shutting-down")
            )
        })
        .cloned()
        .collect()
}

fn expected_counts() -> std::collections::BTreeMap<&'static str, usize> {
    [
        ("vpc", 1),
        ("subnet", 4),
        ("igw", 1),
        ("eip", 1),
        ("nat", 1),
        ("route-table", 3),
        ("vpc-endpoint", 1),
        ("security-group", 2),
        ("launch-template", 0),
        ("instance", 1),
    ]
    .into()
}

async fn role_exists(c: &Clients, name: &str) -> bool {
    c.iam.get_role().role_name(name).send().await.is_ok()
}

async fn profile_exists(c: &Clients, name: &str) -> bool {
    c.iam
        .get_instance_profile()
        .instance_profile_name(name)
        .send()
        .await
        .is_ok()
}

async fn bucket_exists(c: &Clients, name: &str) -> bool {
    c.s3.head_bucket().bucket(name).send().await.is_ok()
}

async fn param_value(c: &Clients, name: &str) -> Option<String> {
    c.ssm
        .get_parameter()
        .name(name)
        .with_decryption(true)
        .send()
        .await
        .ok()
        .and_then(|o| o.parameter().and_then(|p| p.value()).map(str::to_owned))
}

async fn role_policy(c: &Clients, role: &str) -> Value {
    let doc = c
        .iam
        .get_role_policy()
        .role_name(role)
        .policy_name("flotilla")
        .send()
        .await
        .unwrap()
        .policy_document()
        .to_owned();
    // IAM returns policy documents URL-encoded (moto does not always).
    serde_json::from_str(&doc)
        .or_else(|_| {
            let decoded = percent_encoding::percent_decode_str(&doc).decode_utf8_lossy();
            serde_json::from_str(&decoded)
        })
        .expect("policy is JSON")
}

fn statement<'a>(doc: &'a Value, sid: &str) -> &'a Value {
    doc["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Sid"] == sid)
        .unwrap_or_else(|| panic!("no statement {sid} in {doc}"))
}

/// The runner host's user data, decoded.
async fn user_data(c: &Clients, instance: &str) -> String {
    let out = c
        .ec2
        .describe_instance_attribute()
        .instance_id(instance)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let b64 = out.user_data().and_then(|v| v.value()).unwrap();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

/// Makes sure Debian's cloud-init is there (installing it without starting anything).
fn cloud_init() -> std::path::PathBuf {
    let bin = std::path::PathBuf::from("/usr/bin/cloud-init");
    if !bin.exists() {
        let status = std::process::Command::new(
            env!("CARGO_MANIFEST_DIR").to_owned() + "/tests/install-cloud-init.sh",
        )
        .status()
        .expect("run tests/install-cloud-init.sh");
        assert!(status.success(), "installing cloud-init failed");
    }
    bin
}

fn schema_check(dir: &Path, name: &str, text: &str) -> (bool, String) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(cloud_init())
        .args(["schema", "--config-file"])
        .arg(&path)
        .output()
        .expect("run cloud-init schema");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn write_file_content<'a>(cloud_config: &'a Value, path: &str) -> &'a str {
    cloud_config["write_files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == path)
        .and_then(|f| f["content"].as_str())
        .unwrap_or_else(|| panic!("user data writes no {path}"))
}

/// Fails the N-th AWS write of an apply from scratch, for every N (either before it
/// reaches moto or after, with the response lost), then applies again: the second apply must finish the
/// stack with no duplicates, and a third must write nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_half_way_through_apply_is_recovered_by_the_next_apply() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).await;
    let proxy = Proxy::start(&moto.url).await;
    let gitlab = GitlabStub::start().await;
    let c = Clients::new(&moto.url).await;
    // The stacks install their own binary, so its upload is one of the writes.
    let (bin, sum) = fake_flotilla(dir.path(), "flotilla", "x86_64", "1");
    let apply = ["apply", "--flotilla-bin", bin.to_str().unwrap()];
    let key = format!("flotilla/bin/{sum}/flotilla");

    // How many writes a full apply makes, to aim at its middle and its edges.
    let probe = write_stack(
        dir.path(),
        "probe.toml",
        &self_install_stack_toml("probe", 40, &gitlab.url),
    );
    proxy.reset();
    assert!(run(&probe, &proxy.url, true, &apply).await.ok);
    let total = proxy.writes().len() as u64;
    assert!(total > 30, "a full apply made only {total} writes");

    // Every write of the apply, each once, alternating the two kinds of fault.
    for (i, n) in (1..=total).enumerate() {
        let fault = if i % 2 == 0 {
            Fault::Reject
        } else {
            Fault::LoseResponse
        };
        let name = format!("fault{i}");
        let stack = write_stack(
            dir.path(),
            &format!("{name}.toml"),
            &self_install_stack_toml(&name, 100 + i as u8, &gitlab.url),
        );
        proxy.fail_nth_write(n, fault);
        let failed = run(&stack, &proxy.url, true, &apply).await;
        let failed_op = proxy.writes().get(n as usize - 1).cloned();
        assert!(
            !failed.ok,
            "apply with write {n} ({failed_op:?}, {fault:?}) failing succeeded"
        );
        assert!(
            failed.stderr.contains("InjectedFault"),
            "the error does not name the failure:\n{}",
            failed
                .stderr
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );

        proxy.reset();
        let recovered = run(&stack, &proxy.url, true, &apply).await;
        assert!(
            recovered.ok,
            "apply after failing write {n} ({failed_op:?}, {fault:?}) failed:\n{}",
            recovered.stderr
        );
        assert_eq!(
            ec2_counts(&c, &name).await,
            expected_counts(),
            "after failing write {n} ({failed_op:?}, {fault:?})"
        );
        let ours: Vec<_> = gitlab
            .runners()
            .into_iter()
            .filter(|r| r.description == format!("flotilla {name}"))
            .collect();
        assert_eq!(ours.len(), 1, "runners after failing write {n}: {ours:?}");
        assert_eq!(
            param_value(&c, &format!("/flotilla/{name}/runner-token"))
                .await
                .as_deref(),
            Some(ours[0].token.as_str()),
            "stored token is not the runner's current token"
        );
        for role in ["runner-host", "build-machine"] {
            assert!(role_exists(&c, &format!("flotilla-{name}-{role}")).await);
            assert!(profile_exists(&c, &format!("flotilla-{name}-{role}")).await);
        }
        assert!(bucket_exists(&c, &format!("{name}-cache")).await);
        assert!(
            c.s3.head_object()
                .bucket(format!("{name}-cache"))
                .key(&key)
                .send()
                .await
                .is_ok(),
            "the binary is not in the bucket after failing write {n}"
        );

        proxy.reset();
        let third = run(&stack, &proxy.url, true, &apply).await;
        assert!(third.ok, "{}", third.stderr);
        assert_eq!(
            proxy.writes(),
            Vec::<String>::new(),
            "apply after recovery (fault at write {n}, {failed_op:?}) still writes"
        );
        println!("recovered from {fault:?} at write {n}/{total}: {failed_op:?}");
    }
}

/// GitLab created the runner but storing its token failed: the next apply must not
/// create a second runner; it takes the first one over with a fresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_interrupted_before_the_token_was_stored_does_not_register_twice() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).await;
    let proxy = Proxy::start(&moto.url).await;
    let gitlab = GitlabStub::start().await;
    let c = Clients::new(&moto.url).await;
    let stack = write_stack(dir.path(), "s.toml", &stack_toml("reg", 50, &gitlab.url));

    proxy.fail_op("ssm:PutParameter", Fault::Reject);
    let failed = run(&stack, &proxy.url, true, &["apply"]).await;
    assert!(!failed.ok);
    assert_eq!(gitlab.runners().len(), 1, "GitLab got the runner");
    assert_eq!(param_value(&c, "/flotilla/reg/runner-token").await, None);
    let first_token = gitlab.runners()[0].token.clone();

    proxy.reset();
    let plan = run(&stack, &proxy.url, true, &["plan"]).await;
    assert!(plan.stdout.contains("take over runner"), "{}", plan.stdout);
    let again = run(&stack, &proxy.url, true, &["apply"]).await;
    assert!(again.ok, "{}", again.stderr);
    let runners = gitlab.runners();
    assert_eq!(
        runners.len(),
        1,
        "a second runner was registered: {runners:?}"
    );
    assert_ne!(runners[0].token, first_token, "token was not reset");
    assert_eq!(
        param_value(&c, "/flotilla/reg/runner-token")
            .await
            .as_deref(),
        Some(runners[0].token.as_str())
    );

    // The runner deleted in GitLab: the next apply registers it again.
    let id = runners[0].id;
    let all_tokens = gitlab.issued_tokens();
    assert!(gitlab
        .requests()
        .iter()
        .any(|r| r.contains("reset_authentication_token")));
    drop(runners);
    let destroyed = run(&stack, &proxy.url, true, &["destroy", "--yes"]).await;
    assert!(destroyed.ok, "{}", destroyed.stderr);
    assert!(gitlab.requests().contains(&format!("DELETE /runners/{id}")));
    assert_no_secrets(
        &[&failed.all(), &plan.all(), &again.all(), &destroyed.all()],
        &all_tokens,
    );
}

/// Without a GitLab token, apply builds everything, skips registration and says so;
/// with the token, the next apply registers (and writes only the token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_gitlab_token_registration_is_skipped_and_said() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).await;
    let proxy = Proxy::start(&moto.url).await;
    let gitlab = GitlabStub::start().await;
    let c = Clients::new(&moto.url).await;
    let stack = write_stack(
        dir.path(),
        "s.toml",
        &stack_toml("notoken", 60, &gitlab.url),
    );

    let apply = run(&stack, &proxy.url, false, &["apply"]).await;
    assert!(apply.ok, "{}", apply.stderr);
    assert!(
        apply
            .all()
            .contains("GITLAB_TOKEN is not set: runner registration skipped"),
        "{}",
        apply.stdout
    );
    assert!(
        gitlab.requests().is_empty(),
        "GitLab was called without a token"
    );
    assert_eq!(
        param_value(&c, "/flotilla/notoken/runner-token").await,
        None
    );
    assert_eq!(ec2_counts(&c, "notoken").await, expected_counts());

    proxy.reset();
    let again = run(&stack, &proxy.url, true, &["apply"]).await;
    assert!(again.ok, "{}", again.stderr);
    assert_eq!(gitlab.runners().len(), 1);
    assert_eq!(
        proxy.writes(),
        ["ssm:PutParameter"],
        "registration should write only the token"
    );
    // The user data names the parameter, not the token, so the host is not replaced.
}

/// What drifted outside the tool is put back, and only that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_planned_and_converged() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).await;
    let proxy = Proxy::start(&moto.url).await;
    let gitlab = GitlabStub::start().await;
    let c = Clients::new(&moto.url).await;
    let text = stack_toml("drift", 70, &gitlab.url);
    let stack = write_stack(dir.path(), "s.toml", &text);
    assert!(run(&stack, &proxy.url, true, &["apply"]).await.ok);

    // Someone opens the build machines to the world, drops the lifecycle rule and
    // terminates the runner host; the stack file asks for 2 hosts and 3-day expiry.
    let sg = c
        .ec2
        .describe_security_groups()
        .filters(stack_filter("drift"))
        .filters(
            Filter::builder()
                .name("tag:flotilla:resource")
                .values("sg/build-machine")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let sg_id = sg.security_groups()[0].group_id().unwrap().to_owned();
    c.ec2
        .authorize_security_group_ingress()
        .group_id(&sg_id)
        .ip_permissions(
            aws_sdk_ec2::types::IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(2376)
                .to_port(2376)
                .ip_ranges(
                    aws_sdk_ec2::types::IpRange::builder()
                        .cidr_ip("0.0.0.0/0")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    // ... and also strips the runner hosts' outbound rule, lets the build machines send
    // mail, and turns the VPC's DNS hostnames off.
    let group_id = |resource: &'static str| {
        let ec2 = c.ec2.clone();
        async move {
            ec2.describe_security_groups()
                .filters(stack_filter("drift"))
                .filters(
                    Filter::builder()
                        .name("tag:flotilla:resource")
                        .values(resource)
                        .build(),
                )
                .send()
                .await
                .unwrap()
                .security_groups()[0]
                .group_id()
                .unwrap()
                .to_owned()
        }
    };
    let runner_sg = group_id("sg/runner-host").await;
    let all_out = aws_sdk_ec2::types::IpPermission::builder()
        .ip_protocol("-1")
        .ip_ranges(
            aws_sdk_ec2::types::IpRange::builder()
                .cidr_ip("0.0.0.0/0")
                .build(),
        )
        .build();
    c.ec2
        .revoke_security_group_egress()
        .group_id(&runner_sg)
        .ip_permissions(all_out)
        .send()
        .await
        .unwrap();
    c.ec2
        .authorize_security_group_egress()
        .group_id(&sg_id)
        .ip_permissions(
            aws_sdk_ec2::types::IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(25)
                .to_port(25)
                .ip_ranges(
                    aws_sdk_ec2::types::IpRange::builder()
                        .cidr_ip("10.0.0.0/8")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let vpc_id = c
        .ec2
        .describe_vpcs()
        .filters(stack_filter("drift"))
        .send()
        .await
        .unwrap()
        .vpcs()[0]
        .vpc_id()
        .unwrap()
        .to_owned();
    c.ec2
        .modify_vpc_attribute()
        .vpc_id(&vpc_id)
        .enable_dns_hostnames(
            aws_sdk_ec2::types::AttributeBooleanValue::builder()
                .value(false)
                .build(),
        )
        .send()
        .await
        .unwrap();
    c.s3.delete_bucket_lifecycle()
        .bucket("drift-cache")
        .send()
        .await
        .unwrap();
    // An older flotilla-provision gave the build machines S3 rights.
    c.iam
        .put_role_policy()
        .role_name("flotilla-drift-build-machine")
        .policy_name("flotilla")
        .policy_document(
            serde_json::json!({
                "Version": "2012-10-17",
                "Statement": [{
                    "Sid": "CacheObjects",
                    "Effect": "Allow",
                    "Action": ["s3:GetObject", "s3:PutObject"],
                    "Resource": "arn:aws:s3:::drift-cache/*"
                }]
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    let host = live_instances(&c, "drift").await[0]
        .instance_id()
        .unwrap()
        .to_owned();
    c.ec2
        .terminate_instances()
        .instance_ids(&host)
        .send()
        .await
        .unwrap();
    let stack = write_stack(
        dir.path(),
        "s.toml",
        &text
            .replace(
                "expire_days = 7",
                &format!("expire_days = 3\nkms_key = \"{KMS_KEY}\""),
            )
            .replace(
                "instance_type = \"t3.small\"",
                "instance_type = \"t3.small\"\ncount = 2",
            ),
    );

    proxy.reset();
    let plan = run(&stack, &proxy.url, true, &["plan"]).await;
    assert!(plan.ok, "{}", plan.stderr);
    assert!(proxy.writes().is_empty());
    assert!(
        plan.stdout
            .contains("revoke tcp 2376-2376 from cidr:0.0.0.0/0"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout.contains("expire objects after 3 days"),
        "{}",
        plan.stdout
    );
    for drift in [
        "allow egress all traffic, cidr:0.0.0.0/0",
        "revoke egress tcp 25-25 from cidr:10.0.0.0/8",
        "turn DNS hostnames on",
    ] {
        assert!(
            plan.stdout.contains(drift),
            "{drift:?} in:\n{}",
            plan.stdout
        );
    }
    assert!(plan.stdout.contains("+ ec2:instance") && plan.stdout.contains("host/1"));
    // Two hosts: each gets its own fleet (drift, drift-1), so the IAM policy changes.
    assert!(plan.stdout.contains("~ iam:role-policy"), "{}", plan.stdout);
    assert!(
        plan.stdout.contains("- iam:role-policy")
            && plan
                .stdout
                .contains("flotilla-drift-build-machine/flotilla")
            && plan.stdout.contains("pre-signed URLs"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout.contains("default encryption aws:kms"),
        "{}",
        plan.stdout
    );

    assert!(run(&stack, &proxy.url, true, &["apply"]).await.ok);
    let sg = c
        .ec2
        .describe_security_groups()
        .group_ids(&sg_id)
        .send()
        .await
        .unwrap();
    assert!(sg.security_groups()[0].ip_permissions()[0]
        .ip_ranges()
        .is_empty());
    let groups = c
        .ec2
        .describe_security_groups()
        .group_ids(&runner_sg)
        .group_ids(&sg_id)
        .send()
        .await
        .unwrap();
    for g in groups.security_groups() {
        let egress: Vec<_> = g
            .ip_permissions_egress()
            .iter()
            .map(|p| {
                (
                    p.ip_protocol().unwrap_or_default().to_owned(),
                    p.ip_ranges()
                        .iter()
                        .filter_map(|r| r.cidr_ip().map(str::to_owned))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(
            egress,
            [("-1".to_string(), vec!["0.0.0.0/0".to_string()])],
            "egress of {:?}",
            g.group_id()
        );
    }
    let hostnames = c
        .ec2
        .describe_vpc_attribute()
        .vpc_id(&vpc_id)
        .attribute(aws_sdk_ec2::types::VpcAttributeName::EnableDnsHostnames)
        .send()
        .await
        .unwrap();
    assert_eq!(
        hostnames.enable_dns_hostnames().and_then(|v| v.value()),
        Some(true)
    );
    let lc =
        c.s3.get_bucket_lifecycle_configuration()
            .bucket("drift-cache")
            .send()
            .await
            .unwrap();
    assert_eq!(lc.rules()[0].expiration().and_then(|e| e.days()), Some(3));
    let enc =
        c.s3.get_bucket_encryption()
            .bucket("drift-cache")
            .send()
            .await
            .unwrap();
    let rule = &enc.server_side_encryption_configuration().unwrap().rules()[0];
    let by_default = rule.apply_server_side_encryption_by_default().unwrap();
    assert_eq!(by_default.sse_algorithm().as_str(), "aws:kms");
    assert_eq!(by_default.kms_master_key_id(), Some(KMS_KEY));
    assert_eq!(rule.bucket_key_enabled(), Some(true));
    let build_policies = c
        .iam
        .list_role_policies()
        .role_name("flotilla-drift-build-machine")
        .send()
        .await
        .unwrap();
    assert!(build_policies.policy_names().is_empty());
    let runner_policy = role_policy(&c, "flotilla-drift-runner-host").await;
    let kms = statement(&runner_policy, "RunnerCacheKmsKey");
    assert_eq!(kms["Resource"], KMS_KEY);
    assert_eq!(
        kms["Action"],
        serde_json::json!(["kms:Decrypt", "kms:GenerateDataKey"])
    );
    let hosts = live_instances(&c, "drift").await;
    assert_eq!(hosts.len(), 2);
    let mut fleets = Vec::new();
    for h in &hosts {
        let ud = user_data(&c, h.instance_id().unwrap()).await;
        let cc: Value = serde_json::from_str(ud.strip_prefix("#cloud-config\n").unwrap()).unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(
            &path,
            write_file_content(&cc, "/etc/flotilla/flotilla.toml"),
        )
        .unwrap();
        fleets.push(Config::load(&path).unwrap().fleet);
    }
    fleets.sort();
    assert_eq!(fleets, ["drift", "drift-1"]);

    proxy.reset();
    assert!(run(&stack, &proxy.url, true, &["apply"]).await.ok);
    assert!(proxy.writes().is_empty(), "{:?}", proxy.writes());
}

/// destroy never touches what is not tagged with the stack, and refuses while the
/// fleet's build machines still run in the VPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_touches_only_the_stack() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).await;
    let proxy = Proxy::start(&moto.url).await;
    let gitlab = GitlabStub::start().await;
    let c = Clients::new(&moto.url).await;
    let a = write_stack(dir.path(), "a.toml", &stack_toml("alpha", 80, &gitlab.url));
    let b = write_stack(dir.path(), "b.toml", &stack_toml("beta", 81, &gitlab.url));
    assert!(run(&a, &proxy.url, true, &["apply"]).await.ok);
    assert!(run(&b, &proxy.url, true, &["apply"]).await.ok);

    // A build machine of alpha's fleet, as the daemon launches it (fleet tag, no stack tag).
    let subnet = c
        .ec2
        .describe_subnets()
        .filters(stack_filter("alpha"))
        .filters(
            Filter::builder()
                .name("tag:flotilla:resource")
                .values("subnet/private/us-east-1a")
                .build(),
        )
        .send()
        .await
        .unwrap()
        .subnets()[0]
        .subnet_id()
        .unwrap()
        .to_owned();
    let machine = c
        .ec2
        .run_instances()
        .image_id(AMI)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Medium)
        .min_count(1)
        .max_count(1)
        .subnet_id(&subnet)
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key("flotilla:fleet")
                        .value("alpha")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap()
        .instances()[0]
        .instance_id()
        .unwrap()
        .to_owned();

    let refused = run(&a, &proxy.url, true, &["destroy", "--yes"]).await;
    assert!(!refused.ok);
    assert!(refused.stderr.contains(&machine), "{}", refused.stderr);
    assert!(refused.stderr.contains("--terminate-build-machines"));
    assert_eq!(ec2_counts(&c, "alpha").await, expected_counts());

    // Someone else's instance in the VPC: refused even with the flag, and left alone.
    let foreign = c
        .ec2
        .run_instances()
        .image_id(AMI)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Medium)
        .min_count(1)
        .max_count(1)
        .subnet_id(&subnet)
        .send()
        .await
        .unwrap()
        .instances()[0]
        .instance_id()
        .unwrap()
        .to_owned();
    let refused = run(
        &a,
        &proxy.url,
        true,
        &["destroy", "--yes", "--terminate-build-machines"],
    )
    .await;
    assert!(!refused.ok);
    assert!(refused.stderr.contains(&foreign), "{}", refused.stderr);
    let state = c
        .ec2
        .describe_instances()
        .instance_ids(&foreign)
        .send()
        .await
        .unwrap();
    let state = state.reservations()[0].instances()[0]
        .state()
        .and_then(|s| s.name())
        .map(|n| n.as_str().to_owned());
    assert_eq!(
        state.as_deref(),
        Some("running"),
        "destroy touched a foreign instance"
    );
    c.ec2
        .terminate_instances()
        .instance_ids(&foreign)
        .send()
        .await
        .unwrap();

    let done = run(
        &a,
        &proxy.url,
        true,
        &["destroy", "--yes", "--terminate-build-machines"],
    )
    .await;
    assert!(done.ok, "{}", done.stderr);
    assert!(ec2_counts(&c, "alpha").await.values().all(|n| *n == 0));
    // beta is untouched, and still converged.
    assert_eq!(ec2_counts(&c, "beta").await, expected_counts());
    assert!(role_exists(&c, "flotilla-beta-runner-host").await);
    assert!(bucket_exists(&c, "beta-cache").await);
    proxy.reset();
    assert!(run(&b, &proxy.url, true, &["apply"]).await.ok);
    assert!(proxy.writes().is_empty());

    // A bucket with the stack's name that is not the stack's is refused, not adopted.
    c.s3.create_bucket()
        .bucket("gamma-cache")
        .send()
        .await
        .unwrap();
    c.s3.put_object()
        .bucket("gamma-cache")
        .key("someone-elses")
        .body(aws_sdk_s3::primitives::ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap();
    let g = write_stack(dir.path(), "g.toml", &stack_toml("gamma", 82, &gitlab.url));
    let refused = run(&g, &proxy.url, true, &["apply"]).await;
    assert!(!refused.ok);
    assert!(
        refused.stderr.contains("key `bucket.name`"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("refusing to adopt"),
        "{}",
        refused.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_stack_applies_against_moto() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).await;
    let proxy = Proxy::start(&moto.url).await;
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/stack.toml");
    let (bin, _) = fake_flotilla(dir.path(), "flotilla", "x86_64", "example");
    let bin = ["--flotilla-bin", bin.to_str().unwrap()];
    let apply = run(
        &example,
        &proxy.url,
        false,
        &[&bin[..], &["apply"]].concat(),
    )
    .await;
    assert!(apply.ok, "{}", apply.stderr);
    proxy.reset();
    let again = run(
        &example,
        &proxy.url,
        false,
        &[&bin[..], &["apply"]].concat(),
    )
    .await;
    assert!(again.ok);
    assert!(proxy.writes().is_empty(), "{:?}", proxy.writes());
    let destroy = run(&example, &proxy.url, false, &["destroy", "--yes"]).await;
    assert!(destroy.ok, "{}", destroy.stderr);
}

/// Bad stack files: the error names the file and the key, before any network use (the
/// endpoint given is a closed port).
#[tokio::test]
async fn bad_stack_files_get_an_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = stack_toml("bad", 90, "http://127.0.0.1:9");
    let closed = format!("http://127.0.0.1:{}", free_port());
    let cases: &[(&str, String, &str)] = &[
        (
            "unknown key",
            good.replace("expire_days = 7", "expire_days = 7\nexpiry = 3"),
            "key `bucket.expiry`",
        ),
        (
            "wrong type",
            good.replace("expire_days = 7", "expire_days = \"seven\""),
            "key `bucket.expire_days`",
        ),
        (
            "subnet outside the VPC",
            good.replace("127.90.32.0/20", "10.0.0.0/20"),
            "key `network.private_subnets[1]`",
        ),
        (
            "unknown key in a machine class",
            good.replace("idle_count = 1", "idle_count = 1\nidel_time = \"5m\""),
            "key `fleet.classes.small.idel_time`",
        ),
        (
            "bad duration in a machine class",
            good.replace("idle_count = 1", "idle_count = 1\nidle_time = \"soon\""),
            "key `fleet.classes.small.idle_time`",
        ),
        (
            "default class missing",
            good.replace("default_class = \"small\"", "default_class = \"huge\""),
            "key `fleet.default_class`",
        ),
        (
            "missing section",
            good.replace("[gitlab]", "[gitlab_]"),
            "gitlab_",
        ),
        (
            "id the stack owns",
            good.replace("idle_count = 1", "idle_count = 1\nsubnets = [\"subnet-1\"]"),
            "key `fleet.classes.small.subnets`",
        ),
        (
            "bad stack name",
            good.replace("name = \"bad\"", "name = \"Bad Name\""),
            "key `name`",
        ),
        (
            "plain http flotilla download",
            good.replace(
                "https://downloads.example.com/flotilla",
                "http://downloads.example.com/flotilla",
            ),
            "key `runner_hosts.flotilla_url`: \"http://downloads.example.com/flotilla\" is plain \
             http://: expected an https:// URL",
        ),
        (
            "plain http gitlab-runner download",
            good.replace(
                "instance_type = \"t3.small\"",
                "instance_type = \"t3.small\"\ngitlab_runner_url = \"http://mirror.example.com/gitlab-runner\"",
            ),
            "key `runner_hosts.gitlab_runner_url`: \"http://mirror.example.com/gitlab-runner\" is \
             plain http://: expected an https:// URL",
        ),
        (
            "plain http GitLab",
            good.replace("http://127.0.0.1:9", "http://gitlab.example.com"),
            "key `gitlab.url`: \"http://gitlab.example.com\" is plain http://: expected an \
             https:// URL",
        ),
        (
            "flotilla_url without its sum",
            good.lines()
                .filter(|l| !l.starts_with("flotilla_sha256"))
                .collect::<Vec<_>>()
                .join("\n"),
            "key `runner_hosts.flotilla_sha256`: is required with runner_hosts.flotilla_url",
        ),
    ];
    for (what, text, key) in cases {
        let path = write_stack(dir.path(), "stack.toml", text);
        for cmd in ["validate", "plan"] {
            let r = run(&path, &closed, false, &[cmd]).await;
            assert!(!r.ok, "{what}: {cmd} accepted it");
            let err = r.stderr.lines().last().unwrap_or_default().to_owned();
            assert!(
                err.contains(&path.display().to_string()),
                "{what}: the error does not name the file: {err}"
            );
            assert!(
                err.contains(key),
                "{what}: the error does not name {key}: {err}"
            );
            assert!(
                !r.stderr.contains("aws call"),
                "{what}: AWS was called before the file was checked"
            );
        }
    }
    let path = write_stack(dir.path(), "stack.toml", &good);
    let r = run(&path, &closed, false, &["validate"]).await;
    assert!(r.ok, "{}", r.stderr);
}
