//! Recording fakes of the daemon's two edges, EC2 ([`FakeEc2`]) and the machines' dockerd
//! ([`FakeMachines`]), for unit tests of the reconcile loop, probes and health checks
//! under a manual clock. Errors, throttling and capacity shortfalls are scripted
//! with [`Fault`]s; every call is recorded so a test asserts what the daemon asked for.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use futures_util::future::BoxFuture;

use super::machine_api::MachineApi;
use super::Clock;
use crate::ec2::{
    Ec2Api, Ec2Error, Ec2Future, InstanceLife, LaunchSpec, Launched, ObservedInstance, Purchase,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Describe,
    Launch,
    Terminate,
    Stop,
    Start,
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Call {
    Describe,
    Launch {
        machine_id: String,
        instance_type: String,
        subnet: String,
        purchase: Purchase,
    },
    Terminate(Vec<String>),
    Stop(Vec<String>),
    Start(Vec<String>),
}

/// A scripted error: calls of `op` matching the filters fail with `code`, `times` times
/// (forever when `None`).
#[derive(Debug, Clone)]
pub(super) struct Fault {
    pub op: Op,
    pub code: &'static str,
    pub instance_type: Option<String>,
    pub purchase: Option<Purchase>,
    pub times: Option<u32>,
}

impl Fault {
    pub(super) fn new(op: Op, code: &'static str) -> Self {
        Self {
            op,
            code,
            instance_type: None,
            purchase: None,
            times: None,
        }
    }

    pub(super) fn throttle(op: Op) -> Self {
        Self::new(op, "RequestLimitExceeded")
    }

    pub(super) fn no_capacity() -> Self {
        Self::new(Op::Launch, "InsufficientInstanceCapacity")
    }

    pub(super) fn for_type(mut self, instance_type: &str) -> Self {
        self.instance_type = Some(instance_type.to_owned());
        self
    }

    pub(super) fn for_purchase(mut self, purchase: Purchase) -> Self {
        self.purchase = Some(purchase);
        self
    }

    pub(super) fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }

    fn matches(&self, op: Op, spec: Option<&LaunchSpec>) -> bool {
        self.op == op
            && self.times != Some(0)
            && self
                .instance_type
                .as_ref()
                .is_none_or(|t| spec.is_some_and(|s| &s.instance_type == t))
            && self
                .purchase
                .is_none_or(|p| spec.is_some_and(|s| s.purchase == p))
    }
}

#[derive(Default)]
struct Ec2State {
    instances: BTreeMap<String, ObservedInstance>,
    calls: Vec<Call>,
    faults: Vec<Fault>,
    launched: u64,
    /// TerminateInstances is accepted but not carried out (EC2 being slow).
    ignore_terminate: bool,
    /// Instance ids of every accepted TerminateInstances, in order (resends included).
    accepted_terminations: Vec<String>,
    /// StartInstances gives the instance this private address instead of its old one.
    address_after_start: Option<String>,
}

/// EC2 as a map of instances. Launches get `i-<n>` and `10.0.0.<n>`, tagged as the spec
/// says; terminations make instances `Terminated` (still listed, as EC2 does for a while);
/// StopInstances makes them `Stopped` at once, StartInstances `Running`.
pub(super) struct FakeEc2 {
    clock: Clock,
    state: Mutex<Ec2State>,
}

