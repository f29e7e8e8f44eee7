//! AWS clients from the standard SDK chain (region, credentials, `AWS_ENDPOINT_URL`), and
//! the one choke point every AWS call goes through: [`Aws::call`] counts the call as a
//! read or a write, logs it at debug level, and turns SDK errors into [`AwsError`], which
//! keeps the operation name and the AWS error code.
//!
//! Invariant: nothing here knows about tests; pointing the tool at moto is done with the
//! SDK's own environment variables.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Mutex, OnceLock};

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

/// A failed AWS call, naming the operation and keeping AWS's error code.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op} failed: {}{message}", code.as_deref().map(|c| format!("{c}: ")).unwrap_or_default())]
pub struct AwsError {
    pub op: &'static str,
    pub code: Option<String>,
    pub message: String,
}

impl AwsError {
    pub fn code_is(&self, codes: &[&str]) -> bool {
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
pub fn is_read(op: &str) -> bool {
    let action = op.rsplit(':').next().unwrap_or(op);
    ["Describe", "Get", "List", "Head"]
        .iter()
        .any(|p| action.starts_with(p))
}

impl Meter {
    fn count(&self, op: &'static str) {
        *self.calls.lock().unwrap().entry(op).or_default() += 1;
    }

    pub fn reads(&self) -> u32 {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(op, _)| is_read(op))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn writes(&self) -> u32 {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(op, _)| !is_read(op))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn by_op(&self) -> BTreeMap<&'static str, u32> {
        self.calls.lock().unwrap().clone()
    }
}

/// The service clients and the meter they are counted by.
#[derive(Debug)]
pub struct Aws {
    pub ec2: aws_sdk_ec2::Client,
    pub iam: aws_sdk_iam::Client,
    pub s3: aws_sdk_s3::Client,
    pub ssm: aws_sdk_ssm::Client,
    pub sts: aws_sdk_sts::Client,
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
            sts: aws_sdk_sts::Client::new(&conf),
            region,
            meter: Meter::default(),
            account: OnceLock::new(),
        })
    }

    /// The account the credentials belong to: the stack's account, the expected owner
    /// of its bucket and the account in its policies' ARNs. One call per process.
    pub async fn account(&self) -> Result<String, AwsError> {
        if let Some(a) = self.account.get() {
            return Ok(a.clone());
        }
        let out = self
            .call(
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

    /// Runs one AWS call: counts it, logs it, maps its error.
    pub async fn call<T, E, R, F>(&self, op: &'static str, fut: F) -> Result<T, AwsError>
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
