//! Splitting work into store calls, running them concurrently and retrying what was left.
//!
//! Every kind of store call goes through [`in_rounds`]: the pending entries are cut into calls of
//! at most the store's limit, the calls run concurrently (bounded), and entries the store left
//! unprocessed or that failed retryably are pending again in the next round, after the retry
//! policy's backoff. A round that only lost entries to a cancelled transaction, through no fault
//! of theirs, is followed at once, without counting as a retry.

use std::future::Future;

use futures::StreamExt;
use tokio::time::Instant;

use crate::retry::ExponentialBackoff;

use super::store::StoreError;

/// How one entry of a call fared.
#[derive(Debug)]
pub(crate) enum Verdict<R> {
    Done(R),
    /// Try again after backoff (unprocessed, throttled, conflicting).
    Retry(StoreError),
    /// Try again at once: the call was cancelled because of other entries, which are done.
    Again,
    Failed(StoreError),
}

/// One call's answer: a verdict per entry, or a failure of the whole call.
pub(crate) type CallResult<R> = Result<Vec<Verdict<R>>, StoreError>;

/// Bounds on a run of calls.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget<'a> {
    pub retry: &'a ExponentialBackoff,
    /// No call starts, and no call is awaited, past this.
    pub cutoff: Option<Instant>,
    pub max_entries: usize,
    pub max_concurrent: usize,
}

