//! Runner hosts: EC2 instances in the private subnets (spread over the zones) that run
//! gitlab-runner and the flotilla daemon, configured entirely by their user data.
//!
//! A host is kept when its AMI, instance type, subnet and user-data hash (tag
//! `flotilla:user-data-sha256`) match the stack. Otherwise it is replaced, one host at a
//! time: its new instance is launched and waited for (running, then ready: cloud-init
//! done and its flotilla daemon answering, asked over SSM Run Command), then the old
//! instance is drained (gitlab-runner stops once its jobs have finished, then `flotilla
//! drain --wait` gives back its build machines) and terminated, and only then is the
//! next host replaced. Instances with a host id beyond `runner_hosts.count`, and
//! duplicates left by an interrupted run, are drained and terminated the same way.
//! `apply --no-drain` skips the readiness check and the drains (hosts SSM cannot reach).
//!
//! destroy terminates the hosts (and, when told, the build machines of the stack's
//! fleets in its VPC) and waits until EC2 reports them terminated.
//!
//! Invariant: apply never terminates a running runner host it has not drained, unless
//! told `--no-drain`.

use std::time::Duration;

use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    Instance, InstanceMetadataEndpointState, InstanceMetadataOptionsRequest, ResourceType,
    VolumeType,
};
use base64::Engine;
use sha2::{Digest, Sha256};

use super::inventory::{
    id_list, logical as logical_of, name_of, tag, tag_spec, Ec2Type, Inventory,
};
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::naming::{logical, BINARY_TAG, STACK_TAG, USER_DATA_TAG};
use crate::plan::{Action, Go};
use crate::poll::{self, Backoff, Poll};
use crate::run_command::{self, Script};

const KIND: &str = "ec2:instance";

/// How the engine prunes and deletes this type.
pub(crate) const TYPE: Ec2Type = Ec2Type {
    desired,
    delete: |ctx, inv| Box::pin(delete(ctx, inv)),
};

/// What one host should be.
#[derive(Debug, Clone)]
pub(crate) struct HostSpec {
    pub(crate) logical: String,
    pub(crate) subnet: Id,
    pub(crate) user_data: String,
    /// SHA-256 of the flotilla binary the user data installs (tag `flotilla:binary-sha256`,
    /// so a plan can say the binary is what changed).
    pub(crate) flotilla_sha256: String,
}

/// One host as it is after the pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostInfo {
    pub(crate) logical: String,
    pub(crate) instance_id: Id,
    pub(crate) private_ip: Id,
    pub(crate) state: String,
}

fn user_data_hash(user_data: &str) -> String {
    hex::encode(Sha256::digest(user_data.as_bytes()))
}

fn state(i: &Instance) -> &str {
    i.state()
        .and_then(|s| s.name())
        .map(|n| n.as_str())
        .unwrap_or("unknown")
}

fn id(i: &Instance) -> &str {
    i.instance_id().unwrap_or_default()
}

fn info(logical: &str, i: &Instance) -> HostInfo {
    HostInfo {
        logical: logical.to_owned(),
        instance_id: Id::Known(id(i).to_owned()),
        private_ip: Id::from_aws(i.private_ip_address()),
        state: state(i).to_owned(),
    }
}

fn short(sum: &str) -> &str {
    sum.get(..12).unwrap_or(sum)
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
    if i.subnet_id().is_none() || i.subnet_id() != spec.subnet.known() {
        why.push(format!(
            "subnet {} -> {}",
            i.subnet_id().unwrap_or("?"),
            spec.subnet
        ));
    }
    if tag(i.tags(), USER_DATA_TAG) != Some(hash) {
        match tag(i.tags(), BINARY_TAG) {
            Some(old) if old != spec.flotilla_sha256 => why.push(format!(
                "user data changed (flotilla binary {} -> {})",
                short(old),
                short(&spec.flotilla_sha256)
            )),
            _ => why.push("user data changed".into()),
        }
    }
    if matches!(state(i), "shutting-down" | "stopping" | "stopped") {
        why.push(format!("instance is {}", state(i)));
    }
    (!why.is_empty()).then(|| why.join(", "))
}

/// What every runner host is launched with, besides its own [`HostSpec`].
pub(crate) struct Launch<'a> {
    pub(crate) runner_sg: &'a Id,
    pub(crate) profile: &'a str,
    pub(crate) root_device: &'a str,
}

