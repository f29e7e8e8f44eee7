//! Waiting on AWS: the one polling loop of the crate. A check runs at once, then again
//! after capped exponential backoff, until it says done, fails, or the deadline passes
//! (an [`Error::Timeout`] naming what was awaited and what was last seen). Every wait
//! prints a progress line saying what it waits for. Every wait and retry of the crate
//! goes through [`until`]: resources until they reach a state, Run Commands until they
//! end, deletions while AWS reports a dependency ([`while_in_use`]), launches while a
//! new instance profile is not usable yet.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::aws::AwsError;
use crate::error::{Error, Result};

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Poll<T> {
    Done(T),
    /// Not yet: the progress line (what is being waited for, what was seen).
    Wait(String),
}

/// How long and how often to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    /// Delay after the first check; doubled after each one, up to `max`.
    pub(crate) first: Duration,
    pub(crate) max: Duration,
    /// Give up once this much time has passed since the first check.
    pub(crate) limit: Duration,
}

impl Backoff {
    /// 1 s doubling to 10 s, for at most `limit`.
    pub(crate) const fn up_to(limit: Duration) -> Self {
        Self {
            first: Duration::from_secs(1),
            max: Duration::from_secs(10),
            limit,
        }
    }
}

/// Runs `check` until it returns [`Poll::Done`] (its value is returned) or an error (
/// returned as is), sleeping with backoff in between; after `backoff.limit`, an
/// [`Error::Timeout`] for `what`, with the last progress line.
pub(crate) async fn until<T, F, Fut>(what: &str, backoff: Backoff, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Poll<T>>>,
{
    let started = Instant::now();
    let mut delay = backoff.first;
    loop {
        let progress = match check().await? {
            Poll::Done(v) => return Ok(v),
            Poll::Wait(progress) => progress,
        };
        let left = backoff.limit.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(Error::Timeout {
                what: format!("{what} (last seen: {progress})"),
                secs: backoff.limit.as_secs(),
            });
        }
        tracing::info!("{progress}");
        tokio::time::sleep(delay.min(left)).await;
        delay = (delay * 2).min(backoff.max);
    }
}

/// Runs a deletion, again while AWS still reports dependencies being released
/// (`DependencyViolation`: an ENI of a NAT gateway or an instance going away), for up to
/// 5 minutes.
pub(crate) async fn while_in_use<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, AwsError>>,
{
    let backoff = Backoff {
        first: Duration::from_secs(2),
        max: Duration::from_secs(15),
        limit: Duration::from_secs(300),
    };
    until(what, backoff, || {
        let attempt = f();
        async move {
            match attempt.await {
                Ok(v) => Ok(Poll::Done(v)),
                Err(e) if e.code_is(&["DependencyViolation", "InvalidRouteTableID.InUse"]) => {
                    Ok(Poll::Wait(format!("{what}: still in use ({e})")))
                }
                Err(e) => Err(e.into()),
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn checks_until_done_with_growing_delays() {
        let calls = AtomicU32::new(0);
        let start = Instant::now();
        let backoff = Backoff {
            first: 10 * MS,
            max: 40 * MS,
            limit: Duration::from_secs(60),
        };
        let v = until("thing", backoff, || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(if n == 5 {
                Poll::Done(n)
            } else {
                Poll::Wait(format!("try {n}"))
            })
        })
        .await
        .unwrap();
        assert_eq!(v, 5);
        // 10 + 20 + 40 + 40 ms between the five checks.
        let took = start.elapsed();
        assert!(
            took >= 110 * MS && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn gives_up_at_the_limit_naming_what_and_the_last_state() {
        let backoff = Backoff {
            first: MS,
            max: 5 * MS,
            limit: 30 * MS,
        };
        let e = until("the drain of host/0", backoff, || async {
            Ok(Poll::<()>::Wait("InProgress".into()))
        })
        .await
        .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::Timeout { .. }), "{text}");
        assert!(text.contains("the drain of host/0"), "{text}");
        assert!(text.contains("InProgress"), "{text}");
    }

    #[tokio::test]
    async fn an_error_ends_the_wait_at_once() {
        let e = until("x", Backoff::up_to(Duration::from_secs(30)), || async {
            Err::<Poll<()>, _>(Error::Refused("broken".into()))
        })
        .await
        .unwrap_err();
        assert_eq!(e.to_string(), "broken");
    }
}
