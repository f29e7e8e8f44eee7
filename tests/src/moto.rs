//! A private moto server (AWS API emulator) on 127.0.0.1 and the network a sandbox's
//! fleet launches into: an IAM instance profile, a VPC inside 127.0.0.0/8, a subnet and a
//! security group; S3 for the distributed cache (a bucket, pre-signed URLs as gitlab-runner
//! makes them, a forwarder so containers reach it).
//!
//! Invariant: the server lives exactly as long as [`Moto`]; dropping it kills it. The VPC
//! of slot N is 127.N.0.0/16, so the private IPs moto hands out (127.N.1.x) are loopback
//! addresses on Linux and never collide between sandboxes holding different slots.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aws_sdk_ec2::types::{Filter, InstanceStateName};

use crate::util::{free_port, stop_child, wait_for_http};

/// The region every sandbox uses.
pub const REGION: &str = "us-east-1";
/// An AMI id that moto lists.
pub const AMI: &str = "ami-12c6146b";

/// A fake SigV4 header: moto routes by the credential scope and does not verify signatures.
fn fake_auth(service: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential=test/20260101/{REGION}/{service}/aws4_request, \
         SignedHeaders=host, Signature=0"
    )
}

/// A running moto server.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Moto {
    /// Starts `moto_server` from `$FLOTILLA_VENV` (default /root/.cache/flotilla/venv)
    /// and waits until it answers.
    pub async fn start(log: &Path) -> Result<Self> {
        let venv = std::env::var_os("FLOTILLA_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root/.cache/flotilla/venv"));
        let bin = venv.join("bin/moto_server");
        if !bin.exists() {
            bail!(
                "{} not found: install moto with `scripts/sandbox up` or set FLOTILLA_VENV",
                bin.display()
            );
        }
        let port = free_port()?;
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut moto = Self {
            child,
            port,
            log: log.to_owned(),
        };
        let url = format!("{}/moto-api/", moto.url());
        wait_for_http(
            "moto_server",
            &mut moto.child,
            &url,
            Duration::from_secs(60),
            &moto.log,
            |code| Ok(code < 400),
        )
        .await?;
        Ok(moto)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An EC2 client pointed at this moto.
    pub async fn ec2(&self) -> aws_sdk_ec2::Client {
        ec2_client(&self.url()).await
    }

    /// Creates an IAM instance profile (moto validates the one named in RunInstances).
    pub fn create_instance_profile(&self, name: &str) -> Result<()> {
        post_query(
            &self.url(),
            "iam",
            &[
                ("Action", "CreateInstanceProfile"),
                ("InstanceProfileName", name),
                ("Version", "2010-05-08"),
            ],
        )
        .with_context(|| format!("creating IAM instance profile {name} in moto"))?;
        Ok(())
    }

    /// Stops the server now (also done on drop).
    pub fn stop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5), false);
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A plain AWS query-API POST to moto; returns the response body.
pub fn post_query(url: &str, service: &str, params: &[(&str, &str)]) -> Result<String> {
    let resp = ureq::post(&format!("{url}/"))
        .set("Authorization", &fake_auth(service))
        .timeout(Duration::from_secs(20))
        .send_form(params);
    match resp {
        Ok(r) => Ok(r.into_string()?),
        Err(ureq::Error::Status(code, r)) => {
            bail!("HTTP {code}: {}", r.into_string().unwrap_or_default())
        }
        Err(e) => Err(e.into()),
    }
}

