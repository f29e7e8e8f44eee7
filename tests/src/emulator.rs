//! The machine emulator: plays the part of EC2 build machines. It watches the instances of
//! one fleet in moto; for each one that is `running` it reads the user data, writes the
//! files cloud-init would write under a per-machine root, and after a boot delay starts a
//! real dockerd configured from exactly those files, listening on the instance's private
//! IP (a loopback address). When the instance is terminated or gone, that dockerd is
//! stopped and the machine's directories removed. When it is stopped (StopInstances), its
//! dockerd is stopped but its directories are kept (data root with the image cache,
//! certificates, daemon.json): when moto lists it running again (StartInstances), the same
//! dockerd is started again on them after [`EmulatorOptions::start_delay`], as a real
//! machine's disk survives a stop and cloud-init's per-instance files are not rewritten.
//!
//! Like cloud-init it writes the AMI's own files first ([`EmulatorOptions::ami_files`],
//! e.g. a daemon.json the image ships), then the user data's `write_files`, then runs the
//! user data's `python3` runcmd entries (the daemon.json merge) with every absolute path
//! argument mapped into the machine root; `systemctl` entries are skipped (there is no
//! systemd: dockerd is started directly). dockerd gets the merged daemon.json (as its
//! `--config-file`, minus the keys the emulator must set as flags: hosts and TLS files
//! mapped into the root, its own exec root, pid file and address pools), `data-root`
//! mapped into the machine root, and the systemd drop-in's `Environment=` (proxies).
//! The operator's `default-address-pools` are not applied: emulated machines share one
//! host and each gets its own pool in 10.<slot>.0.0/16.
//! The operator's `user_data_parts` are applied as cloud-init would, in its order: their
//! `write_files` after Flotilla's, their shell scripts next, then Flotilla's runcmd and
//! theirs; scripts and commands run chrooted into the machine root ([`crate::cloud_init`]),
//! `systemctl` entries skipped as above.
//!
//! Invariants: never the default bridge (`--bridge=none`), distinct data/exec roots, pid
//! files and `--default-address-pool`s per machine (10.<slot>.<k>.0/24), so several
//! dockerd (also of other sandboxes) run side by side; they share the host's iptables
//! through a guard that keeps one dockerd's start from wiping the chains of the others
//! (see [`IPTABLES_GUARD`]); every dockerd is stopped when the emulator is dropped.
//!
//! Tests wait on machine state changes, not on the clock: every change (a machine appears,
//! finishes booting, fails, is dropped, is stopped) bumps a `tokio::sync::watch`, and
//! [`Emulator::wait_for`] re-checks its condition at each one. Each stop is also kept as a
//! [`StoppedMachine`] record (what was still on the machine when it went).
//!
//! Privileged containers: this host's capability bounding set may lack capabilities a
//! real EC2 machine has (CAP_SYS_RESOURCE here), and dockerd hands a privileged container
//! every capability it knows, so runc would refuse it. Each dockerd's default runtime is
//! a runc wrapper ([`runc_wrapper_script`]) that drops from the container's (and an
//! exec's) capability lists exactly the ones the host cannot grant, so `--privileged`
//! (Docker-in-Docker services) works as on a real machine.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use flotilla_proto::bootstrap::{CloudConfig, DockerdConfig, DAEMON_JSON_PATH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::cloud_init::{self, OperatorParts};
use crate::moto::{fleet_instances, InstanceInfo};
use crate::util::{stop_child, tail, wait_until};

/// Options of the emulator.
#[derive(Debug, Clone)]
pub struct EmulatorOptions {
    /// Fleet whose instances to emulate.
    pub fleet: String,
    /// Per-machine roots go under this directory (keep it short: unix socket paths are
    /// limited to 108 bytes).
    pub dir: PathBuf,
    /// The sandbox slot: machines get Docker address pools inside 10.<slot>.0.0/16.
    pub slot: u8,
    /// Time between "running" in moto and starting dockerd, like a real boot.
    pub boot_delay: Duration,
    /// Time between "running" again after a stop and dockerd starting again (a start is
    /// faster than a first boot: no cloud-init, an image cache already on disk).
    pub start_delay: Duration,
    /// How often moto is polled.
    pub poll_interval: Duration,
    /// Files every machine's image ships (path on the machine, content), written before
    /// the user data's: e.g. an AMI's own `/etc/docker/daemon.json`.
    pub ami_files: Vec<(String, String)>,
}

/// Where an emulated machine is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachinePhase {
    /// Files written; dockerd not started or not answering yet.
    Booting,
    /// dockerd answers on its local socket.
    Running,
    /// Bootstrap failed (bad user data, dockerd died); the message says why.
    Failed(String),
}

/// A machine as the emulator runs it; a snapshot.
#[derive(Debug, Clone)]
pub struct EmulatedMachine {
    pub instance_id: String,
    /// The `flotilla:machine` tag (or the machine id in the user data).
    pub machine_id: Option<String>,
    pub private_ip: String,
    /// The machine's root directory (cloud-init files under `fs/`).
    pub root: PathBuf,
    /// dockerd's local unix socket: no TLS, for tests to inspect the machine.
    pub docker_socket: PathBuf,
    /// The TCP port dockerd was told to listen on (from daemon.json).
    pub tls_port: Option<u16>,
    pub phase: MachinePhase,
    pub dockerd_pid: Option<u32>,
    /// How many times it was started again after a stop (0: its first boot).
    pub starts: u32,
}

impl EmulatedMachine {
    /// `unix://...` for `docker -H`.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.docker_socket.display())
    }
    /// Path of a file the machine's cloud-init wrote (e.g. `/etc/flotilla/tls/ca.pem`).
    pub fn file(&self, path: &str) -> PathBuf {
        self.root.join("fs").join(path.trim_start_matches('/'))
    }
    pub fn dockerd_log(&self) -> PathBuf {
        self.root.join("dockerd.log")
    }
}

