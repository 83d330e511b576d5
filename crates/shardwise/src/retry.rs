//! When and how long to wait before trying again.
//!
//! One policy value, [`ExponentialBackoff`], serves the handler retries, the dead-letter sends,
//! the producer and the store calls, so backoff is decided in one place. It is a value rather
//! than a trait because nothing else ever varied: tests take the same type without jitter
//! ([`Jitter::None`]) or without retries ([`ExponentialBackoff::none`]). Waiting uses tokio's
//! clock, which tests pause and advance.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// How much randomness spreads the waits of many callers that failed together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Wait a uniformly random time up to the computed delay (AWS's "full jitter").
    Full,
    /// Wait exactly the computed delay (tests).
    None,
}

/// Exponential backoff: `initial · 2^(retry-1)`, capped at `max_delay`, at most `max_retries` times.
#[derive(Debug, Clone)]
pub struct ExponentialBackoff {
    pub initial: Duration,
    pub max_delay: Duration,
    pub max_retries: u32,
    pub jitter: Jitter,
}

impl Default for ExponentialBackoff {
    /// Two retries within the invocation: a record that still fails goes back to Lambda, which
    /// retries it with the mapping's own policy, so long in-invocation waits only hold the shard.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            max_retries: 2,
            jitter: Jitter::Full,
        }
    }
}

impl ExponentialBackoff {
    /// No retries at all.
    pub fn none() -> Self {
        Self {
            max_retries: 0,
            ..Self::default()
        }
    }
}

impl ExponentialBackoff {
    /// The wait before retry number `retry` (1 for the first retry), or `None` to give up.
    pub fn backoff(&self, retry: u32) -> Option<Duration> {
        if retry == 0 || retry > self.max_retries {
            return None;
        }
        let factor = 1u32.checked_shl(retry - 1).unwrap_or(u32::MAX);
        let delay = self
            .initial
            .checked_mul(factor)
            .unwrap_or(self.max_delay)
            .min(self.max_delay);
        Some(match self.jitter {
            Jitter::None => delay,
            Jitter::Full => {
                let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                Duration::from_millis(rand::rng().random_range(0..=millis))
            }
        })
    }
}

/// The result of an operation run under a retry policy.
#[derive(Debug)]
pub struct Attempted<T, E> {
    pub result: Result<T, E>,
    /// Attempts made, including the first.
    pub attempts: u32,
}

/// Run `op` until it succeeds, fails with an error `retryable` rejects, the policy gives up, or
/// the next wait would end after `cutoff`.
pub async fn retry<T, E, F, Fut>(
    policy: &ExponentialBackoff,
    cutoff: Option<Instant>,
    retryable: impl Fn(&E) -> bool,
    mut op: F,
) -> Attempted<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempts = 0;
    loop {
        attempts += 1;
        let result = op().await;
        let error = match result {
            Ok(value) => {
                return Attempted {
                    result: Ok(value),
                    attempts,
                };
            }
            Err(error) => error,
        };
        let wait = if retryable(&error) {
            policy.backoff(attempts)
        } else {
            None
        };
        let Some(wait) = wait else {
            return Attempted {
                result: Err(error),
                attempts,
            };
        };
        let resume = Instant::now() + wait;
        if cutoff.is_some_and(|cutoff| resume >= cutoff) {
            return Attempted {
                result: Err(error),
                attempts,
            };
        }
        tokio::time::sleep_until(resume).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn fixed(max_retries: u32) -> ExponentialBackoff {
        ExponentialBackoff {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_millis(350),
            max_retries,
            jitter: Jitter::None,
        }
    }

    #[test]
    fn delays_grow_and_cap() {
        let p = fixed(5);
        let delays: Vec<_> = (1..=6).map(|r| p.backoff(r)).collect();
        assert_eq!(
            delays,
            vec![
                Some(Duration::from_millis(100)),
                Some(Duration::from_millis(200)),
                Some(Duration::from_millis(350)),
                Some(Duration::from_millis(350)),
                Some(Duration::from_millis(350)),
                None
            ]
        );
    }

    #[test]
    fn full_jitter_stays_within_the_delay() {
        let p = ExponentialBackoff {
            jitter: Jitter::Full,
            ..fixed(3)
        };
        for _ in 0..200 {
            assert!(p.backoff(2).unwrap() <= Duration::from_millis(200));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_with_backoff_until_success() {
        let calls = AtomicU32::new(0);
        let start = Instant::now();
        let out = retry(
            &fixed(3),
            None,
            |_: &&str| true,
            || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err("throttled")
                } else {
                    Ok(7)
                }
            },
        )
        .await;
        assert_eq!(out.result.unwrap(), 7);
        assert_eq!(out.attempts, 3);
        // 100 ms + 200 ms of (paused, auto-advanced) waiting.
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn stops_on_permanent_errors_and_before_the_cutoff() {
        let out: Attempted<(), _> = retry(
            &fixed(3),
            None,
            |e: &&str| *e != "bad",
            || async { Err("bad") },
        )
        .await;
        assert_eq!(out.attempts, 1);

        let cutoff = Instant::now() + Duration::from_millis(250);
        let out: Attempted<(), _> = retry(
            &fixed(10),
            Some(cutoff),
            |_: &&str| true,
            || async { Err("slow") },
        )
        .await;
        // Waits 100 ms, then 200 ms would pass the cutoff at 250 ms.
        assert_eq!(out.attempts, 2);
        assert!(Instant::now() < cutoff);
    }
}
