//! S3: the cache bucket. Public access blocked, default encryption (SSE-S3, or SSE-KMS
//! with `bucket.kms_key` and an S3 Bucket Key), a bucket policy that denies any non-TLS
//! request, and a lifecycle rule expiring objects after `bucket.expire_days` days. Each
//! setting is read and rewritten only when it differs.
//!
//! Every call names the stack's account as the expected bucket owner (all but
//! CreateBucket, which has no such parameter), so a bucket of the same name in another
//! account is never read, written or emptied.
//!
//! The flotilla binary the runner hosts install lives in the bucket under a
//! content-addressed key (`flotilla/bin/<sha256>/flotilla`), uploaded with its SHA-256
//! checksum (S3 refuses the bytes if they do not match it) and the stack's tags, and
//! only when that key does not already hold an object with that checksum. It expires
//! under the bucket's lifecycle rule like every object: apply uploads it again when it
//! is missing or would expire within a day, before any host is launched.
//!
//! Ownership: the bucket is the stack's when it carries the stack tag. A bucket with the
//! stack's name, in this account, with no tags at all and no objects is adopted (that is
//! what an apply interrupted between CreateBucket and PutBucketTagging leaves behind);
//! any other existing bucket is refused.

use aws_sdk_s3::types::{
    AbortIncompleteMultipartUpload, BucketLifecycleConfiguration, BucketLocationConstraint,
    ChecksumAlgorithm, ChecksumMode, CreateBucketConfiguration, Delete, ExpirationStatus,
    LifecycleExpiration, LifecycleRule, LifecycleRuleFilter, ObjectIdentifier,
    PublicAccessBlockConfiguration, ServerSideEncryption, ServerSideEncryptionByDefault,
    ServerSideEncryptionConfiguration, ServerSideEncryptionRule, Tag, Tagging,
};
use base64::Engine;
use serde_json::{json, Value};

use crate::binary::LocalBinary;
use crate::context::Ctx;
use crate::error::{built, Error, Result};
use crate::naming::{RESOURCE_TAG, STACK_TAG};
use crate::plan::{Action, Go};

const LIFECYCLE_RULE_ID: &str = "flotilla-expire";
const KIND: &str = "s3:bucket";

/// Denies every request that does not use TLS.
fn bucket_policy(partition: &str, bucket: &str) -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "DenyInsecureTransport",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:*",
            "Resource": [
                format!("arn:{partition}:s3:::{bucket}"),
                format!("arn:{partition}:s3:::{bucket}/*")
            ],
            "Condition": { "Bool": { "aws:SecureTransport": "false" } }
        }]
    })
}

#[derive(Debug, PartialEq, Eq)]
enum Found {
    Missing,
    Ours,
    /// Exists, untagged, empty: left by an interrupted apply.
    Adoptable,
    NotOurs,
}