/// A machine whose dockerd [`Emulator::freeze`] stopped.
#[derive(Debug, Clone)]
pub struct FrozenMachine {
    pub instance_id: String,
    /// The `flotilla:machine` tag (or the machine id in the user data).
    pub machine_id: Option<String>,
    pub dockerd_pid: u32,
}

/// A machine the emulator stopped because its instance left `running` (or at teardown):
/// its dockerd is stopped and its directories are removed by the time this is recorded.
#[derive(Debug, Clone)]
pub struct StoppedMachine {
    pub instance_id: String,
    pub dockerd_pid: Option<u32>,
    /// Names of the containers still on the machine when it was stopped (the emulator
    /// removes them, as the machine's death would): a job's containers here mean the
    /// machine went while the job had things on it.
    pub leftover_containers: Vec<String>,
    /// Whether dockerd stopped on SIGTERM (else it was killed).
    pub clean: bool,
    /// The instance was stopped, not terminated: its directories (data root, images,
    /// certificates) are kept for its next start.
    pub kept: bool,
}

/// How a machine's dockerd is started: decided at its first boot, reused by every start.
#[derive(Debug, Clone)]
struct Launch {
    args: Vec<String>,
    env: Vec<(String, String)>,
    tls_port: Option<u16>,
    machine_id: Option<String>,
    data_dir: PathBuf,
}

struct Entry {
    machine: EmulatedMachine,
    child: Option<Child>,
    launch: Option<Launch>,
}

struct Shared {
    opts: EmulatorOptions,
    machines: Mutex<BTreeMap<String, Entry>>,
    /// Machines whose instance is stopped: dockerd stopped, directories kept.
    parked: Mutex<BTreeMap<String, Entry>>,
    /// Instances whose dockerd is being stopped for a stop (not yet parked).
    parking: Mutex<std::collections::BTreeSet<String>>,
    stopped: Mutex<Vec<StoppedMachine>>,
    next_pool: Mutex<u8>,
    log: Mutex<Option<File>>,
    /// Bumped after every change of `machines` or `stopped`: what [`Emulator::wait_for`]
    /// wakes on.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn machines(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.machines.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn parked(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn parking(&self) -> MutexGuard<'_, std::collections::BTreeSet<String>> {
        self.parking.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells waiters that the machines changed (call after the change, locks released).
    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    fn event(&self, msg: &str) {
        tracing::info!(target: "emulator", "{msg}");
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = log.as_mut() {
            let now = chrono_like_now();
            let _ = writeln!(f, "{now} {msg}");
        }
    }
}

fn chrono_like_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", d.as_secs(), d.subsec_millis())
}

/// The running emulator; dropping it stops every dockerd it started.
pub struct Emulator {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("fleet", &self.shared.opts.fleet)
            .finish()
    }
}

impl Emulator {
    /// Starts watching moto for the fleet's instances.
    pub fn start(ec2: aws_sdk_ec2::Client, opts: EmulatorOptions) -> Result<Self> {
        std::fs::create_dir_all(&opts.dir)
            .with_context(|| format!("creating {}", opts.dir.display()))?;
        install_iptables_guard(&opts.dir.join("bin"))?;
        install_runc_wrapper(&opts.dir.join("bin"))?;
        let log = File::create(opts.dir.join("emulator.log")).ok();
        let shared = Arc::new(Shared {
            opts,
            machines: Mutex::new(BTreeMap::new()),
            parked: Mutex::new(BTreeMap::new()),
            parking: Mutex::new(std::collections::BTreeSet::new()),
            stopped: Mutex::new(Vec::new()),
            next_pool: Mutex::new(0),
            log: Mutex::new(log),
            changes: tokio::sync::watch::Sender::new(0),
        });
        let task = tokio::spawn(watch(ec2, shared.clone()));
        Ok(Self {
            shared,
            task: Some(task),
        })
    }

    /// The machines currently emulated (booting, running or failed).
    pub fn machines(&self) -> Vec<EmulatedMachine> {
        self.shared
            .machines()
            .values()
            .map(|e| e.machine.clone())
            .collect()
    }

    pub fn machine(&self, instance_id: &str) -> Option<EmulatedMachine> {
        self.shared
            .machines()
            .get(instance_id)
            .map(|e| e.machine.clone())
    }

    /// Waits until at least `n` machines are running and returns them; fails at once when
    /// a machine's bootstrap failed.
    pub async fn wait_running(&self, n: usize, timeout: Duration) -> Result<Vec<EmulatedMachine>> {
        let running = self
            .wait_for(
                &format!("{n} emulated machine(s) to be running"),
                timeout,
                |machines, _| {
                    let failed: Vec<_> = machines
                        .iter()
                        .filter_map(|m| match &m.phase {
                            MachinePhase::Failed(why) => Some(format!("{}: {why}", m.instance_id)),
                            _ => None,
                        })
                        .collect();
                    if !failed.is_empty() {
                        return Some(Err(failed.join("; ")));
                    }
                    let running: Vec<_> = machines
                        .iter()
                        .filter(|m| m.phase == MachinePhase::Running)
                        .cloned()
                        .collect();
                    (running.len() >= n).then_some(Ok(running))
                },
            )
            .await?;
        running.map_err(|failed| anyhow::anyhow!("machine bootstrap failed: {failed}"))
    }

