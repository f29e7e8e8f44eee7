//! AWS clients from the standard SDK chain (region, credentials, `AWS_ENDPOINT_URL`), and
//! the one choke point every AWS call goes through: `Aws::read` and `Aws::write` count
//! the call as a read or a write, log it at debug level, and turn SDK errors into
//! [`AwsError`], which keeps the operation name and the AWS error code. A write takes
//! the [`Go`] of a change recorded in apply mode, so plan mode cannot write.
//!
//! Invariant: nothing here knows about tests; pointing the tool at moto is done with the
//! SDK's own environment variables.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Mutex, OnceLock};

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

use crate::plan::Go;

/// A failed AWS call, naming the operation and keeping AWS's error code.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op} failed: {}{message}", code.as_deref().map(|c| format!("{c}: ")).unwrap_or_default())]
pub struct AwsError {
    op: &'static str,
    code: Option<String>,
    pub(crate) message: String,
}

impl AwsError {
    pub(crate) fn code_is(&self, codes: &[&str]) -> bool {
        self.code.as_deref().is_some_and(|c| codes.contains(&c))
    }

    fn from_sdk<E, R>(op: &'static str, err: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let code = err.code().map(str::to_owned);
        let message = match err.message() {
            Some(m) => m.to_owned(),
            None => match &err {
                SdkError::DispatchFailure(d) => format!("cannot reach the endpoint: {d:?}"),
                SdkError::TimeoutError(_) => "timed out".into(),
                SdkError::ServiceError(s) => format!("{}", s.err()),
                other => format!("{other}"),
            },
        };
        Self { op, code, message }
    }
}

/// Reads and writes made so far, by operation.
#[derive(Debug, Default)]
pub struct Meter {
    calls: Mutex<BTreeMap<&'static str, u32>>,
}

/// True for operations that change nothing (Describe*, Get*, List*, Head*).
fn is_read(op: &str) -> bool {
    let action = op.rsplit(':').next().unwrap_or(op);
    ["Describe", "Get", "List", "Head"]
        .iter()
        .any(|p| action.starts_with(p))
}

impl Meter {
    fn count(&self, op: &'static str) {
        *self.lock().entry(op).or_default() += 1;
    }

    /// A poisoned lock only means another thread panicked mid-count.
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, u32>> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn reads(&self) -> u32 {
        self.lock()
            .iter()
            .filter(|(op, _)| is_read(op))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn writes(&self) -> u32 {
        self.lock()
            .iter()
            .filter(|(op, _)| !is_read(op))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn by_op(&self) -> BTreeMap<&'static str, u32> {
        self.lock().clone()
    }
}

/// The service clients and the meter they are counted by.
#[derive(Debug)]
pub struct Aws {
    pub(crate) ec2: aws_sdk_ec2::Client,
    pub(crate) iam: aws_sdk_iam::Client,
    pub(crate) s3: aws_sdk_s3::Client,
    pub(crate) ssm: aws_sdk_ssm::Client,
    pub(crate) logs: aws_sdk_cloudwatchlogs::Client,
    sts: aws_sdk_sts::Client,
    pub region: String,
    pub meter: Meter,
    /// The credentials' account, read once (`sts:GetCallerIdentity`).
    account: OnceLock<String>,
}

impl Aws {
    /// Clients from the standard chain; `region` overrides the chain's region.
    pub async fn from_env(region: Option<&str>) -> Result<Self, AwsError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(5));
        if let Some(r) = region {
            loader = loader.region(Region::new(r.to_owned()));
        }
        let conf = loader.load().await;
        let region = conf
            .region()
            .map(|r| r.to_string())
            .ok_or_else(|| AwsError {
                op: "config",
                code: None,
                message: "no AWS region: set aws.region in the stack file or AWS_REGION".into(),
            })?;
        Ok(Self {
            ec2: aws_sdk_ec2::Client::new(&conf),
            iam: aws_sdk_iam::Client::new(&conf),
            s3: aws_sdk_s3::Client::new(&conf),
            ssm: aws_sdk_ssm::Client::new(&conf),
            logs: aws_sdk_cloudwatchlogs::Client::new(&conf),
            sts: aws_sdk_sts::Client::new(&conf),
            region,
            meter: Meter::default(),
            account: OnceLock::new(),
        })
    }

    /// The region's partition (`aws`, `aws-cn`, `aws-us-gov`), for ARNs.
    pub(crate) fn partition(&self) -> &'static str {
        if self.region.starts_with("cn-") {
            "aws-cn"
        } else if self.region.starts_with("us-gov-") {
            "aws-us-gov"
        } else {
            "aws"
        }
    }

    /// The account the credentials belong to: the stack's account, the expected owner
    /// of its bucket and the account in its policies' ARNs. One call per process.
    pub(crate) async fn account(&self) -> Result<String, AwsError> {
        if let Some(a) = self.account.get() {
            return Ok(a.clone());
        }
        let out = self
            .read(
                "sts:GetCallerIdentity",
                self.sts.get_caller_identity().send(),
            )
            .await?;
        let account = out
            .account()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| AwsError {
                op: "sts:GetCallerIdentity",
                code: None,
                message: "no account in the response".into(),
            })?
            .to_owned();
        Ok(self.account.get_or_init(|| account).clone())
    }

    /// Runs one call that changes nothing (`Describe*`, `Get*`, `List*`, `Head*`).
    pub(crate) async fn read<T, E, R, F>(&self, op: &'static str, fut: F) -> Result<T, AwsError>
    where
        F: Future<Output = Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        debug_assert!(is_read(op), "{op} is a write: call Aws::write with a Go");
        self.call(op, fut).await
    }

    /// Runs one call that changes something, for a change recorded in apply mode.
    pub(crate) async fn write<T, E, R, F>(
        &self,
        _go: Go,
        op: &'static str,
        fut: F,
    ) -> Result<T, AwsError>
    where
        F: Future<Output = Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        debug_assert!(!is_read(op), "{op} is a read: call Aws::read");
        self.call(op, fut).await
    }

    /// Runs one AWS call: counts it, logs it, maps its error.
    async fn call<T, E, R, F>(&self, op: &'static str, fut: F) -> Result<T, AwsError>
    where
        F: Future<Output = Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        self.meter.count(op);
        tracing::debug!(op, "aws call");
        fut.await.map_err(|e| {
            let err = AwsError::from_sdk(op, e);
            tracing::debug!(
                op,
                code = err.code.as_deref().unwrap_or(""),
                "aws call failed"
            );
            err
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_are_told_apart() {
        assert!(is_read("ec2:DescribeVpcs"));
        assert!(is_read("s3:GetBucketPolicy"));
        assert!(is_read("s3:HeadBucket"));
        assert!(!is_read("ec2:CreateVpc"));
        assert!(!is_read("iam:PutRolePolicy"));
        let m = Meter::default();
        m.count("ec2:DescribeVpcs");
        m.count("ec2:CreateVpc");
        m.count("ec2:CreateVpc");
        assert_eq!((m.reads(), m.writes()), (1, 2));
    }
}
