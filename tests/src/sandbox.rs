//! One local cloud: moto (EC2 + IAM) with a VPC inside 127.0.0.0/8, a registry with the
//! busybox test images, a `flotilla.toml` written with flotilla-proto's own types, the
//! `flotilla daemon` itself, and the machine emulator turning the daemon's instances into
//! real dockerd. The helper image ships the gitlab-runner-helper stand-in; what it talks
//! to (a GitLab artifacts API stub, moto's S3 as the distributed cache) is served on the
//! slot's private service address (see [`crate::gitlab_stub`]).
//!
//! Invariant: teardown (explicit [`Sandbox::shutdown`] or Drop) stops the daemon, then
//! terminates every instance of the fleet in moto, stops every dockerd, the registry and
//! moto, the GitLab stub and the S3 forwarder, removes the service interface, and removes
//! the sandbox directory unless `FLOTILLA_KEEP_SANDBOX` is set.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flotilla_proto::config::{ClassConfig, Config, Market};
use flotilla_proto::duration::HumanDuration;

use crate::emulator::{EmulatedMachine, Emulator, EmulatorOptions};
use crate::faults::FaultProxy;
use crate::gitlab_stub::{GitLabStub, ServiceAddress};
use crate::moto::{self, InstanceInfo, Moto, Network, S3Presigner, TcpForward};
use crate::registry::Registry;
use crate::runner::{self, Job, JobResult, RunnerOptions, S3Cache};
use crate::util::{self, stop_child, tail, wait_until, Slot};

/// Knobs of one sandbox; `Default` is what most tests want.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Idle machines the default class keeps warm.
    pub idle_count: u32,
    /// An idle machine beyond idle_count is terminated after this long.
    pub idle_time: Duration,
    /// Jobs per machine; 0 = unlimited.
    pub max_builds: u32,
    pub max_machines: u32,
    /// Emulated boot time between `running` in moto and dockerd starting.
    pub boot_delay: Duration,
    /// Emulated start time of a stopped machine (`running` again to dockerd started).
    pub start_delay: Duration,
    /// The default class's `max_stopped` (the stopped warm pool).
    pub max_stopped: u32,
    /// The default class's `prefetch_images` (`None`: the config's default).
    pub prefetch_images: Option<u32>,
    /// The default class's `jobs_per_machine` (0: the config's default, 1).
    pub jobs_per_machine: u32,
    pub orphan_grace: Duration,
    pub acquire_timeout: Duration,
    /// Exact directory to use (emptied first); default: a new `flt-*` dir under `base_dir`.
    pub dir: Option<PathBuf>,
    /// Where the sandbox dir is made when `dir` is unset (default: the system temp dir).
    /// Keep it short: unix socket paths are limited to 108 bytes.
    pub base_dir: Option<PathBuf>,
    /// The `flotilla` binary (default: `$FLOTILLA_BIN`, else next to this executable).
    pub flotilla_bin: Option<PathBuf>,
    /// Start `flotilla daemon` (turn off to exercise the cloud parts alone).
    pub start_daemon: bool,
    /// The learned warm pool (`[classes.default.forecast]`); off so idle_time is exact.
    pub forecast: bool,
    /// The default class's instance types, in launch order.
    pub instance_types: Vec<String>,
    /// The default class's market.
    pub market: Market,
    /// More classes; empty `ami`, `instance_types`, `subnets`, `security_groups` and
    /// `instance_profile` are filled in with the sandbox's.
    pub extra_classes: Vec<(String, ClassConfig)>,
    /// Put a [`FaultProxy`] between the daemon and moto (see [`Sandbox::faults`]).
    pub ec2_proxy: bool,
    /// Serve the daemon's Prometheus metrics on a free port (see [`Sandbox::metrics`]).
    pub metrics: bool,
    /// The daemon's `reconcile_interval`.
    pub reconcile_interval: Duration,
    /// The fleet's extra machine `tags`.
    pub tags: std::collections::BTreeMap<String, String>,
    /// Files the emulated machines' image ships (path, content): e.g. an AMI's daemon.json.
    pub ami_files: Vec<(String, String)>,
    /// The fleet's `[dockerd]` settings.
    pub dockerd: flotilla_proto::dockerd::DockerdSettings,
    /// The default class's `ready_command`; `{registry}` in its image is the sandbox
    /// registry's address. Its `/host` is this host's `/` (the emulated machines' dockerd
    /// run here).
    pub ready_command: Option<flotilla_proto::boot_hooks::ReadyCommand>,
    /// The default class's `user_data_parts` (the emulator applies them chrooted into
    /// each machine's root, see [`crate::cloud_init`]).
    pub user_data_parts: Vec<flotilla_proto::boot_hooks::UserDataPart>,
    /// `logs.group`: broken or lost machines' reports go to this CloudWatch Logs group
    /// in moto (created here); unset, to `<state_dir>/machines/`.
    pub logs_group: Option<String>,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            idle_count: 0,
            idle_time: Duration::from_secs(20),
            max_builds: 0,
            max_machines: 5,
            boot_delay: Duration::from_secs(2),
            start_delay: Duration::from_secs(1),
            max_stopped: 0,
            prefetch_images: None,
            jobs_per_machine: 0,
            orphan_grace: Duration::from_secs(30),
            acquire_timeout: Duration::from_secs(90),
            dir: None,
            base_dir: None,
            flotilla_bin: None,
            start_daemon: true,
            forecast: false,
            instance_types: vec!["t3.micro".into()],
            market: Market::OnDemand,
            extra_classes: Vec::new(),
            ec2_proxy: false,
            metrics: false,
            reconcile_interval: Duration::from_secs(1),
            tags: std::collections::BTreeMap::new(),
            ami_files: Vec::new(),
            dockerd: Default::default(),
            ready_command: None,
            user_data_parts: Vec::new(),
            logs_group: None,
        }
    }
}