    /// Machines the emulator has stopped so far, in the order they were stopped.
    pub fn stopped(&self) -> Vec<StoppedMachine> {
        self.shared
            .stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until the machine of `instance_id` has been stopped (dockerd stopped,
    /// directories removed); returns the record.
    pub async fn wait_stopped(
        &self,
        instance_id: &str,
        timeout: Duration,
    ) -> Result<StoppedMachine> {
        self.wait_for(
            &format!("the emulator to stop {instance_id}"),
            timeout,
            |_, stopped| {
                stopped
                    .iter()
                    .find(|s| s.instance_id == instance_id)
                    .cloned()
            },
        )
        .await
    }

    /// Waits until `check` finds what it looks for in the emulated machines and the
    /// stopped ones, re-checking at every change the emulator makes: an event wait, with
    /// `timeout` only as a hang guard naming `what`.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&[EmulatedMachine], &[StoppedMachine]) -> Option<T>,
    ) -> Result<T> {
        let mut rx = self.shared.changes.subscribe();
        let wait = async {
            loop {
                rx.borrow_and_update();
                if let Some(v) = check(&self.machines(), &self.stopped()) {
                    return Ok(v);
                }
                if rx.changed().await.is_err() {
                    bail!("the emulator stopped while waiting for {what}");
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.with_context(|| {
            format!(
                "timed out after {timeout:?} waiting for {what}; machines now: {:?}",
                self.machines()
                    .iter()
                    .map(|m| (&m.instance_id, &m.phase))
                    .collect::<Vec<_>>()
            )
        })?
    }

    /// Makes a running machine stop answering, as a hung kernel or a network partition
    /// does: its dockerd is stopped with SIGSTOP, so connections to its TLS port are still
    /// accepted by the kernel but never answered (handshakes and API calls hang), while its
    /// containers run on. [`Emulator::thaw`] resumes it. A frozen machine terminated in
    /// moto is still stopped by the emulator (its last SIGKILL works on a stopped process),
    /// only slowly: thaw it once it is out of service.
    pub fn freeze(&self, instance_id: &str) -> Result<FrozenMachine> {
        let m = self
            .machine(instance_id)
            .with_context(|| format!("{instance_id} is not an emulated machine"))?;
        if m.phase != MachinePhase::Running {
            bail!(
                "{instance_id} is not running ({:?}): nothing to freeze",
                m.phase
            );
        }
        let pid = m
            .dockerd_pid
            .with_context(|| format!("{instance_id} has no dockerd"))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .with_context(|| format!("SIGSTOP to dockerd {pid} of {instance_id}"))?;
        self.shared.event(&format!(
            "{instance_id}: dockerd pid {pid} frozen (SIGSTOP): the machine stops answering"
        ));
        Ok(FrozenMachine {
            instance_id: m.instance_id,
            machine_id: m.machine_id,
            dockerd_pid: pid,
        })
    }

    /// Resumes a machine [`Emulator::freeze`] stopped (SIGCONT). Also works once the
    /// emulator has dropped it (terminated in moto); a dockerd already gone is no error.
    pub fn thaw(&self, frozen: &FrozenMachine) -> Result<()> {
        match nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(frozen.dockerd_pid as i32),
            nix::sys::signal::Signal::SIGCONT,
        ) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => bail!(
                "SIGCONT to dockerd {} of {}: {e}",
                frozen.dockerd_pid,
                frozen.instance_id
            ),
        }
        self.shared.event(&format!(
            "{}: dockerd pid {} thawed (SIGCONT)",
            frozen.instance_id, frozen.dockerd_pid
        ));
        Ok(())
    }

    /// Stops watching and stops every dockerd (blocking; also done on drop).
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let mut entries: Vec<Entry> = std::mem::take(&mut *self.shared.machines())
            .into_values()
            .collect();
        entries.extend(std::mem::take(&mut *self.shared.parked()).into_values());
        let handles: Vec<_> = entries
            .into_iter()
            .map(|e| {
                let shared = self.shared.clone();
                std::thread::spawn(move || stop_machine(&shared, e, true, false))
            })
            .collect();
        for h in handles {
            let _ = h.join();
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn watch(ec2: aws_sdk_ec2::Client, shared: Arc<Shared>) {
    let mut last_error: Option<String> = None;
    loop {
        match fleet_instances(&ec2, &shared.opts.fleet).await {
            Ok(list) => {
                last_error = None;
                reconcile(&ec2, &shared, &list);
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if last_error.as_deref() != Some(&msg) {
                    shared.event(&format!("describe failed: {msg}"));
                    last_error = Some(msg);
                }
            }
        }
        tokio::time::sleep(shared.opts.poll_interval).await;
    }
}

fn reconcile(ec2: &aws_sdk_ec2::Client, shared: &Arc<Shared>, list: &[InstanceInfo]) {
    // (entry, park: stopped rather than terminated, moto's state)
    let mut gone: Vec<(Entry, bool, String)> = Vec::new();
    let mut added = false;
    let state_of = |id: &str| {
        list.iter()
            .find(|i| i.instance_id == id)
            .map_or_else(|| "gone".to_owned(), |i| i.state.clone())
    };
    {
        let mut machines = shared.machines();
        let mut parked = shared.parked();
        let parking = shared.parking();
        for inst in list.iter().filter(|i| i.is_running()) {
            if machines.contains_key(&inst.instance_id) || parking.contains(&inst.instance_id) {
                continue;
            }
            // Started again after a stop: the same directories, dockerd started again.
            if let Some(mut entry) = parked.remove(&inst.instance_id) {
                entry.machine.phase = MachinePhase::Booting;
                entry.machine.starts += 1;
                entry.machine.dockerd_pid = None;
                let (machine, launch) = (entry.machine.clone(), entry.launch.clone());
                shared.event(&format!(
                    "{} is running again in moto: starting its dockerd in {:?} (same data root and certificates)",
                    inst.instance_id, shared.opts.start_delay
                ));
                machines.insert(inst.instance_id.clone(), entry);
                added = true;
                let shared = shared.clone();
                tokio::spawn(async move {
                    let id = machine.instance_id.clone();
                    let started = match launch {
                        Some(launch) => restart(&shared, machine, launch).await,
                        None => Err(anyhow::anyhow!("stopped before its first dockerd start")),
                    };
                    if let Err(e) = started {
                        let msg = format!("{e:#}");
                        shared.event(&format!("{id} failed to start: {msg}"));
                        if let Some(entry) = shared.machines().get_mut(&id) {
                            entry.machine.phase = MachinePhase::Failed(msg);
                        }
                        shared.changed();
                    }
                });
                continue;
            }
            let Some(ip) = inst.private_ip.clone() else {
                continue;
            };
            let root = shared.opts.dir.join(&inst.instance_id);
            let machine = EmulatedMachine {
                instance_id: inst.instance_id.clone(),
                machine_id: inst.machine_id.clone(),
                private_ip: ip,
                docker_socket: root.join("docker.sock"),
                root,
                tls_port: None,
                phase: MachinePhase::Booting,
                dockerd_pid: None,
                starts: 0,
            };
            shared.event(&format!(
                "{} is running in moto at {}: booting",
                inst.instance_id, machine.private_ip
            ));
            added = true;
            machines.insert(
                inst.instance_id.clone(),
                Entry {
                    machine: machine.clone(),
                    child: None,
                    launch: None,
                },
            );
            let (ec2, shared) = (ec2.clone(), shared.clone());
            tokio::spawn(async move {
                let id = machine.instance_id.clone();
                if let Err(e) = boot(&ec2, &shared, machine).await {
                    let msg = format!("{e:#}");
                    shared.event(&format!("{id} failed to boot: {msg}"));
                    if let Some(entry) = shared.machines().get_mut(&id) {
                        entry.machine.phase = MachinePhase::Failed(msg);
                    }
                    shared.changed();
                }
            });
        }
        let alive: Vec<&str> = list
            .iter()
            .filter(|i| matches!(i.state.as_str(), "pending" | "running"))
            .map(|i| i.instance_id.as_str())
            .collect();
        let dead: Vec<String> = machines
            .keys()
            .filter(|id| !alive.contains(&id.as_str()))
            .cloned()
            .collect();
        for id in dead {
            if let Some(e) = machines.remove(&id) {
                let state = state_of(&id);
                let park = matches!(state.as_str(), "stopping" | "stopped");
                gone.push((e, park, state));
            }
        }
        // Stopped machines whose instance is now terminated (or gone): their disks go.
        let kept: Vec<String> = parked
            .keys()
            .filter(|id| {
                !matches!(
                    state_of(id).as_str(),
                    "stopping" | "stopped" | "pending" | "running"
                )
            })
            .cloned()
            .collect();
        for id in kept {
            if let Some(e) = parked.remove(&id) {
                let state = state_of(&id);
                gone.push((e, false, state));
            }
        }
    }
    if added || !gone.is_empty() {
        shared.changed();
    }
    for (entry, park, state) in gone {
        let id = entry.machine.instance_id.clone();
        if park {
            shared.parking().insert(id.clone());
            shared.event(&format!(
                "{id} is {state} in moto: stopping its dockerd, keeping its disk"
            ));
        } else {
            shared.event(&format!("{id} is {state} in moto: stopping its dockerd"));
        }
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || stop_machine(&shared, entry, false, park));
    }
}

/// Starts a stopped machine's dockerd again after the start delay, exactly as its first
/// boot did (same arguments, data root, certificates): no user data is read again.
async fn restart(shared: &Arc<Shared>, machine: EmulatedMachine, launch: Launch) -> Result<()> {
    tokio::time::sleep(shared.opts.start_delay).await;
    run_dockerd(shared, &machine, &launch).await
}

/// Reads user data, writes the files, waits the boot delay, starts dockerd, waits for it.
async fn boot(
    ec2: &aws_sdk_ec2::Client,
    shared: &Arc<Shared>,
    machine: EmulatedMachine,
) -> Result<()> {
    let id = &machine.instance_id;
    let attr = ec2
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .context("DescribeInstanceAttribute userData")?;
    let b64 = attr
        .user_data()
        .and_then(|u| u.value())
        .context("instance has no user data")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .context("user data is not base64")?;
    let text = String::from_utf8(raw).context("user data is not UTF-8")?;
    let cloud = CloudConfig::parse(&text).context("parsing user data as cloud-config")?;

    let fs_root = machine.root.join("fs");
    for (path, content) in &shared.opts.ami_files {
        crate::util::write_file(
            &fs_root.join(path.trim_start_matches('/')),
            content.as_bytes(),
            0o644,
        )?;
    }
    for f in &cloud.write_files {
        let mode = u32::from_str_radix(f.permissions.trim_start_matches("0o"), 8)
            .with_context(|| format!("bad permissions {:?} for {}", f.permissions, f.path))?;
        let dest = fs_root.join(f.path.trim_start_matches('/'));
        let bytes = f.bytes().context("decoding a user data file")?;
        crate::util::write_file(&dest, &bytes, mode)?;
    }
    std::fs::write(machine.root.join("user-data"), &text)?;
    let operator = OperatorParts::parse(&text).context("reading the user_data_parts")?;
    for f in &operator.write_files {
        let mode = u32::from_str_radix(f.permissions.trim_start_matches("0o"), 8)
            .with_context(|| format!("bad permissions {:?} for {}", f.permissions, f.path))?;
        let bytes = f.bytes().context("decoding a user_data_parts file")?;
        crate::util::write_file(&fs_root.join(f.path.trim_start_matches('/')), &bytes, mode)?;
    }
    cloud_init::run_scripts(&fs_root, &operator.scripts)?;
    run_commands(&cloud, &fs_root)?;
    for cmd in &operator.runcmd {
        if cmd.first().is_some_and(|p| p == "systemctl") {
            continue;
        }
        cloud_init::run_in_machine(&fs_root, cmd).context("a user_data_parts runcmd")?;
    }
    let merged = read_daemon_json(&fs_root)?;
    let dockerd_config: DockerdConfig = serde_json::from_value(merged.clone().into())
        .context("reading the merged /etc/docker/daemon.json")?;
    let data_root = merged
        .get("data-root")
        .and_then(|v| v.as_str())
        .map(|p| fs_root.join(p.trim_start_matches('/')));
    let mut flags = merged;
    for key in EMULATOR_FLAGS {
        flags.remove(key);
    }
    std::fs::write(
        machine.root.join("daemon-flags.json"),
        serde_json::to_vec_pretty(&flags)?,
    )?;
    let env = cloud.dockerd_env();
    shared.event(&format!(
        "{id}: wrote {} cloud-init files; dockerd in {:?}",
        cloud.write_files.len(),
        shared.opts.boot_delay
    ));
    let machine_id = machine
        .machine_id
        .clone()
        .or_else(|| cloud.machine_id().map(str::to_owned));

    tokio::time::sleep(shared.opts.boot_delay).await;

    let pool = {
        let mut n = shared.next_pool.lock().unwrap_or_else(|p| p.into_inner());
        let k = *n;
        *n = n.wrapping_add(1);
        k
    };
    let data_dir = data_root.unwrap_or_else(|| machine.root.join("d"));
    let (mut args, tls_port) = dockerd_args(
        &machine,
        &dockerd_config,
        &fs_root,
        &data_dir,
        shared.opts.slot,
        pool,
    )?;
    let runtime = shared.opts.dir.join("bin").join(RUNC_WRAPPER);
    args.extend([
        format!("--add-runtime={RUNC_WRAPPER}={}", runtime.display()),
        format!("--default-runtime={RUNC_WRAPPER}"),
    ]);
    let launch = Launch {
        args,
        env,
        tls_port,
        machine_id,
        data_dir,
    };
    if let Some(entry) = shared.machines().get_mut(id) {
        entry.launch = Some(launch.clone());
    }
    run_dockerd(shared, &machine, &launch).await
}

/// Starts the machine's dockerd (retrying a failed start twice) and marks it running.
async fn run_dockerd(
    shared: &Arc<Shared>,
    machine: &EmulatedMachine,
    launch: &Launch,
) -> Result<()> {
    let id = &machine.instance_id;
    let Launch {
        args,
        env,
        tls_port,
        machine_id,
        data_dir,
    } = launch;
    let start = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        // dockerd's network controller recreates the shared iptables chains at start; two
        // starting at once race ("Chain already exists"). One start at a time per host.
        let lock = tokio::task::spawn_blocking(dockerd_start_lock).await??;
        let started =
            start_dockerd(shared, machine, args, env, *tls_port, machine_id.clone()).await;
        drop(lock);
        match started {
            Ok(true) => break,
            Ok(false) => return Ok(()), // terminated while booting
            Err(e) if attempt < 3 && !shared.machines().contains_key(id) => {
                return Err(e);
            }
            Err(e) if attempt < 3 => {
                shared.event(&format!(
                    "{id}: dockerd failed to start (attempt {attempt}), retrying: {e:#}"
                ));
                if let Some(entry) = shared.machines().get_mut(id) {
                    if let Some(mut c) = entry.child.take() {
                        stop_child(&mut c, Duration::from_secs(5), true);
                    }
                }
                unmount_under(&machine.root.join("x"));
                unmount_under(data_dir);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(entry) = shared.machines().get_mut(id) {
        entry.machine.phase = MachinePhase::Running;
    }
    shared.changed();
    shared.event(&format!(
        "{id}: dockerd ready after {:?} at {}:{}",
        start.elapsed(),
        machine.private_ip,
        tls_port
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into())
    ));
    Ok(())
}

/// daemon.json keys the emulator sets as dockerd flags instead (dockerd refuses a key given
/// both ways).
const EMULATOR_FLAGS: [&str; 11] = [
    "hosts",
    "tls",
    "tlsverify",
    "tlscacert",
    "tlscert",
    "tlskey",
    "data-root",
    "exec-root",
    "pidfile",
    "bridge",
    "default-address-pools",
];

/// Runs the user data's `python3` runcmd entries as cloud-init would, every absolute path
/// argument mapped into the machine root (`fs_root`); other entries (`systemctl`) are
/// skipped: the emulator starts dockerd itself.
fn run_commands(cloud: &CloudConfig, fs_root: &Path) -> Result<()> {
    for cmd in &cloud.runcmd {
        let Some((program, args)) = cmd.split_first() else {
            continue;
        };
        if program != "python3" {
            continue;
        }
        let mapped: Vec<PathBuf> = args
            .iter()
            .map(|a| match a.strip_prefix('/') {
                Some(rel) => fs_root.join(rel),
                None => PathBuf::from(a),
            })
            .collect();
        let out = Command::new("python3")
            .args(&mapped)
            .output()
            .with_context(|| format!("running runcmd {cmd:?}"))?;
        if !out.status.success() {
            bail!(
                "runcmd {cmd:?} failed with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

/// The machine's /etc/docker/daemon.json after boot's merge.
fn read_daemon_json(fs_root: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let path = fs_root.join(DAEMON_JSON_PATH.trim_start_matches('/'));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (the merge did not write it)", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Real machines each have their own iptables; the emulated ones share the host's. At
/// start dockerd deletes and recreates the shared chains (DOCKER, DOCKER-ISOLATION-*),
/// which wipes the rules of the dockerd already running and makes their network calls
/// fail meanwhile. This `iptables` (first in dockerd's PATH) keeps those shared chains:
/// it skips their flush/delete and the removal of the jumps to them, and makes creating
/// an existing chain a no-op. Everything else goes to the real iptables.
const IPTABLES_GUARD: &str = r#"#!/bin/sh
real=/usr/sbin/iptables
[ -x "$real" ] || real=/sbin/iptables
table=filter; op=; chain=; prev=
for a in "$@"; do
  case "$prev" in
    -t) table=$a ;;
    -F|-X|-N|-D) op=$prev; chain=$a ;;
  esac
  prev=$a
done
case "$op:$chain" in
  -F:DOCKER|-X:DOCKER|-F:DOCKER-ISOLATION*|-X:DOCKER-ISOLATION*) exit 0 ;;
  -D:PREROUTING|-D:OUTPUT)
    case " $* " in *" -j DOCKER "*) exit 0 ;; esac ;;
  -N:DOCKER*) "$real" --wait -t "$table" -n -L "$chain" >/dev/null 2>&1 && exit 0 ;;
esac
exec "$real" "$@"
"#;

fn install_iptables_guard(bin: &Path) -> Result<()> {
    crate::util::write_file(&bin.join("iptables"), IPTABLES_GUARD.as_bytes(), 0o755)
}

/// Name (and file name under the emulator's `bin/`) of the machines' default runtime.
pub const RUNC_WRAPPER: &str = "flotilla-runc";

/// Linux capability names by number (capability.h), as runc's config.json spells them.
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The capabilities whose bit is clear in `CapBnd` of /proc/self/status (the bounding set
/// every process this one starts, dockerd and runc included, inherits).
pub fn missing_capabilities() -> Result<Vec<&'static str>> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .context("no CapBnd in /proc/self/status")?
        .trim();
    let bnd = u64::from_str_radix(hex, 16).with_context(|| format!("bad CapBnd {hex:?}"))?;
    Ok(CAPABILITIES
        .iter()
        .enumerate()
        .filter(|(bit, _)| bnd & (1u64 << bit) == 0)
        .map(|(_, name)| *name)
        .collect())
}

/// A runc that first removes `missing` from the capability lists of the bundle's
/// config.json (`create`/`run`; `--bundle`/`-b`, default the working directory) or of an
/// exec's process file (`exec --process`/`-p`), then execs `runc` with the same arguments.
/// Everything else (state, start, kill, delete...) goes to runc untouched. Needs only `sh`
/// and `awk`; the JSON is edited inside `"capabilities": {...}` objects only, so an
/// argument or variable that happens to spell a capability is kept.
pub fn runc_wrapper_script(runc: &str, missing: &[&str]) -> String {
    format!(
        r#"#!/bin/sh
# flotilla-sandbox: runc for emulated machines (see tests/src/emulator.rs). Drops the
# capabilities this host's bounding set lacks, then execs runc with the same arguments.
runc='{runc}'
missing='{missing}'
cmd= prev= bundle= process=
for a in "$@"; do
  if [ -z "$cmd" ]; then
    case "$prev" in
      --root|--log|--log-format|--criu|--rootless) ;;
      *) case "$a" in -*) ;; *) cmd=$a ;; esac ;;
    esac
  else
    case "$prev" in
      --bundle|-b) bundle=$a ;;
      --process|-p) process=$a ;;
    esac
    case "$a" in
      --bundle=*) bundle=${{a#--bundle=}} ;;
      -b=*) bundle=${{a#-b=}} ;;
      --process=*) process=${{a#--process=}} ;;
      -p=*) process=${{a#-p=}} ;;
    esac
  fi
  prev=$a
done
strip() {{
  [ -n "$missing" ] && [ -f "$1" ] || return 0
  awk -v missing="$missing" '
    {{ doc = doc (NR > 1 ? "\n" : "") $0 }}
    END {{
      n = split(missing, caps, " ")
      out = ""
      while (match(doc, /"capabilities"[ \t\n]*:[ \t\n]*[{{][^}}]*[}}]/)) {{
        obj = substr(doc, RSTART, RLENGTH)
        for (i = 1; i <= n; i++) {{
          c = "\"" caps[i] "\""
          gsub(c "[ \t\n]*,[ \t\n]*", "", obj)
          gsub(",[ \t\n]*" c, "", obj)
          gsub(c, "", obj)
        }}
        out = out substr(doc, 1, RSTART - 1) obj
        doc = substr(doc, RSTART + RLENGTH)
      }}
      printf "%s\n", out doc
    }}' "$1" > "$1.flotilla-caps" && mv "$1.flotilla-caps" "$1"
}}
case "$cmd" in
  create|run) strip "${{bundle:-.}}/config.json" ;;
  exec) [ -z "$process" ] || strip "$process" ;;
esac
exec "$runc" "$@"
"#,
        missing = missing.join(" ")
    )
}

