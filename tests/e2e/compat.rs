//! Issue 5: jobs behave as they do on gitlab-runner's docker executor. Services (aliases,
//! variables, entrypoint, command, port check), pull policies, private registries,
//! entrypoints, the helper's files and a non-root build user, cancellation on the machine,
//! and output (100 MB complete with flat memory, stdout/stderr order), plus the output
//! throughput benchmark against `docker exec`.
//!
//! Some tests drive the stages one by one (the runner emulator's [`StageDriver`]) instead
//! of [`Sandbox::run_job`], to look at the machine between two stages or to read a stage's
//! raw output.

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use flotilla_proto::config::{JobConfig, PullPolicy};
use flotilla_proto::duration::HumanDuration;
use flotilla_sandbox::auth_registry::{busybox_image_with, image_id, push_image, AuthRegistry};
use flotilla_sandbox::runner::StageDriver;
use flotilla_sandbox::runner::{StageResult, BUILD_FAILURE_EXIT_CODE};
use flotilla_sandbox::{
    docker_on, Cancel, CancelWhen, EmulatedMachine, Job, JobResult, Outcome, RunnerOptions,
    Sandbox, SandboxOptions,
};
use serde_json::json;

use crate::common::{bounded, POLL};

pub(crate) const LIMIT: Duration = Duration::from_secs(300);

// --- helpers ---

/// Runner options whose stages read a copy of the sandbox's flotilla.toml with `edit`
/// applied to `[job]` (only the stages read those keys; the daemon keeps the original).
pub(crate) fn runner_with_job_config(
    sb: &Sandbox,
    name: &str,
    edit: impl FnOnce(&mut JobConfig),
) -> Result<RunnerOptions> {
    let mut config = sb.config.clone();
    edit(&mut config.job);
    let path = sb.dir.join(format!("flotilla-{name}.toml"));
    std::fs::write(&path, config.to_toml()?)?;
    let mut opts = sb.runner_options();
    opts.config_path = Some(path);
    Ok(opts)
}

fn all_policies_allowed(job: &mut JobConfig) {
    job.allowed_pull_policies = vec![
        PullPolicy::Always,
        PullPolicy::IfNotPresent,
        PullPolicy::Never,
    ];
}

/// `http://127.0.0.1:<port>` of the sandbox's own registry.
fn registry_url(sb: &Sandbox) -> String {
    let host = sb.registry_host();
    format!("http://{host}")
}

/// Pushes a busybox image with `config` patched into its image config to the sandbox's
/// registry; returns its reference and image id.
fn push_with(
    sb: &Sandbox,
    repo: &str,
    flavour: &str,
    config: serde_json::Value,
) -> Result<(String, String)> {
    let image = busybox_image_with(flavour, config)?;
    push_image(&registry_url(sb), None, repo, "latest", &image)?;
    let host = sb.registry_host();
    Ok((format!("{host}/{repo}:latest"), image_id(&image)))
}

/// A job whose payload `image:` has this entrypoint and pull policy (as GitLab sends
/// `image: {name, entrypoint, pull_policy}`).
pub(crate) fn job_with_image(
    id: u64,
    image: &str,
    entrypoint: Option<&[&str]>,
    pull_policy: Option<&[&str]>,
    script: &[&str],
) -> Job {
    let mut job = Job::new(id, script).with_image(image);
    job.payload.insert(
        "image".into(),
        json!({"name": image, "entrypoint": entrypoint, "pull_policy": pull_policy}),
    );
    job
}