/// Instance ids of `fleet` that are not terminated, through the query API (no SDK, no
/// async: usable from Drop).
pub fn fleet_instance_ids_blocking(url: &str, fleet: &str) -> Result<Vec<String>> {
    let tag = format!("tag:{}", flotilla_proto::tags::FLEET);
    let body = post_query(
        url,
        "ec2",
        &[
            ("Action", "DescribeInstances"),
            ("Version", "2016-11-15"),
            ("Filter.1.Name", &tag),
            ("Filter.1.Value.1", fleet),
            ("Filter.2.Name", "instance-state-name"),
            ("Filter.2.Value.1", "pending"),
            ("Filter.2.Value.2", "running"),
            ("Filter.2.Value.3", "stopping"),
            ("Filter.2.Value.4", "stopped"),
            ("Filter.2.Value.5", "shutting-down"),
        ],
    )?;
    let mut ids: Vec<String> = body
        .split("<instanceId>")
        .skip(1)
        .filter_map(|s| s.split_once("</instanceId>").map(|(id, _)| id.to_owned()))
        .collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// Terminates these instances through the query API.
pub fn terminate_blocking(url: &str, ids: &[String]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let keys: Vec<String> = (1..=ids.len()).map(|i| format!("InstanceId.{i}")).collect();
    let mut params: Vec<(&str, &str)> =
        vec![("Action", "TerminateInstances"), ("Version", "2016-11-15")];
    params.extend(
        keys.iter()
            .map(String::as_str)
            .zip(ids.iter().map(String::as_str)),
    );
    post_query(url, "ec2", &params)?;
    Ok(())
}

/// An EC2 client for an endpoint (moto), with test credentials and us-east-1.
pub async fn ec2_client(endpoint: &str) -> aws_sdk_ec2::Client {
    let creds = aws_sdk_ec2::config::Credentials::new("test", "test", None, None, "sandbox");
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(creds)
        .load()
        .await;
    aws_sdk_ec2::Client::new(&shared)
}

/// What a sandbox's fleet launches into.
#[derive(Debug, Clone)]
pub struct Network {
    pub vpc_id: String,
    pub subnet_id: String,
    pub security_group_id: String,
    pub instance_profile: String,
}

/// Creates the VPC 127.N.0.0/16, subnet 127.N.1.0/24 and a security group.
pub async fn create_network(
    ec2: &aws_sdk_ec2::Client,
    slot: u8,
    instance_profile: &str,
) -> Result<Network> {
    let vpc = ec2
        .create_vpc()
        .cidr_block(format!("127.{slot}.0.0/16"))
        .send()
        .await
        .context("CreateVpc in moto")?;
    let vpc_id = vpc
        .vpc()
        .and_then(|v| v.vpc_id())
        .context("CreateVpc returned no VpcId")?
        .to_owned();
    let subnet = ec2
        .create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block(format!("127.{slot}.1.0/24"))
        .availability_zone(format!("{REGION}a"))
        .send()
        .await
        .context("CreateSubnet in moto")?;
    let subnet_id = subnet
        .subnet()
        .and_then(|s| s.subnet_id())
        .context("CreateSubnet returned no SubnetId")?
        .to_owned();
    let sg = ec2
        .create_security_group()
        .group_name(format!("flotilla-builders-{slot}"))
        .description("flotilla sandbox build machines")
        .vpc_id(&vpc_id)
        .send()
        .await
        .context("CreateSecurityGroup in moto")?;
    let security_group_id = sg
        .group_id()
        .context("CreateSecurityGroup returned no GroupId")?
        .to_owned();
    Ok(Network {
        vpc_id,
        subnet_id,
        security_group_id,
        instance_profile: instance_profile.to_owned(),
    })
}

/// One instance of a fleet as moto reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub instance_id: String,
    pub state: String,
    pub private_ip: Option<String>,
    /// The `flotilla:machine` tag.
    pub machine_id: Option<String>,
    pub class: Option<String>,
    pub launch_time: Option<i64>,
}

impl InstanceInfo {
    pub fn is_running(&self) -> bool {
        self.state == InstanceStateName::Running.as_str()
    }
    pub fn is_terminated(&self) -> bool {
        self.state == InstanceStateName::Terminated.as_str()
    }
}