/// Writes the runc wrapper for this host (its missing capabilities) into `bin`.
fn install_runc_wrapper(bin: &Path) -> Result<()> {
    let runc = ["/usr/sbin/runc", "/usr/bin/runc", "/sbin/runc"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("runc not found (apt-get install runc)")?;
    let missing = missing_capabilities()?;
    crate::util::write_file(
        &bin.join(RUNC_WRAPPER),
        runc_wrapper_script(runc, &missing).as_bytes(),
        0o755,
    )
}

/// Host-wide lock serializing dockerd starts (also across sandboxes in other processes).
fn dockerd_start_lock() -> Result<nix::fcntl::Flock<File>> {
    let dir = std::env::temp_dir().join("flotilla-sandbox-slots");
    std::fs::create_dir_all(&dir)?;
    let file = File::create(dir.join("dockerd-start.lock"))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking dockerd-start.lock: {e}"))
}

/// Starts dockerd and waits until it answers on its local socket. `Ok(false)` when the
/// machine was terminated meanwhile (dockerd then stopped again).
async fn start_dockerd(
    shared: &Arc<Shared>,
    machine: &EmulatedMachine,
    args: &[String],
    env: &[(String, String)],
    tls_port: Option<u16>,
    machine_id: Option<String>,
) -> Result<bool> {
    use std::os::unix::process::CommandExt;
    let id = &machine.instance_id;
    let log = File::options()
        .create(true)
        .append(true)
        .open(machine.dockerd_log())?;
    let err = log.try_clone()?;
    let mut cmd = Command::new("dockerd");
    let path = format!(
        "{}:{}",
        shared.opts.dir.join("bin").display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0);
    let child = cmd.spawn().context("starting dockerd")?;
    let pid = child.id();
    {
        let mut machines = shared.machines();
        match machines.get_mut(id) {
            Some(entry) => {
                entry.child = Some(child);
                entry.machine.dockerd_pid = Some(pid);
                entry.machine.tls_port = tls_port;
                entry.machine.machine_id = machine_id;
            }
            None => {
                drop(machines);
                let entry = Entry {
                    machine: machine.clone(),
                    child: Some(child),
                    launch: None,
                };
                let shared = shared.clone();
                tokio::task::spawn_blocking(move || stop_machine(&shared, entry, false, false));
                return Ok(false);
            }
        }
    }
    shared.event(&format!(
        "{id}: dockerd pid {pid} started: dockerd {}",
        args.join(" ")
    ));
    let socket = machine.docker_socket.clone();
    let ready = wait_until(
        "dockerd to answer on its local socket",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let socket = socket.clone();
            let exited = shared
                .machines()
                .get_mut(id)
                .and_then(|e| e.child.as_mut())
                .and_then(|c| c.try_wait().ok().flatten());
            async move {
                if let Some(status) = exited {
                    bail!("dockerd exited with {status}");
                }
                Ok(ping(&socket).await.then_some(()))
            }
        },
    )
    .await;
    if let Err(e) = ready {
        bail!("{e:#}\ndockerd log:\n{}", tail(&machine.dockerd_log(), 20));
    }
    Ok(true)
}

