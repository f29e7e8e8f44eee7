//! `[logs]`: the stack's CloudWatch Logs group through plan, apply, a drifted
//! retention, a no-op apply and destroy, against moto's Logs; a group of the stack's
//! name that is not tagged as the stack's is neither adopted nor deleted.

use std::collections::HashMap;

use flotilla_proto::config::Config;
use serde_json::Value;

use crate::support::*;
use crate::{live_instances, user_data, write_file_content, STACK_TAG};

const GROUP: &str = "/flotilla/logs";

async fn logs_client(moto: &str) -> aws_sdk_cloudwatchlogs::Client {
    let creds =
        aws_sdk_cloudwatchlogs::config::Credentials::new("AKIDCHECK", "check", None, None, "t");
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(moto)
        .region(aws_config::Region::new(REGION))
        .credentials_provider(creds)
        .load()
        .await;
    aws_sdk_cloudwatchlogs::Client::new(&conf)
}

/// The group as moto holds it: (retention, tags), or `None`.
async fn group(
    logs: &aws_sdk_cloudwatchlogs::Client,
) -> Option<(Option<i32>, HashMap<String, String>)> {
    let out = logs
        .describe_log_groups()
        .log_group_name_prefix(GROUP)
        .send()
        .await
        .unwrap();
    let g = out
        .log_groups()
        .iter()
        .find(|g| g.log_group_name() == Some(GROUP))?;
    let arn = format!("arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{GROUP}");
    let tags = logs
        .list_tags_for_resource()
        .resource_arn(arn)
        .send()
        .await
        .unwrap()
        .tags()
        .cloned()
        .unwrap_or_default();
    Some((g.retention_in_days(), tags))
}

fn logs_ops(writes: &[String]) -> Vec<&str> {
    writes
        .iter()
        .map(String::as_str)
        .filter(|w| w.starts_with("logs:"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_group_is_tagged_kept_at_its_retention_and_destroyed_only_when_ours() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).await;
    let proxy = Proxy::start(&moto.url).await;
    let gitlab = GitlabStub::start().await;
    let c = Clients::new(&moto.url).await;
    let logs = logs_client(&moto.url).await;
    let text = format!(
        "{}\n[logs]\nretention_days = 14\n",
        stack_toml("logs", 72, &gitlab.url)
    );
    let stack = write_stack(dir.path(), "s.toml", &text);

    // Plan names the group and creates nothing.
    let plan = run(&stack, &proxy.url, true, &["plan"]).await;
    assert!(plan.ok, "{}", plan.all());
    assert!(plan.stdout.contains("+ logs:log-group"), "{}", plan.stdout);
    assert!(plan.stdout.contains(GROUP), "{}", plan.stdout);
    assert!(group(&logs).await.is_none());

    // Apply: created with the stack's tags in the call, then its retention.
    proxy.reset();
    let apply = run(&stack, &proxy.url, true, &["apply"]).await;
    assert!(apply.ok, "{}", apply.all());
    let writes = proxy.writes();
    println!(
        "measured: apply from scratch with [logs]: {} AWS calls, {} writes",
        proxy.calls().len(),
        writes.len()
    );
    assert_eq!(
        logs_ops(&writes),
        ["logs:CreateLogGroup", "logs:PutRetentionPolicy"]
    );
    let create = proxy
        .calls()
        .into_iter()
        .find(|c| c.op == "logs:CreateLogGroup")
        .unwrap();
    assert!(
        create.body.contains(STACK_TAG),
        "tags in the create call: {}",
        create.body
    );
    let (retention, tags) = group(&logs).await.expect("the group exists");
    assert_eq!(retention, Some(14));
    assert_eq!(tags.get(STACK_TAG).map(String::as_str), Some("logs"));

    // The hosts' daemon saves machine reports to that group; the host role may write
    // to it, the build machines only to their own streams.
    let host = live_instances(&c, "logs").await;
    let ud = user_data(&c, host[0].instance_id().unwrap()).await;
    let cloud: Value = serde_json::from_str(ud.strip_prefix("#cloud-config\n").unwrap()).unwrap();
    let toml_path = dir.path().join("flotilla.toml");
    std::fs::write(
        &toml_path,
        write_file_content(&cloud, "/etc/flotilla/flotilla.toml"),
    )
    .unwrap();
    let config = Config::load(&toml_path).unwrap();
    assert_eq!(config.logs.group.as_deref(), Some(GROUP));
    let runner_policy = crate::role_policy(&c, "flotilla-logs-runner-host").await;
    let text = runner_policy.to_string();
    assert!(text.contains(&format!("log-group:{GROUP}:*")), "{text}");
    let build_policy = crate::role_policy(&c, "flotilla-logs-build-machine").await;
    assert!(
        build_policy
            .to_string()
            .contains(&format!("log-group:{GROUP}:log-stream:build-machines/*")),
        "{build_policy}"
    );

    // Someone shortens the retention: plan says so, apply puts it back with one call.
    logs.put_retention_policy()
        .log_group_name(GROUP)
        .retention_in_days(3)
        .send()
        .await
        .unwrap();
    let plan = run(&stack, &proxy.url, true, &["plan"]).await;
    assert!(
        plan.stdout.contains("~ logs:log-group") && plan.stdout.contains("3 days -> 14 days"),
        "{}",
        plan.stdout
    );
    proxy.reset();
    assert!(run(&stack, &proxy.url, true, &["apply"]).await.ok);
    assert_eq!(proxy.writes(), ["logs:PutRetentionPolicy"]);
    assert_eq!(group(&logs).await.unwrap().0, Some(14));

    // A second apply writes nothing.
    proxy.reset();
    let again = run(&stack, &proxy.url, true, &["apply"]).await;
    assert!(again.ok, "{}", again.all());
    println!(
        "measured: no-op apply with [logs]: {} AWS calls, {} writes",
        proxy.calls().len(),
        proxy.writes().len()
    );
    assert!(proxy.writes().is_empty(), "{:?}", proxy.writes());

    // Without the stack's tag the group is not the stack's: destroy leaves it (and says
    // so), and apply refuses to adopt it.
    let arn = format!("arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{GROUP}");
    logs.untag_resource()
        .resource_arn(&arn)
        .tag_keys(STACK_TAG)
        .send()
        .await
        .unwrap();
    let plan = run(&stack, &proxy.url, true, &["plan"]).await;
    assert!(!plan.ok, "an untagged group is not adopted");
    assert!(
        plan.stderr.contains(GROUP) && plan.stderr.contains("not tagged"),
        "{}",
        plan.stderr
    );
    proxy.reset();
    let destroy = run(&stack, &proxy.url, true, &["destroy", "--yes"]).await;
    assert!(destroy.ok, "{}", destroy.all());
    println!(
        "measured: destroy with [logs]: {} AWS calls, {} writes",
        proxy.calls().len(),
        proxy.writes().len()
    );
    assert!(logs_ops(&proxy.writes()).is_empty(), "{:?}", proxy.writes());
    assert!(
        destroy.stdout.contains("not tagged as the stack's"),
        "{}",
        destroy.stdout
    );
    assert!(group(&logs).await.is_some(), "left alone");

    // Tagged again, it is the stack's: destroy deletes it.
    logs.tag_resource()
        .resource_arn(&arn)
        .tags(STACK_TAG, "logs")
        .send()
        .await
        .unwrap();
    proxy.reset();
    assert!(
        run(&stack, &proxy.url, true, &["destroy", "--yes"])
            .await
            .ok
    );
    assert_eq!(logs_ops(&proxy.writes()), ["logs:DeleteLogGroup"]);
    assert!(group(&logs).await.is_none());
}
