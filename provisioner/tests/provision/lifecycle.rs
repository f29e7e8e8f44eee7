//! One stack's whole life against one moto: plan, apply from scratch, a second apply,
//! plan, output, destroy without and with `--yes`, a second destroy. It runs once per
//! test binary ([`lifecycle`]) and records what each step printed and wrote and what AWS
//! held after apply and after destroy; each test below checks one thing over that record,
//! so a failure names what broke instead of ending one long scenario at its first assert.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use aws_sdk_ec2::types::{
    Address, Filter, Instance, InternetGateway, LaunchTemplate, NatGateway, RouteTable,
    SecurityGroup, Subnet, Volume, Vpc, VpcEndpoint,
};
use flotilla_proto::config::Config;
use serde_json::Value;

use crate::support::*;
use crate::{
    bucket_exists, ec2_counts, expected_counts, live_instances, param_value, profile_exists,
    role_exists, role_policy, schema_check, stack_filter, statement, user_data, write_file_content,
    STACK_TAG,
};

const STACK: &str = "life";
const ROLES: [&str; 2] = ["flotilla-life-runner-host", "flotilla-life-build-machine"];
const TOKEN_PARAM: &str = "/flotilla/life/runner-token";

/// What one run of the binary did: its output and the AWS calls it made.
struct Step {
    run: Run,
    calls: usize,
    writes: Vec<String>,
    /// S3 calls without the stack's account as the expected bucket owner.
    s3_without_owner: Vec<String>,
}

/// AWS as apply left it (read straight from moto).
struct Applied {
    counts: BTreeMap<&'static str, usize>,
    vpcs: Vec<Vpc>,
    subnets: Vec<Subnet>,
    igws: Vec<InternetGateway>,
    nats: Vec<NatGateway>,
    addresses: Vec<Address>,
    route_tables: Vec<RouteTable>,
    endpoints: Vec<VpcEndpoint>,
    security_groups: Vec<SecurityGroup>,
    /// Per role: whether it carries the stack tag, and its instance profile's roles.
    roles: Vec<(String, bool, Vec<String>)>,
    runner_policy: Value,
    build_policy_names: Vec<String>,
    bucket_public_access_blocked: (Option<bool>, Option<bool>, Option<bool>, Option<bool>),
    bucket_sse: String,
    bucket_policy: Value,
    bucket_expiry_days: Option<i32>,
    /// The stack's launch templates after apply (an earlier version's were planted).
    templates: Vec<LaunchTemplate>,
    /// Names of every launch template after apply, the stack's or not.
    all_templates: Vec<String>,
    hosts: Vec<Instance>,
    host_volumes: Vec<Volume>,
    token_value: Option<String>,
    token_type: Option<String>,
    user_data: String,
}

/// AWS and GitLab as destroy left them.
struct Destroyed {
    counts: BTreeMap<&'static str, usize>,
    /// Per role name: (role left, profile left).
    roles_left: Vec<(String, bool, bool)>,
    bucket_left: bool,
    token_left: Option<String>,
    runners_left: usize,
}

struct Lifecycle {
    gitlab_url: String,
    plan: Step,
    runners_after_plan: usize,
    apply: Step,
    applied: Applied,
    runners: Vec<StubRunner>,
    second_apply: Step,
    runners_after_second_apply: usize,
    plan_after: Run,
    output: Run,
    output_json: Run,
    dry_destroy: Step,
    destroy: Step,
    destroyed: Destroyed,
    destroy_again: Run,
    issued_tokens: Vec<String>,
}

static LIFECYCLE: OnceLock<Result<Lifecycle, String>> = OnceLock::new();

/// The record, made by the first test that asks (the others wait for it). A failure to
/// make it fails every test with its message, without making it again.
fn lifecycle() -> &'static Lifecycle {
    let made = LIFECYCLE.get_or_init(|| {
        catch_unwind(AssertUnwindSafe(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a tokio runtime")
                .block_on(record())
        }))
        .map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "recording the lifecycle panicked".into())
        })
    });
    match made {
        Ok(l) => l,
        Err(e) => panic!("the stack's lifecycle could not be recorded: {e}"),
    }
}

async fn step(stack: &std::path::Path, proxy: &Proxy, args: &[&str]) -> Step {
    proxy.reset();
    let run = run(stack, &proxy.url, true, args).await;
    Step {
        run,
        calls: proxy.calls().len(),
        writes: proxy.writes(),
        s3_without_owner: proxy.s3_calls_without_owner(ACCOUNT),
    }
}

