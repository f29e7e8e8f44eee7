//! The only module that talks to EC2. Every call is counted by operation (for the
//! per-job API budget in the README) and errors keep the EC2 error code, so callers can
//! tell throttling and capacity errors from real failures. A failed call never implies
//! anything about a machine's health: callers must treat it as "unknown".

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceNetworkInterfaceSpecification, InstanceStateName,
    InstanceType, LaunchTemplateSpecification, MarketType, ResourceType, ShutdownBehavior,
    SpotInstanceType, SpotMarketOptions, Tag, TagSpecification, VolumeType,
};
use base64::Engine;
use chrono::{DateTime, Utc};
use flotilla_proto::tags;

use crate::metrics::Metrics;

#[derive(Debug, Clone, thiserror::Error)]
#[error("EC2 {operation} failed: {}{message}", code.as_deref().map(|c| format!("{c}: ")).unwrap_or_default())]
pub(crate) struct Ec2Error {
    pub operation: &'static str,
    pub code: Option<String>,
    pub message: String,
}

impl Ec2Error {
    fn from_sdk<E: ProvideErrorMetadata + std::fmt::Debug>(
        operation: &'static str,
        err: aws_sdk_ec2::error::SdkError<E>,
    ) -> Self {
        let code = err.code().map(str::to_owned);
        let message = match err.message() {
            Some(m) => m.to_owned(),
            None => match &err {
                aws_sdk_ec2::error::SdkError::DispatchFailure(d) => {
                    format!("dispatch failure: {d:?}")
                }
                aws_sdk_ec2::error::SdkError::TimeoutError(_) => "timed out".into(),
                other => format!("{other}"),
            },
        };
        Self {
            operation,
            code,
            message,
        }
    }

    pub(crate) fn is_throttling(&self) -> bool {
        self.code.as_deref().is_some_and(is_throttling_code)
    }

    /// The request named an instance EC2 does not know or cannot act on any more.
    pub(crate) fn is_bad_instance(&self) -> bool {
        self.code
            .as_deref()
            .is_some_and(|c| c.starts_with("InvalidInstanceID") || c == "IncorrectInstanceState")
    }

    /// "Try another instance type, zone or market", not "give up".
    pub(crate) fn is_capacity(&self) -> bool {
        self.code.as_deref().is_some_and(is_capacity_code)
    }
}

fn is_throttling_code(code: &str) -> bool {
    matches!(
        code,
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException"
    )
}

fn is_capacity_code(code: &str) -> bool {
    matches!(
        code,
        "InsufficientInstanceCapacity"
            | "InsufficientCapacity"
            | "InsufficientHostCapacity"
            | "InsufficientReservedInstanceCapacity"
            | "UnfulfillableCapacity"
            | "Unsupported"
            | "InsufficientFreeAddressesInSubnet"
            | "InstanceLimitExceeded"
            | "MaxSpotInstanceCountExceeded"
            | "SpotMaxPriceTooLow"
            | "capacity-not-available"
    )
}

/// EC2 sends capacity errors as HTTP 500, and the SDK retries every 5xx (5 attempts with
/// backoff: ~8 s and 5 calls per shortfall, measured). A capacity error is an answer, not a
/// transient fault: the launch must move on to the next subnet, type or market at once.
#[derive(Debug)]
struct CapacityIsAnAnswer;

impl aws_sdk_ec2::config::retry::ClassifyRetry for CapacityIsAnAnswer {
    fn classify_retry(
        &self,
        ctx: &aws_sdk_ec2::config::interceptors::InterceptorContext,
    ) -> aws_sdk_ec2::config::retry::RetryAction {
        use aws_sdk_ec2::operation::run_instances::RunInstancesError;
        let code = match ctx.output_or_error() {
            Some(Err(e)) => e
                .as_operation_error()
                .and_then(|e| e.downcast_ref::<RunInstancesError>())
                .and_then(|e| e.code()),
            _ => None,
        };
        if code.is_some_and(is_capacity_code) {
            aws_sdk_ec2::config::retry::RetryAction::RetryForbidden
        } else {
            aws_sdk_ec2::config::retry::RetryAction::NoActionIndicated
        }
    }

    fn name(&self) -> &'static str {
        "EC2 capacity errors are not retried"
    }
}

/// How one launch buys its instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purchase {
    OnDemand,
    Spot,
}