async fn find(ctx: &Ctx<'_>, bucket: &str, owner: &str) -> Result<Found> {
    let s3 = &ctx.aws.s3;
    match ctx
        .aws
        .read(
            "s3:HeadBucket",
            s3.head_bucket()
                .bucket(bucket)
                .expected_bucket_owner(owner)
                .send(),
        )
        .await
    {
        Ok(_) => {}
        Err(e) if e.code_is(&["NotFound", "NoSuchBucket"]) => return Ok(Found::Missing),
        Err(e) => return Err(e.into()),
    }
    let tags = match ctx
        .aws
        .read(
            "s3:GetBucketTagging",
            s3.get_bucket_tagging()
                .bucket(bucket)
                .expected_bucket_owner(owner)
                .send(),
        )
        .await
    {
        Ok(out) => out.tag_set().to_vec(),
        Err(e) if e.code_is(&["NoSuchTagSet"]) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    if tags
        .iter()
        .any(|t| t.key() == STACK_TAG && t.value() == ctx.stack.name)
    {
        return Ok(Found::Ours);
    }
    if !tags.is_empty() {
        return Ok(Found::NotOurs);
    }
    let objects = ctx
        .aws
        .read(
            "s3:ListObjectsV2",
            s3.list_objects_v2()
                .bucket(bucket)
                .expected_bucket_owner(owner)
                .max_keys(1)
                .send(),
        )
        .await?;
    Ok(if objects.contents().is_empty() {
        Found::Adoptable
    } else {
        Found::NotOurs
    })
}

fn tagging(ctx: &Ctx<'_>) -> Result<Tagging> {
    let tag = |k: &str, v: &str| built("bucket tag", Tag::builder().key(k).value(v).build());
    built(
        "bucket tagging",
        Tagging::builder()
            .tag_set(tag(STACK_TAG, &ctx.stack.name)?)
            .tag_set(tag(RESOURCE_TAG, "bucket")?)
            .build(),
    )
}

/// The bucket as this pass found it: the stack's already, or created (or adopted) now,
/// with the [`Go`] of that change (its settings are then part of it, not updates).
#[derive(Clone, Copy)]
enum State {
    Existing,
    New(Go),
}

pub(crate) async fn converge(ctx: &Ctx<'_>, partition: &str, owner: &str) -> Result<()> {
    let bucket = ctx.stack.bucket.name.clone();
    let s3 = &ctx.aws.s3;
    let state = match find(ctx, &bucket, owner).await? {
        Found::NotOurs => {
            return Err(Error::NotOurs(format!(
                "key `bucket.name`: bucket {bucket} exists but is not tagged \
                 {STACK_TAG}={}: refusing to adopt it (pick another name)",
                ctx.stack.name
            )))
        }
        Found::Missing => {
            let Some(go) = ctx.change(
                Action::Create,
                KIND,
                &bucket,
                format!("expire after {} days", ctx.stack.bucket.expire_days),
            ) else {
                return Ok(());
            };
            let mut req = s3.create_bucket().bucket(&bucket);
            if ctx.aws.region != "us-east-1" {
                req = req.create_bucket_configuration(
                    CreateBucketConfiguration::builder()
                        .location_constraint(BucketLocationConstraint::from(
                            ctx.aws.region.as_str(),
                        ))
                        .build(),
                );
            }
            ctx.aws.write(go, "s3:CreateBucket", req.send()).await?;
            ctx.created(KIND, &bucket, &bucket);
            State::New(go)
        }
        Found::Adoptable => {
            tracing::warn!(
                "bucket {bucket} exists untagged and empty (left by an interrupted apply): \
                 adopting it"
            );
            let Some(go) = ctx.change(
                Action::Update,
                KIND,
                &bucket,
                "tag (adopt untagged empty bucket)",
            ) else {
                return Ok(());
            };
            State::New(go)
        }
        Found::Ours => State::Existing,
    };
    if let State::New(go) = state {
        ctx.aws
            .write(
                go,
                "s3:PutBucketTagging",
                s3.put_bucket_tagging()
                    .bucket(&bucket)
                    .expected_bucket_owner(owner)
                    .tagging(tagging(ctx)?)
                    .send(),
            )
            .await?;
    }
    let b = Bucket {
        ctx,
        name: &bucket,
        owner,
        state,
    };
    public_access_block(&b).await?;
    encryption(&b).await?;
    tls_only_policy(&b, partition).await?;
    lifecycle(&b).await
}

/// The bucket the settings below are read from and written to.
struct Bucket<'a> {
    ctx: &'a Ctx<'a>,
    name: &'a str,
    /// The stack's account: every call names it as the expected owner.
    owner: &'a str,
    state: State,
}

impl Bucket<'_> {
    /// The [`Go`] to write a setting with, if it needs writing: always for a bucket new
    /// in this pass (part of its creation, nothing read), otherwise when `matches` (the
    /// setting read back) is false, as an update the plan says `detail` of.
    async fn needs(
        &self,
        detail: &str,
        matches: impl std::future::Future<Output = Result<bool>>,
    ) -> Result<Option<Go>> {
        Ok(match self.state {
            State::New(go) => Some(go),
            State::Existing if matches.await? => None,
            State::Existing => self.ctx.change(Action::Update, KIND, self.name, detail),
        })
    }
}

