//! CloudWatch Logs as the daemon uses it: one stream per report, written once
//! (CreateLogStream, then PutLogEvents). The only module that talks to CloudWatch Logs;
//! every call is bounded like the EC2 ones, and its endpoint is overridable
//! (`logs.endpoint_url`, else `aws.endpoint_url`).

use aws_sdk_cloudwatchlogs::error::ProvideErrorMetadata;
use aws_sdk_cloudwatchlogs::types::InputLogEvent;
use flotilla_proto::config::AwsConfig;
use flotilla_proto::logs::LogsConfig;

/// CloudWatch's limit on one event is 256 KiB with overhead; reports keep well under.
pub(crate) const MAX_EVENT_BYTES: usize = 200 * 1024;

/// A failed CloudWatch Logs call, naming the operation, the group and AWS's error code.
#[derive(Debug, thiserror::Error)]
#[error("{op} on log group {group} failed: {code}{message}")]
pub(crate) struct LogsError {
    op: &'static str,
    group: String,
    code: String,
    message: String,
}

pub(crate) struct LogsClient {
    client: aws_sdk_cloudwatchlogs::Client,
    group: String,
}

impl LogsClient {
    pub(crate) async fn new(aws: &AwsConfig, logs: &LogsConfig, group: String) -> Self {
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .operation_attempt_timeout(std::time::Duration::from_secs(10))
            .operation_timeout(std::time::Duration::from_secs(30))
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(3))
            .timeout_config(timeouts);
        if let Some(region) = &aws.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(url) = logs.endpoint_url.as_ref().or(aws.endpoint_url.as_ref()) {
            loader = loader.endpoint_url(url);
        }
        Self {
            client: aws_sdk_cloudwatchlogs::Client::new(&loader.load().await),
            group,
        }
    }

    fn error<E: ProvideErrorMetadata + std::fmt::Debug, R: std::fmt::Debug>(
        &self,
        op: &'static str,
        e: &aws_sdk_cloudwatchlogs::error::SdkError<E, R>,
    ) -> LogsError {
        LogsError {
            op,
            group: self.group.clone(),
            code: e.code().map(|c| format!("{c}: ")).unwrap_or_default(),
            message: e.message().map_or_else(|| format!("{e:?}"), str::to_owned),
        }
    }

    /// Writes `messages` (each cut to [`MAX_EVENT_BYTES`]) to `stream`, created first
    /// (an existing one is appended to), all stamped `at_ms`.
    pub(crate) async fn put(
        &self,
        stream: &str,
        at_ms: i64,
        messages: &[String],
    ) -> Result<(), LogsError> {
        tracing::debug!(group = %self.group, stream, "logs:CreateLogStream");
        if let Err(e) = self
            .client
            .create_log_stream()
            .log_group_name(&self.group)
            .log_stream_name(stream)
            .send()
            .await
        {
            if e.code() != Some("ResourceAlreadyExistsException") {
                return Err(self.error("CreateLogStream", &e));
            }
        }
        let mut events = Vec::with_capacity(messages.len());
        for m in messages {
            let event = InputLogEvent::builder()
                .timestamp(at_ms)
                .message(cut(m, MAX_EVENT_BYTES))
                .build()
                .map_err(|e| LogsError {
                    op: "PutLogEvents",
                    group: self.group.clone(),
                    code: String::new(),
                    message: e.to_string(),
                })?;
            events.push(event);
        }
        tracing::debug!(group = %self.group, stream, events = events.len(), "logs:PutLogEvents");
        self.client
            .put_log_events()
            .log_group_name(&self.group)
            .log_stream_name(stream)
            .set_log_events(Some(events))
            .send()
            .await
            .map_err(|e| self.error("PutLogEvents", &e))?;
        Ok(())
    }
}

/// `s` cut to at most `max` bytes on a character boundary, saying so when cut.
pub(crate) fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let note = "\n(cut: too long)";
    let mut end = max.saturating_sub(note.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{note}", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        assert_eq!(cut("abc", 10), "abc");
        let long = "é".repeat(100);
        let c = cut(&long, 50);
        assert!(c.len() <= 50, "{}", c.len());
        assert!(c.ends_with("(cut: too long)"));
    }
}
