//! Issue 10, item 1, the helper contract: artifacts and cache go through the helper
//! container's `gitlab-runner` exactly as gitlab-runner's scripts call it (the sandbox's
//! helper image, like the stock one, ships only `/usr/bin/gitlab-runner-helper`), to the
//! sandbox's GitLab stub and to moto's S3 through pre-signed URLs, end to end.

use std::io::Read;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use flotilla_sandbox::{Job, JobResult, Outcome, Sandbox, SandboxOptions};
use sha2::{Digest, Sha256};

use crate::common::bounded;

const LIMIT: Duration = Duration::from_secs(420);

/// Everything the job printed, every stage (what the job log shows).
fn job_log(r: &JobResult) -> String {
    r.stages
        .iter()
        .map(|s| format!("{}{}", s.stdout, s.stderr))
        .collect()
}

/// The job succeeded and never found its runner command missing.
fn ensure_clean(name: &str, r: &JobResult, sb: &Sandbox) -> Result<()> {
    ensure!(
        r.outcome == Outcome::Success,
        "{name} failed:\n{}\n{}",
        r.describe(),
        sb.diagnostics()
    );
    ensure!(
        !job_log(r).contains("Missing gitlab-runner"),
        "{name}: the helper container has no `gitlab-runner` (artifacts and cache were \
         silently skipped):\n{}",
        r.describe()
    );
    Ok(())
}

/// The hex digest `sha256sum` printed for `file` in a stage's output.
fn printed_sha(r: &JobResult, stage: &str, file: &str) -> Result<String> {
    let out = &r.stage(stage).context("stage did not run")?.stdout;
    out.lines()
        .find_map(|l| {
            let (sum, name) = l.split_once(char::is_whitespace)?;
            (name.trim() == file && sum.len() == 64).then(|| sum.to_owned())
        })
        .with_context(|| format!("no sha256sum of {file} in {stage}:\n{out}"))
}

/// The build machine `prepare` said it leased.
fn machine_of(r: &JobResult) -> Result<String> {
    let out = &r.stage("prepare").context("no prepare")?.stdout;
    out.lines()
        .find_map(|l| l.strip_prefix("Running on build machine "))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .with_context(|| format!("no `Running on build machine` line in:\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_reach_gitlab_and_the_dependent_job_byte_identical() -> Result<()> {
    bounded(LIMIT, async {
        let sb = Sandbox::start(SandboxOptions::default()).await?;
        let build = Job::new(
            1001,
            &[
                "mkdir -p out/sub",
                "dd if=/dev/urandom of=out/payload.bin bs=1048576 count=3 2>/dev/null",
                "echo from-build > out/sub/note.txt",
                "sha256sum out/payload.bin",
            ],
        )
        .with_artifacts(&["out/"]);
        let a = sb.run_job(build).await?;
        ensure_clean("job A", &a, &sb)?;
        let made = printed_sha(&a, "build_script", "out/payload.bin")?;

        let upload = sb.gitlab().jobs().artifacts(1001).with_context(|| {
            format!(
                "the GitLab stub got no artifacts from job A (requests: {:?}):\n{}",
                sb.gitlab().jobs().requests(),
                a.describe()
            )
        })?;
        ensure!(
            upload.filename == "artifacts.zip"
                && upload.query.get("artifact_format").map(String::as_str) == Some("zip")
                && upload.query.get("artifact_type").map(String::as_str) == Some("archive")
                && upload.query.get("expire_in").map(String::as_str) == Some("1 week"),
            "upload as gitlab-runner sends it: {upload:?}"
        );
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(upload.bytes.to_vec()))
            .context("the uploaded artifacts are not a zip")?;
        let mut payload = Vec::new();
        zip.by_name("out/payload.bin")
            .context("out/payload.bin is not in the archive")?
            .read_to_end(&mut payload)?;
        let uploaded = hex::encode(Sha256::digest(&payload));
        ensure!(
            uploaded == made && payload.len() == 3 << 20,
            "job A made {made}, GitLab got {uploaded} ({} bytes)",
            payload.len()
        );

        let test = Job::new(1002, &["sha256sum out/payload.bin", "cat out/sub/note.txt"])
            .with_dependency(1001, "build", &upload.filename, upload.bytes.len() as u64);
        let b = sb.run_job(test).await?;
        ensure_clean("job B", &b, &sb)?;
        ensure!(
            b.ran("download_artifacts"),
            "job B has no download_artifacts stage:\n{}",
            b.describe()
        );
        let got = printed_sha(&b, "build_script", "out/payload.bin")?;
        ensure!(got == made, "job A made {made}, job B got {got}");
        let note = &b.stage("build_script").context("no build_script")?.stdout;
        ensure!(note.contains("from-build"), "job B's note:\n{note}");
        println!(
            "artifacts: job A sha256 {made}, GitLab {uploaded} ({} byte zip), job B {got}",
            upload.bytes.len()
        );
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_archived_on_one_machine_is_restored_on_another_through_s3() -> Result<()> {
    bounded(LIMIT, async {
        // One job per machine: job B cannot find job A's cache on the machine's volume.
        let sb = Sandbox::start(SandboxOptions {
            max_builds: 1,
            ..Default::default()
        })
        .await?;
        let key = "deps-$CI_RUNNER_SHORT_TOKEN";
        let first = Job::new(
            1101,
            &[
                "test ! -e vendor/dep.bin",
                "mkdir -p vendor",
                "dd if=/dev/urandom of=vendor/dep.bin bs=1048576 count=2 2>/dev/null",
                "sha256sum vendor/dep.bin",
            ],
        )
        .with_cache(key, &["vendor/"]);
        let a = sb.run_job(first).await?;
        ensure_clean("job A", &a, &sb)?;
        let made = printed_sha(&a, "build_script", "vendor/dep.bin")?;
        let archive = &a.stage("archive_cache").context("no archive_cache")?.stdout;
        ensure!(
            archive.contains("Created cache"),
            "job A did not create its cache:\n{}",
            a.describe()
        );

        // The object gitlab-runner names for that key: runner/<short token>/project/<id>/<key>.
        let object = format!(
            "runner/{0}/project/1/deps-{0}",
            sb.runner_options().runner_short_token
        );
        let head = sb
            .s3()
            .await
            .head_object()
            .bucket(&sb.cache_bucket)
            .key(&object)
            .send()
            .await
            .with_context(|| format!("{object} is not in the cache bucket:\n{}", a.describe()))?;
        ensure!(
            head.metadata()
                .and_then(|m| m.get("cachekey"))
                .map(String::as_str)
                == Some(object.rsplit('/').next().unwrap_or_default()),
            "cache object metadata: {:?}",
            head.metadata()
        );

        let second = Job::new(1102, &["sha256sum vendor/dep.bin"]).with_cache(key, &["vendor/"]);
        let b = sb.run_job(second).await?;
        ensure_clean("job B", &b, &sb)?;
        let (ma, mb) = (machine_of(&a)?, machine_of(&b)?);
        ensure!(
            ma != mb,
            "both jobs ran on {ma}: max_builds = 1 should have replaced it"
        );
        let restore = &b.stage("restore_cache").context("no restore_cache")?.stdout;
        ensure!(
            restore.contains("Successfully extracted cache"),
            "job B did not extract the cache:\n{}",
            b.describe()
        );
        let got = printed_sha(&b, "build_script", "vendor/dep.bin")?;
        ensure!(
            got == made,
            "job A on {ma} cached {made}, job B on {mb} got {got}"
        );
        println!("cache: {object} archived on {ma}, restored on {mb}, sha256 {got}");
        sb.shutdown().await
    })
    .await
}
