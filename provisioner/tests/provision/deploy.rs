//! `[oidc]` and `[monitoring]` against moto: apply creates the OIDC provider, the deploy
//! role (trust policy pinned to the subjects, policy on one prefix) and the metrics
//! ingress; a second apply writes nothing; drift is put back; a token is exchanged for
//! credentials through the real STS client; `output` prints the targets and roles;
//! destroy removes them. moto verifies neither the token nor the trust conditions, so
//! the trust document itself is asserted.

use std::collections::BTreeSet;

use aws_sdk_ec2::types::{IpPermission, IpRange};
use serde_json::{json, Value};

use crate::support::*;
use crate::{role_policy, stack_filter};

const ROLE: &str = "flotilla-dep-deploy-site";
const SUBJECT: &str = "project_path:web/site:ref_type:branch:ref:main";

async fn trust(c: &Clients) -> Value {
    let doc = c
        .iam
        .get_role()
        .role_name(ROLE)
        .send()
        .await
        .unwrap()
        .role()
        .unwrap()
        .assume_role_policy_document()
        .unwrap()
        .to_owned();
    serde_json::from_str(&doc).unwrap_or_else(|_| {
        let d = percent_encoding::percent_decode_str(&doc).decode_utf8_lossy();
        serde_json::from_str(&d).unwrap()
    })
}