impl Purchase {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::OnDemand => "on-demand",
            Self::Spot => "spot",
        }
    }
}

/// One client-side budget for every EC2 call: a token bucket at the configured rate, and
/// after a throttling error a cool-down (exponential, with jitter) that every caller
/// waits out. This is what keeps a throttling storm from turning into more calls.
pub(crate) struct Budget {
    rate: f64,
    state: tokio::sync::Mutex<BudgetState>,
}

struct BudgetState {
    tokens: f64,
    refilled: Instant,
    cool_down_until: Option<Instant>,
    penalty: Duration,
}

impl Budget {
    pub(crate) fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second.max(1));
        Self {
            rate,
            state: tokio::sync::Mutex::new(BudgetState {
                tokens: rate,
                refilled: Instant::now(),
                cool_down_until: None,
                penalty: Duration::ZERO,
            }),
        }
    }

    /// Waits for a token (and any cool-down). Holding the lock while sleeping queues callers
    /// fairly.
    pub(crate) async fn take(&self) {
        let mut s = self.state.lock().await;
        if let Some(until) = s.cool_down_until {
            tokio::time::sleep_until(until.into()).await;
            s.cool_down_until = None;
        }
        loop {
            let now = Instant::now();
            let refill = now.duration_since(s.refilled).as_secs_f64() * self.rate;
            s.tokens = (s.tokens + refill).min(self.rate);
            s.refilled = now;
            if s.tokens >= 1.0 {
                s.tokens -= 1.0;
                return;
            }
            let wait = Duration::from_secs_f64((1.0 - s.tokens) / self.rate);
            tokio::time::sleep(wait).await;
        }
    }

    pub(crate) async fn throttled(&self) {
        use rand::Rng;
        let mut s = self.state.lock().await;
        s.penalty = (s.penalty * 2).clamp(Duration::from_millis(500), Duration::from_secs(30));
        let jitter = rand::rng().random_range(0.5..1.0);
        s.cool_down_until = Some(Instant::now() + s.penalty.mul_f64(jitter));
        s.tokens = 0.0;
    }

    pub(crate) async fn succeeded(&self) {
        let mut s = self.state.lock().await;
        s.penalty = Duration::ZERO;
    }
}

/// Counts every request sent to EC2, SDK retries included, by its `Action`, and every
/// throttled answer: what EC2's request-rate limit counts. (The SDK retries throttled
/// calls itself, with backoff and its adaptive client-side rate limiter, so counting
/// logical calls showed no throttling at all during a storm; measured with the e2e
/// fault proxy.)
struct CountRequests {
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for CountRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CountRequests")
    }
}

impl aws_sdk_ec2::config::Intercept for CountRequests {
    fn name(&self) -> &'static str {
        "flotilla EC2 request counter"
    }

    fn read_before_transmit(
        &self,
        ctx: &aws_sdk_ec2::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _: &aws_sdk_ec2::config::RuntimeComponents,
        _: &mut aws_sdk_ec2::config::ConfigBag,
    ) -> Result<(), aws_sdk_ec2::error::BoxError> {
        // The query protocol names the operation in the form body.
        let body = ctx.request().body().bytes().unwrap_or_default();
        let action = String::from_utf8_lossy(body)
            .split('&')
            .find_map(|kv| kv.strip_prefix("Action=").map(str::to_owned))
            .unwrap_or_else(|| "Unknown".into());
        self.metrics.ec2_call(&action);
        Ok(())
    }

    fn read_after_attempt(
        &self,
        ctx: &aws_sdk_ec2::config::interceptors::FinalizerInterceptorContextRef<'_>,
        _: &aws_sdk_ec2::config::RuntimeComponents,
        _: &mut aws_sdk_ec2::config::ConfigBag,
    ) -> Result<(), aws_sdk_ec2::error::BoxError> {
        use aws_sdk_ec2::operation::{
            describe_images::DescribeImagesError, describe_instances::DescribeInstancesError,
            run_instances::RunInstancesError, start_instances::StartInstancesError,
            stop_instances::StopInstancesError, terminate_instances::TerminateInstancesError,
        };
        let Some(Err(e)) = ctx.output_or_error() else {
            return Ok(());
        };
        let Some(e) = e.as_operation_error() else {
            return Ok(());
        };
        let (op, code) = if let Some(e) = e.downcast_ref::<RunInstancesError>() {
            ("RunInstances", e.code())
        } else if let Some(e) = e.downcast_ref::<DescribeInstancesError>() {
            ("DescribeInstances", e.code())
        } else if let Some(e) = e.downcast_ref::<TerminateInstancesError>() {
            ("TerminateInstances", e.code())
        } else if let Some(e) = e.downcast_ref::<DescribeImagesError>() {
            ("DescribeImages", e.code())
        } else if let Some(e) = e.downcast_ref::<StopInstancesError>() {
            ("StopInstances", e.code())
        } else if let Some(e) = e.downcast_ref::<StartInstancesError>() {
            ("StartInstances", e.code())
        } else {
            return Ok(());
        };
        if code.is_some_and(is_throttling_code) {
            self.metrics.ec2_throttled(op);
        }
        Ok(())
    }
}

