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

    // The host ships its journal with the program and configuration in its user data.
    ship_host_journal(dir.path(), &cloud, &proxy, &logs).await;

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

/// A stand-in for `journalctl --output=json`: prints the entries of `$FAKE_JOURNAL` (JSON
/// lines) after the one `--after-cursor` names, and records its arguments.
const FAKE_JOURNALCTL: &str = r#"import json, os, sys
with open(os.environ["FAKE_JOURNAL"] + ".argv", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
after = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--after-cursor=")), None)
lines = open(os.environ["FAKE_JOURNAL"]).read().splitlines()
if after:
    cursors = [json.loads(l)["__CURSOR"] for l in lines]
    lines = lines[cursors.index(after) + 1:]
for l in lines:
    print(l, flush=True)
"#;

/// A minute ago, in microseconds since the epoch (journald's clock).
fn started_us() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    u64::try_from(now.as_micros()).unwrap() - 60_000_000
}

fn journal_entry(n: u32, unit: &str, message: Value) -> String {
    serde_json::json!({
        "__CURSOR": format!("s=1;i={n}"),
        // Recent: CloudWatch rejects events older than 14 days.
        "__REALTIME_TIMESTAMP": format!("{}", started_us() + u64::from(n) * 1_000_000),
        "_SYSTEMD_UNIT": unit,
        "MESSAGE": message,
    })
    .to_string()
}

async fn stream_messages(logs: &aws_sdk_cloudwatchlogs::Client, stream: &str) -> Vec<String> {
    logs.get_log_events()
        .log_group_name(GROUP)
        .log_stream_name(stream)
        .start_from_head(true)
        .send()
        .await
        .unwrap()
        .events()
        .iter()
        .filter_map(|e| e.message().map(str::to_owned))
        .collect()
}

/// Runs the host's journal shipper (from its user data) twice against moto with a
/// stand-in journal: every entry arrives once, in order, in the host's own stream, and
/// the second run resumes after the first's cursor. Its SigV4 signature is checked
/// against botocore's.
async fn ship_host_journal(
    dir: &std::path::Path,
    cloud: &Value,
    proxy: &Proxy,
    logs: &aws_sdk_cloudwatchlogs::Client,
) {
    use flotilla_proto::cloud_files::WriteFile;
    use flotilla_proto::journal::{self, ShipperConfig};
    let files: Vec<WriteFile> = serde_json::from_value(cloud["write_files"].clone()).unwrap();
    let program = files
        .iter()
        .find(|f| f.path == journal::SHIPPER_PATH)
        .expect("the host's user data writes the journal shipper");
    let shipper = dir.join("journal-shipper.py");
    std::fs::write(&shipper, program.bytes().unwrap()).unwrap();
    let mut config: ShipperConfig =
        serde_json::from_str(write_file_content(cloud, journal::CONFIG_PATH)).unwrap();
    assert_eq!(config.group, GROUP);
    assert!(config.units.iter().any(|u| u == "gitlab-runner.service"));
    assert!(config.units.iter().any(|u| u == "flotilla.service"));
    let unit = write_file_content(cloud, journal::UNIT_PATH);
    assert!(unit.contains(journal::SHIPPER_PATH), "{unit}");
    assert!(
        cloud["runcmd"].to_string().contains(journal::UNIT_NAME),
        "{}",
        cloud["runcmd"]
    );

    // What IMDS gives on a real host, and the stand-in journal.
    config.region = Some(REGION.to_owned());
    config.instance_id = Some("i-0123456789abcdef0".to_owned());
    config.endpoint_url = Some(proxy.url.clone());
    config.follow = false;
    config.cursor_file = dir.join("journal.cursor").display().to_string();
    let fake = dir.join("journalctl");
    std::fs::write(&fake, format!("#!/usr/bin/env python3\n{FAKE_JOURNALCTL}")).unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    config.journalctl = Some(fake.display().to_string());
    let config_path = dir.join("journal.json");
    std::fs::write(&config_path, config.to_json()).unwrap();
    let journal_path = dir.join("journal.jsonl");
    let not_utf8 = Value::from(vec![0x68, 0x69, 0xff]);
    let mut entries = vec![
        journal_entry(1, "cloud-final.service", "flotilla installed".into()),
        journal_entry(
            2,
            "gitlab-runner.service",
            "Checking for jobs... received".into(),
        ),
        journal_entry(3, "flotilla.service", not_utf8),
    ];
    std::fs::write(&journal_path, entries.join("\n") + "\n").unwrap();
    let ship = || {
        let out = std::process::Command::new("python3")
            .arg(&shipper)
            .arg(&config_path)
            .env("FAKE_JOURNAL", &journal_path)
            .env("AWS_ACCESS_KEY_ID", "AKIDHOST")
            .env("AWS_SECRET_ACCESS_KEY", "host-secret")
            .env("AWS_SESSION_TOKEN", "host-session")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "shipper: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    proxy.reset();
    ship();
    let stream = "hosts/i-0123456789abcdef0";
    assert_eq!(
        stream_messages(logs, stream).await,
        [
            "cloud-final.service: flotilla installed",
            "gitlab-runner.service: Checking for jobs... received",
            "flotilla.service: hi\u{fffd}",
        ]
    );
    assert_eq!(
        proxy.writes(),
        ["logs:CreateLogStream", "logs:PutLogEvents"],
        "one batch"
    );

    // New entries: the next run resumes after the cursor, sending only those.
    entries.push(journal_entry(
        4,
        "gitlab-runner.service",
        "Job succeeded".into(),
    ));
    std::fs::write(&journal_path, entries.join("\n") + "\n").unwrap();
    ship();
    let all = stream_messages(logs, stream).await;
    assert_eq!(all.len(), 4, "{all:?}");
    assert_eq!(all[3], "gitlab-runner.service: Job succeeded");
    let argv = std::fs::read_to_string(journal_path.with_extension("jsonl.argv")).unwrap();
    let runs: Vec<Vec<String>> = argv
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(runs[0].contains(&"--boot".to_owned()), "{runs:?}");
    assert!(
        runs[1].contains(&"--after-cursor=s=1;i=3".to_owned()),
        "{runs:?}"
    );
    for unit in &config.units {
        assert!(runs[0].contains(&format!("--unit={unit}")), "{runs:?}");
    }

    // Its signature is the one botocore computes for the same request.
    let check = format!(
        r#"import datetime, importlib.util, sys
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
spec = importlib.util.spec_from_file_location("shipper", sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
body = b'{{"logGroupName": "/g"}}'
hdrs = {{"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "Logs_20140328.PutLogEvents"}}
url = "https://logs.{REGION}.amazonaws.com/"
for token in (None, "tok"):
    req = AWSRequest(method="POST", url=url, data=body, headers=dict(hdrs))
    SigV4Auth(Credentials("AKID", "secret", token), "logs", "{REGION}").add_auth(req)
    now = datetime.datetime.strptime(req.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    ours = m.sign("POST", url, hdrs, body, "AKID", "secret", token, "{REGION}", "logs", now)
    assert ours["Authorization"] == req.headers["Authorization"], (ours["Authorization"], req.headers["Authorization"])
print("same")
"#
    );
    let venv = std::env::var_os("FLOTILLA_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("/root/.cache/flotilla/venv"));
    let out = std::process::Command::new(venv.join("bin/python3"))
        .arg("-c")
        .arg(check)
        .arg(&shipper)
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "same",
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
