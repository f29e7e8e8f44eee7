//! Runner hosts: EC2 instances in the private subnets (spread over the zones) that run
//! gitlab-runner and the flotilla daemon, configured entirely by their user data.
//!
//! A host is kept when its AMI, instance type, subnet and user-data hash (tag
//! `flotilla:user-data-sha256`) match the stack; otherwise a new one is launched and the
//! old one terminated. Instances with a host id beyond `runner_hosts.count`, or
//! duplicates left by an interrupted run, are terminated.

use std::time::Duration;

use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, HttpTokensState, IamInstanceProfileSpecification, Instance,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest, ResourceType, VolumeType,
};
use base64::Engine;
use sha2::{Digest, Sha256};

use super::{logical as logical_of, tag, tag_spec, Inventory};
use crate::engine::Ctx;
use crate::error::{Error, Result};
use crate::naming::USER_DATA_TAG;
use crate::plan::{is_pending, pending, Action};

/// What one host should be.
#[derive(Debug, Clone)]
pub struct HostSpec {
    pub logical: String,
    pub subnet: String,
    pub user_data: String,
}

/// One host as it is after the pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    pub logical: String,
    pub instance_id: String,
    pub private_ip: String,
    pub state: String,
}

pub fn user_data_hash(user_data: &str) -> String {
    hex::encode(Sha256::digest(user_data.as_bytes()))
}

fn state(i: &Instance) -> &str {
    i.state()
        .and_then(|s| s.name())
        .map(|n| n.as_str())
        .unwrap_or("unknown")
}

fn info(logical: &str, i: &Instance) -> HostInfo {
    HostInfo {
        logical: logical.to_owned(),
        instance_id: i.instance_id().unwrap_or_default().to_owned(),
        private_ip: i.private_ip_address().unwrap_or_default().to_owned(),
        state: state(i).to_owned(),
    }
}

/// Why an existing host does not match, or None when it does.
fn mismatch(ctx: &Ctx<'_>, i: &Instance, spec: &HostSpec, hash: &str) -> Option<String> {
    let h = &ctx.stack.runner_hosts;
    let mut why = Vec::new();
    if i.image_id() != Some(h.ami.as_str()) {
        why.push(format!("ami {} -> {}", i.image_id().unwrap_or("?"), h.ami));
    }
    let itype = i.instance_type().map(|t| t.as_str()).unwrap_or("?");
    if itype != h.instance_type {
        why.push(format!("instance type {itype} -> {}", h.instance_type));
    }
    if i.subnet_id() != Some(spec.subnet.as_str()) {
        why.push(format!(
            "subnet {} -> {}",
            i.subnet_id().unwrap_or("?"),
            spec.subnet
        ));
    }
    if tag(i.tags(), USER_DATA_TAG) != Some(hash) {
        why.push("user data changed".into());
    }
    if matches!(state(i), "shutting-down" | "stopping" | "stopped") {
        why.push(format!("instance is {}", state(i)));
    }
    (!why.is_empty()).then(|| why.join(", "))
}

pub struct Launch<'a> {
    pub runner_sg: &'a str,
    pub profile: &'a str,
    pub root_device: &'a str,
}