/// How the plan line says an old host goes.
fn retire_detail(ctx: &Ctx<'_>, old: &[&Instance]) -> String {
    let ids: Vec<&str> = old.iter().map(|i| id(i)).collect();
    if ctx.drain() {
        format!(
            "new host first, then drain and terminate {}, one host at a time",
            ids.join(", ")
        )
    } else {
        format!(
            "new host first, then terminate {} (no drain)",
            ids.join(", ")
        )
    }
}

pub(crate) async fn converge(
    ctx: &Ctx<'_>,
    inv: &Inventory,
    specs: &[HostSpec],
    launch: &Launch<'_>,
) -> Result<Vec<HostInfo>> {
    // Each host's instances, and what it takes to converge it.
    let mut plans: Vec<(&HostSpec, String, Vec<&Instance>)> = Vec::new();
    for spec in specs {
        let hash = user_data_hash(&spec.user_data);
        let mut candidates: Vec<&Instance> = inv
            .instances
            .iter()
            .filter(|i| logical_of(i.tags()) == Some(spec.logical.as_str()))
            .collect();
        candidates.sort_by_key(|i| id(i).to_owned());
        plans.push((spec, hash, candidates));
    }
    let replacements = plans
        .iter()
        .filter(|(spec, hash, c)| {
            !c.is_empty() && c.iter().all(|i| mismatch(ctx, i, spec, hash).is_some())
        })
        .count();

    // Instances this pass keeps, or retires as the old instances of a replaced host.
    let handled: Vec<&str> = plans
        .iter()
        .flat_map(|(spec, hash, candidates)| {
            match candidates
                .iter()
                .find(|i| mismatch(ctx, i, spec, hash).is_none())
            {
                Some(keep) => vec![id(keep)],
                None => candidates.iter().map(|i| id(i)).collect(),
            }
        })
        .collect();
    // First what goes for good: duplicates (the old instance of a replacement an earlier
    // apply did not finish) and hosts beyond runner_hosts.count.
    for i in inv
        .instances
        .iter()
        .filter(|i| !handled.contains(&id(i)))
        .filter(|i| state(i) != "shutting-down")
    {
        let name = logical_of(i.tags()).unwrap_or("(untagged host)");
        let detail = if ctx.drain() && state(i) == "running" {
            format!("{}, drained first", id(i))
        } else {
            id(i).to_owned()
        };
        if let Some(go) = ctx.change(Action::Delete, KIND, name, detail) {
            retire(ctx, go, name, i, None).await?;
        }
    }

    let mut out = Vec::new();
    let mut replaced = 0;
    for (spec, hash, candidates) in plans {
        if let Some(i) = candidates
            .iter()
            .find(|i| mismatch(ctx, i, spec, &hash).is_none())
        {
            out.push(info(&spec.logical, i));
            continue;
        }
        let (action, detail) = match candidates.first() {
            Some(old) => (
                Action::Replace,
                format!(
                    "{}: {}; {}",
                    id(old),
                    mismatch(ctx, old, spec, &hash).unwrap_or_default(),
                    retire_detail(ctx, &candidates)
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
        let Some(go) = ctx.change(action, KIND, &spec.logical, detail) else {
            out.push(HostInfo {
                logical: spec.logical.clone(),
                instance_id: Id::pending(&spec.logical),
                private_ip: Id::pending(&spec.logical),
                state: "planned".into(),
            });
            continue;
        };
        if candidates.is_empty() {
            let i = run_instance(ctx, go, spec, &hash, launch).await?;
            ctx.created(KIND, &spec.logical, id(&i));
            out.push(info(&spec.logical, &i));
        } else {
            replaced += 1;
            let new = replace(
                ctx,
                go,
                spec,
                &hash,
                launch,
                &candidates,
                (replaced, replacements),
            )
            .await?;
            out.push(new);
        }
    }
    Ok(out)
}

/// One host's rolling replacement: the new instance up and ready, then each old one
/// drained and terminated.
async fn replace(
    ctx: &Ctx<'_>,
    go: Go,
    spec: &HostSpec,
    hash: &str,
    launch: &Launch<'_>,
    old: &[&Instance],
    (n, of): (usize, usize),
) -> Result<HostInfo> {
    let name = spec.logical.as_str();
    let old_ids: Vec<&str> = old.iter().map(|i| id(i)).collect();
    tracing::info!(
        "{name}: replacing {} (host {n} of {of} to replace): launching its new instance",
        old_ids.join(", ")
    );
    let launched = run_instance(ctx, go, spec, hash, launch).await?;
    let new_id = id(&launched).to_owned();
    ctx.created(KIND, name, &new_id);
    let running = wait_running(ctx, name, &new_id).await?;
    if ctx.drain() {
        ready(ctx, go, name, &new_id, &old_ids).await?;
    }
    for i in old {
        retire(ctx, go, name, i, Some(&new_id)).await?;
    }
    tracing::info!("{name}: replaced {} with {new_id}", old_ids.join(", "));
    Ok(info(name, &running))
}

/// Waits until EC2 reports the new instance running (10 minutes at most).
async fn wait_running(ctx: &Ctx<'_>, name: &str, instance: &str) -> Result<Instance> {
    let what = format!("{name}: the new instance {instance} to be running");
    poll::until(&what, Backoff::up_to(Duration::from_secs(600)), || async {
        let out = ctx
            .aws
            .read(
                "ec2:DescribeInstances",
                ctx.aws
                    .ec2
                    .describe_instances()
                    .instance_ids(instance)
                    .send(),
            )
            .await;
        let out = match out {
            Ok(out) => out,
            // A new instance can take a moment to be listed.
            Err(e) if e.code_is(&["InvalidInstanceID.NotFound"]) => {
                return Ok(Poll::Wait(format!(
                    "{name}: waiting for {instance} to be listed by EC2"
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let found = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(instance))
            .cloned();
        let Some(i) = found else {
            return Ok(Poll::Wait(format!(
                "{name}: waiting for {instance} to be listed by EC2"
            )));
        };
        match state(&i) {
            "running" => Ok(Poll::Done(i)),
            "pending" => Ok(Poll::Wait(format!(
                "{name}: waiting for {instance} to be running (pending)"
            ))),
            other => Err(Error::Refused(format!(
                "{name}: the new instance {instance} is {other} ({}) instead of running; the \
                 old host is untouched; apply again to launch another",
                i.state_reason()
                    .and_then(|r| r.message())
                    .unwrap_or("no reason given")
            ))),
        }
    })
    .await
}

/// Waits until the new host is ready: its SSM agent registered, cloud-init done, and
/// its flotilla daemon answering.
async fn ready(ctx: &Ctx<'_>, go: Go, name: &str, instance: &str, old: &[&str]) -> Result<()> {
    tracing::info!(
        "{name}: waiting for {instance} to be ready: SSM agent registered, cloud-init \
         done, flotilla daemon answering (at most {})",
        run_command::human(run_command::READY_TIMEOUT)
    );
    let what = format!("the readiness check of its new instance {instance}");
    let comment = format!(
        "flotilla-provision {}: is {name} {instance} ready",
        ctx.stack.name
    );
    run_command::run(
        ctx,
        go,
        instance,
        &Script {
            host: name,
            what: &what,
            comment: &comment,
            commands: run_command::ready_commands(),
            timeout: Duration::from_secs(600),
            wait_for_agent: Some(run_command::READY_TIMEOUT),
        },
    )
    .await
    .map_err(|e| {
        Error::Refused(format!(
            "{}. The old instance {} keeps serving (not drained); the new one {instance} \
             stays up to be looked at (cloud-init's log, `journalctl -u flotilla`). Apply \
             again once fixed, or `apply --no-drain` to replace hosts without this check",
            with_context(&e, name, &what),
            old.join(", ")
        ))
    })?;
    tracing::info!("{name}: {instance} is ready");
    Ok(())
}

/// Drains (unless `--no-drain`, or it is not running) and terminates an old instance.
async fn retire(
    ctx: &Ctx<'_>,
    go: Go,
    name: &str,
    old: &Instance,
    new: Option<&str>,
) -> Result<()> {
    let old_id = id(old);
    match state(old) {
        "shutting-down" | "terminated" => return Ok(()),
        "running" if ctx.drain() => drain(ctx, go, name, old_id, new).await?,
        other if ctx.drain() => {
            tracing::info!("{name}: {old_id} is {other}: nothing to drain")
        }
        _ => tracing::warn!(
            "{name}: terminating {old_id} without draining it (--no-drain): jobs still \
             running on it fail, and its build machines are left to `flotilla audit`"
        ),
    }
    tracing::info!("{name}: terminating {old_id}");
    ctx.aws
        .write(
            go,
            "ec2:TerminateInstances",
            ctx.aws
                .ec2
                .terminate_instances()
                .instance_ids(old_id)
                .send(),
        )
        .await?;
    Ok(())
}

/// Stops gitlab-runner once its jobs are done and gives back the build machines, over
/// SSM Run Command, within `runner_hosts.drain_timeout`.
async fn drain(ctx: &Ctx<'_>, go: Go, name: &str, instance: &str, new: Option<&str>) -> Result<()> {
    let timeout = ctx.stack.runner_hosts.drain_timeout.as_duration();
    tracing::info!(
        "{name}: draining {instance}: gitlab-runner finishes its running jobs and stops, \
         then flotilla terminates its build machines (at most {}, \
         runner_hosts.drain_timeout)",
        run_command::human(timeout)
    );
    let what = format!("the drain of {instance}");
    let comment = format!(
        "flotilla-provision {}: drain {name} {instance} before terminating it",
        ctx.stack.name
    );
    let serving = match new {
        Some(n) => format!("its new instance {n} serves"),
        None => "the other hosts serve".into(),
    };
    run_command::run(
        ctx,
        go,
        instance,
        &Script {
            host: name,
            what: &what,
            comment: &comment,
            commands: run_command::drain_commands(),
            timeout,
            wait_for_agent: None,
        },
    )
    .await
    .map_err(|e| {
        let hint = match &e {
            Error::Aws(a) if run_command::is_unmanaged(a) => format!(
                "SSM cannot reach {instance} (its SSM agent is not running or not \
                 registered; hosts launched before flotilla-provision installed the agent \
                 have none): drain it by hand on the host (`gitlab-runner stop`, then \
                 `flotilla drain --wait`) and run `apply --no-drain`"
            ),
            _ => format!(
                "{instance} is left running, not terminated (gitlab-runner may be \
                 stopped); apply again to drain it again, or drain it by hand and run \
                 `apply --no-drain`"
            ),
        };
        Error::Refused(format!(
            "{}. {serving}; {hint}",
            with_context(&e, name, &what)
        ))
    })?;
    tracing::info!("{name}: {instance} is drained");
    Ok(())
}

/// An error of a Run Command, saying which host and script when the error itself does
/// not (a failed AWS call does not; a failed or timed-out command does).
fn with_context(e: &Error, host: &str, what: &str) -> String {
    match e {
        Error::Aws(_) => format!("{host}: {what} failed: {e}"),
        _ => e.to_string(),
    }
}

/// Waits until EC2 reports every instance terminated (10 minutes at most).
async fn wait_terminated(ctx: &Ctx<'_>, ids: &[String]) -> Result<()> {
    let what = format!("instances {} to terminate", ids.join(", "));
    poll::until(&what, Backoff::up_to(Duration::from_secs(600)), || async {
        let out = ctx
            .aws
            .read(
                "ec2:DescribeInstances",
                ctx.aws
                    .ec2
                    .describe_instances()
                    .set_instance_ids(Some(ids.to_vec()))
                    .send(),
            )
            .await?;
        let left = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| state(i) != "terminated")
            .count();
        Ok(if left == 0 {
            Poll::Done(())
        } else {
            Poll::Wait(format!("waiting for {left} instance(s) to terminate"))
        })
    })
    .await
}

/// RunInstances for one host, again while a new instance profile is not usable yet
/// (it takes EC2 a few seconds to see one; up to a minute).
async fn run_instance(
    ctx: &Ctx<'_>,
    go: Go,
    spec: &HostSpec,
    hash: &str,
    launch: &Launch<'_>,
) -> Result<Instance> {
    let (Some(subnet), Some(runner_sg)) = (spec.subnet.known(), launch.runner_sg.known()) else {
        return Err(Error::Refused(format!(
            "cannot launch {}: its subnet or security group was not created",
            spec.logical
        )));
    };
    let h = &ctx.stack.runner_hosts;
    let user_data = base64::engine::general_purpose::STANDARD.encode(&spec.user_data);
    let backoff = Backoff {
        first: Duration::from_secs(5),
        max: Duration::from_secs(5),
        limit: Duration::from_secs(55),
    };
    poll::until(
        "the runner host instance profile to be usable",
        backoff,
        || async {
            let req = ctx
                .aws
                .ec2
                .run_instances()
                .image_id(&h.ami)
                .instance_type(h.instance_type.as_str().into())
                .min_count(1)
                .max_count(1)
                .subnet_id(subnet)
                .security_group_ids(runner_sg)
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
                    &[
                        (USER_DATA_TAG, hash),
                        (BINARY_TAG, spec.flotilla_sha256.as_str()),
                    ],
                ))
                .tag_specifications(tag_spec(ctx, ResourceType::Volume, &spec.logical, &[]));
            match ctx.aws.write(go, "ec2:RunInstances", req.send()).await {
                Ok(out) => out
                    .instances()
                    .first()
                    .cloned()
                    .map(Poll::Done)
                    .ok_or_else(|| Error::Refused("RunInstances returned no instance".into())),
                Err(e)
                    if e.code_is(&["InvalidParameterValue"])
                        && e.message.contains("iamInstanceProfile") =>
                {
                    Ok(Poll::Wait(
                        "instance profile not usable yet; retrying in 5s".into(),
                    ))
                }
                Err(e) => Err(e.into()),
            }
        },
    )
    .await
}

/// The runner hosts' logical ids. (The engine never prunes instances: `converge`
/// retires a host the stack no longer asks for, drained first.)
fn desired(ctx: &Ctx<'_>) -> Vec<String> {
    (0..ctx.stack.runner_hosts.count)
        .map(logical::host)
        .collect()
}

/// Terminates the stack's instances (the runner hosts) and waits until they are gone.
async fn delete(ctx: &Ctx<'_>, inv: &Inventory) -> Result<()> {
    let mut go = None;
    let mut ids = Vec::new();
    for i in &inv.instances {
        let id = id(i);
        if let Some(g) = ctx.change(Action::Delete, KIND, &name_of(i.tags(), id), id) {
            go = Some(g);
            ids.push(id.to_owned());
        }
    }
    terminate_and_wait(ctx, go, ids).await
}

/// Terminates instances and waits until EC2 reports them terminated.
async fn terminate_and_wait(ctx: &Ctx<'_>, go: Option<Go>, ids: Vec<String>) -> Result<()> {
    let Some(go) = go.filter(|_| !ids.is_empty()) else {
        return Ok(());
    };
    ctx.aws
        .write(
            go,
            "ec2:TerminateInstances",
            ctx.aws
                .ec2
                .terminate_instances()
                .set_instance_ids(Some(ids.clone()))
                .send(),
        )
        .await?;
    wait_terminated(ctx, &ids).await
}

/// Before destroy: instances in the stack's VPC that are not its runner hosts. Anything
/// but a build machine of the stack's fleets is a refusal; build machines are too,
/// unless `terminate` (`--terminate-build-machines`), when they are terminated.
pub(crate) async fn delete_build_machines(
    ctx: &Ctx<'_>,
    inv: &Inventory,
    terminate: bool,
) -> Result<()> {
    let (machines, foreign) = other_instances(ctx, inv).await?;
    if !foreign.is_empty() {
        return Err(Error::Refused(format!(
            "instances that are not the stack's run in its VPC ({}): they are never \
             touched; remove them first",
            id_list(&foreign, |i| i.instance_id()).join(", ")
        )));
    }
    if machines.is_empty() {
        return Ok(());
    }
    let ids = id_list(&machines, |i| i.instance_id());
    if !terminate {
        return Err(Error::Refused(format!(
            "build machines of the stack's fleet still run in its VPC ({}): drain the \
             runner hosts (`flotilla drain`) first, or pass --terminate-build-machines",
            ids.join(", ")
        )));
    }
    let mut go = None;
    for id in &ids {
        go = ctx
            .change(
                Action::Delete,
                "ec2:build-machine",
                id,
                "fleet tag, in the stack's VPC",
            )
            .or(go);
    }
    terminate_and_wait(ctx, go, ids).await
}

/// Instances in the stack's VPC that are not its runner hosts: build machines of the
/// stack's fleets (fleet tag `<fleet>` or `<fleet>-<n>`, as the daemons launch them) and
/// anything else.
async fn other_instances(ctx: &Ctx<'_>, inv: &Inventory) -> Result<(Vec<Instance>, Vec<Instance>)> {
    let Some(vpc) = inv.vpcs.first().and_then(|v| v.vpc_id()) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let mut found = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let out = ctx
            .aws
            .read(
                "ec2:DescribeInstances",
                ctx.aws
                    .ec2
                    .describe_instances()
                    .filters(Filter::builder().name("vpc-id").values(vpc).build())
                    .set_next_token(token.clone())
                    .send(),
            )
            .await?;
        found.extend(
            out.reservations()
                .iter()
                .flat_map(|r| r.instances())
                .filter(|i| i.vpc_id() == Some(vpc))
                .filter(|i| state(i) != "terminated")
                .filter(|i| tag(i.tags(), STACK_TAG) != Some(ctx.stack.name.as_str()))
                .cloned(),
        );
        token = out.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    Ok(found.into_iter().partition(|i| {
        tag(i.tags(), flotilla_proto::tags::FLEET).is_some_and(|f| ctx.stack.is_own_fleet(f))
    }))
}