/// The image id on the machine, or `None` when the image is not there.
async fn machine_image_id(m: &EmulatedMachine, image: &str) -> Option<String> {
    docker_on(m, &["image", "inspect", "-f", "{{.Id}}", image])
        .await
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The sandbox's only machine (tests using it run with max_machines = 1).
pub(crate) async fn the_machine(sb: &Sandbox) -> Result<EmulatedMachine> {
    let mut running = sb
        .emulator()
        .wait_running(1, Duration::from_secs(90))
        .await?;
    ensure!(running.len() == 1, "expected one machine: {running:#?}");
    Ok(running.remove(0))
}

pub(crate) fn all_output(s: &StageResult) -> String {
    format!("{}{}", s.stdout, s.stderr)
}

/// The job ran prepare once (a build failure is not retried), which failed the build, and
/// no script ran; returns prepare's output.
pub(crate) fn prepare_build_failure(r: &JobResult, ctx: &dyn Fn() -> String) -> Result<String> {
    let prepare = r
        .stage("prepare")
        .with_context(|| format!("prepare did not run\n{}", ctx()))?;
    ensure!(
        prepare.exit_code == Some(BUILD_FAILURE_EXIT_CODE),
        "prepare should fail the build (not the system)\n{}",
        ctx()
    );
    let attempts = r.stages.iter().filter(|s| s.name == "prepare").count();
    ensure!(
        attempts == 1,
        "a build failure in prepare was retried ({attempts} attempts)\n{}",
        ctx()
    );
    ensure!(!r.ran("build_script"), "{}", ctx());
    ensure!(r.cleanup_exit == Some(0), "{}", ctx());
    Ok(all_output(prepare))
}

// --- services ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_is_reached_by_its_derived_aliases_and_user_alias_with_variables_entrypoint_and_command(
) -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions {
            idle_count: 1,
            max_machines: 1,
            ..Default::default()
        })
        .await?;
        // An image whose own entrypoint would fail: the job's entrypoint must replace it.
        let (pushed, _) = push_with(
            &sb,
            "tests/svc-web",
            "svc-web",
            json!({
                "Entrypoint": ["sh", "-c", "echo the image entrypoint ran; exit 3"],
                "ExposedPorts": {"8080/tcp": {}},
            }),
        )?;
        // gitlab-runner derives aliases from the name without registry host and tag; a
        // registry with a port gives names no resolver accepts, so the image gets a Docker
        // Hub style name on the machine (as `postgres` or `bitnami/redis` would have).
        let m = the_machine(&sb).await?;
        docker_on(&m, &["pull", &pushed]).await?;
        docker_on(&m, &["tag", &pushed, "tests/svc-web:latest"]).await?;
        let opts = runner_with_job_config(&sb, "services", all_policies_allowed)?;

        let mut job = Job::new(
            201,
            &[r#"for h in tests-svc-web tests__svc-web web; do ok=; for i in 1 2 3 4 5; do if wget -qO- "http://$h:8080/"; then ok=1; break; fi; sleep 1; done; [ -n "$ok" ] || { echo "no answer from $h"; exit 7; }; done"#],
        )
        .with_variable("JOB_WORD", "from-the-job");
        job.services.push(json!({
            "name": "tests/svc-web:latest",
            "alias": "web",
            "entrypoint": ["sh", "-c"],
            "command": ["mkdir -p /www && echo \"service-says-$SERVICE_WORD-$JOB_WORD via $(cat /etc/flotilla-image)\" > /www/index.html && exec httpd -f -p 8080 -h /www"],
            "pull_policy": ["if-not-present"],
            "variables": [{"key": "SERVICE_WORD", "value": "hi"}],
        }));
        let r = flotilla_sandbox::runner::run_job(opts, job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        let prepare = r.stage("prepare").context("prepare did not run")?;
        ensure!(
            !all_output(prepare).contains("WARNING"),
            "the port check warned about a service that listens on its exposed port\n{}",
            ctx()
        );
        let build = r
            .stage("build_script")
            .with_context(|| format!("build_script did not run\n{}", ctx()))?;
        let answers = build
            .stdout
            .matches("service-says-hi-from-the-job via svc-web")
            .count();
        ensure!(
            answers == 3,
            "expected the service's page by both derived aliases and the user alias, got {answers}\n{}",
            ctx()
        );
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_that_never_opens_its_port_gives_a_warning_with_its_logs_and_the_job_runs(
) -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let (image, _) = push_with(
            &sb,
            "tests/svc-silent",
            "svc-silent",
            json!({
                "Cmd": ["sh", "-c", "echo silent-service-starting-$SERVICE_WORD; exec sleep 3600"],
                "ExposedPorts": {"5432/tcp": {}},
            }),
        )?;
        let opts = runner_with_job_config(&sb, "svc-wait", |j| {
            j.service_wait = HumanDuration::from_secs(3)
        })?;
        let mut job = Job::new(202, &["echo job-ran-after-the-warning"]);
        job.services.push(json!({
            "name": image, "alias": "db",
            "variables": [{"key": "SERVICE_WORD", "value": "quietly"}],
        }));
        let r = flotilla_sandbox::runner::run_job(opts, job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        let prepare = all_output(r.stage("prepare").context("prepare did not run")?);
        for needle in [
            "WARNING",
            "probably didn't start properly",
            "5432",
            "silent-service-starting-quietly",
        ] {
            ensure!(
                prepare.contains(needle),
                "prepare's warning lacks {needle:?}\n{}",
                ctx()
            );
        }
        let build = r
            .stage("build_script")
            .with_context(|| format!("build_script did not run\n{}", ctx()))?;
        ensure!(
            build.stdout.contains("job-ran-after-the-warning"),
            "{}",
            ctx()
        );
        sb.shutdown().await
    })
    .await
}