/// Every instance tagged `flotilla:fleet=<fleet>` in any state, oldest launch first.
pub async fn fleet_instances(ec2: &aws_sdk_ec2::Client, fleet: &str) -> Result<Vec<InstanceInfo>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let resp = ec2
            .describe_instances()
            .filters(
                Filter::builder()
                    .name(format!("tag:{}", flotilla_proto::tags::FLEET))
                    .values(fleet)
                    .build(),
            )
            .set_next_token(token.take())
            .send()
            .await
            .context("DescribeInstances in moto")?;
        for r in resp.reservations() {
            for i in r.instances() {
                let tag = |k: &str| {
                    i.tags()
                        .iter()
                        .find(|t| t.key() == Some(k))
                        .and_then(|t| t.value())
                        .map(str::to_owned)
                };
                out.push(InstanceInfo {
                    instance_id: i.instance_id().unwrap_or_default().to_owned(),
                    state: i
                        .state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_owned())
                        .unwrap_or_default(),
                    private_ip: i.private_ip_address().map(str::to_owned),
                    machine_id: tag(flotilla_proto::tags::MACHINE),
                    class: tag(flotilla_proto::tags::CLASS),
                    launch_time: i.launch_time().map(|t| t.secs()),
                });
            }
        }
        match resp.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_owned()),
            _ => break,
        }
    }
    out.sort_by(|a, b| (a.launch_time, &a.instance_id).cmp(&(b.launch_time, &b.instance_id)));
    Ok(out)
}

/// Launches one instance the way the daemon would (tags in the launch call), for tests
/// that need an instance the daemon did not launch; returns its id.
pub async fn launch_instance(
    ec2: &aws_sdk_ec2::Client,
    network: &Network,
    tags: &[(&str, &str)],
    user_data: Option<&str>,
) -> Result<String> {
    use aws_sdk_ec2::types::{
        IamInstanceProfileSpecification, InstanceType, ResourceType, Tag, TagSpecification,
    };
    use base64::Engine;
    let mut spec = TagSpecification::builder().resource_type(ResourceType::Instance);
    for (k, v) in tags {
        spec = spec.tags(Tag::builder().key(*k).value(*v).build());
    }
    let run = ec2
        .run_instances()
        .image_id(AMI)
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .subnet_id(&network.subnet_id)
        .security_group_ids(&network.security_group_id)
        .iam_instance_profile(
            IamInstanceProfileSpecification::builder()
                .name(&network.instance_profile)
                .build(),
        )
        .set_user_data(user_data.map(|u| base64::engine::general_purpose::STANDARD.encode(u)))
        .tag_specifications(spec.build())
        .send()
        .await
        .context("RunInstances in moto")?;
    run.instances()
        .first()
        .and_then(|i| i.instance_id())
        .map(str::to_owned)
        .context("RunInstances returned no instance")
}

/// The state of one instance (any fleet).
pub async fn instance_state(ec2: &aws_sdk_ec2::Client, id: &str) -> Result<String> {
    let resp = ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .with_context(|| format!("DescribeInstances {id}"))?;
    resp.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .find_map(|i| {
            i.state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_owned())
        })
        .with_context(|| format!("{id} not found"))
}

/// An S3 client for an endpoint (moto, or the address containers reach it on), with test
/// credentials, path-style addressing (the endpoint is an IP) and checksums only where
/// S3 requires them (a pre-signed PUT must not carry the checksum of an empty body).
pub async fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    let creds = aws_sdk_s3::config::Credentials::new("test", "test", None, None, "sandbox");
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(creds)
        .load()
        .await;
    let conf = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(true)
        .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// Creates a bucket in moto's S3 (the distributed cache's).
pub async fn create_bucket(s3: &aws_sdk_s3::Client, bucket: &str) -> Result<()> {
    s3.create_bucket()
        .bucket(bucket)
        .send()
        .await
        .with_context(|| format!("CreateBucket {bucket} in moto"))?;
    Ok(())
}

/// One pre-signed request: URL plus the headers that were signed and must be sent.
#[derive(Debug, Clone)]
pub struct Presigned {
    pub url: String,
    pub headers: Vec<(String, String)>,
}

/// Pre-signs S3 requests on one bucket, as gitlab-runner's S3 cache adapter does on the
/// runner host (cache/s3/adapter.go: GET to extract, HEAD to check, PUT to archive with
/// the `x-amz-meta-*` metadata headers signed). Pure computation: no request is sent.
#[derive(Debug, Clone)]
pub struct S3Presigner {
    client: aws_sdk_s3::Client,
    pub bucket: String,
}