/// The class every sandbox configures.
pub const CLASS: &str = "default";

/// A running sandbox.
pub struct Sandbox {
    pub dir: PathBuf,
    pub fleet: String,
    pub slot: u8,
    pub config: Config,
    pub config_path: PathBuf,
    pub flotilla_bin: PathBuf,
    pub network: Network,
    pub job_image: String,
    /// The helper image jobs get: what `helper_image`'s `${ARCH}-v${CI_RUNNER_VERSION}` expands to.
    pub helper_image: String,
    /// The distributed cache's bucket in moto (`[runners.cache] Type = "s3"`).
    pub cache_bucket: String,
    ec2: aws_sdk_ec2::Client,
    moto_url: String,
    faults: Option<FaultProxy>,
    // Teardown order matters: fields are stopped explicitly in `teardown`.
    daemon: Option<Child>,
    emulator: Option<Emulator>,
    registry: Option<Registry>,
    moto: Option<Moto>,
    /// What the helper container talks to: the GitLab stub and moto's S3 (through a
    /// forwarder), on the host's private service address (see `gitlab_stub.rs`).
    gitlab: Option<GitLabStub>,
    s3_forward: Option<TcpForward>,
    s3_cache: Option<S3Cache>,
    service: Option<ServiceAddress>,
    _slot: Option<Slot>,
    torn_down: bool,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("dir", &self.dir)
            .field("fleet", &self.fleet)
            .field("moto", &self.moto_url)
            .finish()
    }
}

/// The `flotilla` binary: `$FLOTILLA_BIN`, else `flotilla` next to (or one directory above)
/// the current executable (`<target>/debug/deps/e2e-*` or `<target>/debug/flotilla-sandbox`).
pub fn find_flotilla_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FLOTILLA_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("FLOTILLA_BIN={} is not a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the current executable")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("flotilla"))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "the flotilla binary is not built (looked at {}); run `cargo build -p flotilla` \
                 with the same CARGO_TARGET_DIR, or set FLOTILLA_BIN",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// The `gitlab-runner-helper` stand-in (src/bin/gitlab-runner-helper.rs) the sandbox's