async fn record() -> Lifecycle {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).await;
    let proxy = Proxy::start(&moto.url).await;
    let gitlab = GitlabStub::start().await;
    let c = Clients::new(&moto.url).await;
    let stack = write_stack(
        dir.path(),
        "stack.toml",
        &stack_toml(STACK, 31, &gitlab.url),
    );

    // What an earlier version of the provisioner left (one template per class, tagged
    // with the stack), and an operator's own template beside it.
    plant_template(&c, "flotilla-life-small", Some(STACK)).await;
    plant_template(&c, "operators-placement", None).await;
    let plan = step(&stack, &proxy, &["plan"]).await;
    let runners_after_plan = gitlab.runners().len();
    let apply = step(&stack, &proxy, &["apply"]).await;
    println!(
        "measured: apply from scratch: {} AWS calls, {} writes",
        apply.calls,
        apply.writes.len()
    );
    let applied = read_applied(&c).await;
    let runners = gitlab.runners();
    let second_apply = step(&stack, &proxy, &["apply"]).await;
    println!(
        "measured: no-op apply: {} AWS calls, {} writes",
        second_apply.calls,
        second_apply.writes.len()
    );
    let runners_after_second_apply = gitlab.runners().len();
    let plan_after = run(&stack, &proxy.url, true, &["plan"]).await;
    let output = run(&stack, &proxy.url, true, &["output"]).await;
    let output_json = run(&stack, &proxy.url, true, &["output", "--json"]).await;
    let dry_destroy = step(&stack, &proxy, &["destroy"]).await;
    let destroy = step(&stack, &proxy, &["destroy", "--yes"]).await;
    println!(
        "measured: destroy: {} AWS calls, {} writes",
        destroy.calls,
        destroy.writes.len()
    );
    let mut roles_left = Vec::new();
    for name in ROLES {
        roles_left.push((
            name.to_owned(),
            role_exists(&c, name).await,
            profile_exists(&c, name).await,
        ));
    }
    let destroyed = Destroyed {
        counts: ec2_counts(&c, STACK).await,
        roles_left,
        bucket_left: bucket_exists(&c, "life-cache").await,
        token_left: param_value(&c, TOKEN_PARAM).await,
        runners_left: gitlab.runners().len(),
    };
    let destroy_again = run(&stack, &proxy.url, true, &["destroy", "--yes"]).await;
    Lifecycle {
        gitlab_url: gitlab.url.clone(),
        plan,
        runners_after_plan,
        apply,
        applied,
        runners,
        second_apply,
        runners_after_second_apply,
        plan_after,
        output,
        output_json,
        dry_destroy,
        destroy,
        destroyed,
        destroy_again,
        issued_tokens: gitlab.issued_tokens(),
    }
}

