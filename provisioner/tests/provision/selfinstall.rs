//! The stack installs its own binary: apply uploads `flotilla` to the stack's bucket
//! under a content-addressed key, the hosts install it from there (checking its sum),
//! and a new binary is rolled out one host at a time, each old host drained over SSM
//! Run Command before it is terminated.

use serde_json::Value;

use super::support::*;
use super::{live_instances, role_policy, schema_check, statement, user_data, write_file_content};

fn tag<'a>(i: &'a aws_sdk_ec2::types::Instance, key: &str) -> Option<&'a str> {
    i.tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// Instance id of each host (`host/0`, ...), sorted by host.
async fn hosts(c: &Clients, stack: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = live_instances(c, stack)
        .await
        .iter()
        .map(|i| {
            (
                tag(i, "flotilla:resource").unwrap_or_default().to_owned(),
                i.instance_id().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

/// What a rollout did, in order: launches, Run Command (drain or readiness check, to
/// which instance), terminations; read from the requests the proxy saw.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Launch,
    Ready(String),
    Drain(String),
    Terminate(Vec<String>),
}

fn events(proxy: &Proxy) -> Vec<Event> {
    proxy
        .calls()
        .into_iter()
        .filter_map(|c| match c.op.as_str() {
            "ec2:RunInstances" => Some(Event::Launch),
            "ec2:TerminateInstances" => Some(Event::Terminate(
                c.body
                    .split('&')
                    .filter(|kv| kv.starts_with("InstanceId."))
                    .filter_map(|kv| kv.split('=').nth(1))
                    .map(str::to_owned)
                    .collect(),
            )),
            "ssm:SendCommand" => {
                let v: Value = serde_json::from_str(&c.body).expect("SendCommand is JSON");
                let instance = v["InstanceIds"][0].as_str().unwrap().to_owned();
                let script = v["Parameters"]["commands"].to_string();
                Some(if script.contains("drain --wait") {
                    Event::Drain(instance)
                } else {
                    Event::Ready(instance)
                })
            }
            _ => None,
        })
        .collect()
}

/// The SendCommand requests the proxy saw, as JSON.
fn send_commands(proxy: &Proxy) -> Vec<Value> {
    proxy
        .calls()
        .into_iter()
        .filter(|c| c.op == "ssm:SendCommand")
        .map(|c| serde_json::from_str(&c.body).unwrap())
        .collect()
}

fn s3_puts(proxy: &Proxy) -> Vec<String> {
    proxy
        .writes()
        .into_iter()
        .filter(|op| op.starts_with("s3:PUT /") && op.contains("/flotilla/bin/"))
        .collect()
}

/// The bucket holds the binary under its content-addressed key, with its checksum and
/// the stack's tags; the host's user data installs exactly that object with that sum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_uploads_the_binary_and_the_hosts_install_it_from_the_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).await;
    let proxy = Proxy::start(&moto.url).await;
    let gitlab = GitlabStub::start().await;
    let c = Clients::new(&moto.url).await;
    let stack = write_stack(
        dir.path(),
        "s.toml",
        &self_install_stack_toml("own", 32, &gitlab.url),
    );
    let (bin, sum) = fake_flotilla(dir.path(), "flotilla", "x86_64", "1");
    let bin_arg = bin.to_str().unwrap();
    let key = format!("flotilla/bin/{sum}/flotilla");

    // A binary for another architecture than the hosts' AMI is refused before any write.
    let (arm, _) = fake_flotilla(dir.path(), "flotilla-arm64", "arm64", "1");
    let refused = run(
        &stack,
        &proxy.url,
        true,
        &["--flotilla-bin", arm.to_str().unwrap(), "apply"],
    )
    .await;
    assert!(!refused.ok);
    assert!(
        refused.stderr.contains("built for arm64") && refused.stderr.contains("x86_64"),
        "{}",
        refused.stderr
    );
    assert!(proxy.writes().is_empty(), "{:?}", proxy.writes());

    // plan shows the upload and makes none.
    proxy.reset();
    let plan = run(
        &stack,
        &proxy.url,
        true,
        &["--flotilla-bin", bin_arg, "plan"],
    )
    .await;
    assert!(plan.ok, "{}", plan.stderr);
    assert!(
        plan.stdout
            .contains(&format!("+ s3:object                s3://own-cache/{key}")),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout.contains(&format!("sha256 {sum}")),
        "{}",
        plan.stdout
    );
    assert!(
        proxy.writes().is_empty(),
        "plan wrote: {:?}",
        proxy.writes()
    );

    // apply uploads it once, with the expected bucket owner, tagged as the stack's.
    proxy.reset();
    let apply = run(
        &stack,
        &proxy.url,
        true,
        &["apply", "--flotilla-bin", bin_arg],
    )
    .await;
    assert!(apply.ok, "{}", apply.stderr);
    println!(
        "measured: apply from scratch, binary uploaded: {} AWS calls, {} writes",
        proxy.calls().len(),
        proxy.writes().len()
    );
    assert_eq!(
        s3_puts(&proxy),
        [format!("s3:PUT /own-cache/{key}?x-id")],
        "{:?}",
        proxy.writes()
    );
    assert_eq!(
        proxy.s3_calls_without_owner(ACCOUNT),
        Vec::<String>::new(),
        "S3 calls without the expected bucket owner"
    );
    let head =
        c.s3.head_object()
            .bucket("own-cache")
            .key(&key)
            .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
            .send()
            .await
            .expect("the binary is in the bucket under its content-addressed key");
    use base64::Engine;
    assert_eq!(
        head.checksum_sha256(),
        Some(
            base64::engine::general_purpose::STANDARD
                .encode(hex::decode(&sum).unwrap())
                .as_str()
        )
    );
    let got =
        c.s3.get_object()
            .bucket("own-cache")
            .key(&key)
            .send()
            .await
            .unwrap()
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes();
    assert_eq!(got.as_ref(), std::fs::read(&bin).unwrap().as_slice());
    let tags =
        c.s3.get_object_tagging()
            .bucket("own-cache")
            .key(&key)
            .send()
            .await
            .unwrap();
    let tags: Vec<(&str, &str)> = tags
        .tag_set()
        .iter()
        .map(|t| (t.key(), t.value()))
        .collect();
    assert!(tags.contains(&("flotilla:stack", "own")), "{tags:?}");
    assert!(
        tags.contains(&("flotilla:resource", "flotilla-bin")),
        "{tags:?}"
    );

    // The host installs that object, checks that sum, and carries it as a tag; the user
    // data still passes Debian's cloud-init schema.
    let host = &live_instances(&c, "own").await[0];
    assert_eq!(tag(host, "flotilla:binary-sha256"), Some(sum.as_str()));
    let ud = user_data(&c, host.instance_id().unwrap()).await;
    let cc: Value = serde_json::from_str(ud.strip_prefix("#cloud-config\n").unwrap()).unwrap();
    let install = write_file_content(&cc, "/usr/local/sbin/flotilla-install");
    assert!(
        install.contains(&format!(
            "fetch_s3 's3://own-cache/{key}' /usr/local/bin/flotilla '{sum}'"
        )),
        "{install}"
    );
    assert!(
        install.contains("aws s3 cp --region 'us-east-1'"),
        "{install}"
    );
    assert!(install.contains("sha256sum -c -"), "{install}");
    assert!(!install.contains("downloads.example.com"), "{install}");
    let (ok, report) = schema_check(dir.path(), "own-user-data.txt", &ud);
    assert!(ok, "cloud-init schema rejected the user data:\n{report}");

    // The host role reads exactly the binaries' prefix (and runs the SSM agent, not
    // with the managed policy: no GetParameter on every parameter).
    let policy = role_policy(&c, "flotilla-own-runner-host").await;
    let read = statement(&policy, "InstallFlotillaFromBucket");
    assert_eq!(read["Action"], "s3:GetObject");
    assert_eq!(read["Resource"], "arn:aws:s3:::own-cache/flotilla/bin/*");
    let register = statement(&policy, "SsmAgentRegisters");
    assert_eq!(register["Action"], "ssm:UpdateInstanceInformation");
    assert!(statement(&policy, "SsmAgentRunCommand")["Action"]
        .as_array()
        .unwrap()
        .contains(&Value::from("ec2messages:GetMessages")));
    assert!(!policy.to_string().contains("ssm:GetParameters"));
    let attached = c
        .iam
        .list_attached_role_policies()
        .role_name("flotilla-own-runner-host")
        .send()
        .await
        .unwrap();
    assert!(attached.attached_policies().is_empty());

    // The same binary again: nothing uploaded, nothing replaced, nothing written.
    proxy.reset();
    let again = run(
        &stack,
        &proxy.url,
        true,
        &["apply", "--flotilla-bin", bin_arg],
    )
    .await;
    assert!(again.ok, "{}", again.stderr);
    assert_eq!(proxy.writes(), Vec::<String>::new());
    println!(
        "measured: no-op apply, binary in the bucket: {} AWS calls, 0 writes",
        proxy.calls().len()
    );
    assert!(
        again.stdout.contains("Nothing to apply"),
        "{}",
        again.stdout
    );
    assert!(
        again
            .stdout
            .contains(&format!("already at s3://own-cache/{key}: unchanged")),
        "{}",
        again.stdout
    );

    // output names where the hosts get flotilla from.
    let out = run(
        &stack,
        &proxy.url,
        true,
        &["output", "--json", "--flotilla-bin", bin_arg],
    )
    .await;
    let v: Value = serde_json::from_str(&out.stdout).expect("output --json is JSON");
    assert_eq!(v["flotilla_binary"], format!("s3://own-cache/{key}"));
    assert_eq!(v["flotilla_sha256"], sum.as_str());

    // destroy deletes the bucket with the binary in it.
    let destroy = run(&stack, &proxy.url, true, &["destroy", "--yes"]).await;
    assert!(destroy.ok, "{}", destroy.stderr);
    assert!(c.s3.head_bucket().bucket("own-cache").send().await.is_err());
}

/// A new binary replaces the hosts one at a time: for each, the new instance is
/// launched, found running and ready, then the old one drained (over SSM) and only then
/// terminated, before the next host is touched. A drain that fails leaves the old host
/// running and the next apply finishes the job; `--no-drain` sends no command at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_replaces_the_hosts_one_at_a_time_draining_each_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).await;
    let proxy = Proxy::start(&moto.url).await;
    let gitlab = GitlabStub::start().await;
    let c = Clients::new(&moto.url).await;
    let text = self_install_stack_toml("roll", 33, &gitlab.url).replace(
        "instance_type = \"t3.small\"",
        "instance_type = \"t3.small\"\ncount = 2\ndrain_timeout = \"45m\"",
    );
    let stack = write_stack(dir.path(), "s.toml", &text);
    let apply = |version: &str, extra: &'static [&'static str]| {
        let (bin, _) = fake_flotilla(
            dir.path(),
            &format!("flotilla-{version}"),
            "x86_64",
            version,
        );
        let stack = stack.clone();
        let url = proxy.url.clone();
        async move {
            let mut args = vec!["apply", "--flotilla-bin", bin.to_str().unwrap()];
            args.extend_from_slice(extra);
            run(&stack, &url, true, &args).await
        }
    };

    let first = apply("1", &[]).await;
    assert!(first.ok, "{}", first.stderr);
    let v1 = hosts(&c, "roll").await;
    assert_eq!(v1.len(), 2, "{v1:?}");
    assert!(
        send_commands(&proxy).is_empty(),
        "new hosts need no drain: {:?}",
        send_commands(&proxy)
    );

    // Version 2. The new host/0 is not registered with SSM at first (its agent starts at
    // boot): the readiness check is sent again until it is.
    proxy.fail_op("ssm:SendCommand", Fault::RejectWith("InvalidInstanceId"));
    let plan_text = {
        let (bin, _) = fake_flotilla(dir.path(), "flotilla-2", "x86_64", "2");
        let plan = run(
            &stack,
            &proxy.url,
            true,
            &["plan", "--flotilla-bin", bin.to_str().unwrap()],
        )
        .await;
        assert!(plan.ok, "{}", plan.stderr);
        plan.stdout
    };
    assert!(
        plan_text.contains("-/+ ec2:instance             host/0")
            && plan_text.contains("-/+ ec2:instance             host/1"),
        "{plan_text}"
    );
    assert!(
        plan_text.contains("flotilla binary") && plan_text.contains("then drain and terminate"),
        "{plan_text}"
    );
    let started = std::time::Instant::now();
    let second = apply("2", &[]).await;
    assert!(second.ok, "{}", second.stderr);
    println!(
        "measured: rolling replacement of 2 hosts: {:?}",
        started.elapsed()
    );
    let v2 = hosts(&c, "roll").await;
    assert_eq!(v2.len(), 2, "{v2:?}");
    let (old0, old1) = (v1[0].1.clone(), v1[1].1.clone());
    let (new0, new1) = (v2[0].1.clone(), v2[1].1.clone());
    assert!(![&old0, &old1].contains(&&new0) && ![&old0, &old1].contains(&&new1));
    use Event::*;
    assert_eq!(
        events(&proxy),
        [
            Launch,
            Ready(new0.clone()), // InvalidInstanceId: sent again
            Ready(new0.clone()),
            Drain(old0.clone()),
            Terminate(vec![old0.clone()]),
            Launch,
            Ready(new1.clone()),
            Drain(old1.clone()),
            Terminate(vec![old1.clone()]),
        ]
    );
    // The new binary went up before any host was launched.
    let writes = proxy.writes();
    let put = writes.iter().position(|w| w.contains("/flotilla/bin/"));
    let launch = writes.iter().position(|w| w == "ec2:RunInstances");
    assert!(put.is_some() && put < launch, "{writes:?}");
    // The drain: gitlab-runner stops (its jobs finish), then flotilla drains and waits,
    // within runner_hosts.drain_timeout.
    let drain = send_commands(&proxy)
        .into_iter()
        .find(|v| v["InstanceIds"][0] == old0.as_str())
        .unwrap();
    assert_eq!(drain["DocumentName"], "AWS-RunShellScript");
    assert_eq!(drain["Parameters"]["executionTimeout"][0], "2700");
    let script: Vec<&str> = drain["Parameters"]["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let stop = script
        .iter()
        .position(|l| *l == "/usr/local/bin/gitlab-runner stop");
    let wait = script.iter().position(|l| {
        *l == "/usr/local/bin/flotilla --config /etc/flotilla/flotilla.toml drain --wait"
    });
    assert!(stop.is_some() && stop < wait, "{script:?}");
    // moto kept the drains as sent, one per old host, in order (moto lists every
    // instance it knows as each command's targets, whatever InstanceIds said: the
    // proxy's record above is what names the instance).
    let listed = c.ssm.list_commands().send().await.unwrap();
    let drains: Vec<&str> = listed
        .commands()
        .iter()
        .filter(|c| c.document_name() == Some("AWS-RunShellScript"))
        .filter_map(|c| c.comment())
        .filter(|c| c.contains(": drain "))
        .collect();
    assert_eq!(
        drains,
        [
            format!("flotilla-provision roll: drain host/0 {old0} before terminating it"),
            format!("flotilla-provision roll: drain host/1 {old1} before terminating it"),
        ]
    );
    assert!(
        second.stderr.contains(&format!("host/0: draining {old0}"))
            && second
                .stderr
                .contains(&format!("host/1: terminating {old1}")),
        "no progress lines:\n{}",
        second.stderr
    );
    assert_eq!(s3_puts(&proxy).len(), 1);

    // The same binary again: nothing to do.
    proxy.reset();
    let same = apply("2", &[]).await;
    assert!(same.ok, "{}", same.stderr);
    assert_eq!(proxy.writes(), Vec::<String>::new());

    // Version 3, and SSM cannot reach the old host/0 (no agent): the apply stops with
    // the way out, and host/0's old instance is neither drained nor terminated.
    proxy.fail_op_after("ssm:SendCommand", 1, Fault::RejectWith("InvalidInstanceId"));
    let failed = apply("3", &[]).await;
    assert!(!failed.ok);
    let err = failed.stderr.lines().last().unwrap_or_default();
    assert!(
        err.contains(&format!("SSM cannot reach {new0}")) && err.contains("apply --no-drain"),
        "{err}"
    );
    assert!(
        !events(&proxy).iter().any(|e| matches!(e, Terminate(_))),
        "{:?}",
        events(&proxy)
    );
    let mid = hosts(&c, "roll").await;
    assert_eq!(mid.len(), 3, "{mid:?}");
    assert!(mid.iter().any(|(_, id)| *id == new0), "{mid:?}");

    // The next apply keeps host/0's new instance, drains and terminates the old one
    // (finishing what the failed apply started), then replaces host/1.
    proxy.reset();
    let resumed = apply("3", &[]).await;
    assert!(resumed.ok, "{}", resumed.stderr);
    let v3 = hosts(&c, "roll").await;
    assert_eq!(v3.len(), 2, "{v3:?}");
    let (new0_v3, new1_v3) = (v3[0].1.clone(), v3[1].1.clone());
    assert!(mid.iter().any(|(_, id)| *id == new0_v3), "{mid:?} {v3:?}");
    assert_eq!(
        events(&proxy),
        [
            Drain(new0.clone()),
            Terminate(vec![new0.clone()]),
            Launch,
            Ready(new1_v3.clone()),
            Drain(new1.clone()),
            Terminate(vec![new1.clone()]),
        ]
    );

    // --no-drain: no command at all, still one host at a time.
    proxy.reset();
    let blunt = apply("4", &["--no-drain"]).await;
    assert!(blunt.ok, "{}", blunt.stderr);
    assert_eq!(
        events(&proxy),
        [
            Launch,
            Terminate(vec![new0_v3.clone()]),
            Launch,
            Terminate(vec![new1_v3.clone()]),
        ]
    );
    assert!(
        blunt.stderr.contains("without draining"),
        "{}",
        blunt.stderr
    );
    let v4 = hosts(&c, "roll").await;
    assert_eq!(v4.len(), 2, "{v4:?}");

    // runner_hosts.count lowered to 1: host/1 goes, drained first, and host/0 stays.
    write_stack(
        dir.path(),
        "s.toml",
        &text.replace("count = 2", "count = 1"),
    );
    proxy.reset();
    let plan = run(&stack, &proxy.url, true, &["plan"]).await;
    assert!(
        plan.stdout.contains("host/1") && plan.stdout.contains("drained first"),
        "{}",
        plan.stdout
    );
    proxy.reset();
    let fewer = apply("4", &[]).await;
    assert!(fewer.ok, "{}", fewer.stderr);
    let host1 = v4[1].1.clone();
    assert_eq!(
        events(&proxy),
        [Drain(host1.clone()), Terminate(vec![host1.clone()])]
    );
    assert_eq!(hosts(&c, "roll").await, v4[..1].to_vec());
}

/// With no `runner_hosts.flotilla_url`, a flotilla-provision with no `flotilla` next to
/// it and no `--flotilla-bin` stops before any network use, naming both ways out.
#[tokio::test]
async fn a_missing_binary_is_refused_naming_both_options() {
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("flotilla-provision");
    std::fs::copy(env!("CARGO_BIN_EXE_flotilla-provision"), &alone).unwrap();
    let stack = write_stack(
        dir.path(),
        "s.toml",
        &self_install_stack_toml("lonely", 34, "https://gitlab.example.com"),
    );
    let closed = format!("http://127.0.0.1:{}", free_port());
    for cmd in ["plan", "apply", "output"] {
        let r = run_exe(&alone, &stack, &closed, false, &[cmd]).await;
        assert!(!r.ok, "{cmd} went ahead");
        let err = r.stderr.lines().last().unwrap_or_default();
        assert!(
            err.contains(&dir.path().join("flotilla").display().to_string()),
            "{err}"
        );
        assert!(err.contains("--flotilla-bin"), "{err}");
        assert!(err.contains("runner_hosts.flotilla_url"), "{err}");
        assert!(
            !r.stderr.contains("aws call"),
            "AWS was called: {}",
            r.stderr
        );
    }
    // validate and destroy need no binary.
    let r = run_exe(&alone, &stack, &closed, false, &["validate"]).await;
    assert!(r.ok, "{}", r.stderr);

    // The sibling is found once it is there; a file that is no Linux executable is not
    // taken.
    std::fs::write(dir.path().join("flotilla"), "#!/bin/sh\necho hi\n").unwrap();
    let r = run_exe(&alone, &stack, &closed, false, &["plan"]).await;
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains("not a 64-bit little-endian Linux executable"),
        "{}",
        r.stderr
    );
}
