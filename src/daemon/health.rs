//! The health of the etcd cluster as one state machine over two facts:
//! whether this daemon's shares are in force (its etcd lease is renewed
//! in time) and whether etcd calls succeed.
//!
//! - HEALTHY: shares in force, calls succeed.
//! - SUSPECT: shares in force, but a call failed (decisions do not change:
//!   shares stay in force until their deadline).
//! - DEGRADED: shares out of force and etcd unreachable: global rules
//!   follow their `on_failure` policy.
//! - RECOVERING: etcd answers but shares are not in force yet (starting,
//!   registering again after an outage): `on_failure` still decides.
//!
//! Slow is not down: only a failed call (or one past the etcd timeout)
//! counts. Calls recover after two successes in a row (hysteresis). Each
//! transition is logged once, counted, and published to the `ClusterLink`
//! for reports.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use crate::daemon::limiter::global::{ClusterLink, EtcdState};

/// Consecutive successes after a failure before calls count as working.
const SUCCESSES_TO_RECOVER: u32 = 2;
/// Consecutive failures before a daemon whose shares are in force says
/// SUSPECT: slow is not down (one call timed out while etcd wrote a
/// snapshot, once in a 30-minute soak).
const FAILURES_TO_SUSPECT: u32 = 2;
/// Immediate retries of a call that etcd answered Unavailable (each may
/// reach another endpoint; the deadline still bounds them all).
const RETRIES: u32 = 4;

/// A failed etcd call.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("etcd gave no answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd: {0}")]
    Etcd(etcd_client::Error),
}

/// Errors worth an immediate retry: the member we reached is down or has
/// no leader; another endpoint may answer.
fn retryable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable || s.message().contains("leader changed")
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

#[derive(Debug)]
struct Inner {
    state: EtcdState,
    since: SystemTime,
    /// Calls work (no failure since the last two successes).
    calls_ok: bool,
    /// Shares are in force (as of the last check).
    valid: bool,
    /// Consecutive successes since the last failure.
    successes: u32,
    /// Consecutive failures since the last success.
    failures: u32,
    /// Calls failed [`FAILURES_TO_SUSPECT`] times in a row, and do not
    /// work again yet.
    failing: bool,
    last_error: String,
}

/// The state machine; calls report with [`Health::success`] and
/// [`Health::failure`], share validity with [`Health::shares`].
#[derive(Debug)]
pub struct Health {
    link: Arc<ClusterLink>,
    inner: Mutex<Inner>,
    pub transitions: AtomicU64,
    /// Woken on every entry into RECOVERING (the rules watcher re-lists and
    /// re-creates its watch then, in case its stream stalled silently).
    pub recovering: tokio::sync::Notify,
    /// Transitions become spans when traces are exported.
    telemetry: std::sync::OnceLock<Arc<crate::daemon::telemetry::Telemetry>>,
}

impl Health {
    /// Starts RECOVERING: etcd not proven reachable, no share in force.
    pub fn new(link: Arc<ClusterLink>) -> Health {
        link.set_state(EtcdState::Recovering);
        Health {
            link,
            inner: Mutex::new(Inner {
                state: EtcdState::Recovering,
                since: SystemTime::now(),
                calls_ok: true,
                valid: false,
                successes: 0,
                failures: 0,
                failing: false,
                last_error: String::new(),
            }),
            transitions: AtomicU64::new(0),
            recovering: tokio::sync::Notify::new(),
            telemetry: std::sync::OnceLock::new(),
        }
    }

    /// Exports every later transition as a span.
    pub fn trace_with(&self, telemetry: Arc<crate::daemon::telemetry::Telemetry>) {
        let _ = self.telemetry.set(telemetry);
    }

    pub fn state(&self) -> EtcdState {
        self.inner.lock().state
    }

    /// The state, when it was entered, and the last error seen.
    pub fn snapshot(&self) -> (EtcdState, SystemTime, String) {
        let i = self.inner.lock();
        (i.state, i.since, i.last_error.clone())
    }

    /// A call succeeded.
    pub fn success(&self) {
        let mut i = self.inner.lock();
        i.successes = i.successes.saturating_add(1);
        i.failures = 0;
        if !i.calls_ok && i.successes >= SUCCESSES_TO_RECOVER {
            i.calls_ok = true;
            i.failing = false;
        }
        self.settle(&mut i);
    }

