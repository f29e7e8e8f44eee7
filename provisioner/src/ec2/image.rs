//! The AMI lookup the stack shares: root device names (so root volumes can be set) and
//! architectures, one DescribeImages per AMI.

use std::collections::BTreeMap;

use crate::context::Ctx;
use crate::error::{Error, Result};

/// What the stack needs to know of an AMI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageInfo {
    /// `/dev/xvda`, `/dev/sda1`: so root volumes can be set.
    pub(crate) root_device: String,
    /// As EC2 names it (`x86_64`, `arm64`).
    pub(crate) architecture: String,
}

/// Root device name and architecture of each AMI the stack uses. An AMI that does not
/// exist is an error naming the stack key that asked for it.
pub(crate) async fn images(ctx: &Ctx<'_>) -> Result<BTreeMap<String, ImageInfo>> {
    let mut wanted: Vec<(String, String)> = vec![(
        ctx.stack.runner_hosts.ami.clone(),
        "runner_hosts.ami".into(),
    )];
    for (name, c) in &ctx.classes {
        wanted.push((c.ami.clone(), format!("fleet.classes.{name}.ami")));
    }
    let mut out = BTreeMap::new();
    for (ami, key) in wanted {
        if out.contains_key(&ami) {
            continue;
        }
        let res = ctx
            .aws
            .read(
                "ec2:DescribeImages",
                ctx.aws.ec2.describe_images().image_ids(&ami).send(),
            )
            .await;
        let image = match res {
            Ok(o) => o.images().first().cloned(),
            Err(e) if e.code_is(&["InvalidAMIID.NotFound", "InvalidAMIID.Malformed"]) => None,
            Err(e) => return Err(e.into()),
        };
        let Some(image) = image else {
            return Err(Error::Refused(format!(
                "key `{key}`: AMI {ami} does not exist in {}",
                ctx.aws.region
            )));
        };
        out.insert(
            ami,
            ImageInfo {
                root_device: image.root_device_name().unwrap_or("/dev/xvda").to_owned(),
                architecture: image
                    .architecture()
                    .map(|a| a.as_str().to_owned())
                    .unwrap_or_default(),
            },
        );
    }
    Ok(out)
}