/// All four public-access blocks on.
async fn public_access_block(b: &Bucket<'_>) -> Result<()> {
    let (aws, s3) = (b.ctx.aws, &b.ctx.aws.s3);
    let read = async {
        match aws
            .read(
                "s3:GetPublicAccessBlock",
                s3.get_public_access_block()
                    .bucket(b.name)
                    .expected_bucket_owner(b.owner)
                    .send(),
            )
            .await
        {
            Ok(out) => Ok(out.public_access_block_configuration().is_some_and(|c| {
                c.block_public_acls() == Some(true)
                    && c.ignore_public_acls() == Some(true)
                    && c.block_public_policy() == Some(true)
                    && c.restrict_public_buckets() == Some(true)
            })),
            Err(e) if e.code_is(&["NoSuchPublicAccessBlockConfiguration"]) => Ok(false),
            Err(e) => Err(e.into()),
        }
    };
    let Some(go) = b.needs("block all public access", read).await? else {
        return Ok(());
    };
    aws.write(
        go,
        "s3:PutPublicAccessBlock",
        s3.put_public_access_block()
            .bucket(b.name)
            .expected_bucket_owner(b.owner)
            .public_access_block_configuration(
                PublicAccessBlockConfiguration::builder()
                    .block_public_acls(true)
                    .ignore_public_acls(true)
                    .block_public_policy(true)
                    .restrict_public_buckets(true)
                    .build(),
            )
            .send(),
    )
    .await?;
    Ok(())
}

/// Default encryption: SSE-S3, or SSE-KMS with `bucket.kms_key` and an S3 Bucket Key
/// (a bucket-level data key cuts KMS calls, and their cost).
async fn encryption(b: &Bucket<'_>) -> Result<()> {
    let (aws, s3) = (b.ctx.aws, &b.ctx.aws.s3);
    let kms = b.ctx.stack.bucket.kms_key.as_deref();
    let read = async {
        match aws
            .read(
                "s3:GetBucketEncryption",
                s3.get_bucket_encryption()
                    .bucket(b.name)
                    .expected_bucket_owner(b.owner)
                    .send(),
            )
            .await
        {
            Ok(out) => Ok(out
                .server_side_encryption_configuration()
                .and_then(|c| c.rules().first())
                .is_some_and(|r| {
                    let key_ok = kms.is_none() || r.bucket_key_enabled() == Some(true);
                    key_ok
                        && r.apply_server_side_encryption_by_default()
                            .is_some_and(|d| {
                                *d.sse_algorithm() == sse_algorithm(kms)
                                    && d.kms_master_key_id() == kms
                            })
                })),
            Err(e) if e.code_is(&["ServerSideEncryptionConfigurationNotFoundError"]) => Ok(false),
            Err(e) => Err(e.into()),
        }
    };
    let detail = match kms {
        Some(key) => format!("default encryption aws:kms with key {key}, bucket key enabled"),
        None => "default encryption AES256".into(),
    };
    let Some(go) = b.needs(&detail, read).await? else {
        return Ok(());
    };
    let by_default = built(
        "default encryption",
        ServerSideEncryptionByDefault::builder()
            .sse_algorithm(sse_algorithm(kms))
            .set_kms_master_key_id(kms.map(str::to_owned))
            .build(),
    )?;
    let config = built(
        "encryption configuration",
        ServerSideEncryptionConfiguration::builder()
            .rules(
                ServerSideEncryptionRule::builder()
                    .apply_server_side_encryption_by_default(by_default)
                    .set_bucket_key_enabled(kms.is_some().then_some(true))
                    .build(),
            )
            .build(),
    )?;
    aws.write(
        go,
        "s3:PutBucketEncryption",
        s3.put_bucket_encryption()
            .bucket(b.name)
            .expected_bucket_owner(b.owner)
            .server_side_encryption_configuration(config)
            .send(),
    )
    .await?;
    Ok(())
}

/// The bucket policy denying every non-TLS request.
async fn tls_only_policy(b: &Bucket<'_>, partition: &str) -> Result<()> {
    let (aws, s3) = (b.ctx.aws, &b.ctx.aws.s3);
    let want = bucket_policy(partition, b.name);
    let read = async {
        match aws
            .read(
                "s3:GetBucketPolicy",
                s3.get_bucket_policy()
                    .bucket(b.name)
                    .expected_bucket_owner(b.owner)
                    .send(),
            )
            .await
        {
            Ok(out) => Ok(out.policy().and_then(crate::iam::parse_policy).as_ref() == Some(&want)),
            Err(e) if e.code_is(&["NoSuchBucketPolicy"]) => Ok(false),
            Err(e) => Err(e.into()),
        }
    };
    let Some(go) = b.needs("policy: deny non-TLS access", read).await? else {
        return Ok(());
    };
    aws.write(
        go,
        "s3:PutBucketPolicy",
        s3.put_bucket_policy()
            .bucket(b.name)
            .expected_bucket_owner(b.owner)
            .policy(want.to_string())
            .send(),
    )
    .await?;
    Ok(())
}