impl S3Presigner {
    /// `endpoint` is the address the URLs carry (the one the containers reach).
    pub async fn new(endpoint: &str, bucket: &str) -> Self {
        Self {
            client: s3_client(endpoint).await,
            bucket: bucket.to_owned(),
        }
    }

    fn config(expires: Duration) -> Result<aws_sdk_s3::presigning::PresigningConfig> {
        aws_sdk_s3::presigning::PresigningConfig::expires_in(expires)
            .context("S3 pre-signing config")
    }

    fn done(req: aws_sdk_s3::presigning::PresignedRequest) -> Presigned {
        Presigned {
            url: req.uri().to_owned(),
            headers: req
                .headers()
                .filter(|(k, _)| !k.eq_ignore_ascii_case("host"))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        }
    }

    pub async fn get(&self, key: &str, expires: Duration) -> Result<Presigned> {
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(Self::config(expires)?)
            .await
            .with_context(|| format!("pre-signing GET {key}"))?;
        Ok(Self::done(req))
    }

    pub async fn head(&self, key: &str, expires: Duration) -> Result<Presigned> {
        let req = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(Self::config(expires)?)
            .await
            .with_context(|| format!("pre-signing HEAD {key}"))?;
        Ok(Self::done(req))
    }

    /// A PUT with `metadata` as signed `x-amz-meta-<name>` headers.
    pub async fn put(
        &self,
        key: &str,
        expires: Duration,
        metadata: &[(&str, &str)],
    ) -> Result<Presigned> {
        let mut op = self.client.put_object().bucket(&self.bucket).key(key);
        for (k, v) in metadata {
            op = op.metadata(*k, *v);
        }
        let req = op
            .presigned(Self::config(expires)?)
            .await
            .with_context(|| format!("pre-signing PUT {key}"))?;
        Ok(Self::done(req))
    }
}

/// A TCP forwarder: accepts on `listen` and pipes each connection to `target`; stops when
/// dropped. Lets containers reach moto through the sandbox's service address while moto
/// itself stays on 127.0.0.1.
#[derive(Debug)]
pub struct TcpForward {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TcpForward {
    pub async fn start(listen: std::net::IpAddr, target: std::net::SocketAddr) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind((listen, 0))
            .await
            .with_context(|| format!("binding a forwarder to {target} on {listen}"))?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    // Out of descriptors or the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for TcpForward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A CloudWatch Logs client for an endpoint (moto), with test credentials and us-east-1.
pub async fn logs_client(endpoint: &str) -> aws_sdk_cloudwatchlogs::Client {
    let creds =
        aws_sdk_cloudwatchlogs::config::Credentials::new("test", "test", None, None, "sandbox");
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(creds)
        .load()
        .await;
    aws_sdk_cloudwatchlogs::Client::new(&shared)
}

/// Creates a log group in moto's CloudWatch Logs (as `flotilla-provision` would).
pub async fn create_log_group(endpoint: &str, group: &str) -> anyhow::Result<()> {
    logs_client(endpoint)
        .await
        .create_log_group()
        .log_group_name(group)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("creating log group {group} in moto: {e:?}"))?;
    Ok(())
}

/// The messages of one stream (`None` while it does not exist).
pub async fn log_events(
    endpoint: &str,
    group: &str,
    stream: &str,
) -> anyhow::Result<Option<Vec<String>>> {
    let out = logs_client(endpoint)
        .await
        .get_log_events()
        .log_group_name(group)
        .log_stream_name(stream)
        .start_from_head(true)
        .send()
        .await;
    match out {
        Ok(o) => Ok(Some(
            o.events()
                .iter()
                .filter_map(|e| e.message().map(str::to_owned))
                .collect(),
        )),
        Err(e)
            if aws_sdk_cloudwatchlogs::error::ProvideErrorMetadata::code(&e)
                == Some("ResourceNotFoundException") =>
        {
            Ok(None)
        }
        Err(e) => Err(anyhow::anyhow!("GetLogEvents {group}/{stream}: {e:?}")),
    }
}