// --- images: pull policies, credentials, entrypoints ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_policies_never_if_not_present_always_and_a_list_follow_the_registry_and_the_machine(
) -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions {
            idle_count: 1,
            max_machines: 1,
            ..Default::default()
        })
        .await?;
        let opts = runner_with_job_config(&sb, "policies", all_policies_allowed)?;
        let (image, v1) = push_with(&sb, "tests/policy", "policy-v1", json!({}))?;
        let m = the_machine(&sb).await?;
        let run = |id: u64, policy: &'static [&'static str]| {
            let job = job_with_image(id, &image, None, Some(policy), &["cat /etc/flotilla-image"]);
            flotilla_sandbox::runner::run_job(opts.clone(), job)
        };

        // never, image not on the machine: a build failure that names the policy.
        let r = run(301, &["never"]).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        let out = prepare_build_failure(&r, &ctx)?;
        ensure!(
            out.contains("never") && out.contains(&image),
            "the failure should name the image and the policy\n{}",
            ctx()
        );
        ensure!(machine_image_id(&m, &image).await.is_none(), "{}", ctx());

        // [never, if-not-present]: never fails, if-not-present pulls.
        let r = run(302, &["never", "if-not-present"]).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        ensure!(
            r.stage("build_script")
                .is_some_and(|b| b.stdout.contains("policy-v1")),
            "{}",
            ctx()
        );
        ensure!(
            machine_image_id(&m, &image).await.as_deref() == Some(v1.as_str()),
            "the machine does not have v1 ({v1})\n{}",
            ctx()
        );

        // The registry gets a new image under the same tag.
        let (_, v2) = push_with(&sb, "tests/policy", "policy-v2", json!({}))?;
        ensure!(v1 != v2, "v1 and v2 have the same id");

        // if-not-present and never keep what the machine has.
        for (id, policy) in [(303, &["if-not-present"][..]), (304, &["never"][..])] {
            let job = job_with_image(id, &image, None, Some(policy), &["cat /etc/flotilla-image"]);
            let r = flotilla_sandbox::runner::run_job(opts.clone(), job).await?;
            let ctx = || format!("{policy:?}\n{}\n{}", r.describe(), sb.diagnostics());
            ensure!(r.outcome == Outcome::Success, "{}", ctx());
            ensure!(
                r.stage("build_script")
                    .is_some_and(|b| b.stdout.contains("policy-v1")),
                "{policy:?} re-pulled the image\n{}",
                ctx()
            );
            ensure!(
                machine_image_id(&m, &image).await.as_deref() == Some(v1.as_str()),
                "{}",
                ctx()
            );
        }

        // always pulls the new image.
        let r = run(305, &["always"]).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        ensure!(
            r.stage("build_script")
                .is_some_and(|b| b.stdout.contains("policy-v2")),
            "always did not pull the updated image\n{}",
            ctx()
        );
        ensure!(
            machine_image_id(&m, &image).await.as_deref() == Some(v2.as_str()),
            "the machine does not have v2 ({v2})\n{}",
            ctx()
        );
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_policy_outside_allowed_pull_policies_is_a_build_failure_before_any_machine(
) -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let opts = runner_with_job_config(&sb, "allowed", |j| {
            j.allowed_pull_policies = vec![PullPolicy::Always, PullPolicy::IfNotPresent];
        })?;
        let job = job_with_image(
            311,
            &sb.job_image,
            None,
            Some(&["if-not-present", "never"][..]),
            &["echo should-not-run"],
        );
        let r = flotilla_sandbox::runner::run_job(opts, job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        let out = prepare_build_failure(&r, &ctx)?;
        ensure!(
            out.contains("\"never\"")
                && out.contains("not allowed")
                && out.contains("always, if-not-present"),
            "the failure should name the policy and the allowed ones\n{}",
            ctx()
        );
        let launched = sb.instances().await?;
        ensure!(
            launched.is_empty(),
            "a machine was launched for a job refused by policy: {launched:#?}"
        );
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_image_pulls_with_docker_auth_config_or_payload_credentials_and_is_refused_without(
) -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let password = format!("pw-{}", flotilla_sandbox::util::unique_token());
        let mut reg = AuthRegistry::start(
            &sb.dir.join("auth-registry"),
            &sb.dir,
            "ci-puller",
            &password,
        )
        .await?;
        let image = reg.push(
            "team/private",
            "latest",
            &busybox_image_with("private", json!({}))?,
        )?;
        let opts = sb.runner_options();
        let script = ["cat /etc/flotilla-image"];

        // No credentials: a clear build failure, not retried.
        let r = sb
            .run_job(Job::new(401, &script).with_image(&image))
            .await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        let out = prepare_build_failure(&r, &ctx)?;
        ensure!(
            out.contains(&format!("cannot pull image {image}")),
            "the failure should say the image cannot be pulled\n{}",
            ctx()
        );

        // A wrong password: refused too, and never echoed.
        let wrong = format!("wrong-{password}");
        let job = Job::new(402, &script)
            .with_image(&image)
            .with_variable("DOCKER_AUTH_CONFIG", &reg.docker_auth_config(Some(&wrong)));
        let r = sb.run_job(job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        let out = prepare_build_failure(&r, &ctx)?;
        ensure!(
            out.contains(&format!("cannot pull image {image}")),
            "{}",
            ctx()
        );
        ensure!(
            !r.describe().contains(&wrong),
            "a password was echoed\n{}",
            ctx()
        );

        // DOCKER_AUTH_CONFIG as a job variable.
        let job = Job::new(403, &script)
            .with_image(&image)
            .with_variable("DOCKER_AUTH_CONFIG", &reg.docker_auth_config(None));
        let r = sb.run_job(job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        ensure!(
            r.stage("build_script")
                .is_some_and(|b| b.stdout.contains("private\n")),
            "{}",
            ctx()
        );
        ensure!(
            !r.describe().contains(&password),
            "the password was echoed\n{}",
            ctx()
        );

        // DOCKER_AUTH_CONFIG in the runner's own environment.
        let mut runner_env = opts.clone();
        runner_env
            .env
            .push(("DOCKER_AUTH_CONFIG".into(), reg.docker_auth_config(None)));
        let r = flotilla_sandbox::runner::run_job(
            runner_env,
            Job::new(404, &script).with_image(&image),
        )
        .await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());

        // The job payload's `credentials` (GitLab's own registry login). The default policy
        // (always) pulls again, so the registry checks the login again.
        let mut job = Job::new(405, &script).with_image(&image);
        job.payload
            .insert("credentials".into(), json!([reg.payload_credential()]));
        let r = sb.run_job(job).await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        ensure!(
            !r.describe().contains(&password),
            "the password was echoed\n{}",
            ctx()
        );

        reg.stop();
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entrypoint_that_does_not_exec_its_arguments_works_with_an_empty_entrypoint_and_sh_c_works(
) -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let (no_exec, _) = push_with(
            &sb,
            "tests/no-exec-entrypoint",
            "no-exec-entrypoint",
            json!({"Entrypoint": ["sh", "-c", "echo this entrypoint ignores its arguments"]}),
        )?;
        let (execs, _) = push_with(
            &sb,
            "tests/exec-entrypoint",
            "exec-entrypoint",
            json!({"Entrypoint": ["sh", "-c", "echo prepared-by-the-entrypoint > /tmp/entrypoint-ran; exec \"$@\"", "entrypoint"]}),
        )?;
        let script = ["cat /etc/flotilla-image"];

        // As on the docker executor, the job's container does not stay up: a build
        // failure saying what to do.
        let r = sb
            .run_job(job_with_image(501, &no_exec, None, None, &script))
            .await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        let build = r
            .stage("build_script")
            .with_context(|| format!("build_script did not run\n{}", ctx()))?;
        ensure!(
            build.exit_code == Some(BUILD_FAILURE_EXIT_CODE)
                && all_output(build).contains(r#"entrypoint: [""]"#),
            "expected a build failure pointing at entrypoint: [\"\"]\n{}",
            ctx()
        );

        // entrypoint: [""] clears it.
        let r = sb
            .run_job(job_with_image(502, &no_exec, Some(&[""][..]), None, &script))
            .await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        ensure!(
            r.stage("build_script")
                .is_some_and(|b| b.stdout.contains("no-exec-entrypoint\n")),
            "{}",
            ctx()
        );

        // An entrypoint that execs its arguments runs before the stages.
        let r = sb
            .run_job(job_with_image(
                503,
                &execs,
                None,
                None,
                &["cat /tmp/entrypoint-ran"],
            ))
            .await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        ensure!(
            r.stage("build_script")
                .is_some_and(|b| b.stdout.contains("prepared-by-the-entrypoint")),
            "the image's entrypoint did not run\n{}",
            ctx()
        );

        // `entrypoint: ["/bin/sh", "-c"]`, common in .gitlab-ci.yml files: the docker
        // executor's command (`sh -c <detect shell>`) then runs `sh`, which reads the script
        // from the container's stdin.
        let r = sb
            .run_job(job_with_image(
                504,
                &sb.job_image,
                Some(&["/bin/sh", "-c"][..]),
                None,
                &["echo shell-entrypoint-job-ran"],
            ))
            .await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        ensure!(
            r.stage("build_script")
                .is_some_and(|b| b.stdout.contains("shell-entrypoint-job-ran\n")),
            "{}",
            ctx()
        );
        sb.shutdown().await
    })
    .await
}