/// helper image ships: `$FLOTILLA_HELPER_BIN`, else next to (or one directory above) the
/// current executable, like [`find_flotilla_bin`].
pub fn find_helper_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FLOTILLA_HELPER_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("FLOTILLA_HELPER_BIN={} is not a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the current executable")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("gitlab-runner-helper"))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "the gitlab-runner-helper stand-in is not built (looked at {}); run \
                 `cargo build -p flotilla-sandbox` with the same CARGO_TARGET_DIR, or set \
                 FLOTILLA_HELPER_BIN",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

impl Sandbox {
    /// Starts everything and returns once the daemon's control socket accepts connections.
    pub async fn start(opts: SandboxOptions) -> Result<Self> {
        let flotilla_bin = match &opts.flotilla_bin {
            Some(p) => p.clone(),
            None if opts.start_daemon => find_flotilla_bin()?,
            None => find_flotilla_bin().unwrap_or_else(|_| PathBuf::from("flotilla")),
        };
        let slot = Slot::acquire()?;
        let dir = match &opts.dir {
            Some(d) => {
                if d.exists() {
                    util::stop_leftovers(d);
                    crate::emulator::unmount_under(d);
                    std::fs::remove_dir_all(d)
                        .with_context(|| format!("emptying {}", d.display()))?;
                }
                std::fs::create_dir_all(d)?;
                d.clone()
            }
            None => {
                let base = opts.base_dir.clone().unwrap_or_else(std::env::temp_dir);
                std::fs::create_dir_all(&base)?;
                tempfile::Builder::new()
                    .prefix("flt-")
                    .tempdir_in(&base)
                    .context("creating the sandbox dir")?
                    .keep()
            }
        };
        match Self::start_in(opts, flotilla_bin, slot, dir.clone()).await {
            Ok(sb) => Ok(sb),
            Err(e) => {
                if std::env::var_os("FLOTILLA_KEEP_SANDBOX").is_none() {
                    crate::emulator::unmount_under(&dir);
                    let _ = std::fs::remove_dir_all(&dir);
                } else {
                    eprintln!(
                        "sandbox: FLOTILLA_KEEP_SANDBOX is set: kept {}",
                        dir.display()
                    );
                }
                Err(e)
            }
        }
    }

