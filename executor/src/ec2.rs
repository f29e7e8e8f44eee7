//! The only module that talks to EC2. Every call is counted by operation (for the
//! per-job API budget in the README) and errors keep the EC2 error code, so callers can
//! tell throttling and capacity errors from real failures. A failed call never implies
//! anything about a machine's health: callers must treat it as "unknown".

use std::collections::BTreeMap;
use std::sync::Mutex;

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceNetworkInterfaceSpecification, InstanceStateName, InstanceType, ResourceType,
    ShutdownBehavior, Tag, TagSpecification, VolumeType,
};
use base64::Engine;
use chrono::{DateTime, Utc};
use flotilla_proto::tags;

#[derive(Debug, Clone, thiserror::Error)]
#[error("EC2 {operation} failed: {}{message}", code.as_deref().map(|c| format!("{c}: ")).unwrap_or_default())]
pub struct Ec2Error {
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

    pub fn is_throttling(&self) -> bool {
        matches!(
            self.code.as_deref(),
            Some("RequestLimitExceeded" | "Throttling" | "ThrottlingException")
        )
    }
}

/// What a launch needs; everything a machine is and owns is decided before the call.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub fleet: String,
    pub machine_id: String,
    /// Idempotency token: a retried call with the same token cannot launch twice.
    pub client_token: String,
    pub class: String,
    pub ami: String,
    pub instance_type: String,
    pub subnet: String,
    pub security_groups: Vec<String>,
    pub instance_profile: Option<String>,
    pub root_volume_gb: Option<u32>,
    pub user_data: String,
}

#[derive(Debug, Clone)]
pub struct Launched {
    pub instance_id: String,
    pub private_ip: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceLife {
    Pending,
    Running,
    Stopping,
    Stopped,
    ShuttingDown,
    Terminated,
}

impl InstanceLife {
    /// Gone or going: the machine will never run a job again.
    pub fn is_gone(self) -> bool {
        matches!(
            self,
            Self::ShuttingDown | Self::Terminated | Self::Stopping | Self::Stopped
        )
    }
}

/// One instance as DescribeInstances reported it.
#[derive(Debug, Clone)]
pub struct ObservedInstance {
    pub instance_id: String,
    pub life: InstanceLife,
    pub machine_id: Option<String>,
    pub class: Option<String>,
    pub private_ip: Option<String>,
    pub instance_type: String,
    pub launched_at: Option<DateTime<Utc>>,
}

pub struct Ec2Client {
    client: aws_sdk_ec2::Client,
    calls: Mutex<BTreeMap<&'static str, u64>>,
    root_devices: Mutex<BTreeMap<String, String>>,
}

impl Ec2Client {
    pub async fn new(aws: &flotilla_proto::config::AwsConfig) -> Self {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(aws_config::retry::RetryConfig::adaptive().with_max_attempts(5));
        if let Some(region) = &aws.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(url) = &aws.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let sdk = loader.load().await;
        Self {
            client: aws_sdk_ec2::Client::new(&sdk),
            calls: Mutex::new(BTreeMap::new()),
            root_devices: Mutex::new(BTreeMap::new()),
        }
    }

    fn count(&self, op: &'static str) {
        if let Ok(mut c) = self.calls.lock() {
            *c.entry(op).or_default() += 1;
        }
    }

    /// EC2 calls made so far, by operation.
    pub fn calls(&self) -> BTreeMap<&'static str, u64> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Every instance carrying `flotilla:fleet=<fleet>` that is not yet terminated: one
    /// paginated DescribeInstances, however large the fleet.
    pub async fn describe_fleet(&self, fleet: &str) -> Result<Vec<ObservedInstance>, Ec2Error> {
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
        while let Some(page) = pages.next().await {
            self.count("DescribeInstances");
            let page = page.map_err(|e| Ec2Error::from_sdk("DescribeInstances", e))?;
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
        }
        Ok(out)
    }

    async fn root_device(&self, ami: &str) -> Result<String, Ec2Error> {
        if let Some(d) = self
            .root_devices
            .lock()
            .ok()
            .and_then(|m| m.get(ami).cloned())
        {
            return Ok(d);
        }
        self.count("DescribeImages");
        let out = self
            .client
            .describe_images()
            .image_ids(ami)
            .send()
            .await
            .map_err(|e| Ec2Error::from_sdk("DescribeImages", e))?;
        let device = out
            .images()
            .first()
            .and_then(|i| i.root_device_name())
            .unwrap_or("/dev/xvda")
            .to_owned();
        if let Ok(mut m) = self.root_devices.lock() {
            m.insert(ami.to_owned(), device.clone());
        }
        Ok(device)
    }

    /// One RunInstances for one machine, tagged in the call itself (so there is no window
    /// in which an untagged instance of ours exists), IMDSv2 only with hop limit 1 (job
    /// containers cannot reach the instance role), no public IP.
    pub async fn launch(&self, spec: &LaunchSpec) -> Result<Launched, Ec2Error> {
        let tag_list = vec![
            Tag::builder().key(tags::FLEET).value(&spec.fleet).build(),
            Tag::builder().key(tags::CLASS).value(&spec.class).build(),
            Tag::builder()
                .key(tags::MACHINE)
                .value(&spec.machine_id)
                .build(),
            Tag::builder()
                .key(tags::NAME)
                .value(tags::name_value(&spec.fleet, &spec.machine_id))
                .build(),
        ];
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
            .associate_public_ip_address(false)
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
                    .http_put_response_hop_limit(1)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .user_data(base64::engine::general_purpose::STANDARD.encode(&spec.user_data))
            .tag_specifications(tag_spec(ResourceType::Instance))
            .tag_specifications(tag_spec(ResourceType::Volume))
            .tag_specifications(tag_spec(ResourceType::NetworkInterface));
        if let Some(profile) = &spec.instance_profile {
            req = req.iam_instance_profile(
                IamInstanceProfileSpecification::builder()
                    .name(profile)
                    .build(),
            );
        }
        if let Some(gb) = spec.root_volume_gb {
            let device = self.root_device(&spec.ami).await?;
            req = req.block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(device)
                    .ebs(
                        EbsBlockDevice::builder()
                            .volume_size(gb as i32)
                            .volume_type(VolumeType::Gp3)
                            .encrypted(true)
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            );
        }
        self.count("RunInstances");
        let out = req
            .send()
            .await
            .map_err(|e| Ec2Error::from_sdk("RunInstances", e))?;
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
    pub async fn terminate(&self, instance_ids: &[String]) -> Result<(), Ec2Error> {
        for chunk in instance_ids.chunks(500) {
            self.count("TerminateInstances");
            self.client
                .terminate_instances()
                .set_instance_ids(Some(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| Ec2Error::from_sdk("TerminateInstances", e))?;
        }
        Ok(())
    }
}