// --- helper container and the build user ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_written_in_a_helper_stage_are_modified_by_a_non_root_build_user() -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let (by_name, _) = push_with(
            &sb,
            "tests/user-build",
            "user-build",
            json!({"User": "build"}),
        )?;
        let (by_uid, _) = push_with(
            &sb,
            "tests/user-1000",
            "user-1000",
            json!({"User": "1000:1000"}),
        )?;
        for (id, image) in [(601, &by_name), (602, &by_uid)] {
            let mut job = Job::new(
                id,
                &[
                    "echo build-user=$(id -u)",
                    "echo changed-by-the-build >> src/file.txt",
                    "cat src/file.txt",
                    "touch src/created-by-the-build",
                    "rm src/delete-me",
                    "ls src",
                ],
            )
            .with_image(image);
            // get_sources as git would: directories and files, written by root in the
            // helper container.
            job.stage_bodies.insert(
                "get_sources".into(),
                vec![
                    r#"mkdir -p "$CI_PROJECT_DIR/src""#.into(),
                    r#"echo written-by-the-helper > "$CI_PROJECT_DIR/src/file.txt""#.into(),
                    r#"touch "$CI_PROJECT_DIR/src/delete-me""#.into(),
                    "echo helper-user=$(id -u)".into(),
                ],
            );
            let r = sb.run_job(job).await?;
            let ctx = || format!("{image}\n{}\n{}", r.describe(), sb.diagnostics());
            ensure!(r.outcome == Outcome::Success, "{}", ctx());
            ensure!(
                r.stage("get_sources")
                    .is_some_and(|s| s.stdout.contains("helper-user=0")),
                "{}",
                ctx()
            );
            let build = r
                .stage("build_script")
                .with_context(|| format!("build_script did not run\n{}", ctx()))?;
            ensure!(
                build.stdout.contains("build-user=1000")
                    && build
                        .stdout
                        .contains("written-by-the-helper\nchanged-by-the-build\n")
                    && build.stdout.split("$ ls src\n").nth(1).is_some_and(|ls| ls
                        .contains("created-by-the-build")
                        && !ls.contains("delete-me")),
                "{}",
                ctx()
            );
        }
        sb.shutdown().await
    })
    .await
}