/// One lifecycle rule: every object expires after `bucket.expire_days`.
async fn lifecycle(b: &Bucket<'_>) -> Result<()> {
    let (aws, s3) = (b.ctx.aws, &b.ctx.aws.s3);
    let days = i32::try_from(b.ctx.stack.bucket.expire_days).unwrap_or(i32::MAX);
    let read = async {
        match aws
            .read(
                "s3:GetBucketLifecycleConfiguration",
                s3.get_bucket_lifecycle_configuration()
                    .bucket(b.name)
                    .expected_bucket_owner(b.owner)
                    .send(),
            )
            .await
        {
            Ok(out) => Ok(match out.rules() {
                [rule] => {
                    rule.id() == Some(LIFECYCLE_RULE_ID)
                        && rule.status() == &ExpirationStatus::Enabled
                        && rule.expiration().and_then(|e| e.days()) == Some(days)
                }
                _ => false,
            }),
            Err(e) if e.code_is(&["NoSuchLifecycleConfiguration"]) => Ok(false),
            Err(e) => Err(e.into()),
        }
    };
    let detail = format!("expire objects after {days} days");
    let Some(go) = b.needs(&detail, read).await? else {
        return Ok(());
    };
    let rule = built(
        "lifecycle rule",
        LifecycleRule::builder()
            .id(LIFECYCLE_RULE_ID)
            .status(ExpirationStatus::Enabled)
            .filter(LifecycleRuleFilter::builder().prefix("").build())
            .expiration(LifecycleExpiration::builder().days(days).build())
            .abort_incomplete_multipart_upload(
                AbortIncompleteMultipartUpload::builder()
                    .days_after_initiation(1)
                    .build(),
            )
            .build(),
    )?;
    let config = built(
        "lifecycle configuration",
        BucketLifecycleConfiguration::builder().rules(rule).build(),
    )?;
    aws.write(
        go,
        "s3:PutBucketLifecycleConfiguration",
        s3.put_bucket_lifecycle_configuration()
            .bucket(b.name)
            .expected_bucket_owner(b.owner)
            .lifecycle_configuration(config)
            .send(),
    )
    .await?;
    Ok(())
}

/// SSE-KMS with `bucket.kms_key`, SSE-S3 without.
fn sse_algorithm(kms: Option<&str>) -> ServerSideEncryption {
    if kms.is_some() {
        ServerSideEncryption::AwsKms
    } else {
        ServerSideEncryption::Aes256
    }
}

/// The plan's name for an object of the bucket.
const OBJECT_KIND: &str = "s3:object";

/// Whether an object written at `written` (seconds since the epoch) would expire under
/// an `expire_days` lifecycle rule within the next day (or half its life, for a 1-day
/// rule), as of `now`. S3 expires an object at the first midnight UTC after `written`
/// plus the days, so this errs early.
fn expires_soon(written: i64, now: i64, expire_days: u32) -> bool {
    let life = i64::from(expire_days) * 86_400;
    let margin = (life / 2).min(86_400);
    now >= written + life - margin
}

/// The object's tags, as PutObject takes them (a URL query string).
fn object_tagging(ctx: &Ctx<'_>, resource: &str) -> String {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    format!(
        "{}={}&{}={}",
        enc(STACK_TAG),
        enc(&ctx.stack.name),
        enc(RESOURCE_TAG),
        enc(resource)
    )
}