/// dockerd's command line from the machine's daemon.json, mapped into the machine root.
fn dockerd_args(
    m: &EmulatedMachine,
    c: &DockerdConfig,
    fs_root: &Path,
    data_root: &Path,
    slot: u8,
    pool: u8,
) -> Result<(Vec<String>, Option<u16>)> {
    let map = |p: &str| {
        fs_root
            .join(p.trim_start_matches('/'))
            .display()
            .to_string()
    };
    let mut args = Vec::new();
    if c.tlsverify {
        args.push("--tlsverify".to_owned());
        args.push(format!("--tlscacert={}", map(&c.tlscacert)));
    } else if c.tls {
        args.push("--tls".to_owned());
    }
    if c.tls || c.tlsverify {
        args.push(format!("--tlscert={}", map(&c.tlscert)));
        args.push(format!("--tlskey={}", map(&c.tlskey)));
    }
    let mut tls_port = None;
    for host in &c.hosts {
        if let Some(addr) = host.strip_prefix("tcp://") {
            let port: u16 = addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .with_context(|| format!("daemon.json host {host:?} has no port"))?;
            tls_port = Some(port);
            args.push(format!("-H=tcp://{}:{port}", m.private_ip));
        } else if host.starts_with("unix://") {
            args.push(format!("-H=unix://{}", m.docker_socket.display()));
        } else {
            bail!("daemon.json host {host:?} is neither tcp:// nor unix://");
        }
    }
    if tls_port.is_none() {
        bail!("daemon.json has no tcp:// host: the machine would not be reachable");
    }
    if !c.hosts.iter().any(|h| h.starts_with("unix://")) {
        // The emulator always needs its local socket for readiness and inspection.
        args.push(format!("-H=unix://{}", m.docker_socket.display()));
    }
    let r = &m.root;
    args.extend([
        format!("--data-root={}", data_root.display()),
        format!("--exec-root={}", r.join("x").display()),
        format!("--pidfile={}", r.join("docker.pid").display()),
        "--bridge=none".to_owned(),
        format!("--default-address-pool=base=10.{slot}.{pool}.0/24,size=28"),
        format!("--config-file={}", r.join("daemon-flags.json").display()),
        "--shutdown-timeout=3".to_owned(),
    ]);
    Ok((args, tls_port))
}

