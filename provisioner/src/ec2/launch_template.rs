//! Build-machine launch templates, one per machine class (`flotilla-<stack>-<class>`):
//! IMDSv2 required with hop limit 1 (job containers cannot reach the instance role), an
//! encrypted root volume, no public IP, the build security group and instance profile,
//! and the fleet/class tags on instances and volumes. Drift creates a new version and
//! makes it the default; a class removed from the stack has its template deleted. Also
//! the AMI lookup (root device names, architecture) the hosts share.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{
    LaunchTemplateBlockDeviceMappingRequest, LaunchTemplateEbsBlockDeviceRequest,
    LaunchTemplateHttpTokensState, LaunchTemplateIamInstanceProfileSpecificationRequest,
    LaunchTemplateInstanceMetadataEndpointState, LaunchTemplateInstanceMetadataOptionsRequest,
    LaunchTemplateInstanceNetworkInterfaceSpecificationRequest,
    LaunchTemplateTagSpecificationRequest, RequestLaunchTemplateData, ResourceType,
    ResponseLaunchTemplateData, Tag, VolumeType,
};
use flotilla_proto::tags;

use super::inventory::{find, tag_spec, Ec2Type, Inventory};
use crate::context::Ctx;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::naming::logical;
use crate::plan::Action;

const KIND: &str = "ec2:launch-template";

/// How the engine prunes and deletes this type.
pub(crate) const TYPE: Ec2Type = Ec2Type {
    desired,
    delete: |ctx, inv| Box::pin(delete(ctx, inv)),
};

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

/// What a template says, in a form that compares with what the stack wants.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spec {
    image: String,
    instance_type: String,
    profile: String,
    http_tokens_required: bool,
    hop_limit: i32,
    root_device: String,
    encrypted: bool,
    volume_size: Option<i32>,
    public_ip: bool,
    groups: Vec<String>,
    instance_tags: Vec<(String, String)>,
}