/// Two jobs in a row on one machine: the second sees the first's cache (the per-machine
/// cache volume at cache_dir) but nothing of its builds volume, containers or network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_job_on_a_machine_sees_only_the_cache_of_the_previous_one() -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let first = sb
            .run_job(Job::new(
                651,
                &[
                    "echo from-651 > \"$CI_PROJECT_DIR/left-in-builds\"",
                    "echo cached-by-651 > /cache/kept-in-cache",
                    "echo leftover > /tmp/left-in-container",
                ],
            ))
            .await?;
        ensure!(
            first.outcome == Outcome::Success,
            "{}\n{}",
            first.describe(),
            sb.diagnostics()
        );
        let second = sb
            .run_job(Job::new(
                652,
                &[
                    "cat /cache/kept-in-cache",
                    "test ! -e \"$CI_PROJECT_DIR/left-in-builds\" && echo builds-clean",
                    "test ! -e /tmp/left-in-container && echo container-fresh",
                ],
            ))
            .await?;
        let ctx = || format!("{}\n{}", second.describe(), sb.diagnostics());
        ensure!(second.outcome == Outcome::Success, "{}", ctx());
        let out = &second
            .stage("build_script")
            .with_context(|| format!("build_script did not run\n{}", ctx()))?
            .stdout;
        ensure!(
            out.contains("cached-by-651"),
            "cache did not survive\n{}",
            ctx()
        );
        ensure!(
            out.contains("builds-clean"),
            "builds volume leaked\n{}",
            ctx()
        );
        ensure!(
            out.contains("container-fresh"),
            "container reused\n{}",
            ctx()
        );
        let launched = sb.instances().await?;
        ensure!(
            launched.len() == 1,
            "expected both jobs on one machine: {launched:?}"
        );
        sb.shutdown().await
    })
    .await
}

// --- cancellation ---

/// Runs `script` as build_script, cancels it like a UI cancel once its loop runs on the
/// machine, and checks on the machine that nothing of it is left; then after_script and an
/// on_failure stage run.
async fn cancel_and_check_the_container(sb: &Sandbox, id: u64, script: &str) -> Result<()> {
    let cancel = Arc::new(tokio::sync::Notify::new());
    let mut opts = sb.runner_options();
    opts.graceful_kill_timeout = Duration::from_secs(30);
    opts.cancel = Some(Cancel {
        stage: "build_script".into(),
        when: CancelWhen::Notified(cancel.clone()),
    });
    let mut job =
        Job::new(id, &[script]).with_after_script(&["echo after-script-ran", "ps -o pid,args"]);
    job.stage_bodies.insert(
        "upload_artifacts_on_failure".into(),
        vec!["echo upload-on-failure-ran".into()],
    );
    let mut d = StageDriver::prepare(opts, job).await?;
    let m = the_machine(sb).await?;
    let container = d.build_container();
    d.stage_ok("prepare_script").await?;
    d.stage_ok("get_sources").await?;

    // The script's processes as the machine sees them, while it runs; the cancel comes
    // once its loop is seen there (or the wait gave up: the stage must end either way).
    let top = |m: EmulatedMachine, c: String| async move {
        docker_on(&m, &["top", &c, "-eo", "pid,args"]).await
    };
    let watch = async {
        let seen = flotilla_sandbox::util::wait_until(
            "the script's sleep on the machine",
            Duration::from_secs(60),
            POLL,
            || async {
                Ok(top(m.clone(), container.clone())
                    .await
                    .ok()
                    .filter(|t| t.contains("sleep 1")))
            },
        )
        .await;
        cancel.notify_one();
        seen
    };
    let (build, during) = tokio::join!(d.stage("build_script"), watch);
    let build = build?;
    let during = during.with_context(|| d.describe())?;
    // SIGTERM, then (for a script that ignores it) flotilla's own SIGKILL after its grace:
    // the stage ends by itself, before the runner's graceful_kill_timeout would kill it.
    ensure!(
        build.cancelled_after.is_some() && !build.killed,
        "the run stage did not end by itself after SIGTERM (cancelled: {:?}, killed: {})\n{}",
        build.cancelled_after,
        build.killed,
        d.describe()
    );

    // Nothing of the script is left: only the container's keep-alive and its sleep.
    let after = top(m.clone(), container.clone())
        .await
        .with_context(|| format!("{}\n{}", d.describe(), sb.diagnostics()))?;
    let leftovers: Vec<&str> = after
        .lines()
        .skip(1)
        .filter(|l| !l.contains("trap 'exit 0' TERM INT") && !l.trim_end().ends_with("sleep 3600"))
        .collect();
    ensure!(
        leftovers.is_empty(),
        "processes of the cancelled script still run in the container: {leftovers:#?}\n\
         during the script:\n{during}\nafter:\n{after}\n{}",
        d.describe()
    );

    // gitlab-runner goes on with after_script and the on_failure stages.
    let after_script = d.stage_ok("after_script").await?;
    ensure!(
        after_script.stdout.contains("after-script-ran")
            && !after_script.stdout.contains("sleep 1"),
        "{}",
        d.describe()
    );
    let upload = d.stage_ok("upload_artifacts_on_failure").await?;
    ensure!(
        upload.stdout.contains("upload-on-failure-ran"),
        "{}",
        d.describe()
    );
    d.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_a_sleep_loop_leaves_no_process_of_the_script_and_after_script_still_runs(
) -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        cancel_and_check_the_container(&sb, 701, "while true; do sleep 1; done").await?;
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ignored_by_the_script_is_followed_by_sigkill_and_after_script_still_runs(
) -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        cancel_and_check_the_container(&sb, 702, "trap '' TERM; while true; do sleep 1; done")
            .await?;
        sb.shutdown().await
    })
    .await
}

// --- output ---

/// Bytes in the 100 MB output: binary, then invalid UTF-8, then text.
const BINARY_BYTES: u64 = 10 * 1024 * 1024;
const TEXT_BYTES: u64 = 90 * 1024 * 1024;