    async fn start_in(
        opts: SandboxOptions,
        flotilla_bin: PathBuf,
        slot: Slot,
        dir: PathBuf,
    ) -> Result<Self> {
        let n = slot.n;
        let fleet = format!("sbx{n}-{}", util::unique_token());
        tracing::info!("sandbox {fleet} in {} (slot {n})", dir.display());

        let moto = Moto::start(&dir.join("moto.log")).await?;
        util::record_pid(&dir, "moto_server", moto.pid());
        let moto_url = moto.url();
        let ec2 = moto.ec2().await;
        let faults = if opts.ec2_proxy {
            Some(FaultProxy::start(&moto_url).await?)
        } else {
            None
        };
        let profile = format!("flotilla-builder-{n}");
        moto.create_instance_profile(&profile)?;
        let network = moto::create_network(&ec2, n, &profile).await?;

        // What the helper container reaches (containers cannot reach 127.0.0.1): the
        // GitLab stub and moto's S3 on the host's private service address.
        let service = ServiceAddress::create(n, &dir)?;
        let gitlab = GitLabStub::start(service.ip).await?;
        let cache_bucket = format!("flotilla-cache-{n}");
        moto::create_bucket(&moto::s3_client(&moto_url).await, &cache_bucket).await?;
        let s3_forward = TcpForward::start(
            service.ip.into(),
            std::net::SocketAddr::from(([127, 0, 0, 1], moto.port())),
        )
        .await?;
        let s3_cache = S3Cache {
            presigner: S3Presigner::new(&format!("http://{}", s3_forward.addr), &cache_bucket)
                .await,
            shared: false,
            path: String::new(),
        };

        let reg_dir = dir.join("registry");
        std::fs::create_dir_all(&reg_dir)?;
        let registry = Registry::start(&reg_dir).await?;
        util::record_pid(&dir, "docker-registry", registry.pid());
        let (job_image, helper_image) = {
            let r = &registry;
            let job = r.push_busybox_image("flotilla/busybox", "latest", "job")?;
            // Like the stock helper image: busybox plus only /usr/bin/gitlab-runner-helper.
            let helper_bin = find_helper_bin()?;
            let built = tokio::task::spawn_blocking(move || {
                crate::images::HostImage::new("helper")
                    .binary(&helper_bin, "/usr/bin/gitlab-runner-helper")
                    .build_cached(&std::env::temp_dir().join("flotilla-image-cache"))
            })
            .await
            .context("building the helper image panicked")??;
            // Tagged as GitLab tags its helpers, so the config can name it the way an
            // operator does: per machine architecture and runner version.
            let tag = format!("x86_64-v{}", crate::runner::RUNNER_VERSION);
            let helper = r.push_built("flotilla/helper", &tag, &built)?;
            (job, helper)
        };

        let state_dir = dir.join("state");
        // Parse a skeleton, then set fields: new keys in flotilla-proto keep their defaults.
        let q = |v: &str| serde_json::to_string(v).unwrap_or_default();
        let skeleton = format!(
            "fleet = {}\nstate_dir = {}\ndefault_class = {}\n\n[classes.{CLASS}]\nami = {}\n\
             instance_types = [\"t3.micro\"]\nsubnets = [{}]\n",
            q(&fleet),
            q(&state_dir.display().to_string()),
            q(CLASS),
            q(moto::AMI),
            q(&network.subnet_id),
        );
        let mut config = Config::from_toml(&skeleton)
            .map_err(|e| anyhow::anyhow!("sandbox config skeleton: {e}"))?;
        config.max_machines = opts.max_machines;
        config.reconcile_interval = HumanDuration(opts.reconcile_interval);
        config.orphan_grace = HumanDuration(opts.orphan_grace);
        config.aws.region = Some(moto::REGION.into());
        config.aws.endpoint_url = Some(
            faults
                .as_ref()
                .map_or_else(|| moto_url.clone(), |f| f.url().to_owned()),
        );
        if opts.metrics {
            config.metrics_addr = Some(format!("127.0.0.1:{}", util::free_port()?));
        }
        config.tags = opts.tags.clone();
        config.dockerd = opts.dockerd.clone();
        if let Some(group) = &opts.logs_group {
            moto::create_log_group(&moto_url, group).await?;
            config.logs.group = Some(group.clone());
            // Straight to moto: the fault proxy speaks EC2 only.
            config.logs.endpoint_url = Some(moto_url.clone());
        }
        config.job.default_image = job_image.clone();
        config.job.helper_image = format!(
            "{}/flotilla/helper:${{ARCH}}-v${{CI_RUNNER_VERSION}}",
            registry.host()
        );
        config.job.acquire_timeout = HumanDuration(opts.acquire_timeout);
        {
            let class = config
                .classes
                .get_mut(CLASS)
                .context("skeleton has no default class")?;
            class.security_groups = vec![network.security_group_id.clone()];
            class.instance_profile = Some(profile.clone());
            class.idle_count = opts.idle_count;
            class.idle_time = HumanDuration(opts.idle_time);
            class.max_machines = opts.max_machines;
            class.max_builds = opts.max_builds;
            class.max_stopped = opts.max_stopped;
            if opts.jobs_per_machine > 0 {
                class.jobs_per_machine = opts.jobs_per_machine;
            }
            if let Some(n) = opts.prefetch_images {
                class.prefetch_images = n;
            }
            class.boot_timeout = HumanDuration::from_secs(60);
            // The pool tests assert idle_count/idle_time exactly; the learned warm pool
            // would (rightly) keep a machine after a job. Tests of it turn it on.
            class.forecast.enabled = opts.forecast;
            class.instance_types = opts.instance_types.clone();
            class.market = opts.market;
            class.ready_command = opts.ready_command.clone().map(|mut r| {
                r.image = r.image.replace("{registry}", &registry.host());
                r
            });
            class.user_data_parts = opts.user_data_parts.clone();
        }
        for (name, extra) in &opts.extra_classes {
            let mut class = extra.clone();
            if class.ami.is_empty() {
                class.ami = moto::AMI.into();
            }
            if class.instance_types.is_empty() {
                class.instance_types = opts.instance_types.clone();
            }
            if class.subnets.is_empty() {
                class.subnets = vec![network.subnet_id.clone()];
            }
            if class.security_groups.is_empty() {
                class.security_groups = vec![network.security_group_id.clone()];
            }
            if class.instance_profile.is_none() {
                class.instance_profile = Some(profile.clone());
            }
            config.classes.insert(name.clone(), class);
        }
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("sandbox config is invalid: {e}"))?;
        let config_path = dir.join("flotilla.toml");
        std::fs::write(&config_path, config.to_toml()?)?;