async fn read_applied(c: &Clients) -> Applied {
    let f = || stack_filter(STACK);
    let ec2 = &c.ec2;
    let mut roles = Vec::new();
    for role in ROLES {
        let tagged = match c.iam.get_role().role_name(role).send().await {
            Ok(r) => r.role().is_some_and(|r| {
                r.tags()
                    .iter()
                    .any(|t| t.key() == STACK_TAG && t.value() == STACK)
            }),
            Err(_) => false,
        };
        let profile_roles = match c
            .iam
            .get_instance_profile()
            .instance_profile_name(role)
            .send()
            .await
        {
            Ok(p) => p
                .instance_profile()
                .map(|p| p.roles().iter().map(|r| r.role_name().to_owned()).collect())
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        roles.push((role.to_owned(), tagged, profile_roles));
    }
    let hosts = live_instances(c, STACK).await;
    let host_volumes = match hosts.first().and_then(|h| h.instance_id()) {
        Some(id) => ec2
            .describe_volumes()
            .filters(
                Filter::builder()
                    .name("attachment.instance-id")
                    .values(id)
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .volumes()
            .to_vec(),
        None => Vec::new(),
    };
    let user_data = match hosts.first().and_then(|h| h.instance_id()) {
        Some(id) => user_data(c, id).await,
        None => String::new(),
    };
    let pab =
        c.s3.get_public_access_block()
            .bucket("life-cache")
            .send()
            .await;
    let pab = pab
        .ok()
        .and_then(|p| p.public_access_block_configuration().cloned());
    let sse =
        c.s3.get_bucket_encryption()
            .bucket("life-cache")
            .send()
            .await;
    let bucket_policy = c.s3.get_bucket_policy().bucket("life-cache").send().await;
    let lifecycle =
        c.s3.get_bucket_lifecycle_configuration()
            .bucket("life-cache")
            .send()
            .await;
    let templates = ec2
        .describe_launch_templates()
        .filters(f())
        .send()
        .await
        .unwrap()
        .launch_templates()
        .to_vec();
    let all_templates = ec2
        .describe_launch_templates()
        .send()
        .await
        .unwrap()
        .launch_templates()
        .iter()
        .filter_map(|t| t.launch_template_name().map(str::to_owned))
        .collect();
    let params = c.ssm.describe_parameters().send().await.unwrap();
    Applied {
        counts: ec2_counts(c, STACK).await,
        vpcs: ec2
            .describe_vpcs()
            .filters(f())
            .send()
            .await
            .unwrap()
            .vpcs()
            .to_vec(),
        subnets: ec2
            .describe_subnets()
            .filters(f())
            .send()
            .await
            .unwrap()
            .subnets()
            .to_vec(),
        igws: ec2
            .describe_internet_gateways()
            .filters(f())
            .send()
            .await
            .unwrap()
            .internet_gateways()
            .to_vec(),
        nats: ec2
            .describe_nat_gateways()
            .filter(f())
            .send()
            .await
            .unwrap()
            .nat_gateways()
            .to_vec(),
        addresses: ec2
            .describe_addresses()
            .filters(f())
            .send()
            .await
            .unwrap()
            .addresses()
            .to_vec(),
        route_tables: ec2
            .describe_route_tables()
            .filters(f())
            .send()
            .await
            .unwrap()
            .route_tables()
            .to_vec(),
        endpoints: ec2
            .describe_vpc_endpoints()
            .filters(f())
            .send()
            .await
            .unwrap()
            .vpc_endpoints()
            .to_vec(),
        security_groups: ec2
            .describe_security_groups()
            .filters(f())
            .send()
            .await
            .unwrap()
            .security_groups()
            .to_vec(),
        roles,
        runner_policy: role_policy(c, ROLES[0]).await,
        build_policy_names: c
            .iam
            .list_role_policies()
            .role_name(ROLES[1])
            .send()
            .await
            .unwrap()
            .policy_names()
            .to_vec(),
        bucket_public_access_blocked: pab.map_or((None, None, None, None), |p| {
            (
                p.block_public_acls(),
                p.ignore_public_acls(),
                p.block_public_policy(),
                p.restrict_public_buckets(),
            )
        }),
        bucket_sse: sse
            .ok()
            .and_then(|e| {
                e.server_side_encryption_configuration()
                    .and_then(|c| c.rules().first())
                    .and_then(|r| r.apply_server_side_encryption_by_default())
                    .map(|d| d.sse_algorithm().as_str().to_owned())
            })
            .unwrap_or_default(),
        bucket_policy: bucket_policy
            .ok()
            .and_then(|p| p.policy().map(str::to_owned))
            .and_then(|p| serde_json::from_str(&p).ok())
            .unwrap_or(Value::Null),
        bucket_expiry_days: lifecycle.ok().and_then(|l| {
            l.rules()
                .first()
                .and_then(|r| r.expiration().and_then(|e| e.days()))
        }),
        templates,
        all_templates,
        hosts,
        host_volumes,
        token_value: param_value(c, TOKEN_PARAM).await,
        token_type: params
            .parameters()
            .iter()
            .find(|p| p.name() == Some(TOKEN_PARAM))
            .and_then(|p| p.r#type().map(|t| t.as_str().to_owned())),
        user_data,
    }
}

impl Applied {
    fn subnet(&self, cidr: &str) -> &Subnet {
        self.subnets
            .iter()
            .find(|s| s.cidr_block() == Some(cidr))
            .unwrap_or_else(|| panic!("no subnet {cidr}"))
    }

    fn subnet_ids(&self, cidrs: &[&str]) -> BTreeSet<String> {
        cidrs
            .iter()
            .map(|c| self.subnet(c).subnet_id().unwrap().to_owned())
            .collect()
    }

    fn private_subnets(&self) -> BTreeSet<String> {
        self.subnet_ids(&["127.31.16.0/20", "127.31.32.0/20"])
    }

    fn group(&self, logical: &str) -> &SecurityGroup {
        self.security_groups
            .iter()
            .find(|g| g.tags().iter().any(|t| t.value() == Some(logical)))
            .unwrap_or_else(|| panic!("no security group {logical}"))
    }

    fn host(&self) -> &Instance {
        self.hosts.first().expect("a runner host")
    }

    /// The user data's cloud-config document.
    fn cloud_config(&self) -> Value {
        let body = self
            .user_data
            .strip_prefix("#cloud-config\n")
            .expect("user data starts with #cloud-config");
        serde_json::from_str(body).expect("the cloud-config is JSON")
    }
}

fn applied() -> &'static Applied {
    let l = lifecycle();
    assert!(l.apply.run.ok, "apply failed:\n{}", l.apply.run.stderr);
    &l.applied
}

#[test]
fn plan_reads_only_and_lists_every_resource() {
    let l = lifecycle();
    assert!(l.plan.run.ok, "{}", l.plan.run.stderr);
    assert!(l.plan.writes.is_empty(), "plan wrote: {:?}", l.plan.writes);
    for kind in [
        "ec2:vpc",
        "ec2:subnet",
        "ec2:internet-gateway",
        "ec2:elastic-ip",
        "ec2:nat-gateway",
        "ec2:route-table",
        "ec2:vpc-endpoint",
        "ec2:security-group",
        "s3:bucket",
        "iam:role",
        "iam:role-policy",
        "iam:instance-profile",
        "ec2:launch-template",
        "ec2:instance",
        "gitlab:runner",
    ] {
        assert!(
            l.plan.run.stdout.contains(kind),
            "plan lacks {kind}:\n{}",
            l.plan.run.stdout
        );
    }
    assert_eq!(l.runners_after_plan, 0, "plan registered a runner");
}

#[test]
fn apply_creates_each_resource_once_with_progress_lines() {
    let l = lifecycle();
    let a = applied();
    assert!(
        l.apply.run.stderr.contains("creating ec2:vpc"),
        "no progress lines"
    );
    assert_eq!(a.counts, expected_counts());
}

#[test]
fn the_network_routes_public_subnets_to_the_internet_and_private_ones_through_nat() {
    let a = applied();
    let vpc = &a.vpcs[0];
    assert_eq!(vpc.cidr_block(), Some("127.31.0.0/16"));
    let vpc_id = vpc.vpc_id().unwrap();
    for (cidr, zone) in [
        ("127.31.0.0/24", "us-east-1a"),
        ("127.31.1.0/24", "us-east-1b"),
        ("127.31.16.0/20", "us-east-1a"),
        ("127.31.32.0/20", "us-east-1b"),
    ] {
        assert_eq!(a.subnet(cidr).availability_zone(), Some(zone), "{cidr}");
    }
    let private = a.private_subnets();
    let public = a.subnet_ids(&["127.31.0.0/24", "127.31.1.0/24"]);
    let igw = &a.igws[0];
    assert_eq!(igw.attachments()[0].vpc_id(), Some(vpc_id));
    let nat = a
        .nats
        .iter()
        .find(|n| {
            n.tags()
                .iter()
                .any(|t| t.key() == Some(STACK_TAG) && t.value() == Some(STACK))
        })
        .expect("the stack's NAT gateway");
    assert!(
        public.contains(nat.subnet_id().unwrap()),
        "NAT not in a public subnet"
    );
    assert_eq!(
        nat.nat_gateway_addresses()[0].allocation_id(),
        a.addresses[0].allocation_id()
    );
    let mut private_rtbs = BTreeSet::new();
    for rt in &a.route_tables {
        let default = rt
            .routes()
            .iter()
            .find(|r| r.destination_cidr_block() == Some("0.0.0.0/0"))
            .expect("default route");
        let assoc: BTreeSet<String> = rt
            .associations()
            .iter()
            .filter_map(|a| a.subnet_id().map(str::to_owned))
            .collect();
        if default.gateway_id() == igw.internet_gateway_id() {
            assert_eq!(assoc, public, "public route table associations");
        } else {
            assert_eq!(default.nat_gateway_id(), nat.nat_gateway_id());
            assert_eq!(assoc.len(), 1);
            assert!(private.is_superset(&assoc));
            private_rtbs.insert(rt.route_table_id().unwrap().to_owned());
        }
    }
    assert_eq!(private_rtbs.len(), 2);
    let ep = &a.endpoints[0];
    assert_eq!(ep.service_name(), Some("com.amazonaws.us-east-1.s3"));
    let ep_rtbs: BTreeSet<String> = ep.route_table_ids().iter().cloned().collect();
    assert_eq!(ep_rtbs, private_rtbs);
}

#[test]
fn build_machines_admit_only_dockerd_from_the_runner_hosts() {
    let a = applied();
    let runner_sg = a.group("sg/runner-host");
    let build_sg = a.group("sg/build-machine");
    assert!(
        runner_sg.ip_permissions().is_empty(),
        "runner SG has inbound rules"
    );
    let perms = build_sg.ip_permissions();
    assert_eq!(perms.len(), 1);
    assert_eq!(
        (perms[0].from_port(), perms[0].to_port()),
        (Some(2376), Some(2376))
    );
    assert!(perms[0].ip_ranges().is_empty(), "build SG open to a CIDR");
    assert_eq!(
        perms[0].user_id_group_pairs()[0].group_id(),
        runner_sg.group_id()
    );
}

#[test]
fn roles_are_tagged_and_their_profiles_hold_exactly_them() {
    let a = applied();
    for (role, tagged, profile_roles) in &a.roles {
        assert!(tagged, "{role} not tagged");
        assert_eq!(profile_roles, std::slice::from_ref(role));
    }
}

#[test]
fn the_runner_host_policy_is_scoped_to_the_stack() {
    let a = applied();
    let p = &a.runner_policy;
    let launch = statement(p, "LaunchInstancesWithFleetTagAndImdsV2");
    assert_eq!(
        launch["Condition"]["StringEquals"]["aws:RequestTag/flotilla:fleet"],
        serde_json::json!(["life"])
    );
    assert_eq!(
        launch["Condition"]["StringEquals"]["ec2:MetadataHttpTokens"],
        "required"
    );
    assert!(launch["Resource"]
        .as_str()
        .unwrap()
        .starts_with(&format!("arn:aws:ec2:us-east-1:{ACCOUNT}:instance/")));
    let volumes = statement(p, "LaunchEncryptedVolumesWithFleetTag");
    assert_eq!(volumes["Condition"]["Bool"]["ec2:Encrypted"], "true");
    let images = statement(p, "LaunchFromConfiguredImages");
    assert_eq!(
        images["Resource"],
        serde_json::json!([format!("arn:aws:ec2:us-east-1::image/{AMI}")])
    );
    let terminate = statement(p, "TerminateOnlyOwnFleet");
    assert_eq!(
        terminate["Condition"]["StringEquals"]["ec2:ResourceTag/flotilla:fleet"],
        serde_json::json!(["life"])
    );
    let pass = statement(p, "PassOnlyBuildMachineRole");
    assert!(pass["Resource"]
        .as_str()
        .unwrap()
        .ends_with(":role/flotilla-life-build-machine"));
    let ssm_read = statement(p, "ReadOwnRunnerToken");
    assert!(ssm_read["Resource"]
        .as_str()
        .unwrap()
        .ends_with(":parameter/flotilla/life/runner-token"));
    let launch_from = statement(p, "LaunchIntoStackNetwork").to_string();
    for s in &a.private_subnets() {
        assert!(launch_from.contains(s.as_str()), "policy lacks subnet {s}");
    }
    assert_eq!(
        statement(p, "RunnerCache")["Resource"],
        "arn:aws:s3:::life-cache/*"
    );
}

#[test]
fn build_machines_hold_no_aws_rights() {
    let a = applied();
    assert!(
        a.build_policy_names.is_empty(),
        "{:?}",
        a.build_policy_names
    );
}

#[test]
fn every_s3_call_names_the_stacks_account_as_bucket_owner() {
    let l = lifecycle();
    for (what, s) in [("apply", &l.apply), ("destroy", &l.destroy)] {
        assert_eq!(
            s.s3_without_owner,
            Vec::<String>::new(),
            "{what}: S3 calls without the expected bucket owner"
        );
    }
}

#[test]
fn the_bucket_is_private_encrypted_tls_only_and_expiring() {
    let a = applied();
    assert_eq!(
        a.bucket_public_access_blocked,
        (Some(true), Some(true), Some(true), Some(true))
    );
    assert_eq!(a.bucket_sse, "AES256");
    let deny = &a.bucket_policy["Statement"][0];
    assert_eq!(deny["Effect"], "Deny");
    assert_eq!(deny["Condition"]["Bool"]["aws:SecureTransport"], "false");
    assert_eq!(a.bucket_expiry_days, Some(7));
}

#[test]
fn launch_templates_an_earlier_version_left_are_deleted_and_an_operators_template_is_not() {
    let l = lifecycle();
    let a = &l.applied;
    assert!(
        l.plan.run.stdout.contains("flotilla-life-small"),
        "the plan names the template it deletes:\n{}",
        l.plan.run.stdout
    );
    assert!(a.templates.is_empty(), "apply creates no launch template");
    assert_eq!(a.all_templates, ["operators-placement"]);
    assert!(
        l.apply
            .writes
            .iter()
            .any(|w| w.contains("DeleteLaunchTemplate")),
        "{:?}",
        l.apply.writes
    );
}

/// A launch template with one setting, tagged with `stack` when given.
async fn plant_template(c: &Clients, name: &str, stack: Option<&str>) {
    use aws_sdk_ec2::types::{RequestLaunchTemplateData, ResourceType, Tag, TagSpecification};
    let mut req = c
        .ec2
        .create_launch_template()
        .launch_template_name(name)
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .build(),
        );
    if let Some(stack) = stack {
        req = req.tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::LaunchTemplate)
                .tags(Tag::builder().key(STACK_TAG).value(stack).build())
                .build(),
        );
    }
    req.send().await.unwrap();
}

