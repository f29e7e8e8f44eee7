//! Issue 10: the pipelines teams bring from docker+machine. `[job.container]` options as
//! the build container and the services see them, allow-lists and privilege requests
//! refused before any machine is leased, `$VAR` expansion of image and service names,
//! `image: docker: user/platform`, and registry credential helpers on the runner host.
//! (Docker-in-Docker with privileged services and shared volumes: `dind.rs`; artifacts
//! and cache through the helper: `helper.rs`.)

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use flotilla_proto::config::{parse_toml, ClassConfig};
use flotilla_proto::container::ContainerOptions;
use flotilla_sandbox::auth_registry::{busybox_image_with, push_image, AuthRegistry};
use flotilla_sandbox::runner::StageDriver;
use flotilla_sandbox::{docker_on, Job, Outcome, Sandbox, SandboxOptions};
use serde_json::json;

use crate::common::bounded;
use crate::compat::{
    all_output, job_with_image, prepare_build_failure, runner_with_job_config, the_machine, LIMIT,
};

/// `name=value` lines a script printed.
fn printed(out: &str, name: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .map(|v| v.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_options_reach_the_build_container_and_the_services() -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions {
            max_machines: 1,
            ..Default::default()
        })
        .await?;
        let container: ContainerOptions = serde_json::from_value(json!({
            "shm_size": "256m",
            "tmpfs": {"/scratch": "rw,size=16m"},
            "services_tmpfs": {"/svc-scratch": "rw"},
            "extra_hosts": ["gitlab.internal:10.9.8.7"],
            "dns": ["10.9.8.53"],
            "dns_search": ["corp.internal"],
            "cap_add": ["NET_ADMIN"],
            "cap_drop": ["NET_RAW"],
            "devices": ["/dev/null:/dev/flotilla-null"],
            "security_opt": ["no-new-privileges"],
            "sysctls": {"net.core.somaxconn": "1000"},
            "ulimits": {"nofile": "1000:2000"},
            "user": "1000",
            "memory": "256m",
            "cpus": "0.5",
            "service_memory": "128m",
        }))?;
        let opts = runner_with_job_config(&sb, "container", |job| job.container = container)?;
        let script = [
            "echo shm=$(df -k /dev/shm | tail -1 | awk '{print $2}')",
            "echo scratch=$(grep -c ' /scratch tmpfs ' /proc/mounts || true)",
            "echo hosts=$(grep gitlab.internal /etc/hosts | awk '{print $1}')",
            "echo capbnd=$(awk '/^CapBnd/ {print $2}' /proc/self/status)",
            "echo nnp=$(awk '/^NoNewPrivs/ {print $2}' /proc/self/status)",
            "echo somaxconn=$(cat /proc/sys/net/core/somaxconn)",
            "echo nofile=$(ulimit -Sn):$(ulimit -Hn)",
            "echo uid=$(id -u)",
            "echo memory=$(cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes)",
            "test -c /dev/flotilla-null && echo device=yes",
        ];
        let mut job = Job::new(1001, &script);
        job.services = vec![json!({"name": sb.job_image, "alias": "svc",
            "entrypoint": ["sh", "-c"], "command": ["sleep 3600"]})];
        let mut d = StageDriver::prepare(opts, job).await?;
        let m = the_machine(&sb).await?;
        let inspect = |name: String| {
            let m = m.clone();
            async move {
                let text = docker_on(&m, &["inspect", "-f", "{{json .HostConfig}}", &name]).await?;
                serde_json::from_str::<serde_json::Value>(&text).context("HostConfig JSON")
            }
        };
        let service = inspect(format!("flotilla-{}-svc-0", d.job_key())).await?;
        let ctx = || format!("{service:#}\n{}", d.describe());
        ensure!(service["Tmpfs"].get("/svc-scratch").is_some(), "services_tmpfs\n{}", ctx());
        ensure!(service["Memory"] == json!(128 << 20), "service_memory\n{}", ctx());
        ensure!(service["ShmSize"] == json!(256 << 20), "shm_size\n{}", ctx());
        ensure!(service["ExtraHosts"] == json!(["gitlab.internal:10.9.8.7"]), "{}", ctx());
        ensure!(service["CapAdd"].is_null(), "cap_add is the build container's\n{}", ctx());
        let build = inspect(d.build_container()).await?;
        let ctx = || format!("{build:#}\n{}", d.describe());
        ensure!(build["Dns"] == json!(["10.9.8.53"]), "{}", ctx());
        ensure!(build["DnsSearch"] == json!(["corp.internal"]), "{}", ctx());
        ensure!(build["CapDrop"] == json!(["NET_RAW"]), "{}", ctx());
        ensure!(build["NanoCpus"] == json!(500_000_000), "{}", ctx());

        d.stage_ok("prepare_script").await?;
        d.stage_ok("get_sources").await?;
        let out = all_output(&d.stage_ok("build_script").await?);
        let ctx = || format!("{out}\n{}", d.describe());
        let get = |k: &str| printed(&out, k).unwrap_or_default();
        ensure!(get("shm") == "262144", "/dev/shm is 256m\n{}", ctx());
        ensure!(get("scratch") == "1", "tmpfs at /scratch\n{}", ctx());
        ensure!(get("hosts") == "10.9.8.7", "extra_hosts\n{}", ctx());
        // The bounding set carries cap_add / cap_drop (user 1000 has no effective caps).
        let capbnd = u64::from_str_radix(&get("capbnd"), 16).unwrap_or(0);
        const NET_ADMIN: u64 = 1 << 12;
        const NET_RAW: u64 = 1 << 13;
        ensure!(capbnd & NET_ADMIN != 0, "cap_add NET_ADMIN\n{}", ctx());
        ensure!(capbnd & NET_RAW == 0, "cap_drop NET_RAW\n{}", ctx());
        ensure!(get("nnp") == "1", "no-new-privileges\n{}", ctx());
        ensure!(get("somaxconn") == "1000", "sysctls\n{}", ctx());
        ensure!(get("nofile") == "1000:2000", "ulimits\n{}", ctx());
        ensure!(get("uid") == "1000", "user\n{}", ctx());
        ensure!(get("memory") == (256u64 << 20).to_string(), "memory\n{}", ctx());
        ensure!(get("device") == "yes", "devices\n{}", ctx());
        d.cleanup().await?;
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_images_services_and_privilege_fail_the_build_before_any_machine() -> Result<()> {
    bounded(LIMIT, async {
        // A class whose `[classes.dind.job]` turns privileged on for its jobs only.
        let dind: ClassConfig =
            parse_toml("ami = \"\"\ninstance_types = []\nsubnets = []\n[job]\nprivileged = true\n")
                .map_err(anyhow::Error::msg)?;
        let sb = Sandbox::start(SandboxOptions {
            extra_classes: vec![("dind".into(), dind)],
            ..Default::default()
        })
        .await?;
        let registry = sb.registry_host();
        let opts = runner_with_job_config(&sb, "strict", |job| {
            job.allowed_images = vec![format!("{registry}/flotilla/*")];
            job.allowed_services = vec!["**/postgres:*".into()];
        })?;
        let run = |job: Job| flotilla_sandbox::runner::run_job(opts.clone(), job);

        let r = run(Job::new(1101, &["true"]).with_image("docker.io/evil/miner:1")).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        let out = prepare_build_failure(&r, &ctx)?;
        ensure!(
            out.contains("allowed_images") && out.contains(&format!("{registry}/flotilla/*")),
            "the refusal names the setting and its patterns\n{}",
            ctx()
        );

        let mut job = Job::new(1102, &["true"]).with_image(&sb.job_image);
        job.services = vec![json!({"name": "redis:7"})];
        let r = run(job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        let out = prepare_build_failure(&r, &ctx)?;
        ensure!(
            out.contains("allowed_services") && out.contains("redis:7"),
            "{}",
            ctx()
        );

        let job = Job::new(1103, &["true"]).with_variable("FLOTILLA_PRIVILEGED", "true");
        let r = run(job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        let out = prepare_build_failure(&r, &ctx)?;
        ensure!(out.contains("`privileged` is false"), "{}", ctx());

        let mut job = Job::new(1104, &["true"]);
        job.services = vec![json!({"name": format!("{registry}/lib/postgres:16"),
            "variables": [{"key": "FLOTILLA_PRIVILEGED", "value": "true"}]})];
        let r = run(job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        let out = prepare_build_failure(&r, &ctx)?;
        ensure!(out.contains("services_privileged"), "{}", ctx());

        let instances = sb.instances().await?;
        ensure!(
            instances.is_empty(),
            "refused jobs must not lease (or launch) a machine: {instances:#?}\n{}",
            sb.diagnostics()
        );

        // The same request in the class that allows it runs, privileged (CAP_SYS_ADMIN).
        let job = Job::new(
            1105,
            &["echo capeff=$(awk '/^CapEff/ {print $2}' /proc/self/status)"],
        )
        .with_image(&sb.job_image)
        .with_variable("FLOTILLA_CLASS", "dind")
        .with_variable("FLOTILLA_PRIVILEGED", "true");
        let r = run(job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        let out = r.stage("build_script").map(all_output).unwrap_or_default();
        let capeff = u64::from_str_radix(&printed(&out, "capeff").unwrap_or_default(), 16)?;
        const SYS_ADMIN: u64 = 1 << 21;
        ensure!(
            capeff & SYS_ADMIN != 0,
            "not privileged in class dind\n{}",
            ctx()
        );
        sb.shutdown().await
    })
    .await
}

/// A `docker-credential-<name>` stand-in: answers with `login` for `host` only, and logs
/// every server it is asked about.
fn credential_helper(
    dir: &std::path::Path,
    name: &str,
    host: &str,
    login: (&str, &str),
) -> Result<std::path::PathBuf> {
    let log = dir.join(format!("{name}.log"));
    let script = format!(
        "#!/bin/sh\nread -r server\necho \"$1 $server\" >> '{}'\n\
         if [ \"$1\" = get ] && [ \"$server\" = '{host}' ]; then\n\
         printf '{{\"ServerURL\":\"%s\",\"Username\":\"%s\",\"Secret\":\"%s\"}}' '{host}' '{}' '{}'\nexit 0\nfi\n\
         echo 'credentials not found in native keychain'\nexit 1\n",
        log.display(),
        login.0,
        login.1
    );
    let path = dir.join(format!("docker-credential-{name}"));
    flotilla_sandbox::util::write_file(&path, script.as_bytes(), 0o755)?;
    Ok(log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_expand_from_variables_and_credential_helpers_log_in_on_the_runner_host() -> Result<()>
{
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions {
            max_machines: 1,
            ..Default::default()
        })
        .await?;
        let registry = sb.registry_host();
        let web = busybox_image_with(
            "web",
            json!({"Cmd": ["httpd", "-f", "-p", "8080", "-h", "/etc"], "ExposedPorts": {"8080/tcp": {}}}),
        )?;
        push_image(&format!("http://{registry}"), None, "flotilla/web", "v7", &web)?;

        // Image and service names, alias and docker user from the job's variables.
        let mut job = job_with_image(
            1201,
            "$SBX_REGISTRY/flotilla/busybox:${JOB_TAG}",
            None,
            None,
            &["echo uid=$(id -u)", "echo web=$(wget -q -O- http://web:8080/flotilla-image)"],
        );
        job.payload.insert(
            "image".into(),
            json!({"name": "$SBX_REGISTRY/flotilla/busybox:${JOB_TAG}",
                   "executor_opts": {"docker": {"user": "$RUN_AS", "platform": "linux/amd64"}}}),
        );
        job.services = vec![json!({"name": "${SBX_REGISTRY}/flotilla/web:${WEB_TAG}", "alias": "$WEB_ALIAS"})];
        let job = job
            .with_variable("SBX_REGISTRY", &registry)
            .with_variable("JOB_TAG", "latest")
            .with_variable("WEB_TAG", "v7")
            .with_variable("WEB_ALIAS", "web")
            .with_variable("RUN_AS", "1000");
        let r = sb.run_job(job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        let out = r.stage("build_script").map(all_output).unwrap_or_default();
        ensure!(printed(&out, "uid").as_deref() == Some("1000"), "image docker user\n{}", ctx());
        ensure!(printed(&out, "web").as_deref() == Some("web"), "expanded service and alias\n{}", ctx());

        // Credential helpers on the runner host, for a registry that needs a login.
        let password = format!("pw-{}", flotilla_sandbox::util::unique_token());
        let mut reg = AuthRegistry::start(&sb.dir.join("auth-registry"), &sb.dir, "ci-puller", &password).await?;
        let image = reg.push("team/private", "latest", &busybox_image_with("private", json!({}))?)?;
        let bin = sb.dir.join("helper-bin");
        std::fs::create_dir_all(&bin)?;
        let log = credential_helper(&bin, "sandbox", &reg.host(), ("ci-puller", &password))?;
        let mut opts = sb.runner_options();
        let path = std::env::var("PATH").unwrap_or_default();
        opts.env.push(("PATH".into(), format!("{}:{path}", bin.display())));
        let script = ["cat /etc/flotilla-image"];
        for (id, config) in [
            (1202, json!({"credHelpers": {reg.host(): "sandbox"}})),
            (1203, json!({"credsStore": "sandbox"})),
        ] {
            let job = Job::new(id, &script)
                .with_image(&image)
                .with_variable("DOCKER_AUTH_CONFIG", &config.to_string());
            let r = flotilla_sandbox::runner::run_job(opts.clone(), job).await?;
            let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
            ensure!(r.outcome == Outcome::Success, "{config}\n{}", ctx());
            ensure!(
                r.stage("build_script").is_some_and(|b| b.stdout.contains("private\n")),
                "{}",
                ctx()
            );
            ensure!(!r.describe().contains(&password), "the password was echoed\n{}", ctx());
        }
        let asked = std::fs::read_to_string(&log)?;
        ensure!(
            asked.lines().filter(|l| *l == format!("get {}", reg.host())).count() == 2,
            "the helper is asked for the image's registry: {asked}"
        );

        // A helper that is not installed: a build failure naming it, no anonymous pull.
        let job = Job::new(1204, &script)
            .with_image(&image)
            .with_variable("DOCKER_AUTH_CONFIG", &json!({"credHelpers": {reg.host(): "ecr-login"}}).to_string());
        let r = flotilla_sandbox::runner::run_job(opts.clone(), job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(
            matches!(&r.outcome, Outcome::BuildFailure { stage, .. } if stage == "prepare"),
            "{}",
            ctx()
        );
        let out = r.stage("prepare").map(all_output).unwrap_or_default();
        ensure!(out.contains("docker-credential-ecr-login"), "{}", ctx());
        reg.stop();
        tokio::time::timeout(Duration::from_secs(60), sb.shutdown()).await?
    })
    .await
}
