//! What each runner host is configured with: where it gets the flotilla binary (the
//! stack's URL, or the binary apply uploads to the bucket, checked against the AMI's
//! architecture), its fleet name, its `flotilla.toml` and gitlab-runner `config.toml`,
//! and the user data carrying them. Pure: computed from the stack and the ids of the
//! resources the configs name.

use flotilla_proto::journal::{self, ShipperConfig};

use crate::binary::LocalBinary;
use crate::cloudinit::{self, FlotillaSource, HostUserData};
use crate::context::Ctx;
use crate::ec2::image::ImageInfo;
use crate::ec2::instance::HostSpec;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::naming::logical;
use crate::render;
use crate::stack::FleetIds;

/// Where the hosts get flotilla: the stack's URL, or the binary apply uploads (whose
/// architecture must be the runner hosts' AMI's).
pub(crate) fn flotilla_source<'a>(
    ctx: &'a Ctx<'_>,
    key: Option<&'a str>,
    host_image: Option<&ImageInfo>,
) -> Result<FlotillaSource<'a>> {
    let stack = ctx.stack;
    match (&stack.runner_hosts.flotilla_url, &ctx.hosts.flotilla, key) {
        (Some(url), _, _) => Ok(FlotillaSource::Url {
            url,
            sha256: stack
                .runner_hosts
                .flotilla_sha256
                .as_deref()
                .unwrap_or_default(),
        }),
        (None, Some(bin), Some(key)) => {
            check_arch(ctx, bin, host_image)?;
            Ok(FlotillaSource::Bucket {
                bucket: &stack.bucket.name,
                key,
                sha256: &bin.sha256,
            })
        }
        _ => Err(Error::Refused(
            "no flotilla binary for the runner hosts: pass --flotilla-bin PATH, or set \
             runner_hosts.flotilla_url and runner_hosts.flotilla_sha256"
                .into(),
        )),
    }
}

fn check_arch(ctx: &Ctx<'_>, bin: &LocalBinary, image: Option<&ImageInfo>) -> Result<()> {
    let arch = image.map_or("", |i| i.architecture.as_str());
    if arch.is_empty() || bin.arch == arch {
        return Ok(());
    }
    Err(Error::Refused(format!(
        "the flotilla binary {} is built for {} but runner_hosts.ami {} is {arch}: pass \
         --flotilla-bin with a {arch} Linux build",
        bin.path.display(),
        bin.arch,
        ctx.stack.runner_hosts.ami,
    )))
}

/// One runner host's configuration.
pub(crate) struct HostConfig {
    pub(crate) spec: HostSpec,
    pub(crate) fleet: String,
    pub(crate) flotilla_toml: String,
}

/// Every runner host's configuration, each with its own fleet name and so its own user
/// data; hosts are spread over the zones' private subnets.
pub(crate) fn hosts(
    ctx: &Ctx<'_>,
    flotilla: FlotillaSource<'_>,
    ids: &FleetIds,
    private_subnets: &[Id],
) -> Result<Vec<HostConfig>> {
    let stack = ctx.stack;
    let region = &ctx.aws.region;
    let fleets = stack.host_fleets();
    let token_param = ctx.names.token_param();
    let journal = stack
        .log_group()
        .map(|group| ShipperConfig::new(&group, journal::HOST_STREAMS, journal::HOST_UNITS));
    let mut out = Vec::new();
    for (i, fleet) in (0..stack.runner_hosts.count).zip(&fleets) {
        let config = render::flotilla_config(stack, ids, fleet).map_err(Error::Refused)?;
        let flotilla_toml = render::flotilla_toml(&config).map_err(Error::Refused)?;
        let runner_toml =
            render::runner_config_toml(stack, &config, region).map_err(Error::Refused)?;
        let user_data = cloudinit::render(&HostUserData {
            hosts: &stack.runner_hosts,
            flotilla,
            region,
            token_param: &token_param,
            flotilla_toml: &flotilla_toml,
            runner_config_toml: &runner_toml,
            journal: journal.as_ref(),
        });
        if user_data.len() > flotilla_proto::bootstrap::MAX_USER_DATA_BYTES {
            return Err(Error::Refused(format!(
                "runner host user data is {} bytes, over EC2's 16 KiB limit",
                user_data.len()
            )));
        }
        let zone_index = i as usize % stack.network.zones.len().max(1);
        out.push(HostConfig {
            spec: HostSpec {
                logical: logical::host(i),
                subnet: private_subnets
                    .get(zone_index)
                    .cloned()
                    .unwrap_or_else(|| Id::pending("subnet/private")),
                user_data,
                flotilla_sha256: flotilla.sha256().to_owned(),
            },
            fleet: fleet.clone(),
            flotilla_toml,
        });
    }
    Ok(out)
}

/// gitlab-runner's `config.toml` as the first host has it (what `output` prints).
pub(crate) fn runner_config_toml(ctx: &Ctx<'_>, ids: &FleetIds) -> Result<String> {
    let stack = ctx.stack;
    let fleets = stack.host_fleets();
    let first = fleets.first().map_or(stack.fleet_name(), String::as_str);
    let config = render::flotilla_config(stack, ids, first).map_err(Error::Refused)?;
    render::runner_config_toml(stack, &config, &ctx.aws.region).map_err(Error::Refused)
}