async fn metrics_rules(c: &Clients) -> BTreeSet<(i32, String)> {
    let sgs = c
        .ec2
        .describe_security_groups()
        .filters(stack_filter("dep"))
        .send()
        .await
        .unwrap();
    let runner = sgs
        .security_groups()
        .iter()
        .find(|g| g.tags().iter().any(|t| t.value() == Some("sg/runner-host")))
        .unwrap();
    runner
        .ip_permissions()
        .iter()
        .flat_map(|p| {
            p.ip_ranges().iter().map(|r| {
                (
                    p.from_port().unwrap_or(-1),
                    r.cidr_ip().unwrap_or_default().to_owned(),
                )
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_deploy_roles_and_monitoring_converge_and_are_destroyed() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).await;
    let proxy = Proxy::start(&moto.url).await;
    let gitlab = GitlabStub::start().await;
    let c = Clients::new(&moto.url).await;
    let text = format!(
        "{}\n[oidc]\nissuer = \"https://gitlab.example.com\"\naudience = \"https://gitlab.example.com\"\n\n\
         [[oidc.roles]]\nname = \"site\"\nsubjects = [\"{SUBJECT}\"]\nbucket = \"example-site\"\nprefix = \"www\"\n\n\
         [monitoring]\ncidr = \"10.9.0.0/16\"\n",
        stack_toml("dep", 91, &gitlab.url)
    );
    let stack = write_stack(dir.path(), "s.toml", &text);

    proxy.reset();
    let apply = run(&stack, &proxy.url, true, &["apply"]).await;
    assert!(apply.ok, "{}", apply.all());
    println!(
        "measured: apply from scratch with [oidc] and [monitoring]: {} AWS calls, {} writes",
        proxy.calls().len(),
        proxy.writes().len()
    );
    let provider = "arn:aws:iam::123456789012:oidc-provider/gitlab.example.com";
    let p = c
        .iam
        .get_open_id_connect_provider()
        .open_id_connect_provider_arn(provider)
        .send()
        .await
        .unwrap();
    assert_eq!(p.client_id_list(), ["https://gitlab.example.com"]);
    assert!(p
        .tags()
        .iter()
        .any(|t| t.key() == "flotilla:stack" && t.value() == "dep"));
    let t = trust(&c).await;
    assert_eq!(t["Statement"][0]["Principal"]["Federated"], provider);
    assert_eq!(t["Statement"][0]["Action"], "sts:AssumeRoleWithWebIdentity");
    assert_eq!(
        t["Statement"][0]["Condition"],
        json!({
            "StringEquals": { "gitlab.example.com:aud": "https://gitlab.example.com" },
            "StringLike": { "gitlab.example.com:sub": [SUBJECT] }
        })
    );
    let policy = role_policy(&c, ROLE).await;
    assert_eq!(
        policy["Statement"][0]["Resource"],
        "arn:aws:s3:::example-site/www/*"
    );
    let want: BTreeSet<(i32, String)> = [
        (9252, "10.9.0.0/16".to_string()),
        (9402, "10.9.0.0/16".to_string()),
    ]
    .into();
    assert_eq!(metrics_rules(&c).await, want);

    proxy.reset();
    let again = run(&stack, &proxy.url, true, &["apply"]).await;
    assert!(again.ok, "{}", again.all());
    assert!(proxy.writes().is_empty(), "{:?}", proxy.writes());
    println!(
        "measured: no-op apply with [oidc] and [monitoring]: {} AWS calls, 0 writes",
        proxy.calls().len()
    );

    // Someone lets every project in, drops the role's policy and a metrics rule.
    let open = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": { "Federated": provider },
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": { "StringLike": { "gitlab.example.com:sub": "*" } }
        }]
    });
    c.iam
        .update_assume_role_policy()
        .role_name(ROLE)
        .policy_document(open.to_string())
        .send()
        .await
        .unwrap();
    c.iam
        .delete_role_policy()
        .role_name(ROLE)
        .policy_name("flotilla")
        .send()
        .await
        .unwrap();
    let sg = c
        .ec2
        .describe_security_groups()
        .filters(stack_filter("dep"))
        .send()
        .await
        .unwrap()
        .security_groups()
        .iter()
        .find(|g| g.tags().iter().any(|t| t.value() == Some("sg/runner-host")))
        .and_then(|g| g.group_id().map(str::to_owned))
        .unwrap();
    c.ec2
        .revoke_security_group_ingress()
        .group_id(&sg)
        .ip_permissions(
            IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(9402)
                .to_port(9402)
                .ip_ranges(IpRange::builder().cidr_ip("10.9.0.0/16").build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    let plan = run(&stack, &proxy.url, true, &["plan"]).await;
    assert!(plan.stdout.contains("trust policy"), "{}", plan.stdout);
    assert!(
        plan.stdout
            .contains("allow tcp 9402-9402 from cidr:10.9.0.0/16"),
        "{}",
        plan.stdout
    );
    assert!(run(&stack, &proxy.url, true, &["apply"]).await.ok);
    assert_eq!(
        trust(&c).await["Statement"][0]["Condition"]["StringLike"]["gitlab.example.com:sub"],
        json!([SUBJECT])
    );
    assert_eq!(
        role_policy(&c, ROLE).await["Statement"][0]["Resource"],
        "arn:aws:s3:::example-site/www/*"
    );
    assert_eq!(metrics_rules(&c).await, want);

    // Audience drift: someone adds an audience by hand, and the stack's changes. Apply
    // leaves the provider with exactly the stack's (one add, one remove, no re-create),
    // and the trust policy follows.
    c.iam
        .add_client_id_to_open_id_connect_provider()
        .open_id_connect_provider_arn(provider)
        .client_id("sts.amazonaws.com")
        .send()
        .await
        .unwrap();
    let moved = text.replace(
        "audience = \"https://gitlab.example.com\"",
        "audience = \"https://deploy.example.com\"",
    );
    assert_ne!(moved, text);
    let moved_stack = write_stack(dir.path(), "moved.toml", &moved);
    let plan = run(&moved_stack, &proxy.url, true, &["plan"]).await;
    assert!(
        plan.stdout
            .contains("add audience https://deploy.example.com")
            && plan.stdout.contains("remove audience sts.amazonaws.com")
            && plan
                .stdout
                .contains("remove audience https://gitlab.example.com"),
        "{}",
        plan.stdout
    );
    proxy.reset();
    assert!(run(&moved_stack, &proxy.url, true, &["apply"]).await.ok);
    let writes = proxy.writes();
    assert!(
        !writes
            .iter()
            .any(|w| w.contains("CreateOpenIDConnectProvider")
                || w.contains("DeleteOpenIDConnectProvider")),
        "{writes:?}"
    );
    let audiences = c
        .iam
        .get_open_id_connect_provider()
        .open_id_connect_provider_arn(provider)
        .send()
        .await
        .unwrap()
        .client_id_list()
        .to_vec();
    assert_eq!(audiences, vec!["https://deploy.example.com".to_string()]);
    assert_eq!(
        trust(&c).await["Statement"][0]["Condition"]["StringEquals"]["gitlab.example.com:aud"],
        "https://deploy.example.com"
    );
    assert!(run(&stack, &proxy.url, true, &["apply"]).await.ok);

    // A job's token for the role, through the real STS client (moto checks neither
    // signature nor conditions).
    let creds = aws_sdk_sts::config::Credentials::new("AKIDCHECK", "check", None, None, "t");
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&moto.url)
        .region(aws_config::Region::new(REGION))
        .credentials_provider(creds)
        .load()
        .await;
    let sts = aws_sdk_sts::Client::new(&conf);
    let role_arn = format!("arn:aws:iam::{ACCOUNT}:role/flotilla-deploy/dep/{ROLE}");
    let assumed = sts
        .assume_role_with_web_identity()
        .role_arn(&role_arn)
        .role_session_name("job-1")
        .web_identity_token("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJwcm9qZWN0X3BhdGg6d2ViL3NpdGUifQ.sig")
        .send()
        .await
        .unwrap();
    assert!(assumed.credentials().is_some());

    let output = run(&stack, &proxy.url, true, &["output"]).await;
    assert!(output.ok, "{}", output.all());
    assert!(
        output
            .stdout
            .contains(&format!("deploy_role              site {role_arn}")),
        "{}",
        output.stdout
    );
    let targets: Vec<&str> = output
        .stdout
        .lines()
        .filter(|l| l.starts_with("scrape_target"))
        .collect();
    assert_eq!(targets.len(), 2, "{}", output.stdout);
    assert!(targets[0].contains("flotilla host/0 127.91.") && targets[0].ends_with(":9402"));
    assert!(targets[1].contains("gitlab-runner host/0") && targets[1].ends_with(":9252"));
    let json_out = run(&stack, &proxy.url, true, &["output", "--json"]).await;
    let v: Value = serde_json::from_str(&json_out.stdout).unwrap();
    assert_eq!(v["scrape_targets"].as_array().unwrap().len(), 2);
    assert_eq!(v["deploy"]["roles"]["site"], role_arn);

    proxy.reset();
    let destroy = run(&stack, &proxy.url, true, &["destroy", "--yes"]).await;
    assert!(destroy.ok, "{}", destroy.all());
    println!(
        "measured: destroy with [oidc] and [monitoring]: {} AWS calls, {} writes",
        proxy.calls().len(),
        proxy.writes().len()
    );
    assert!(c.iam.get_role().role_name(ROLE).send().await.is_err());
    assert!(c
        .iam
        .list_open_id_connect_providers()
        .send()
        .await
        .unwrap()
        .open_id_connect_provider_list()
        .is_empty());
}
