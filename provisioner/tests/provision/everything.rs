//! Every optional section in one stack (`[logs]`, `[oidc]`, `[monitoring]`,
//! `[network.vpn]`, fleet tags, a class KMS key): the sections must not fight over a
//! resource (a second apply writes nothing) and destroy leaves nothing of the stack. Also
//! where the README's call counts "with everything enabled" come from.

use crate::support::*;
use crate::{ec2_counts, stack_filter};

const STACK: &str = "every";
const CERT: &str =
    "arn:aws:acm:us-east-1:123456789012:certificate/11111111-2222-3333-4444-555555555555";

fn stack_text(gitlab: &str) -> String {
    let base = stack_toml(STACK, 63, gitlab).replace(
        "root_volume_gb = 20\n",
        "root_volume = { gb = 40, type = \"gp3\", kms_key = \"alias/ci-volumes\" }\n\
         tags = { CostCenter = \"ci\" }\n",
    );
    format!(
        "{base}\n[logs]\nretention_days = 30\n\n\
         [oidc]\nissuer = \"https://gitlab.example.com\"\naudience = \"https://gitlab.example.com\"\n\n\
         [[oidc.roles]]\nname = \"site\"\nsubjects = [\"project_path:web/site:ref_type:branch:ref:main\"]\n\
         bucket = \"example-site\"\nprefix = \"www\"\n\n\
         [monitoring]\ncidr = \"127.63.200.0/24\"\n\n\
         [network.vpn]\nclient_cidr = \"172.16.0.0/22\"\nsubnets = [\"127.63.2.0/26\", \"127.63.2.64/26\"]\n\
         server_certificate_arn = \"{CERT}\"\nclient_root_certificate_arn = \"{CERT}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_section_at_once_applies_converges_and_destroys() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).await;
    let proxy = Proxy::start(&moto.url).await;
    let gitlab = GitlabStub::start().await;
    let c = Clients::new(&moto.url).await;
    let stack = write_stack(dir.path(), "s.toml", &stack_text(&gitlab.url));

    let plan = run(&stack, &proxy.url, true, &["plan"]).await;
    assert!(plan.ok, "{}", plan.all());
    assert!(
        proxy.writes().is_empty(),
        "plan wrote: {:?}",
        proxy.writes()
    );

    proxy.reset();
    let apply = run(&stack, &proxy.url, true, &["apply"]).await;
    assert!(apply.ok, "{}", apply.all());
    println!(
        "measured: apply from scratch with everything: {} AWS calls, {} writes",
        proxy.calls().len(),
        proxy.writes().len()
    );
    for op in [
        "ec2:CreateClientVpnEndpoint",
        "iam:CreateOpenIDConnectProvider",
        "logs:CreateLogGroup",
    ] {
        assert!(
            proxy.writes().iter().any(|w| w == op),
            "apply did not {op}: {:?}",
            proxy.writes()
        );
    }

    proxy.reset();
    let again = run(&stack, &proxy.url, true, &["apply"]).await;
    assert!(again.ok, "{}", again.all());
    println!(
        "measured: no-op apply with everything: {} AWS calls, {} writes",
        proxy.calls().len(),
        proxy.writes().len()
    );
    assert!(
        proxy.writes().is_empty(),
        "the sections fight: a second apply wrote {:?}",
        proxy.writes()
    );

    proxy.reset();
    let destroy = run(&stack, &proxy.url, true, &["destroy", "--yes"]).await;
    assert!(destroy.ok, "{}", destroy.all());
    println!(
        "measured: destroy with everything: {} AWS calls, {} writes",
        proxy.calls().len(),
        proxy.writes().len()
    );
    let left = ec2_counts(&c, STACK).await;
    assert!(left.values().all(|n| *n == 0), "left behind: {left:?}");
    let endpoints = c.ec2.describe_client_vpn_endpoints().send().await.unwrap();
    assert!(
        endpoints.client_vpn_endpoints().iter().all(|e| e
            .status()
            .and_then(|s| s.code())
            .map(|c| c.as_str())
            == Some("deleted")),
        "{endpoints:?}"
    );
    let providers = c.iam.list_open_id_connect_providers().send().await.unwrap();
    assert!(
        providers.open_id_connect_provider_list().is_empty(),
        "{providers:?}"
    );
    let vpcs = c
        .ec2
        .describe_vpcs()
        .filters(stack_filter(STACK))
        .send()
        .await
        .unwrap();
    assert!(vpcs.vpcs().is_empty(), "{vpcs:?}");
}