#[test]
fn the_runner_host_is_private_with_imdsv2_its_role_and_an_encrypted_volume() {
    let a = applied();
    let host = a.host();
    assert!(
        a.private_subnets().contains(host.subnet_id().unwrap()),
        "host not in a private subnet"
    );
    assert_eq!(host.public_ip_address(), None);
    assert_eq!(
        host.metadata_options()
            .and_then(|m| m.http_tokens())
            .map(|t| t.as_str()),
        Some("required")
    );
    assert!(host
        .iam_instance_profile()
        .and_then(|p| p.arn())
        .unwrap()
        .ends_with("/flotilla-life-runner-host"));
    assert_eq!(
        host.security_groups()[0].group_id(),
        a.group("sg/runner-host").group_id()
    );
    assert!(!a.host_volumes.is_empty());
    for v in &a.host_volumes {
        assert_eq!(v.encrypted(), Some(true), "{v:?}");
    }
}

#[test]
fn one_runner_is_registered_and_its_token_is_only_in_ssm() {
    let l = lifecycle();
    let a = applied();
    assert_eq!(l.runners.len(), 1, "{:?}", l.runners);
    let r = &l.runners[0];
    assert_eq!(r.description, "flotilla life");
    assert_eq!(r.tags, ["flotilla", "test"]);
    assert_eq!(r.runner_type, "instance_type");
    assert_eq!(a.token_value.as_deref(), Some(r.token.as_str()));
    assert_eq!(a.token_type.as_deref(), Some("SecureString"));
    assert!(
        a.user_data.contains(TOKEN_PARAM),
        "user data names the parameter"
    );
}