/// A job whose `step_generate` writes `out.bin` (random bytes, invalid UTF-8, text lines)
/// into the project dir and prints its size and sha256; `build_script` cats it.
fn output_job(id: u64) -> Job {
    let mut job = Job::new(id, &[]);
    job.stage_bodies.insert(
        "step_generate".into(),
        vec![
            // `yes | head` ends yes with SIGPIPE, which pipefail would make a failure.
            "set +o pipefail".into(),
            r#"f="$CI_PROJECT_DIR/out.bin""#.into(),
            format!(r#"head -c {BINARY_BYTES} /dev/urandom > "$f""#),
            r#"printf '\377\376 invalid utf-8 \300\200 \355\240\200\n' >> "$f""#.into(),
            format!(
                r#"yes 'flotilla output line, after the binary part' | head -c {TEXT_BYTES} >> "$f""#
            ),
            r#"echo "machine-bytes=$(wc -c < "$f")""#.into(),
            r#"echo "machine-sha256=$(sha256sum "$f" | cut -d' ' -f1)""#.into(),
        ],
    );
    job.stage_bodies.insert(
        "build_script".into(),
        vec![r#"cat "$CI_PROJECT_DIR/out.bin""#.into()],
    );
    job.stage_bodies
        .insert("step_noop".into(), vec![":".into()]);
    job
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
}

/// What `flotilla run` did while a slow consumer read its stdout.
struct SlowlyRead {
    status: std::process::ExitStatus,
    stderr: String,
    /// sha256 of everything read from stdout.
    sha256: String,
    /// Peak RSS when its first output arrived (started, connected, streaming begun).
    first_output_peak_kib: u64,
    /// Peak RSS when its last output was read.
    streaming_peak_kib: u64,
}

/// Runs `cmd` (a `flotilla run`) read by a consumer slower than the machine, so any
/// buffering inside flotilla would grow: after each MiB it lets flotilla fill the pipe and
/// block on it before reading on. Flotilla's peak RSS is read after every read from it.
fn read_slowly(mut cmd: std::process::Command) -> Result<SlowlyRead> {
    use flotilla_sandbox::util::{peak_rss_kib, pid_alive, pipe_fill, wait_until_blocking};
    use std::io::Write;
    use std::os::fd::AsFd;
    let mut run = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = run.id();
    let mut out = run.stdout.take().context("no stdout")?;
    let mut err_pipe = run.stderr.take().context("no stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let mut sum = std::process::Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut sum_in = sum.stdin.take().context("no sha256sum stdin")?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut since_pause = 0;
    let (mut first_output_peak_kib, mut streaming_peak_kib) = (None, 0);
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        // Flotilla is alive until its output ends, so all but the last few reads see it.
        if let Some(peak) = peak_rss_kib(pid) {
            first_output_peak_kib.get_or_insert(peak);
            streaming_peak_kib = streaming_peak_kib.max(peak);
        }
        sum_in.write_all(&buf[..n])?;
        since_pause += n;
        if since_pause >= 1024 * 1024 {
            since_pause = 0;
            // The pipe full (within a page: writes up to a page are atomic), or
            // flotilla gone; the deadline only keeps a stalled run from hanging here.
            wait_until_blocking(Duration::from_secs(60), Duration::from_millis(1), || {
                let full = pipe_fill(out.as_fd()).is_ok_and(|(queued, cap)| queued + 4096 >= cap);
                (full || !pid_alive(pid as i32)).then_some(())
            });
        }
    }
    drop(sum_in);
    let status = run.wait()?;
    let sum = sum.wait_with_output()?;
    let stderr = err_reader.join().unwrap_or_default();
    let sha256 = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    Ok(SlowlyRead {
        status,
        stderr,
        sha256,
        first_output_peak_kib: first_output_peak_kib.unwrap_or(0),
        streaming_peak_kib,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_of_100_mb_with_binary_arrives_complete_while_run_stage_memory_stays_flat(
) -> Result<()> {
    /// Peak RSS allowed for `flotilla run` while streaming 100 MB (it holds chunks only).
    const RSS_BOUND_KIB: u64 = 64 * 1024;
    /// How far it may rise from its first output to its last: a few frames at a time,
    /// whatever the output's size.
    const RSS_GROWTH_BOUND_KIB: u64 = 8 * 1024;
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let mut d = StageDriver::prepare(sb.runner_options(), output_job(801)).await?;
        d.stage_ok("prepare_script").await?;
        d.stage_ok("get_sources").await?;
        let generated = d.stage_ok("step_generate").await?;
        let machine_sha = field(&generated.stdout, "machine-sha256")
            .context("no machine-sha256")?
            .to_owned();
        let machine_bytes: u64 = field(&generated.stdout, "machine-bytes")
            .context("no machine-bytes")?
            .parse()?;
        ensure!(
            machine_bytes > BINARY_BYTES + TEXT_BYTES,
            "{}",
            d.describe()
        );

        let cmd = d.run_command("build_script")?;
        let run = tokio::task::spawn_blocking(move || read_slowly(cmd)).await??;
        ensure!(
            run.status.success(),
            "flotilla run failed ({}): {}\n{}",
            run.status,
            run.stderr,
            d.describe()
        );
        ensure!(
            run.sha256 == machine_sha,
            "the streamed output differs from what the machine wrote ({machine_bytes} bytes): \
             sha256 {} != {machine_sha}\nstderr: {}",
            run.sha256,
            run.stderr
        );
        let (first, peak) = (run.first_output_peak_kib, run.streaming_peak_kib);
        let growth = peak.saturating_sub(first);
        eprintln!(
            "100 MB output: flotilla run peak RSS {peak} KiB (bound {RSS_BOUND_KIB}), \
             {first} KiB at its first output: +{growth} KiB (bound +{RSS_GROWTH_BOUND_KIB})"
        );
        ensure!(
            first > 0 && peak < RSS_BOUND_KIB && growth < RSS_GROWTH_BOUND_KIB,
            "flotilla run's peak RSS was {peak} KiB streaming {machine_bytes} bytes, \
             {first} KiB at its first output: +{growth} KiB (bounds {RSS_BOUND_KIB} KiB, \
             +{RSS_GROWTH_BOUND_KIB} KiB)"
        );
        d.cleanup().await?;
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_and_stderr_arrive_interleaved_as_produced_with_bytes_unchanged() -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let mut job = Job::new(802, &[]);
        job.stage_bodies.insert(
            "build_script".into(),
            vec![
                r#"i=1; while [ $i -le 10 ]; do echo "out-$i"; sleep 0.15; echo "err-$i" >&2; sleep 0.15; i=$((i+1)); done"#.into(),
                r#"printf 'raw-\377\376\300-end\n' >&2"#.into(),
            ],
        );
        let mut d = StageDriver::prepare(sb.runner_options(), job).await?;
        d.stage_ok("prepare_script").await?;
        d.stage_ok("get_sources").await?;
        let mut cmd = tokio::process::Command::from(d.run_command("build_script")?);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        // Lines in the order they arrive on the two pipes, as gitlab-runner merges them.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(&'static str, Vec<u8>)>();
        for (name, pipe) in [
            ("out", child.stdout.take().map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>)),
            ("err", child.stderr.take().map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>)),
        ] {
            let pipe = pipe.context("no pipe")?;
            let tx = tx.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut r = tokio::io::BufReader::new(pipe);
                loop {
                    let mut line = Vec::new();
                    match r.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            if tx.send((name, line)).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
        drop(tx);
        let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await??;
        let mut lines = Vec::new();
        while let Some(l) = rx.recv().await {
            lines.push(l);
        }
        ensure!(status.success(), "flotilla run failed: {lines:?}\n{}", d.describe());
        // Every stdout line, and the script's stderr lines (flotilla may log on stderr).
        let got: Vec<(&str, Vec<u8>)> = lines
            .into_iter()
            .filter(|(s, l)| {
                *s == "out" || [&b"out-"[..], b"err-", b"raw-"].iter().any(|p| l.starts_with(p))
            })
            .collect();
        let mut want: Vec<(&str, Vec<u8>)> = (1..=10)
            .flat_map(|i| {
                [
                    ("out", format!("out-{i}\n").into_bytes()),
                    ("err", format!("err-{i}\n").into_bytes()),
                ]
            })
            .collect();
        want.push(("err", b"raw-\xff\xfe\xc0-end\n".to_vec()));
        ensure!(
            got == want,
            "output order or bytes differ\n got: {:?}\nwant: {:?}",
            got.iter().map(|(s, l)| format!("{s}:{}", String::from_utf8_lossy(l).trim_end())).collect::<Vec<_>>(),
            want.iter().map(|(s, l)| format!("{s}:{}", String::from_utf8_lossy(l).trim_end())).collect::<Vec<_>>()
        );
        d.cleanup().await?;
        sb.shutdown().await
    })
    .await
}

// --- benchmark ---

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// The phases `flotilla::timing` logged for one call of `cmd` (stdout to /dev/null), each
/// as (phase, milliseconds since the spawn), ending with ("exit", the call's wall time).
fn call_phases(mut cmd: std::process::Command) -> Result<Vec<(String, f64)>> {
    cmd.env("FLOTILLA_LOG", "warn,flotilla::timing=debug");
    let spawned = std::time::SystemTime::now();
    let start = Instant::now();
    let out = cmd
        .stdout(std::fs::File::create("/dev/null")?)
        .stderr(Stdio::piped())
        .output()?;
    let took = start.elapsed().as_secs_f64() * 1e3;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {stderr}",
        out.status
    );
    let spawned_us = spawned.duration_since(std::time::UNIX_EPOCH)?.as_micros() as f64;
    let mut phases = Vec::new();
    for line in stderr.lines().filter(|l| l.contains("timing")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(|v| v.trim_matches('"').to_owned())
        };
        if let (Some(phase), Some(us)) = (field("phase="), field("unix_us=")) {
            phases.push((phase, (us.parse::<f64>()? - spawned_us) / 1e3));
        }
    }
    // A binary from before the marks logs none: the breakdown is left out.
    if !phases.is_empty() {
        phases.push(("exit".into(), took));
    }
    Ok(phases)
}

/// Median milliseconds each phase took after the one before it (the first: since the
/// spawn), over several calls, as a report line.
fn phase_breakdown(calls: &[Vec<(String, f64)>]) -> String {
    let Some(first) = calls.first().filter(|c| !c.is_empty()) else {
        return "not logged by this binary".into();
    };
    let mut parts = Vec::new();
    for (i, (phase, _)) in first.iter().enumerate() {
        let steps: Vec<f64> = calls
            .iter()
            .filter_map(|c| {
                let at = c.get(i)?.1;
                let before = if i == 0 { 0.0 } else { c.get(i - 1)?.1 };
                Some(at - before)
            })
            .collect();
        if steps.len() == calls.len() {
            parts.push(format!("{phase} +{:.1}", median(steps)));
        }
    }
    format!("{} ms", parts.join(", "))
}

/// Wall time of a command whose stdout goes to /dev/null.
fn time_to_devnull(mut cmd: std::process::Command) -> Result<f64> {
    let start = Instant::now();
    let out = cmd
        .stdout(std::fs::File::create("/dev/null")?)
        .stderr(Stdio::piped())
        .output()?;
    let took = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

/// Not a pass/fail test: prints the output throughput of `flotilla run` (the run stage,
/// over mTLS) against `docker exec` of the same command in the same container, through the
/// docker CLI over TLS with flotilla's client certificate and through the machine's local
/// unix socket. Medians of `FLOTILLA_BENCH_RUNS` (default 5) runs of 100 MB each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_throughput_of_flotilla_run_against_docker_exec() -> Result<()> {
    bounded(Duration::from_secs(600), async {
        let runs: usize = std::env::var("FLOTILLA_BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or(5);
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let mut d = StageDriver::prepare(sb.runner_options(), output_job(901)).await?;
        d.stage_ok("prepare_script").await?;
        d.stage_ok("get_sources").await?;
        let generated = d.stage_ok("step_generate").await?;
        let bytes: f64 = field(&generated.stdout, "machine-bytes")
            .context("no machine-bytes")?
            .parse()?;
        let m = the_machine(&sb).await?;
        let container = d.build_container();
        let file = format!("{}/out.bin", d.ctx.project_dir());
        let port = m.tls_port.context("machine has no TLS port")?;
        let state = sb.state_dir().to_owned();
        let exec = |host: String, tls: bool, script: String| {
            let mut c = std::process::Command::new("docker");
            c.env_remove("DOCKER_HOST")
                .env_remove("DOCKER_TLS_VERIFY")
                .env_remove("DOCKER_CERT_PATH");
            if tls {
                // The machine's certificate names its DNS name, not the IP the CLI dials:
                // TLS with flotilla's client certificate, without checking the server name.
                c.arg("--tls")
                    .arg("--tlscacert")
                    .arg(state.join(flotilla::pki::CA_CERT_FILE))
                    .arg("--tlscert")
                    .arg(state.join(flotilla::pki::CLIENT_CERT_FILE))
                    .arg("--tlskey")
                    .arg(state.join(flotilla::pki::CLIENT_KEY_FILE));
            }
            c.args(["-H", &host, "exec", &container, "sh", "-c"])
                .arg(script);
            c
        };
        let cat = format!("cat '{file}'");
        let tls_host = format!("tcp://{}:{port}", m.private_ip);
        let unix_host = m.docker_host();
        // Per method: the 100 MB stage, and an empty one (the fixed cost of a call).
        let mut samples: [(Vec<f64>, Vec<f64>); 3] = Default::default();
        for _ in 0..runs {
            let cmds = [
                [d.run_command("build_script")?, d.run_command("step_noop")?],
                [
                    exec(tls_host.clone(), true, cat.clone()),
                    exec(tls_host.clone(), true, ":".into()),
                ],
                [
                    exec(unix_host.clone(), false, cat.clone()),
                    exec(unix_host.clone(), false, ":".into()),
                ],
            ];
            for (i, [full, empty]) in cmds.into_iter().enumerate() {
                let t = tokio::task::spawn_blocking(move || time_to_devnull(full)).await??;
                samples[i].0.push(t);
                let t = tokio::task::spawn_blocking(move || time_to_devnull(empty)).await??;
                samples[i].1.push(t);
            }
        }
        let mb = bytes / 1e6;
        let mut report = format!(
            "output throughput, {mb:.0} MB per run, median of {runs} (flotilla binary {}):\n",
            d.ctx.opts.flotilla_bin.display()
        );
        let runs_of = |s: &[f64]| {
            s.iter()
                .map(|t| format!("{t:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (name, (full, empty)) in [
            "flotilla run (mTLS, Docker API via bollard)",
            "docker exec, docker CLI over TLS (client cert)",
            "docker exec, docker CLI over the local unix socket",
        ]
        .iter()
        .zip(samples.iter())
        {
            let (t, t0) = (median(full.clone()), median(empty.clone()));
            report.push_str(&format!(
                "  {name:<52} {t:6.2} s {:7.1} MB/s | empty call {t0:5.3} s | streaming alone {:7.1} MB/s  (runs: {})\n",
                mb / t,
                mb / (t - t0).max(1e-3),
                runs_of(full)
            ));
        }
        // Where an empty call's time goes (ms after the previous phase, medians).
        let mut calls = Vec::new();
        for _ in 0..runs.max(5) {
            let cmd = d.run_command("step_noop")?;
            calls.push(tokio::task::spawn_blocking(move || call_phases(cmd)).await??);
        }
        report.push_str(&format!(
            "  flotilla empty call, phases: {}\n",
            phase_breakdown(&calls)
        ));
        println!("{report}");
        eprintln!("{report}");
        if let Ok(path) = std::env::var("FLOTILLA_BENCH_OUT") {
            std::fs::write(Path::new(&path), &report)?;
        }
        d.cleanup().await?;
        sb.shutdown().await
    })
    .await
}