impl FakeEc2 {
    pub(super) fn new(clock: Clock) -> Self {
        Self {
            clock,
            state: Mutex::new(Ec2State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Ec2State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn inject(&self, fault: Fault) {
        self.state().faults.push(fault);
    }

    pub(super) fn ignore_terminate(&self, ignore: bool) {
        self.state().ignore_terminate = ignore;
    }

    pub(super) fn count(&self, op: Op) -> usize {
        self.state()
            .calls
            .iter()
            .filter(|c| {
                matches!(
                    (op, c),
                    (Op::Describe, Call::Describe)
                        | (Op::Launch, Call::Launch { .. })
                        | (Op::Terminate, Call::Terminate(_))
                        | (Op::Stop, Call::Stop(_))
                        | (Op::Start, Call::Start(_))
                )
            })
            .count()
    }

    /// The launches made, as (instance type, subnet, purchase).
    pub(super) fn launches(&self) -> Vec<(String, String, Purchase)> {
        self.state()
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::Launch {
                    instance_type,
                    subnet,
                    purchase,
                    ..
                } => Some((instance_type.clone(), subnet.clone(), *purchase)),
                _ => None,
            })
            .collect()
    }

    /// The instances terminated by the daemon, in call order.
    /// Instance ids of every TerminateInstances EC2 accepted (a failed call is not here).
    pub(super) fn terminated(&self) -> Vec<String> {
        self.state().accepted_terminations.clone()
    }

    /// Every StopInstances and StartInstances call, in order, failed ones included.
    pub(super) fn stops_and_starts(&self) -> Vec<Call> {
        self.state()
            .calls
            .iter()
            .filter(|c| matches!(c, Call::Stop(_) | Call::Start(_)))
            .cloned()
            .collect()
    }

    /// The next StartInstances moves the instance to `address` (EC2 outside a VPC).
    pub(super) fn address_after_start(&self, address: &str) {
        self.state().address_after_start = Some(address.to_owned());
    }

    /// Sets an instance's state behind the daemon's back (an operator's stop or start).
    pub(super) fn set_life(&self, instance_id: &str, life: InstanceLife) {
        if let Some(i) = self.state().instances.get_mut(instance_id) {
            i.life = life;
        }
    }

    /// An instance of the fleet the daemon did not launch (another daemon's, or one whose
    /// launch it forgot).
    pub(super) fn plant(&self, instance: ObservedInstance) {
        self.state()
            .instances
            .insert(instance.instance_id.clone(), instance);
    }

    /// Terminates an instance behind the daemon's back (spot reclaim, an operator).
    pub(super) fn terminate_behind_its_back(&self, instance_id: &str) {
        if let Some(i) = self.state().instances.get_mut(instance_id) {
            i.life = InstanceLife::Terminated;
        }
    }

    /// Takes the first matching fault (counting it down), recording the call either way.
    fn call(&self, op: Op, spec: Option<&LaunchSpec>, call: Call) -> Result<(), Ec2Error> {
        let mut s = self.state();
        s.calls.push(call);
        let Some(fault) = s.faults.iter_mut().find(|f| f.matches(op, spec)) else {
            return Ok(());
        };
        if let Some(n) = fault.times.as_mut() {
            *n -= 1;
        }
        Err(Ec2Error {
            operation: match op {
                Op::Describe => "DescribeInstances",
                Op::Launch => "RunInstances",
                Op::Terminate => "TerminateInstances",
                Op::Stop => "StopInstances",
                Op::Start => "StartInstances",
            },
            code: Some(fault.code.to_owned()),
            message: "scripted by the test".into(),
        })
    }
}

impl Ec2Api for FakeEc2 {
    fn describe_fleet<'a>(&'a self, fleet: &'a str) -> Ec2Future<'a, Vec<ObservedInstance>> {
        let _ = fleet;
        let r = self
            .call(Op::Describe, None, Call::Describe)
            .map(|()| self.state().instances.values().cloned().collect());
        Box::pin(async move { r })
    }

    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> Ec2Future<'a, Launched> {
        let call = Call::Launch {
            machine_id: spec.machine_id.clone(),
            instance_type: spec.instance_type.clone(),
            subnet: spec.subnet.clone(),
            purchase: spec.purchase,
        };
        let r = self.call(Op::Launch, Some(spec), call).map(|()| {
            let mut s = self.state();
            s.launched += 1;
            let n = s.launched;
            let launched = Launched {
                instance_id: format!("i-{n:04}"),
                private_ip: format!("10.0.0.{n}"),
            };
            s.instances.insert(
                launched.instance_id.clone(),
                ObservedInstance {
                    instance_id: launched.instance_id.clone(),
                    life: InstanceLife::Running,
                    machine_id: Some(spec.machine_id.clone()),
                    class: Some(spec.class.clone()),
                    daemon_id: Some(spec.daemon_id.clone()),
                    subnet: Some(spec.subnet.clone()),
                    private_ip: Some(launched.private_ip.clone()),
                    instance_type: spec.instance_type.clone(),
                    launched_at: Some(self.clock.now()),
                },
            );
            launched
        });
        Box::pin(async move { r })
    }

    fn terminate<'a>(&'a self, instance_ids: &'a [String]) -> Ec2Future<'a, ()> {
        let r = self
            .call(Op::Terminate, None, Call::Terminate(instance_ids.to_vec()))
            .map(|()| {
                let mut s = self.state();
                s.accepted_terminations.extend(instance_ids.iter().cloned());
                if !s.ignore_terminate {
                    for id in instance_ids {
                        if let Some(i) = s.instances.get_mut(id) {
                            i.life = InstanceLife::Terminated;
                        }
                    }
                }
            });
        Box::pin(async move { r })
    }

    fn stop<'a>(&'a self, instance_ids: &'a [String]) -> Ec2Future<'a, ()> {
        let r = self
            .call(Op::Stop, None, Call::Stop(instance_ids.to_vec()))
            .map(|()| {
                let mut s = self.state();
                for id in instance_ids {
                    if let Some(i) = s.instances.get_mut(id) {
                        i.life = InstanceLife::Stopped;
                    }
                }
            });
        Box::pin(async move { r })
    }

