//! Waiting in a test for something another process does: poll a condition
//! until it holds, or fail after a deadline with the process's log.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `ready` every 20 ms until it holds; fails with "`what` in
/// `secs` s" and `log()` (the process log) after `secs` seconds.
pub async fn poll_until<F, Fut>(what: &str, secs: u64, log: impl Fn() -> String, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ready().await {
        assert!(
            Instant::now() < deadline,
            "{what} in {secs} s; log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