#[test]
fn the_user_data_passes_cloud_init_schema() {
    let a = applied();
    assert!(a.user_data.starts_with("#cloud-config\n"));
    let dir = tempfile::tempdir().unwrap();
    let (ok, report) = schema_check(dir.path(), "user-data.txt", &a.user_data);
    assert!(ok, "cloud-init schema rejected the user data:\n{report}");
    // The check can fail: the same document with a wrong type is rejected.
    let broken = a
        .user_data
        .replacen("\"permissions\": \"0644\"", "\"permissions\": 644", 1);
    assert_ne!(broken, a.user_data);
    let (ok, report) = schema_check(dir.path(), "broken.txt", &broken);
    assert!(!ok, "cloud-init accepted a broken document:\n{report}");
}

/// The `flotilla.toml` the user data writes, loaded with the daemon's own loader.
fn host_config(a: &Applied) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.toml");
    std::fs::write(
        &path,
        write_file_content(&a.cloud_config(), "/etc/flotilla/flotilla.toml"),
    )
    .unwrap();
    Config::load(&path).expect("the executor's loader accepts flotilla.toml")
}

#[test]
fn the_hosts_flotilla_toml_loads_and_names_the_stacks_resources() {
    let a = applied();
    let config = host_config(a);
    assert_eq!(config.fleet, "life");
    let class = &config.classes["small"];
    assert_eq!(
        class.subnets.iter().cloned().collect::<BTreeSet<_>>(),
        a.private_subnets()
    );
    assert_eq!(
        class.security_groups,
        [a.group("sg/build-machine").group_id().unwrap().to_owned()]
    );
    assert_eq!(
        class.instance_profile.as_deref(),
        Some("flotilla-life-build-machine")
    );
    assert_eq!(class.idle_count, 1);
}