    fn start<'a>(&'a self, instance_ids: &'a [String]) -> Ec2Future<'a, ()> {
        let r = self
            .call(Op::Start, None, Call::Start(instance_ids.to_vec()))
            .map(|()| {
                let mut s = self.state();
                let address = s.address_after_start.take();
                for id in instance_ids {
                    if let Some(i) = s.instances.get_mut(id) {
                        i.life = InstanceLife::Running;
                        if let Some(a) = &address {
                            i.private_ip = Some(a.clone());
                        }
                    }
                }
            });
        Box::pin(async move { r })
    }
}

/// How a fake machine's dockerd behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dockerd {
    /// Answers; holds this many job containers.
    Up { containers: usize },
    /// Refuses at once (crashed).
    Down,
}

/// Every machine's dockerd answers unless scripted otherwise (by machine id, or for all
/// machines not named).
#[derive(Default)]
pub(super) struct FakeMachines {
    dockerd: Mutex<HashMap<String, Dockerd>>,
    otherwise: Mutex<Option<Dockerd>>,
    /// Exit code of every ready command (0 unless set).
    ready_exit: Mutex<i64>,
    /// Ready commands run, by machine id.
    pub(super) ready_runs: Mutex<Vec<String>>,
    /// Every ping, as (machine id, address).
    pub(super) pings: Mutex<Vec<(String, String)>>,
    /// `events` never answers (a report stays under way, as when the daemon dies).
    pub(super) hold_events: std::sync::atomic::AtomicBool,
    /// Images pulled, as (machine id, image), in order.
    pub(super) pulls: Mutex<Vec<(String, String)>>,
}

impl FakeMachines {
    /// How machines not scripted by id behave (new launches included).
    pub(super) fn set_default(&self, d: Dockerd) {
        *self.otherwise.lock().unwrap_or_else(|p| p.into_inner()) = Some(d);
    }

    pub(super) fn set_ready_exit(&self, code: i64) {
        *self.ready_exit.lock().unwrap_or_else(|p| p.into_inner()) = code;
    }

    pub(super) fn set(&self, machine_id: &str, d: Dockerd) {
        self.dockerd
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(machine_id.to_owned(), d);
    }

    fn get(&self, machine_id: &str) -> Dockerd {
        self.dockerd
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(machine_id)
            .copied()
            .or(*self.otherwise.lock().unwrap_or_else(|p| p.into_inner()))
            .unwrap_or(Dockerd::Up { containers: 0 })
    }

    async fn answer(&self, machine_id: &str) -> Result<usize, String> {
        match self.get(machine_id) {
            Dockerd::Up { containers } => Ok(containers),
            Dockerd::Down => Err("connection refused".into()),
        }
    }
}

impl MachineApi for FakeMachines {
    fn ping<'a>(
        &'a self,
        machine_id: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        self.pings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((machine_id.to_owned(), address.to_owned()));
        Box::pin(async move { self.answer(machine_id).await.map(|_| ()) })
    }

    fn job_containers<'a>(
        &'a self,
        machine_id: &'a str,
        _address: &'a str,
        _job_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<usize, String>> {
        Box::pin(self.answer(machine_id))
    }

    fn ready_command<'a>(
        &'a self,
        machine_id: &'a str,
        _address: &'a str,
        _cmd: &'a flotilla_proto::boot_hooks::ReadyCommand,
        _timeout: std::time::Duration,
    ) -> BoxFuture<'a, Result<super::ready::ReadyRun, String>> {
        self.ready_runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(machine_id.to_owned());
        let exit_code = *self.ready_exit.lock().unwrap_or_else(|p| p.into_inner());
        Box::pin(async move {
            self.answer(machine_id).await?;
            Ok(super::ready::ReadyRun {
                exit_code,
                output_tail: format!("exit {exit_code}\n"),
            })
        })
    }

    fn events<'a>(
        &'a self,
        machine_id: &'a str,
        _address: &'a str,
        _since: i64,
        _until: i64,
    ) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move {
            if self.hold_events.load(std::sync::atomic::Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            self.answer(machine_id)
                .await
                .map(|_| vec![format!("container die {machine_id}")])
        })
    }

    fn pull<'a>(
        &'a self,
        machine_id: &'a str,
        _address: &'a str,
        image: &'a str,
        _timeout: std::time::Duration,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.answer(machine_id).await?;
            self.pulls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((machine_id.to_owned(), image.to_owned()));
            Ok(())
        })
    }
}