/// What a launch needs; everything a machine is and owns is decided before the call.
#[derive(Debug, Clone)]
pub(crate) struct LaunchSpec {
    pub fleet: String,
    /// This daemon's persistent id, tagged `flotilla:daemon`.
    pub daemon_id: String,
    pub machine_id: String,
    /// Idempotency token: a retried call with the same token cannot launch twice.
    pub client_token: String,
    pub class: String,
    pub ami: String,
    pub instance_type: String,
    pub subnet: String,
    pub security_groups: Vec<String>,
    pub instance_profile: Option<String>,
    pub root_volume: flotilla_proto::config::RootVolume,
    /// IMDSv2's hop limit (1: job containers cannot reach IMDS).
    pub imds_hop_limit: u8,
    pub public_ip: bool,
    pub purchase: Purchase,
    pub user_data: String,
    /// The operator's tags (`tags`, `[classes.X].tags`), set after Flotilla's own.
    pub extra_tags: BTreeMap<String, String>,
    /// The class's launch template; every setting above overrides it.
    pub launch_template: Option<flotilla_proto::config::LaunchTemplateRef>,
}

impl LaunchSpec {
    /// Every tag of the machine's instance, root volume and network interface: Flotilla's
    /// own first (in a fixed order, `flotilla:daemon` last of them), then the operator's.
    /// The config refuses operator tags that collide with Flotilla's; one that got here
    /// anyway is dropped, so the fleet and machine tags can never be replaced.
    pub(crate) fn tags(&self) -> Vec<(String, String)> {
        let mut out = vec![
            (tags::FLEET.to_owned(), self.fleet.clone()),
            (tags::CLASS.to_owned(), self.class.clone()),
            (tags::MACHINE.to_owned(), self.machine_id.clone()),
            (
                tags::NAME.to_owned(),
                tags::name_value(&self.fleet, &self.machine_id),
            ),
            (tags::DAEMON.to_owned(), self.daemon_id.clone()),
        ];
        for (k, v) in &self.extra_tags {
            if !out.iter().any(|(own, _)| own == k) && !k.starts_with("flotilla:") {
                out.push((k.clone(), v.clone()));
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Launched {
    pub instance_id: String,
    pub private_ip: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InstanceLife {
    Pending,
    Running,
    Stopping,
    Stopped,
    ShuttingDown,
    Terminated,
}

impl InstanceLife {
    /// Gone or going: the instance will never run again.
    pub(crate) fn is_gone(self) -> bool {
        matches!(self, Self::ShuttingDown | Self::Terminated)
    }

    /// Stopped or on its way there: it runs no job now, but keeps its disk and can be
    /// started again (the stopped warm pool, or an operator's stop).
    pub(crate) fn is_stopped(self) -> bool {
        matches!(self, Self::Stopping | Self::Stopped)
    }
}

/// One instance as DescribeInstances reported it.
#[derive(Debug, Clone)]
pub(crate) struct ObservedInstance {
    pub instance_id: String,
    pub life: InstanceLife,
    pub machine_id: Option<String>,
    pub class: Option<String>,
    /// The `flotilla:daemon` tag: which daemon launched it (none before daemon ids).
    pub daemon_id: Option<String>,
    pub subnet: Option<String>,
    pub private_ip: Option<String>,
    pub instance_type: String,
    pub launched_at: Option<DateTime<Utc>>,
}

/// A boxed EC2 call: the daemon holds its EC2 side as `Arc<dyn Ec2Api>`.
pub(crate) type Ec2Future<'a, T> = futures_util::future::BoxFuture<'a, Result<T, Ec2Error>>;

/// The EC2 calls the daemon makes. Behind a trait so that the reconcile loop's
/// failure paths (throttling, capacity errors, instances vanishing) run as millisecond unit
/// tests against a recording fake; [`Ec2Client`] is the one real implementation.
pub(crate) trait Ec2Api: Send + Sync {
    /// Every instance carrying `flotilla:fleet=<fleet>` that is not yet terminated.
    fn describe_fleet<'a>(&'a self, fleet: &'a str) -> Ec2Future<'a, Vec<ObservedInstance>>;
    /// One RunInstances for one machine, tagged in the call.
    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> Ec2Future<'a, Launched>;
    /// TerminateInstances, batched.
    fn terminate<'a>(&'a self, instance_ids: &'a [String]) -> Ec2Future<'a, ()>;
    /// StopInstances, batched (the stopped warm pool; only instances of this fleet).
    fn stop<'a>(&'a self, instance_ids: &'a [String]) -> Ec2Future<'a, ()>;
    /// StartInstances, batched (a stopped machine brought back; only this fleet's).
    fn start<'a>(&'a self, instance_ids: &'a [String]) -> Ec2Future<'a, ()>;
    /// GetConsoleOutput of one instance, decoded (empty when EC2 has none yet). Only for
    /// the report saved when a machine is marked broken or lost; fakes need not answer.
    fn console_output<'a>(&'a self, instance_id: &'a str) -> Ec2Future<'a, String> {
        let _ = instance_id;
        Box::pin(async {
            Err(Ec2Error {
                operation: "GetConsoleOutput",
                code: None,
                message: "not available here".into(),
            })
        })
    }
}

impl Ec2Api for Ec2Client {
    fn describe_fleet<'a>(&'a self, fleet: &'a str) -> Ec2Future<'a, Vec<ObservedInstance>> {
        Box::pin(Ec2Client::describe_fleet(self, fleet))
    }

    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> Ec2Future<'a, Launched> {
        Box::pin(Ec2Client::launch(self, spec))
    }

    fn terminate<'a>(&'a self, instance_ids: &'a [String]) -> Ec2Future<'a, ()> {
        Box::pin(Ec2Client::terminate(self, instance_ids))
    }

    fn stop<'a>(&'a self, instance_ids: &'a [String]) -> Ec2Future<'a, ()> {
        Box::pin(Ec2Client::batched(self, Lifecycle::Stop, instance_ids))
    }

    fn start<'a>(&'a self, instance_ids: &'a [String]) -> Ec2Future<'a, ()> {
        Box::pin(Ec2Client::batched(self, Lifecycle::Start, instance_ids))
    }

    fn console_output<'a>(&'a self, instance_id: &'a str) -> Ec2Future<'a, String> {
        Box::pin(Ec2Client::console_output(self, instance_id))
    }
}

pub(crate) struct Ec2Client {
    client: aws_sdk_ec2::Client,
    /// Per AMI: its root device name and root volume size (GiB, when the AMI says).
    root_devices: Mutex<BTreeMap<String, (String, Option<i32>)>>,
    budget: Budget,
}

/// One EC2 API attempt (RunInstances answers in seconds; a page of DescribeInstances of
/// 1000 machines in well under this).
const EC2_ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// One call with its retries.
const EC2_OPERATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

impl Ec2Client {
    pub(crate) async fn new(
        aws: &flotilla_proto::config::AwsConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        // Every call is bounded: a response that never comes (a black-holed connection)
        // must end as an error the daemon handles, not a launch that holds its machine
        // record in `booting` forever (the plan does not time out a launch in flight).
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .operation_attempt_timeout(EC2_ATTEMPT_TIMEOUT)
            .operation_timeout(EC2_OPERATION_TIMEOUT)
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(aws_config::retry::RetryConfig::adaptive().with_max_attempts(5))
            .timeout_config(timeouts);
        if let Some(region) = &aws.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(url) = &aws.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let sdk = loader.load().await;
        let conf = aws_sdk_ec2::config::Builder::from(&sdk)
            .retry_classifier(CapacityIsAnAnswer)
            .interceptor(CountRequests { metrics })
            .build();
        Self {
            client: aws_sdk_ec2::Client::from_conf(conf),
            root_devices: Mutex::new(BTreeMap::new()),
            budget: Budget::new(aws.max_requests_per_second),
        }
    }

    /// Every call goes through here, naming its operation (the provisioner's IAM test
    /// reads these names: the runner policy grants exactly the calls made here). The
    /// budget first; the metrics count the requests sent, retries included (see
    /// [`CountRequests`]).
    async fn count(&self, op: &'static str) {
        self.budget.take().await;
        tracing::trace!(op, "EC2 call");
    }

    /// Feeds a call's outcome back into the budget.
    async fn settle<T>(&self, result: Result<T, Ec2Error>) -> Result<T, Ec2Error> {
        match &result {
            Err(e) if e.is_throttling() => {
                self.budget.throttled().await;
            }
            Ok(_) => self.budget.succeeded().await,
            Err(_) => {}
        }
        result
    }

    /// Every instance carrying `flotilla:fleet=<fleet>` that is not yet terminated: one
    /// paginated DescribeInstances, however large the fleet.
    pub(crate) async fn describe_fleet(
        &self,
        fleet: &str,
    ) -> Result<Vec<ObservedInstance>, Ec2Error> {
        let mut pages = self
            .client
            .describe_instances()
            .filters(
                Filter::builder()
                    .name(format!("tag:{}", tags::FLEET))
                    .values(fleet)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .values("pending")
                    .values("running")
                    .values("stopping")
                    .values("stopped")
                    .values("shutting-down")
                    .build(),
            )
            .max_results(1000)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        self.count("DescribeInstances").await;
        while let Some(page) = pages.next().await {
            let page = self
                .settle(page.map_err(|e| Ec2Error::from_sdk("DescribeInstances", e)))
                .await?;
            for inst in page.reservations().iter().flat_map(|r| r.instances()) {
                let tag = |key: &str| {
                    inst.tags()
                        .iter()
                        .find(|t| t.key() == Some(key))
                        .and_then(|t| t.value())
                        .map(str::to_owned)
                };
                // Belt and braces: the filter already guarantees this.
                if tag(tags::FLEET).as_deref() != Some(fleet) {
                    continue;
                }
                let life = match inst.state().and_then(|s| s.name()) {
                    Some(InstanceStateName::Pending) => InstanceLife::Pending,
                    Some(InstanceStateName::Running) => InstanceLife::Running,
                    Some(InstanceStateName::Stopping) => InstanceLife::Stopping,
                    Some(InstanceStateName::Stopped) => InstanceLife::Stopped,
                    Some(InstanceStateName::ShuttingDown) => InstanceLife::ShuttingDown,
                    _ => InstanceLife::Terminated,
                };
                out.push(ObservedInstance {
                    instance_id: inst.instance_id().unwrap_or_default().to_owned(),
                    life,
                    machine_id: tag(tags::MACHINE),
                    class: tag(tags::CLASS),
                    daemon_id: tag(tags::DAEMON),
                    subnet: inst.subnet_id().map(str::to_owned),
                    private_ip: inst.private_ip_address().map(str::to_owned),
                    instance_type: inst
                        .instance_type()
                        .map(|t| t.as_str().to_owned())
                        .unwrap_or_default(),
                    launched_at: inst
                        .launch_time()
                        .and_then(|t| DateTime::from_timestamp(t.secs(), t.subsec_nanos())),
                });
            }
            if page.next_token().is_some_and(|t| !t.is_empty()) {
                self.count("DescribeInstances").await;
            }
        }
        Ok(out)
    }

    async fn root_device(&self, ami: &str) -> Result<(String, Option<i32>), Ec2Error> {
        if let Some(d) = self
            .root_devices
            .lock()
            .ok()
            .and_then(|m| m.get(ami).cloned())
        {
            return Ok(d);
        }
        self.count("DescribeImages").await;
        let out = self
            .settle(
                self.client
                    .describe_images()
                    .image_ids(ami)
                    .send()
                    .await
                    .map_err(|e| Ec2Error::from_sdk("DescribeImages", e)),
            )
            .await?;
        let image = out.images().first();
        let device = image
            .and_then(|i| i.root_device_name())
            .unwrap_or("/dev/xvda")
            .to_owned();
        let size = image
            .map(|i| i.block_device_mappings())
            .unwrap_or_default()
            .iter()
            .find(|b| b.device_name() == Some(device.as_str()))
            .and_then(|b| b.ebs())
            .and_then(|e| e.volume_size());
        let root = (device, size);
        if let Ok(mut m) = self.root_devices.lock() {
            m.insert(ami.to_owned(), root.clone());
        }
        Ok(root)
    }

    /// One RunInstances for one machine, tagged in the call itself (so there is no window
    /// in which an untagged instance of ours exists), IMDSv2 only with the class's hop
    /// limit (1 by default: job containers cannot reach the instance role), a public IP
    /// only where the class asks for one, and an encrypted root volume whatever the AMI's
    /// snapshot is (the runner-host policy requires it).
    pub(crate) async fn launch(&self, spec: &LaunchSpec) -> Result<Launched, Ec2Error> {
        let tag_list: Vec<Tag> = spec
            .tags()
            .into_iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let tag_spec = |rt: ResourceType| {
            TagSpecification::builder()
                .resource_type(rt)
                .set_tags(Some(tag_list.clone()))
                .build()
        };
        let nic = InstanceNetworkInterfaceSpecification::builder()
            .device_index(0)
            .subnet_id(&spec.subnet)
            .set_groups(Some(spec.security_groups.clone()))
            .associate_public_ip_address(spec.public_ip)
            .delete_on_termination(true)
            .build();
        let mut req = self
            .client
            .run_instances()
            .image_id(&spec.ami)
            .instance_type(InstanceType::from(spec.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .client_token(&spec.client_token)
            .network_interfaces(nic)
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_put_response_hop_limit(i32::from(spec.imds_hop_limit))
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .user_data(base64::engine::general_purpose::STANDARD.encode(&spec.user_data))
            .tag_specifications(tag_spec(ResourceType::Instance))
            .tag_specifications(tag_spec(ResourceType::Volume))
            .tag_specifications(tag_spec(ResourceType::NetworkInterface));
        if let Some(t) = &spec.launch_template {
            req = req.launch_template(
                LaunchTemplateSpecification::builder()
                    .set_launch_template_name(t.name.clone())
                    .set_launch_template_id(t.id.clone())
                    .version(&t.version)
                    .build(),
            );
        }
        if let Some(profile) = &spec.instance_profile {
            req = req.iam_instance_profile(
                IamInstanceProfileSpecification::builder()
                    .name(profile)
                    .build(),
            );
        }
        let (device, ami_gb) = self.root_device(&spec.ami).await?;
        let v = &spec.root_volume;
        // Without a configured size, the size of the AMI's own root volume.
        let size = v.gb.map(|gb| gb as i32).or(ami_gb);
        let ebs = EbsBlockDevice::builder()
            .set_volume_size(size)
            .volume_type(VolumeType::from(v.kind.as_str()))
            .set_iops(v.iops.map(|n| n as i32))
            .set_throughput(v.throughput.map(|n| n as i32))
            .set_kms_key_id(v.kms_key.clone());
        req = req.block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name(device)
                .ebs(ebs.encrypted(true).delete_on_termination(true).build())
                .build(),
        );
        if spec.purchase == Purchase::Spot {
            req = req.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(
                        SpotMarketOptions::builder()
                            .spot_instance_type(SpotInstanceType::OneTime)
                            .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                            .build(),
                    )
                    .build(),
            );
        }
        self.count("RunInstances").await;
        let out = self
            .settle(
                req.send()
                    .await
                    .map_err(|e| Ec2Error::from_sdk("RunInstances", e)),
            )
            .await?;
        let inst = out.instances().first().ok_or_else(|| Ec2Error {
            operation: "RunInstances",
            code: None,
            message: "no instance in the response".into(),
        })?;
        Ok(Launched {
            instance_id: inst.instance_id().unwrap_or_default().to_owned(),
            private_ip: inst.private_ip_address().unwrap_or_default().to_owned(),
        })
    }

    /// Terminates in batches. Callers pass only instances proven to carry this fleet's tag.
    pub(crate) async fn terminate(&self, instance_ids: &[String]) -> Result<(), Ec2Error> {
        self.batched(Lifecycle::Terminate, instance_ids).await
    }

    /// One lifecycle call over `instance_ids` in batches of 500. An instance EC2 no longer
    /// knows (or cannot act on in its state) fails the whole batch; then the batch goes one
    /// by one so the others are not held hostage: terminating an instance already gone is
    /// done, and stopping or starting one in the wrong state is left to the next
    /// observation (it fails that instance's call, not the others').
    async fn batched(&self, op: Lifecycle, instance_ids: &[String]) -> Result<(), Ec2Error> {
        let mut failed = None;
        for chunk in instance_ids.chunks(500) {
            match self.lifecycle_batch(op, chunk).await {
                Err(e) if chunk.len() > 1 && e.is_bad_instance() => {
                    for id in chunk {
                        match self.lifecycle_batch(op, std::slice::from_ref(id)).await {
                            Err(e) if e.is_bad_instance() && op == Lifecycle::Terminate => {
                                tracing::debug!(instance = %id, error = %e, "instance already gone");
                            }
                            Err(e) if e.is_bad_instance() => {
                                tracing::warn!(instance = %id, error = %e, "instance cannot be {} now", op.done());
                                failed = Some(e);
                            }
                            other => other?,
                        }
                    }
                }
                other => other?,
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// The instance's serial console output (the last 64 KiB EC2 keeps), base64-decoded;
    /// undecodable bytes are replaced, never an error.
    pub(crate) async fn console_output(&self, instance_id: &str) -> Result<String, Ec2Error> {
        use base64::Engine as _;
        self.count("GetConsoleOutput").await;
        let out = self
            .settle(
                self.client
                    .get_console_output()
                    .instance_id(instance_id)
                    .send()
                    .await
                    .map_err(|e| Ec2Error::from_sdk("GetConsoleOutput", e)),
            )
            .await?;
        let encoded = out.output().unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .unwrap_or_else(|_| encoded.as_bytes().to_vec());
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// One call of `op` for `ids`. Each arm names its operation in its own `count` (the
    /// provisioner's IAM test reads those names).
    async fn lifecycle_batch(&self, op: Lifecycle, ids: &[String]) -> Result<(), Ec2Error> {
        let name = op.operation();
        let ids = Some(ids.to_vec());
        let sent = match op {
            Lifecycle::Terminate => {
                self.count("TerminateInstances").await;
                self.client
                    .terminate_instances()
                    .set_instance_ids(ids)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| Ec2Error::from_sdk(name, e))
            }
            Lifecycle::Stop => {
                self.count("StopInstances").await;
                self.client
                    .stop_instances()
                    .set_instance_ids(ids)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| Ec2Error::from_sdk(name, e))
            }
            Lifecycle::Start => {
                self.count("StartInstances").await;
                self.client
                    .start_instances()
                    .set_instance_ids(ids)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| Ec2Error::from_sdk(name, e))
            }
        };
        self.settle(sent).await
    }
}

/// The batched lifecycle calls: what [`Ec2Client::batched`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    Terminate,
    Stop,
    Start,
}

impl Lifecycle {
    /// The EC2 operation, as its errors name it.
    fn operation(self) -> &'static str {
        match self {
            Self::Terminate => "TerminateInstances",
            Self::Stop => "StopInstances",
            Self::Start => "StartInstances",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Self::Terminate => "terminated",
            Self::Stop => "stopped",
            Self::Start => "started",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_tags_follow_flotillas_own_and_never_replace_them() {
        let spec = LaunchSpec {
            fleet: "ci".into(),
            daemon_id: "d-1".into(),
            machine_id: "m1".into(),
            client_token: "m1-1".into(),
            class: "small".into(),
            ami: "ami-1".into(),
            instance_type: "t3.micro".into(),
            subnet: "subnet-1".into(),
            security_groups: vec![],
            instance_profile: None,
            root_volume: Default::default(),
            imds_hop_limit: 1,
            public_ip: false,
            purchase: Purchase::OnDemand,
            user_data: String::new(),
            extra_tags: BTreeMap::from([
                ("CostCenter".to_string(), "ci".to_string()),
                (tags::FLEET.to_string(), "someone-else".to_string()),
                ("flotilla:other".to_string(), "x".to_string()),
            ]),
            launch_template: None,
        };
        let got = spec.tags();
        let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                tags::FLEET,
                tags::CLASS,
                tags::MACHINE,
                tags::NAME,
                tags::DAEMON,
                "CostCenter"
            ]
        );
        assert_eq!(got[0].1, "ci", "the fleet tag is the daemon's");
    }
}