#[test]
fn the_hosts_gitlab_runner_config_uses_the_custom_executor() {
    let l = lifecycle();
    let cc = applied().cloud_config();
    let runner_toml: toml::Table =
        toml::from_str(write_file_content(&cc, "/etc/gitlab-runner/config.toml.in")).unwrap();
    assert_eq!(
        runner_toml["runners"][0]["executor"].as_str(),
        Some("custom")
    );
    assert_eq!(
        runner_toml["runners"][0]["url"].as_str(),
        Some(l.gitlab_url.as_str())
    );
}

#[test]
fn a_second_apply_writes_nothing_and_plan_has_nothing_to_do() {
    let l = lifecycle();
    let again = &l.second_apply;
    assert!(again.run.ok, "{}", again.run.stderr);
    assert_eq!(again.writes, Vec::<String>::new(), "second apply wrote");
    assert!(
        again.run.stdout.contains("Nothing to apply"),
        "{}",
        again.run.stdout
    );
    assert_eq!(l.runners_after_second_apply, 1);
    assert!(
        l.plan_after.stdout.contains("nothing to do"),
        "{}",
        l.plan_after.stdout
    );
}

#[test]
fn output_prints_the_ids_and_both_config_files() {
    let l = lifecycle();
    let a = applied();
    let vpc_id = a.vpcs[0].vpc_id().unwrap();
    assert!(l.output.ok, "{}", l.output.stderr);
    assert!(l.output.stdout.contains(vpc_id));
    assert!(l.output.stdout.contains("[runners.custom]"));
    assert!(l.output.stdout.contains("default_class = \"small\""));
    let v: Value = serde_json::from_str(&l.output_json.stdout).expect("output --json is JSON");
    assert_eq!(v["vpc"], vpc_id);
    assert_eq!(
        v["runner_hosts"][0]["instance_id"],
        a.host().instance_id().unwrap()
    );
    assert_eq!(v["gitlab_runner_id"], l.runners[0].id);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.toml");
    std::fs::write(
        &path,
        v["runner_hosts"][0]["flotilla_toml"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(Config::load(&path).unwrap(), host_config(a));
}

#[test]
fn destroy_without_yes_deletes_nothing() {
    let dry = &lifecycle().dry_destroy;
    assert!(dry.run.ok, "{}", dry.run.stderr);
    assert!(dry.writes.is_empty(), "{:?}", dry.writes);
    assert!(dry.run.stdout.contains("destroy --yes"));
}

#[test]
fn destroy_leaves_nothing_tagged_with_the_stack() {
    let l = lifecycle();
    assert!(
        l.destroy.run.ok,
        "destroy failed:\n{}",
        l.destroy.run.stderr
    );
    let d = &l.destroyed;
    assert!(
        d.counts.values().all(|n| *n == 0),
        "left behind: {:?}",
        d.counts
    );
    for (name, role, profile) in &d.roles_left {
        assert!(!role, "role {name} left");
        assert!(!profile, "profile {name} left");
    }
    assert!(!d.bucket_left, "bucket left");
    assert_eq!(d.token_left, None);
    assert_eq!(d.runners_left, 0, "GitLab runner left");
}

#[test]
fn a_second_destroy_finds_nothing() {
    let again = &lifecycle().destroy_again;
    assert!(
        again.stdout.contains("Nothing to destroy"),
        "{}",
        again.stdout
    );
}

#[test]
fn nothing_printed_or_in_the_user_data_carries_a_secret() {
    let l = lifecycle();
    let texts = [
        l.plan.run.all(),
        l.apply.run.all(),
        l.applied.user_data.clone(),
        l.second_apply.run.all(),
        l.plan_after.all(),
        l.output.all(),
        l.output_json.all(),
        l.dry_destroy.run.all(),
        l.destroy.run.all(),
        l.destroy_again.all(),
    ];
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    assert_no_secrets(&texts, &l.issued_tokens);
}