/// `GET /_ping` on a dockerd unix socket.
pub async fn ping(socket: &Path) -> bool {
    let attempt = async {
        let mut s = tokio::net::UnixStream::connect(socket).await.ok()?;
        s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        Some(text.starts_with("HTTP/1.") && text.contains(" 200 ") && text.ends_with("OK"))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Stops a machine's dockerd and removes its directories (unless `keep_dirs`, at teardown
/// with `FLOTILLA_KEEP_SANDBOX`). `park`: the instance was stopped, not terminated: its
/// directories are kept and it waits, parked, for its next start. Its containers and
/// networks are removed either way (they hold this host's bridges and iptables rules;
/// Flotilla cleans a job's before a machine is idle, so a stopped machine has none).
fn stop_machine(shared: &Shared, mut entry: Entry, keep_dirs: bool, park: bool) {
    let id = entry.machine.instance_id.clone();
    let (bridges, leftover_containers) = if entry.child.is_some() {
        release_host_resources(&entry.machine)
    } else {
        (Vec::new(), Vec::new())
    };
    let mut stopped_clean = true;
    if let Some(child) = entry.child.as_mut() {
        let clean = stop_child(child, Duration::from_secs(15), false);
        stopped_clean = clean;
        if !clean {
            // SIGKILL'ed dockerd leaves its containerd (same process group) behind.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        shared.event(&format!(
            "{id}: dockerd stopped ({})",
            if clean { "SIGTERM" } else { "SIGKILL" }
        ));
    }
    for b in bridges {
        if Path::new("/sys/class/net").join(&b).exists() {
            let _ = quiet("ip", &["link", "delete", &b]);
        }
    }
    unmount_under(&entry.machine.root);
    if park {
        let record = StoppedMachine {
            instance_id: id.clone(),
            dockerd_pid: entry.machine.dockerd_pid,
            leftover_containers,
            clean: stopped_clean,
            kept: true,
        };
        entry.child = None;
        entry.machine.dockerd_pid = None;
        shared.parked().insert(id.clone(), entry);
        shared.parking().remove(&id);
        shared
            .stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
        shared.event(&format!("{id}: stopped, disk kept"));
        shared.changed();
        return;
    }
    if !keep_dirs || std::env::var_os("FLOTILLA_KEEP_SANDBOX").is_none() {
        match std::fs::remove_dir_all(&entry.machine.root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => shared.event(&format!(
                "{id}: cannot remove {}: {e}",
                entry.machine.root.display()
            )),
        }
    }
    shared
        .stopped
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(StoppedMachine {
            instance_id: id,
            dockerd_pid: entry.machine.dockerd_pid,
            leftover_containers,
            clean: stopped_clean,
            kept: false,
        });
    shared.changed();
}

/// Runs a command with no output, bounded by 20 s; returns its stdout when it succeeded.
fn quiet(program: &str, args: &[&str]) -> Option<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let ok = crate::util::wait_until_blocking(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || child.try_wait().ok().flatten(),
    );
    match ok {
        Some(status) if status.success() => reader.join().ok(),
        Some(_) => None,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    }
}