    /// A call that started at `started` failed or timed out.
    pub fn failure(&self, error: &str, _started: Instant) {
        let mut i = self.inner.lock();
        i.successes = 0;
        i.failures = i.failures.saturating_add(1);
        i.calls_ok = false;
        i.failing |= i.failures >= FAILURES_TO_SUSPECT;
        i.last_error = error.to_owned();
        self.settle(&mut i);
    }

    /// Whether shares are in force now (checked on a timer).
    pub fn shares(&self, valid: bool) {
        let mut i = self.inner.lock();
        if i.valid != valid {
            i.valid = valid;
            self.settle(&mut i);
        }
    }

    fn settle(&self, i: &mut Inner) {
        let state = match (i.valid, i.calls_ok) {
            (true, _) if !i.failing => EtcdState::Healthy,
            (true, _) => EtcdState::Suspect,
            (false, false) => EtcdState::Degraded,
            (false, true) => EtcdState::Recovering,
        };
        if state != i.state {
            self.enter(i, state);
        }
    }

    /// Runs one etcd call within `deadline`, retrying at once (on another
    /// endpoint) while etcd answers Unavailable, as it does while a member is
    /// down or a leader is being elected, and reports the outcome.
    ///
    /// # Errors
    /// The call failed, or did not finish within the deadline.
    pub async fn guard<T, Fut>(
        &self,
        deadline: Duration,
        mut call: impl FnMut() -> Fut,
    ) -> Result<T, CallError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            let left = deadline.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, call()).await {
                Ok(Ok(v)) => {
                    self.success();
                    return Ok(v);
                }
                Ok(Err(e)) if attempt < RETRIES && retryable(&e) => attempt += 1,
                Ok(Err(e)) => {
                    self.failure(&e.to_string(), started);
                    return Err(CallError::Etcd(e));
                }
                Err(_) => {
                    let error = CallError::Timeout(deadline);
                    self.failure(&error.to_string(), started);
                    return Err(error);
                }
            }
        }
    }

    fn enter(&self, i: &mut Inner, state: EtcdState) {
        let from = i.state;
        i.state = state;
        i.since = SystemTime::now();
        self.link.set_state(state);
        self.transitions.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = self.telemetry.get() {
            t.etcd_state(from.name(), state.name(), &i.last_error);
        }
        if state == EtcdState::Recovering {
            self.recovering.notify_waiters();
        }
        match state {
            EtcdState::Degraded => tracing::warn!(
                from = from.name(),
                error = %i.last_error,
                "etcd unreachable and this daemon's shares lapsed: global rules now follow their on_failure policy"
            ),
            EtcdState::Suspect => {
                tracing::warn!(from = from.name(), error = %i.last_error, "etcd call failed; shares stay in force until their deadline")
            }
            EtcdState::Recovering => {
                tracing::info!(
                    from = from.name(),
                    "etcd reachable; taking shares (on_failure decides until then)"
                )
            }
            EtcdState::Healthy => tracing::info!(from = from.name(), "etcd healthy"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        Health::new(Arc::new(ClusterLink::new(
            crate::daemon::limiter::NullSink,
            crate::rule::OnFailure::Local,
        )))
    }

    #[test]
    fn states_follow_share_validity_and_calls() {
        let h = health();
        assert_eq!(h.state(), EtcdState::Recovering);
        h.success();
        h.shares(true);
        assert_eq!(h.state(), EtcdState::Healthy);
        // One failed call is not trouble yet; two in a row are.
        h.failure("boom", Instant::now());
        assert_eq!(h.state(), EtcdState::Healthy, "one slow call");
        h.failure("boom", Instant::now());
        assert_eq!(h.state(), EtcdState::Suspect, "shares still in force");
        // One success is not enough (hysteresis); a failure in between
        // starts the count again.
        h.success();
        assert_eq!(h.state(), EtcdState::Suspect);
        h.failure("boom", Instant::now());
        h.success();
        h.success();
        assert_eq!(h.state(), EtcdState::Healthy);
        // Shares lapsed after a failed call: degraded (straight from
        // healthy).
        h.failure("boom", Instant::now());
        h.shares(false);
        assert_eq!(h.state(), EtcdState::Degraded);
        h.success();
        h.success();
        assert_eq!(h.state(), EtcdState::Recovering);
        h.shares(true);
        assert_eq!(h.state(), EtcdState::Healthy);
        assert_eq!(h.transitions.load(Ordering::Relaxed), 6);
    }
}