pub async fn converge(
    ctx: &Ctx<'_>,
    inv: &Inventory,
    specs: &[HostSpec],
    launch: &Launch<'_>,
) -> Result<Vec<HostInfo>> {
    let mut out = Vec::new();
    let mut keep: Vec<String> = Vec::new();
    let mut announced: Vec<String> = Vec::new();
    for spec in specs {
        let hash = user_data_hash(&spec.user_data);
        let mut candidates: Vec<&Instance> = inv
            .instances
            .iter()
            .filter(|i| logical_of(i.tags()) == Some(spec.logical.as_str()))
            .collect();
        candidates.sort_by_key(|i| i.instance_id().unwrap_or_default().to_owned());
        let matching = candidates
            .iter()
            .find(|i| mismatch(ctx, i, spec, &hash).is_none());
        if let Some(i) = matching {
            keep.push(i.instance_id().unwrap_or_default().to_owned());
            out.push(info(&spec.logical, i));
            continue;
        }
        let (action, detail) = match candidates.first() {
            Some(old) => (
                Action::Replace,
                format!(
                    "{}: {}",
                    old.instance_id().unwrap_or("?"),
                    mismatch(ctx, old, spec, &hash).unwrap_or_default()
                ),
            ),
            None => (
                Action::Create,
                format!(
                    "{} {} in {}",
                    ctx.stack.runner_hosts.ami, ctx.stack.runner_hosts.instance_type, spec.subnet
                ),
            ),
        };
        if action == Action::Replace {
            announced.push(spec.logical.clone());
        }
        if !ctx.change(action, "ec2:instance", &spec.logical, detail) {
            out.push(HostInfo {
                logical: spec.logical.clone(),
                instance_id: pending(&spec.logical),
                private_ip: pending(&spec.logical),
                state: "planned".into(),
            });
            continue;
        }
        let i = run_instance(ctx, spec, &hash, launch).await?;
        keep.push(i.instance_id().unwrap_or_default().to_owned());
        ctx.created("ec2:instance", &spec.logical, i.instance_id().unwrap_or(""));
        out.push(info(&spec.logical, &i));
    }
    // Everything else tagged with the stack goes: replaced hosts, duplicates, hosts beyond
    // runner_hosts.count.
    let stale: Vec<&Instance> = inv
        .instances
        .iter()
        .filter(|i| !keep.iter().any(|k| Some(k.as_str()) == i.instance_id()))
        .filter(|i| state(i) != "shutting-down")
        .collect();
    let mut to_terminate = Vec::new();
    for i in stale {
        let id = i.instance_id().unwrap_or_default().to_owned();
        let name = logical_of(i.tags()).unwrap_or("(untagged host)").to_owned();
        // A replaced host was already announced as "-/+"; do not count it twice.
        if announced.contains(&name) || ctx.change(Action::Delete, "ec2:instance", &name, &id) {
            to_terminate.push(id);
        }
    }
    if ctx.applying() && !to_terminate.is_empty() {
        ctx.aws
            .call(
                "ec2:TerminateInstances",
                ctx.aws
                    .ec2
                    .terminate_instances()
                    .set_instance_ids(Some(to_terminate))
                    .send(),
            )
            .await?;
    }
    Ok(out)
}

async fn run_instance(
    ctx: &Ctx<'_>,
    spec: &HostSpec,
    hash: &str,
    launch: &Launch<'_>,
) -> Result<Instance> {
    if [&spec.subnet, launch.runner_sg]
        .iter()
        .any(|s| is_pending(s))
    {
        return Err(Error::Refused(format!(
            "cannot launch {}: its subnet or security group was not created",
            spec.logical
        )));
    }
    let h = &ctx.stack.runner_hosts;
    let user_data = base64::engine::general_purpose::STANDARD.encode(&spec.user_data);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let req = ctx
            .aws
            .ec2
            .run_instances()
            .image_id(&h.ami)
            .instance_type(h.instance_type.as_str().into())
            .min_count(1)
            .max_count(1)
            .subnet_id(&spec.subnet)
            .security_group_ids(launch.runner_sg)
            .iam_instance_profile(
                IamInstanceProfileSpecification::builder()
                    .name(launch.profile)
                    .build(),
            )
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_put_response_hop_limit(1)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            .block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(launch.root_device)
                    .ebs(
                        EbsBlockDevice::builder()
                            .encrypted(true)
                            .delete_on_termination(true)
                            .volume_type(VolumeType::Gp3)
                            .volume_size(h.root_volume_gb as i32)
                            .build(),
                    )
                    .build(),
            )
            .set_key_name(h.key_name.clone())
            .user_data(user_data.clone())
            .tag_specifications(tag_spec(
                ctx,
                ResourceType::Instance,
                &spec.logical,
                &[(USER_DATA_TAG, hash)],
            ))
            .tag_specifications(tag_spec(ctx, ResourceType::Volume, &spec.logical, &[]));
        match ctx.aws.call("ec2:RunInstances", req.send()).await {
            Ok(out) => {
                return out
                    .instances()
                    .first()
                    .cloned()
                    .ok_or_else(|| Error::Refused("RunInstances returned no instance".into()))
            }
            // A new instance profile takes a few seconds to be usable by EC2.
            Err(e)
                if attempt < 12
                    && e.code_is(&["InvalidParameterValue"])
                    && e.message.contains("iamInstanceProfile") =>
            {
                tracing::info!("instance profile not usable yet; retrying in 5s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