/// Uploads the flotilla binary to its content-addressed key, unless an object with its
/// checksum is there already (and not about to expire). In plan mode, only says so.
pub(crate) async fn ensure_binary(ctx: &Ctx<'_>, owner: &str, bin: &LocalBinary) -> Result<()> {
    let bucket = &ctx.stack.bucket.name;
    let key = bin.key();
    let s3 = &ctx.aws.s3;
    let name = format!("s3://{bucket}/{key}");
    let raw = hex::decode(&bin.sha256)
        .map_err(|e| Error::Refused(format!("bad SHA-256 {}: {e}", bin.sha256)))?;
    let checksum = base64::engine::general_purpose::STANDARD.encode(raw);
    let head = ctx
        .aws
        .read(
            "s3:HeadObject",
            s3.head_object()
                .bucket(bucket)
                .key(&key)
                .expected_bucket_owner(owner)
                .checksum_mode(ChecksumMode::Enabled)
                .send(),
        )
        .await;
    let found = match head {
        Ok(out) => Some(out),
        // A bucket that does not exist yet (plan on a new stack) holds nothing either.
        Err(e) if e.code_is(&["NotFound", "NoSuchKey", "NoSuchBucket"]) => None,
        Err(e) => return Err(e.into()),
    };
    let upload = format!(
        "upload {} ({:.1} MB, sha256 {})",
        bin.path.display(),
        bin.size as f64 / 1e6,
        bin.sha256
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (action, detail) = match &found {
        None => (Action::Create, upload),
        Some(o) if o.checksum_sha256() != Some(checksum.as_str()) => (
            Action::Update,
            format!("its checksum is not the binary's: {upload}"),
        ),
        Some(o)
            if o.last_modified()
                .is_some_and(|t| expires_soon(t.secs(), now, ctx.stack.bucket.expire_days)) =>
        {
            (
                Action::Update,
                format!("the bucket's lifecycle rule expires it within a day: {upload}"),
            )
        }
        Some(_) => {
            ctx.plan.note(format!(
                "flotilla binary {} (sha256 {}) is already at {name}: unchanged",
                bin.path.display(),
                bin.sha256
            ));
            return Ok(());
        }
    };
    let Some(go) = ctx.change(action, OBJECT_KIND, &name, detail) else {
        return Ok(());
    };
    let body = aws_sdk_s3::primitives::ByteStream::from_path(&bin.path)
        .await
        .map_err(|e| Error::Refused(format!("cannot read {}: {e}", bin.path.display())))?;
    ctx.aws
        .write(
            go,
            "s3:PutObject",
            s3.put_object()
                .bucket(bucket)
                .key(&key)
                .expected_bucket_owner(owner)
                .body(body)
                .content_type("application/octet-stream")
                .checksum_algorithm(ChecksumAlgorithm::Sha256)
                .checksum_sha256(&checksum)
                .tagging(object_tagging(ctx, "flotilla-bin"))
                .send(),
        )
        .await?;
    ctx.created(OBJECT_KIND, &name, &bin.sha256);
    Ok(())
}

/// Empties and deletes the bucket if it is the stack's.
pub(crate) async fn destroy(ctx: &Ctx<'_>, owner: &str) -> Result<()> {
    let bucket = ctx.stack.bucket.name.clone();
    let s3 = &ctx.aws.s3;
    match find(ctx, &bucket, owner).await? {
        Found::Missing => return Ok(()),
        Found::NotOurs | Found::Adoptable => {
            ctx.plan.note(format!(
                "bucket {bucket} is not tagged as the stack's: left alone"
            ));
            return Ok(());
        }
        Found::Ours => {}
    }
    let Some(go) = ctx.change(Action::Delete, KIND, &bucket, "with all its objects") else {
        return Ok(());
    };
    loop {
        let page = ctx
            .aws
            .read(
                "s3:ListObjectsV2",
                s3.list_objects_v2()
                    .bucket(&bucket)
                    .expected_bucket_owner(owner)
                    .max_keys(1000)
                    .send(),
            )
            .await?;
        let keys = page
            .contents()
            .iter()
            .filter_map(|o| o.key())
            .map(|k| built("object key", ObjectIdentifier::builder().key(k).build()))
            .collect::<Result<Vec<_>>>()?;
        if keys.is_empty() {
            break;
        }
        tracing::info!("deleting {} objects from {bucket}", keys.len());
        let delete = built(
            "object deletion",
            Delete::builder()
                .set_objects(Some(keys))
                .quiet(true)
                .build(),
        )?;
        ctx.aws
            .write(
                go,
                "s3:DeleteObjects",
                s3.delete_objects()
                    .bucket(&bucket)
                    .expected_bucket_owner(owner)
                    .delete(delete)
                    .send(),
            )
            .await?;
    }
    ctx.aws
        .write(
            go,
            "s3:DeleteBucket",
            s3.delete_bucket()
                .bucket(&bucket)
                .expected_bucket_owner(owner)
                .send(),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_is_uploaded_again_only_near_its_expiry() {
        let day = 86_400;
        // 30-day rule: refreshed once less than a day is left.
        assert!(!expires_soon(0, 28 * day, 30));
        assert!(expires_soon(0, 29 * day, 30));
        assert!(expires_soon(0, 40 * day, 30));
        // 1-day rule: half a day of margin, so two applies in a row upload once.
        assert!(!expires_soon(0, 60, 1));
        assert!(expires_soon(0, day / 2, 1));
    }
}