        let emulator = Emulator::start(
            ec2.clone(),
            EmulatorOptions {
                fleet: fleet.clone(),
                dir: dir.join("m"),
                slot: n,
                boot_delay: opts.boot_delay,
                start_delay: opts.start_delay,
                poll_interval: Duration::from_millis(250),
                ami_files: opts.ami_files.clone(),
            },
        )?;

        let mut sb = Self {
            dir,
            fleet,
            slot: n,
            config,
            config_path,
            flotilla_bin,
            network,
            job_image,
            helper_image,
            cache_bucket,
            ec2,
            moto_url,
            faults,
            daemon: None,
            emulator: Some(emulator),
            registry: Some(registry),
            moto: Some(moto),
            gitlab: Some(gitlab),
            s3_forward: Some(s3_forward),
            s3_cache: Some(s3_cache),
            service: Some(service),
            _slot: Some(slot),
            torn_down: false,
        };
        if opts.start_daemon {
            sb.start_daemon().await?;
        }
        Ok(sb)
    }

    /// Environment for the daemon and the stages: fake credentials, no instance metadata.
    pub fn aws_env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", moto::REGION),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// Starts `flotilla daemon` (again, after [`Sandbox::kill_daemon`]); its output is
    /// appended to [`Sandbox::daemon_log`]. Returns once the control socket answers.
    pub async fn start_daemon(&mut self) -> Result<()> {
        self.start_daemon_with(&[]).await
    }

    /// `flotilla --config <sandbox config> daemon <extra>` with the sandbox's AWS
    /// environment and log level, stdin closed; the caller sets where output goes.
    fn daemon_command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(&self.flotilla_bin);
        cmd.arg("--config")
            .arg(&self.config_path)
            .arg("daemon")
            .args(extra)
            .envs(self.aws_env())
            .env(
                "RUST_LOG",
                std::env::var("FLOTILLA_DAEMON_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null());
        cmd
    }

    /// [`Sandbox::start_daemon`] with more arguments after `daemon` (e.g. `--adopt`).
    pub async fn start_daemon_with(&mut self, extra: &[&str]) -> Result<()> {
        if self.daemon.is_some() {
            bail!("the daemon is already running");
        }
        let log_path = self.daemon_log();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let err = log.try_clone()?;
        let mut cmd = self.daemon_command(extra);
        cmd.stdout(log).stderr(err);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().with_context(|| {
            format!(
                "starting {} daemon {}",
                self.flotilla_bin.display(),
                extra.join(" ")
            )
        })?;
        util::record_pid(&self.dir, "flotilla", child.id());
        self.daemon = Some(child);
        let socket = self.config.socket_path();
        let daemon = &mut self.daemon;
        let ready = wait_until(
            "the daemon's control socket",
            Duration::from_secs(60),
            Duration::from_millis(100),
            || {
                let exited = daemon.as_mut().and_then(|c| c.try_wait().ok().flatten());
                let socket = socket.clone();
                async move {
                    if let Some(status) = exited {
                        bail!("flotilla daemon exited with {status}");
                    }
                    Ok(tokio::net::UnixStream::connect(&socket)
                        .await
                        .ok()
                        .map(|_| ()))
                }
            },
        )
        .await;
        if let Err(e) = ready {
            if let Some(mut c) = self.daemon.take() {
                stop_child(&mut c, Duration::from_secs(5), true);
            }
            bail!(
                "{e:#}\ndaemon log ({}):\n{}",
                log_path.display(),
                tail(&log_path, 40)
            );
        }
        Ok(())
    }

    /// Runs `flotilla daemon <extra>` in the foreground, expecting it to exit on its own
    /// (a refusal to start) within `timeout`; returns its exit code and its output (stdout
    /// then stderr), also appended to [`Sandbox::daemon_log`]. A daemon that is still
    /// running at `timeout` is killed and reported as an error with what it printed.
    pub async fn run_daemon_to_exit(
        &self,
        extra: &[&str],
        timeout: Duration,
    ) -> Result<(Option<i32>, String)> {
        let mut cmd = tokio::process::Command::from(self.daemon_command(extra));
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| {
            format!(
                "starting {} daemon {}",
                self.flotilla_bin.display(),
                extra.join(" ")
            )
        })?;
        let pid = child.id();
        let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(out) => out.context("waiting for flotilla daemon")?,
            Err(_) => {
                // wait_with_output owned the child; it is killed on drop. Its group too.
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                bail!(
                    "flotilla daemon {} was still running after {timeout:?} (expected it to exit)",
                    extra.join(" ")
                );
            }
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.daemon_log())
        {
            use std::io::Write;
            let _ = f.write_all(text.as_bytes());
        }
        Ok((out.status.code(), text))
    }

    /// Pushes another busybox image (`/etc/flotilla-image` holds `flavour`) to the
    /// sandbox registry; returns its reference.
    /// `127.0.0.1:<port>` of the sandbox's registry, the host part of its image references.
    pub fn registry_host(&self) -> String {
        self.job_image
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn push_image(&self, repo: &str, flavour: &str) -> Result<String> {
        self.registry
            .as_ref()
            .context("registry already stopped")?
            .push_busybox_image(repo, "latest", flavour)
    }

    /// Builds (once per host: the layers are cached under
    /// [`crate::images::image_cache_dir`]) and pushes the Docker-in-Docker images: the
    /// service `flotilla/dind` (like docker:dind) and the job image `flotilla/docker-cli`.
    pub async fn push_dind_images(&self) -> Result<DindImages> {
        let built = tokio::task::spawn_blocking(|| {
            let dir = crate::images::image_cache_dir();
            let dind = crate::images::dind_image().build_cached(&dir)?;
            let cli = crate::images::docker_cli_image().build_cached(&dir)?;
            anyhow::Ok((dind, cli))
        })
        .await
        .context("building the DinD images panicked")??;
        let registry = self.registry.as_ref().context("registry already stopped")?;
        Ok(DindImages {
            dind: registry.push_built("flotilla/dind", "latest", &built.0)?,
            docker_cli: registry.push_built("flotilla/docker-cli", "latest", &built.1)?,
        })
    }

    pub fn daemon_log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    /// Sends `signal` to the daemon and waits (up to 30 s) for it to exit; the next
    /// [`Sandbox::start_daemon`] starts it again with the same config and state.
    pub async fn kill_daemon(&mut self, signal: nix::sys::signal::Signal) -> Result<()> {
        let mut child = self.daemon.take().context("the daemon is not running")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)
            .with_context(|| format!("sending {signal} to the daemon"))?;
        let exited = util::wait_until(
            "the daemon to exit",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || {
                let done = child.try_wait().map(|s| s.map(|_| ()));
                async move { Ok(done?) }
            },
        )
        .await;
        if exited.is_err() {
            stop_child(&mut child, Duration::from_secs(1), true);
        }
        exited
    }

    /// The fault-injecting proxy between the daemon and moto (`SandboxOptions::ec2_proxy`).
    pub fn faults(&self) -> Option<&FaultProxy> {
        self.faults.as_ref()
    }

    /// The daemon's metrics URL (`SandboxOptions::metrics`).
    pub fn metrics_url(&self) -> Option<String> {
        self.config
            .metrics_addr
            .as_ref()
            .map(|a| format!("http://{a}/metrics"))
    }

    /// One scrape of the daemon's `/metrics` (the raw text).
    pub async fn metrics(&self) -> Result<String> {
        let url = self
            .metrics_url()
            .context("the sandbox was started without metrics")?;
        tokio::task::spawn_blocking(move || {
            let resp = ureq::get(&url)
                .timeout(Duration::from_secs(10))
                .call()
                .with_context(|| format!("GET {url}"))?;
            Ok(resp.into_string()?)
        })
        .await?
    }

    pub fn state_dir(&self) -> &Path {
        &self.config.state_dir
    }

    pub fn moto_url(&self) -> &str {
        &self.moto_url
    }

    pub fn ec2(&self) -> &aws_sdk_ec2::Client {
        &self.ec2
    }

    /// The machine emulator.
    pub fn emulator(&self) -> &Emulator {
        // Only None after teardown, which consumes or drops the sandbox.
        self.emulator
            .as_ref()
            .unwrap_or_else(|| unreachable!("emulator used after teardown"))
    }

    pub fn machines(&self) -> Vec<EmulatedMachine> {
        self.emulator().machines()
    }

    /// Every instance of the fleet in moto, any state, oldest first.
    pub async fn instances(&self) -> Result<Vec<InstanceInfo>> {
        moto::fleet_instances(&self.ec2, &self.fleet).await
    }

    /// Instances of the fleet in moto in this state (`pending`, `running`, `terminated`...).
    pub async fn count_instances(&self, state: &str) -> Result<usize> {
        Ok(self
            .instances()
            .await?
            .iter()
            .filter(|i| i.state == state)
            .count())
    }

    /// Waits until `pred` holds for the fleet's instances; returns them.
    pub async fn wait_instances(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[InstanceInfo]) -> bool,
    ) -> Result<Vec<InstanceInfo>> {
        let pred = &pred;
        wait_until(what, timeout, Duration::from_millis(250), || async move {
            let list = self.instances().await?;
            Ok(pred(&list).then_some(list))
        })
        .await
        .with_context(|| format!("instances now: {}", self.describe_instances_now()))
    }

    fn describe_instances_now(&self) -> String {
        match moto::fleet_instance_ids_blocking(&self.moto_url, &self.fleet) {
            Ok(ids) => format!("not terminated: {ids:?}"),
            Err(e) => format!("(cannot describe: {e:#})"),
        }
    }

    /// How the runner emulator calls this sandbox's flotilla.
    pub fn runner_options(&self) -> RunnerOptions {
        let mut o = RunnerOptions::new(&self.flotilla_bin, Some(&self.config_path));
        o.env = self.aws_env();
        o.env.push(("RUST_LOG".into(), "info".into()));
        o.work_dir = Some(self.dir.join("runner"));
        if let Some(g) = &self.gitlab {
            o.server_url = g.url();
            o.gitlab = Some(g.jobs().clone());
        }
        o.cache = self.s3_cache.clone();
        o
    }

    /// The GitLab stub (artifacts API) the helper talks to.
    pub fn gitlab(&self) -> &GitLabStub {
        // Only None after teardown, which consumes or drops the sandbox.
        self.gitlab
            .as_ref()
            .unwrap_or_else(|| unreachable!("GitLab stub used after teardown"))
    }

    /// An S3 client on moto (127.0.0.1), to look at the cache bucket.
    pub async fn s3(&self) -> aws_sdk_s3::Client {
        moto::s3_client(&self.moto_url).await
    }

    /// Runs one job through every stage.
    pub async fn run_job(&self, job: Job) -> Result<JobResult> {
        runner::run_job(self.runner_options(), job).await
    }

    /// `flotilla --config F status` output (stdout + stderr).
    /// Returns once the daemon has completed `n` more reconcile passes (observe, plan,
    /// act) than when called: "a few reconciles later" as an event, not a guess at time.
    pub async fn wait_reconciles(&self, n: u64) -> Result<()> {
        let client = flotilla::control::ControlClient::new(&self.config.socket_path());
        let start = client.status().await?.reconcile_passes;
        let limit = self
            .config
            .reconcile_interval
            .0
            .saturating_mul(n as u32 * 3)
            + Duration::from_secs(30);
        wait_until(
            &format!("{n} reconcile passes"),
            limit,
            Duration::from_millis(100),
            || {
                let client = &client;
                async move {
                    let passes = client.status().await?.reconcile_passes;
                    Ok((passes >= start + n).then_some(()))
                }
            },
        )
        .await
    }

    pub async fn status(&self) -> Result<String> {
        let out = tokio::process::Command::new(&self.flotilla_bin)
            .arg("--config")
            .arg(&self.config_path)
            .arg("status")
            .envs(self.aws_env())
            .output()
            .await?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Diagnostics for a failed assertion: daemon log tail, emulator log, machines.
    pub fn diagnostics(&self) -> String {
        format!(
            "sandbox {}\n--- daemon.log (tail)\n{}\n--- emulator.log (tail)\n{}\n--- machines\n{:#?}",
            self.dir.display(),
            tail(&self.daemon_log(), 60),
            tail(&self.dir.join("m/emulator.log"), 30),
            self.emulator.as_ref().map(|e| e.machines()).unwrap_or_default()
        )
    }

    /// Stops everything (see the module invariant).
    pub async fn shutdown(mut self) -> Result<()> {
        tokio::task::spawn_blocking(move || self.teardown())
            .await
            .context("sandbox teardown panicked")
    }

    /// Blocking teardown; idempotent.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        if let Some(mut d) = self.daemon.take() {
            stop_child(&mut d, Duration::from_secs(15), true);
        }
        match moto::fleet_instance_ids_blocking(&self.moto_url, &self.fleet) {
            Ok(ids) => {
                if let Err(e) = moto::terminate_blocking(&self.moto_url, &ids) {
                    eprintln!("sandbox: terminating {ids:?} in moto failed: {e:#}");
                }
            }
            Err(e) => eprintln!("sandbox: listing the fleet in moto failed: {e:#}"),
        }
        if let Some(mut e) = self.emulator.take() {
            e.stop();
        }
        if let Some(mut r) = self.registry.take() {
            r.stop();
        }
        if let Some(mut m) = self.moto.take() {
            m.stop();
        }
        self.gitlab = None;
        self.s3_forward = None;
        if let Some(mut s) = self.service.take() {
            s.remove();
        }
        if std::env::var_os("FLOTILLA_KEEP_SANDBOX").is_some() {
            eprintln!(
                "sandbox: FLOTILLA_KEEP_SANDBOX is set: kept {}",
                self.dir.display()
            );
        } else {
            crate::emulator::unmount_under(&self.dir);
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                eprintln!("sandbox: cannot remove {}: {e}", self.dir.display());
            }
        }
        self._slot = None;
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// References of the Docker-in-Docker images in a sandbox's registry.
#[derive(Debug, Clone)]
pub struct DindImages {
    /// A docker:dind-like service image (see [`crate::images::dind_image`]).
    pub dind: String,
    /// A job image with busybox and the docker CLI.
    pub docker_cli: String,
}

/// Runs the docker CLI against a machine's local unix socket (no TLS); returns stdout.
pub async fn docker_on(machine: &EmulatedMachine, args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new("docker")
        .arg("-H")
        .arg(machine.docker_host())
        .args(args)
        .env_remove("DOCKER_HOST")
        .env_remove("DOCKER_TLS_VERIFY")
        .env_remove("DOCKER_CERT_PATH")
        .output()
        .await
        .context("running the docker CLI")?;
    if !out.status.success() {
        bail!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
