//! The health of the etcd cluster as one state machine:
//! HEALTHY -> SUSPECT (a call failed: keep serving held tokens; buckets of
//! `on_failure = "local"` rules that run dry use their fallback) -> DEGRADED
//! (failures for `degrade_after`, or `failures_to_degrade` in a row: global
//! rules follow `on_failure`) -> RECOVERING (two calls in a row succeeded:
//! hysteresis; rules re-listed,
//! debts posted by the coordinator) -> HEALTHY. Each transition is logged
//! once, counted, and published to the hot path through the `ClusterLink`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use crate::daemon::limiter::global::{ClusterLink, EtcdState};

/// Consecutive failures that make a suspect cluster degraded.
const FAILURES_TO_DEGRADE: u32 = 3;
/// Consecutive successes that end DEGRADED (hysteresis: one lucky call
/// against a failing or overloaded etcd does not flip the hot path back).
const SUCCESSES_TO_RECOVER: u32 = 2;
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
    /// Entered DEGRADED since the last completed recovery: the way back to
    /// HEALTHY goes through RECOVERING (debts must be posted).
    owes_recovery: bool,
    since: SystemTime,
    first_failure: Option<Instant>,
    failures: u32,
    /// Consecutive successes (for leaving DEGRADED).
    successes: u32,
    last_error: String,
}

/// The state machine; calls report with [`Health::success`] and
/// [`Health::failure`].
#[derive(Debug)]
pub struct Health {
    link: Arc<ClusterLink>,
    degrade_after: Duration,
    inner: Mutex<Inner>,
    pub transitions: AtomicU64,
    /// Woken on every entry into RECOVERING (the rules watcher re-lists and
    /// re-creates its watch then, in case its stream stalled silently).
    pub recovering: tokio::sync::Notify,
    /// Transitions become spans when traces are exported.
    telemetry: std::sync::OnceLock<Arc<crate::daemon::telemetry::Telemetry>>,
}

impl Health {
    /// Starts SUSPECT: nothing has been proven yet.
    pub fn new(link: Arc<ClusterLink>, degrade_after: Duration) -> Health {
        link.set_state(EtcdState::Suspect);
        Health {
            link,
            degrade_after,
            inner: Mutex::new(Inner {
                state: EtcdState::Suspect,
                owes_recovery: false,
                since: SystemTime::now(),
                first_failure: Some(Instant::now()),
                failures: 0,
                successes: 0,
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
        i.failures = 0;
        i.first_failure = None;
        i.successes = i.successes.saturating_add(1);
        match i.state {
            EtcdState::Suspect if i.owes_recovery => self.enter(&mut i, EtcdState::Recovering),
            EtcdState::Suspect => self.enter(&mut i, EtcdState::Healthy),
            EtcdState::Degraded if i.successes >= SUCCESSES_TO_RECOVER => {
                self.enter(&mut i, EtcdState::Recovering)
            }
            EtcdState::Degraded => {}
            EtcdState::Healthy | EtcdState::Recovering => {}
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

    /// A call that started at `started` failed or timed out.
    pub fn failure(&self, error: &str, started: Instant) {
        let mut i = self.inner.lock();
        i.failures += 1;
        i.successes = 0;
        i.last_error = error.to_owned();
        // A hang counts from when the call began, not when it timed out.
        let first = *i.first_failure.get_or_insert(started);
        match i.state {
            EtcdState::Healthy | EtcdState::Recovering => self.enter(&mut i, EtcdState::Suspect),
            EtcdState::Suspect
                if i.failures >= FAILURES_TO_DEGRADE || first.elapsed() >= self.degrade_after =>
            {
                self.enter(&mut i, EtcdState::Degraded)
            }
            _ => {}
        }
    }

    /// The time-based part of SUSPECT -> DEGRADED, for when calls hang
    /// instead of failing (the prober calls this on every tick).
    pub fn check_timeout(&self) {
        let mut i = self.inner.lock();
        if i.state == EtcdState::Suspect
            && i.first_failure
                .is_some_and(|f| f.elapsed() >= self.degrade_after)
        {
            self.enter(&mut i, EtcdState::Degraded);
        }
    }

    /// Recovery finished (rules re-listed, debts posted).
    pub fn recovered(&self) {
        let mut i = self.inner.lock();
        if i.state == EtcdState::Recovering {
            i.owes_recovery = false;
            self.enter(&mut i, EtcdState::Healthy);
        }
    }

    fn enter(&self, i: &mut Inner, state: EtcdState) {
        let from = i.state;
        i.state = state;
        if state == EtcdState::Degraded {
            i.owes_recovery = true;
        }
        i.since = SystemTime::now();
        if state == EtcdState::Suspect {
            i.first_failure.get_or_insert_with(Instant::now);
        }
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
                "etcd unreachable: global rules now follow their on_failure policy"
            ),
            EtcdState::Suspect => {
                tracing::warn!(from = from.name(), error = %i.last_error, "etcd call failed; serving held tokens")
            }
            EtcdState::Recovering => {
                tracing::info!("etcd reachable again: re-listing rules, posting debts")
            }
            EtcdState::Healthy => tracing::info!(from = from.name(), "etcd healthy"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        Health::new(
            Arc::new(ClusterLink::new(
                crate::daemon::limiter::NullSink,
                crate::rule::OnFailure::Local,
            )),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn walks_the_states_in_order() {
        let h = health();
        assert_eq!(h.state(), EtcdState::Suspect);
        h.success();
        assert_eq!(h.state(), EtcdState::Healthy);
        h.failure("boom", Instant::now());
        assert_eq!(h.state(), EtcdState::Suspect);
        h.failure("boom", Instant::now());
        assert_eq!(h.state(), EtcdState::Suspect);
        h.failure("boom", Instant::now());
        assert_eq!(h.state(), EtcdState::Degraded);
        h.failure("boom", Instant::now());
        assert_eq!(h.state(), EtcdState::Degraded);
        // One success is not enough to leave DEGRADED; a failure in between
        // starts the count again.
        h.success();
        assert_eq!(h.state(), EtcdState::Degraded);
        h.failure("boom", Instant::now());
        h.success();
        assert_eq!(h.state(), EtcdState::Degraded);
        h.success();
        assert_eq!(h.state(), EtcdState::Recovering);
        // A failure while recovering does not skip the recovery.
        h.failure("boom", Instant::now());
        assert_eq!(h.state(), EtcdState::Suspect);
        h.success();
        assert_eq!(h.state(), EtcdState::Recovering);
        h.recovered();
        assert_eq!(h.state(), EtcdState::Healthy);
        assert_eq!(h.transitions.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn hanging_calls_degrade_by_time() {
        let h = Health::new(
            Arc::new(ClusterLink::new(
                crate::daemon::limiter::NullSink,
                crate::rule::OnFailure::Local,
            )),
            Duration::from_millis(1),
        );
        std::thread::sleep(Duration::from_millis(5));
        h.check_timeout();
        assert_eq!(h.state(), EtcdState::Degraded);
    }
}