/// Run `call` over `items` in calls of at most `budget.max_entries`. `call` answers one verdict
/// per entry, same positions, or fails as a whole. Returns one result per item, same positions.
pub(crate) async fn in_rounds<'i, T, R, F, Fut>(
    items: &'i [T],
    budget: Budget<'_>,
    call: F,
) -> Vec<Result<R, StoreError>>
where
    F: Fn(Vec<&'i T>) -> Fut,
    Fut: Future<Output = CallResult<R>>,
{
    let mut results: Vec<Option<Result<R, StoreError>>> = (0..items.len()).map(|_| None).collect();
    let mut pending: Vec<usize> = (0..items.len()).collect();
    let mut retries = 0u32;
    let max_entries = budget.max_entries.max(1);
    while !pending.is_empty() {
        let chunks: Vec<&[usize]> = pending.chunks(max_entries).collect();
        // The calls are built first and only then driven, so the stream holds plain futures.
        let calls: Vec<_> = chunks
            .iter()
            .enumerate()
            .map(|(n, chunk)| {
                let entries: Vec<&'i T> = chunk.iter().map(|&i| &items[i]).collect();
                let answer = call(entries);
                let cutoff = budget.cutoff;
                async move {
                    let answer = match cutoff {
                        Some(cutoff) => tokio::time::timeout_at(cutoff, answer)
                            .await
                            .unwrap_or_else(|_| {
                                Err(StoreError::Unavailable(
                                    "no answer before the invocation's deadline".into(),
                                ))
                            }),
                        None => answer.await,
                    };
                    (n, answer)
                }
            })
            .collect();
        let answers: Vec<(usize, CallResult<R>)> = futures::stream::iter(calls)
            .buffer_unordered(budget.max_concurrent.max(1))
            .collect()
            .await;

        let mut next = Vec::new();
        let mut progress = false;
        let mut backoff_needed = false;
        let mut last_error: Option<StoreError> = None;
        for (n, answer) in answers {
            let chunk = chunks[n];
            match answer {
                Err(error) => {
                    if error.is_retryable() {
                        next.extend_from_slice(chunk);
                        backoff_needed = true;
                        last_error = Some(error);
                    } else {
                        for &i in chunk {
                            results[i] = Some(Err(error.clone()));
                        }
                    }
                }
                Ok(verdicts) if verdicts.len() != chunk.len() => {
                    let error = StoreError::Unavailable(format!(
                        "store answered {} entries of {}",
                        verdicts.len(),
                        chunk.len()
                    ));
                    next.extend_from_slice(chunk);
                    backoff_needed = true;
                    last_error = Some(error);
                }
                Ok(verdicts) => {
                    for (&i, verdict) in chunk.iter().zip(verdicts) {
                        match verdict {
                            Verdict::Done(value) => {
                                progress = true;
                                results[i] = Some(Ok(value));
                            }
                            Verdict::Failed(error) => {
                                progress = true;
                                results[i] = Some(Err(error));
                            }
                            Verdict::Again => next.push(i),
                            Verdict::Retry(error) => {
                                next.push(i);
                                backoff_needed = true;
                                last_error = Some(error);
                            }
                        }
                    }
                }
            }
        }
        drop(chunks);
        pending = next;
        if pending.is_empty() {
            break;
        }
        if !backoff_needed && progress {
            // Cancelled only because others were taken: those are settled, go again at once.
            continue;
        }
        retries += 1;
        let error = last_error.unwrap_or_else(|| {
            StoreError::Unavailable("the store made no progress on these entries".into())
        });
        let resume = budget
            .retry
            .backoff(retries)
            .map(|wait| Instant::now() + wait);
        match resume {
            Some(resume) if budget.cutoff.is_none_or(|cutoff| resume < cutoff) => {
                tokio::time::sleep_until(resume).await;
            }
            _ => {
                for &i in &pending {
                    results[i] = Some(Err(error.clone()));
                }
                break;
            }
        }
    }
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| Err(StoreError::Unavailable("entry was never answered".into())))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::retry::{ExponentialBackoff, Jitter};
    use std::sync::Mutex;
    use std::time::Duration;

    fn policy(max_retries: u32) -> ExponentialBackoff {
        ExponentialBackoff {
            initial: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
            max_retries,
            jitter: Jitter::None,
        }
    }

    fn budget(p: &ExponentialBackoff, max_entries: usize) -> Budget<'_> {
        Budget {
            retry: p,
            cutoff: None,
            max_entries,
            max_concurrent: 4,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn calls_respect_the_limit_and_unprocessed_entries_are_retried() {
        let items: Vec<u32> = (0..60).collect();
        let sizes = Mutex::new(Vec::new());
        let p = policy(3);
        let results = in_rounds(&items, budget(&p, 25), |entries| {
            sizes.lock().unwrap().push(entries.len());
            let first_round = sizes.lock().unwrap().len() <= 3;
            async move {
                Ok(entries
                    .iter()
                    .map(|&&n| {
                        // Every entry divisible by 7 is left over once.
                        if first_round && n % 7 == 0 {
                            Verdict::Retry(StoreError::Throttled("unprocessed".into()))
                        } else {
                            Verdict::Done(n * 2)
                        }
                    })
                    .collect())
            }
        })
        .await;
        assert_eq!(results.len(), 60);
        assert!(
            results
                .iter()
                .enumerate()
                .all(|(i, r)| *r.as_ref().unwrap() == i as u32 * 2)
        );
        let sizes = sizes.into_inner().unwrap();
        assert_eq!(&sizes[..3], &[25, 25, 10]);
        assert_eq!(&sizes[3..], &[9]);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_retries_and_before_the_cutoff() {
        let items = vec![1, 2, 3];
        let p = policy(2);
        let calls = Mutex::new(0);
        let results: Vec<Result<(), StoreError>> = in_rounds(&items, budget(&p, 25), |_| {
            *calls.lock().unwrap() += 1;
            async { Err(StoreError::Throttled("slow down".into())) }
        })
        .await;
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(StoreError::Throttled(_))))
        );
        assert_eq!(*calls.lock().unwrap(), 3);

        let calls = Mutex::new(0);
        let cutoff = Instant::now() + Duration::from_millis(15);
        let results: Vec<Result<(), StoreError>> = in_rounds(
            &items,
            Budget {
                cutoff: Some(cutoff),
                ..budget(&policy(10), 25)
            },
            |_| {
                *calls.lock().unwrap() += 1;
                async { Err(StoreError::Unavailable("down".into())) }
            },
        )
        .await;
        assert!(results.iter().all(Result::is_err));
        // 10 ms wait, then a 20 ms wait would pass the 15 ms cutoff.
        assert_eq!(*calls.lock().unwrap(), 2);
        assert!(Instant::now() < cutoff);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_hangs_is_abandoned_at_the_cutoff() {
        let items = vec![1];
        let p = policy(3);
        let cutoff = Instant::now() + Duration::from_millis(500);
        let results: Vec<Result<(), StoreError>> = in_rounds(
            &items,
            Budget {
                cutoff: Some(cutoff),
                ..budget(&p, 25)
            },
            |_| std::future::pending(),
        )
        .await;
        assert!(matches!(results[0], Err(StoreError::Unavailable(_))));
        assert_eq!(Instant::now(), cutoff);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_entries_go_again_at_once_and_permanent_failures_stop() {
        let items = vec![0, 1, 2, 3];
        let p = policy(0);
        let round = Mutex::new(0);
        let start = Instant::now();
        let results = in_rounds(&items, budget(&p, 100), |entries| {
            *round.lock().unwrap() += 1;
            let first = *round.lock().unwrap() == 1;
            async move {
                Ok(entries
                    .iter()
                    .map(|&&n| match (first, n) {
                        (true, 1) => Verdict::Done("taken"),
                        (true, 3) => Verdict::Failed(StoreError::Rejected("bad".into())),
                        (true, _) => Verdict::Again,
                        (false, _) => Verdict::Done("claimed"),
                    })
                    .collect())
            }
        })
        .await;
        assert_eq!(*results[0].as_ref().unwrap(), "claimed");
        assert_eq!(*results[1].as_ref().unwrap(), "taken");
        assert_eq!(*results[2].as_ref().unwrap(), "claimed");
        assert!(results[3].is_err());
        assert_eq!(*round.lock().unwrap(), 2);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