/// What a real machine's death releases but a stopped dockerd leaves on this host: the
/// bridges and iptables rules of its networks. Removes containers and networks through
/// the machine's local socket; returns the bridge names for a last-resort delete and the
/// names of the containers it removed.
fn release_host_resources(m: &EmulatedMachine) -> (Vec<String>, Vec<String>) {
    let host = m.docker_host();
    let docker = |args: &[&str]| {
        let mut full = vec!["-H", host.as_str()];
        full.extend_from_slice(args);
        quiet("docker", &full)
    };
    let bridges: Vec<String> = docker(&[
        "network",
        "ls",
        "-q",
        "--no-trunc",
        "--filter",
        "driver=bridge",
    ])
    .unwrap_or_default()
    .lines()
    .map(|id| format!("br-{}", &id[..id.len().min(12)]))
    .collect();
    let containers = docker(&["ps", "-a", "--format", "{{.ID}} {{.Names}}"]).unwrap_or_default();
    let (ids, names): (Vec<&str>, Vec<String>) = containers
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(id, name)| (id, name.to_owned()))
        .unzip();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids);
        let _ = docker(&args);
    }
    let _ = docker(&["network", "prune", "-f"]);
    (bridges, names)
}

/// Lazily unmounts every mount point under `root`, deepest first.
pub fn unmount_under(root: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for p in points {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&p)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{"process":{"args":["echo","CAP_SYS_RESOURCE"],"capabilities":{"bounding":["CAP_CHOWN","CAP_SYS_RESOURCE","CAP_KILL"],"effective":["CAP_SYS_RESOURCE"],"permitted":["CAP_KILL","CAP_SYS_RESOURCE"]}},"root":{"path":"rootfs"}}"#;

    /// Runs the wrapper around a fake runc that records its arguments; returns them.
    fn run_wrapper(dir: &Path, args: &[&str]) -> String {
        let fake = dir.join("fake-runc");
        let seen = dir.join("seen");
        crate::util::write_file(
            &fake,
            format!("#!/bin/sh\necho \"$*\" > '{}'\n", seen.display()).as_bytes(),
            0o755,
        )
        .unwrap();
        let wrapper = dir.join("wrapper");
        let script = runc_wrapper_script(&fake.display().to_string(), &["CAP_SYS_RESOURCE"]);
        crate::util::write_file(&wrapper, script.as_bytes(), 0o755).unwrap();
        let status = Command::new(&wrapper)
            .args(args)
            .current_dir(dir)
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::read_to_string(seen).unwrap()
    }

    fn caps(path: &Path, pointer: &str) -> serde_json::Value {
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        doc.pointer(pointer).unwrap().clone()
    }

    #[test]
    fn the_wrapper_drops_missing_capabilities_from_a_bundle_and_keeps_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("b");
        std::fs::create_dir(&bundle).unwrap();
        std::fs::write(bundle.join("config.json"), CONFIG).unwrap();
        let bundle_arg = bundle.display().to_string();
        let args = [
            "--root",
            "/r",
            "--log",
            "/l.json",
            "--log-format",
            "json",
            "create",
            "--bundle",
            &bundle_arg,
            "--pid-file",
            "/p",
            "id1",
        ];
        let seen = run_wrapper(dir.path(), &args);
        assert_eq!(seen.trim(), args.join(" "), "runc gets the same arguments");
        let config = bundle.join("config.json");
        assert_eq!(
            caps(&config, "/process/capabilities"),
            serde_json::json!({"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": [], "permitted": ["CAP_KILL"]})
        );
        assert_eq!(caps(&config, "/process/args/1"), "CAP_SYS_RESOURCE");
    }

    #[test]
    fn the_wrapper_edits_an_exec_process_file_and_the_default_bundle_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let process = dir.path().join("process.json");
        std::fs::write(
            &process,
            r#"{"args":["sh"],"capabilities":{"bounding":["CAP_SYS_RESOURCE"]}}"#,
        )
        .unwrap();
        let p = process.display().to_string();
        run_wrapper(
            dir.path(),
            &["--root", "/r", "exec", "--process", &p, "id1"],
        );
        assert_eq!(
            caps(&process, "/capabilities/bounding"),
            serde_json::json!([])
        );
        // `run` without --bundle: the working directory's config.json.
        std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
        run_wrapper(dir.path(), &["run", "id2"]);
        assert_eq!(
            caps(
                &dir.path().join("config.json"),
                "/process/capabilities/bounding"
            ),
            serde_json::json!(["CAP_CHOWN", "CAP_KILL"])
        );
        // Other subcommands leave files alone.
        std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
        run_wrapper(dir.path(), &["--root", "/r", "delete", "--force", "id2"]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("config.json")).unwrap(),
            CONFIG
        );
    }

    #[test]
    fn missing_capabilities_come_from_the_bounding_set() {
        let missing = missing_capabilities().unwrap();
        // Whatever this host lacks, CAP_CHOWN is always granted to root's tests.
        assert!(!missing.contains(&"CAP_CHOWN"), "{missing:?}");
    }
}