impl Spec {
    fn from_response(d: &ResponseLaunchTemplateData) -> Self {
        let md = d.metadata_options();
        let bd = d.block_device_mappings().first();
        let ni = d.network_interfaces().first();
        let mut instance_tags: Vec<(String, String)> = d
            .tag_specifications()
            .iter()
            .filter(|t| t.resource_type() == Some(&ResourceType::Instance))
            .flat_map(|t| t.tags())
            .map(|t| {
                (
                    t.key().unwrap_or_default().to_owned(),
                    t.value().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        instance_tags.sort();
        let mut groups: Vec<String> = ni.map(|n| n.groups().to_vec()).unwrap_or_default();
        groups.sort();
        Self {
            image: d.image_id().unwrap_or_default().to_owned(),
            instance_type: d
                .instance_type()
                .map(|t| t.as_str().to_owned())
                .unwrap_or_default(),
            profile: d
                .iam_instance_profile()
                .and_then(|p| p.name())
                .unwrap_or_default()
                .to_owned(),
            http_tokens_required: md.and_then(|m| m.http_tokens())
                == Some(&LaunchTemplateHttpTokensState::Required),
            hop_limit: md
                .and_then(|m| m.http_put_response_hop_limit())
                .unwrap_or(0),
            root_device: bd
                .and_then(|b| b.device_name())
                .unwrap_or_default()
                .to_owned(),
            encrypted: bd.and_then(|b| b.ebs()).and_then(|e| e.encrypted()) == Some(true),
            volume_size: bd.and_then(|b| b.ebs()).and_then(|e| e.volume_size()),
            public_ip: ni.and_then(|n| n.associate_public_ip_address()) != Some(false),
            groups,
            instance_tags,
        }
    }

    fn request(&self) -> RequestLaunchTemplateData {
        let tags: Vec<Tag> = self
            .instance_tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let tag_spec = |rt: ResourceType| {
            LaunchTemplateTagSpecificationRequest::builder()
                .resource_type(rt)
                .set_tags(Some(tags.clone()))
                .build()
        };
        RequestLaunchTemplateData::builder()
            .image_id(&self.image)
            .instance_type(self.instance_type.as_str().into())
            .iam_instance_profile(
                LaunchTemplateIamInstanceProfileSpecificationRequest::builder()
                    .name(&self.profile)
                    .build(),
            )
            .metadata_options(
                LaunchTemplateInstanceMetadataOptionsRequest::builder()
                    .http_tokens(LaunchTemplateHttpTokensState::Required)
                    .http_put_response_hop_limit(self.hop_limit)
                    .http_endpoint(LaunchTemplateInstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            .block_device_mappings(
                LaunchTemplateBlockDeviceMappingRequest::builder()
                    .device_name(&self.root_device)
                    .ebs(
                        LaunchTemplateEbsBlockDeviceRequest::builder()
                            .encrypted(true)
                            .delete_on_termination(true)
                            .volume_type(VolumeType::Gp3)
                            .set_volume_size(self.volume_size)
                            .build(),
                    )
                    .build(),
            )
            .network_interfaces(
                LaunchTemplateInstanceNetworkInterfaceSpecificationRequest::builder()
                    .device_index(0)
                    .associate_public_ip_address(false)
                    .delete_on_termination(true)
                    .set_groups(Some(self.groups.clone()))
                    .build(),
            )
            .tag_specifications(tag_spec(ResourceType::Instance))
            .tag_specifications(tag_spec(ResourceType::Volume))
            .build()
    }

    fn diff(&self, have: &Spec) -> Vec<String> {
        let mut d = Vec::new();
        macro_rules! cmp {
            ($f:ident) => {
                if self.$f != have.$f {
                    d.push(format!("{} {:?} -> {:?}", stringify!($f), have.$f, self.$f));
                }
            };
        }
        cmp!(image);
        cmp!(instance_type);
        cmp!(profile);
        cmp!(http_tokens_required);
        cmp!(hop_limit);
        cmp!(root_device);
        cmp!(encrypted);
        cmp!(volume_size);
        cmp!(public_ip);
        cmp!(groups);
        cmp!(instance_tags);
        d
    }
}

/// Logical ids this module keeps: one template per class.
fn desired(ctx: &Ctx<'_>) -> Vec<String> {
    ctx.classes
        .keys()
        .map(|c| logical::launch_template(c))
        .collect()
}

/// Launch template name -> id (pending in plan mode when not created yet).
pub(crate) async fn converge(
    ctx: &Ctx<'_>,
    inv: &Inventory,
    images: &BTreeMap<String, ImageInfo>,
    build_sg: &Id,
) -> Result<BTreeMap<String, Id>> {
    let mut out = BTreeMap::new();
    let fleet = ctx.stack.fleet_name().to_owned();
    for (class, c) in &ctx.classes {
        let name = logical::launch_template(class);
        let mut instance_tags = vec![
            (tags::FLEET.to_owned(), fleet.clone()),
            (tags::CLASS.to_owned(), class.clone()),
        ];
        instance_tags.sort();
        let want = Spec {
            image: c.ami.clone(),
            instance_type: c.instance_types.first().cloned().unwrap_or_default(),
            profile: ctx.names.build_role(),
            http_tokens_required: true,
            hop_limit: 1,
            root_device: images
                .get(&c.ami)
                .map(|i| i.root_device.clone())
                .unwrap_or_default(),
            encrypted: true,
            volume_size: c.root_volume_gb.map(|g| g as i32),
            public_ip: false,
            groups: vec![build_sg.to_string()],
            instance_tags,
        };
        let template_name = ctx.names.launch_template(class);
        let found = find(
            &inv.templates,
            |t| t.tags(),
            |t| t.launch_template_id().unwrap_or(""),
            &name,
        );
        let Some(t) = found else {
            let Some(go) = ctx.change(
                Action::Create,
                KIND,
                &template_name,
                format!("{} {}", want.image, want.instance_type),
            ) else {
                out.insert(template_name, Id::pending(&name));
                continue;
            };
            let created = ctx
                .aws
                .write(
                    go,
                    "ec2:CreateLaunchTemplate",
                    ctx.aws
                        .ec2
                        .create_launch_template()
                        .launch_template_name(&template_name)
                        .launch_template_data(want.request())
                        .tag_specifications(tag_spec(ctx, ResourceType::LaunchTemplate, &name, &[]))
                        .send(),
                )
                .await?;
            let id = Id::from_aws(
                created
                    .launch_template()
                    .and_then(|t| t.launch_template_id()),
            );
            ctx.created(KIND, &template_name, &id.to_string());
            out.insert(template_name, id);
            continue;
        };
        let id = t.launch_template_id().unwrap_or_default().to_owned();
        let versions = ctx
            .aws
            .read(
                "ec2:DescribeLaunchTemplateVersions",
                ctx.aws
                    .ec2
                    .describe_launch_template_versions()
                    .launch_template_id(&id)
                    .versions("$Default")
                    .send(),
            )
            .await?;
        let have = versions
            .launch_template_versions()
            .first()
            .and_then(|v| v.launch_template_data())
            .map(Spec::from_response);
        let diff = match &have {
            Some(h) => want.diff(h),
            None => vec!["no default version".into()],
        };
        let go = if diff.is_empty() {
            None
        } else {
            ctx.change(
                Action::Update,
                KIND,
                &template_name,
                format!("new version: {}", diff.join("; ")),
            )
        };
        if let Some(go) = go {
            let v = ctx
                .aws
                .write(
                    go,
                    "ec2:CreateLaunchTemplateVersion",
                    ctx.aws
                        .ec2
                        .create_launch_template_version()
                        .launch_template_id(&id)
                        .launch_template_data(want.request())
                        .send(),
                )
                .await?;
            let number = v
                .launch_template_version()
                .and_then(|v| v.version_number())
                .unwrap_or_default();
            ctx.aws
                .write(
                    go,
                    "ec2:ModifyLaunchTemplate",
                    ctx.aws
                        .ec2
                        .modify_launch_template()
                        .launch_template_id(&id)
                        .default_version(number.to_string())
                        .send(),
                )
                .await?;
        }
        out.insert(template_name, Id::Known(id));
    }
    Ok(out)
}

async fn delete(ctx: &Ctx<'_>, inv: &Inventory) -> Result<()> {
    for t in &inv.templates {
        let id = t.launch_template_id().unwrap_or_default();
        let name = t.launch_template_name().unwrap_or(id);
        if let Some(go) = ctx.change(Action::Delete, KIND, name, id) {
            ctx.aws
                .write(
                    go,
                    "ec2:DeleteLaunchTemplate",
                    ctx.aws
                        .ec2
                        .delete_launch_template()
                        .launch_template_id(id)
                        .send(),
                )
                .await?;
        }
    }
    Ok(())
}
