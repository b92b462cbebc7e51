//! The health of the etcd cluster as one state machine:
//! HEALTHY -> SUSPECT (a call failed: keep serving held tokens) -> DEGRADED
//! (failures for `degrade_after`, or `failures_to_degrade` in a row: global
//! rules follow `on_failure`) -> RECOVERING (a call succeeded: rules re-listed,
//! debts posted by the coordinator) -> HEALTHY. Each transition is logged
//! once, counted, and published to the hot path through the `ClusterLink`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use crate::daemon::limiter::global::{ClusterLink, EtcdState};

/// Consecutive failures that make a suspect cluster degraded.
const FAILURES_TO_DEGRADE: u32 = 3;

#[derive(Debug)]
struct Inner {
    state: EtcdState,
    since: SystemTime,
    first_failure: Option<Instant>,
    failures: u32,
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
                since: SystemTime::now(),
                first_failure: Some(Instant::now()),
                failures: 0,
                last_error: String::new(),
            }),
            transitions: AtomicU64::new(0),
        }
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
        match i.state {
            EtcdState::Suspect => self.enter(&mut i, EtcdState::Healthy),
            EtcdState::Degraded => self.enter(&mut i, EtcdState::Recovering),
            EtcdState::Healthy | EtcdState::Recovering => {}
        }
    }

    /// A call failed or timed out.
    pub fn failure(&self, error: &str) {
        let mut i = self.inner.lock();
        i.failures += 1;
        i.last_error = error.to_owned();
        let first = *i.first_failure.get_or_insert_with(Instant::now);
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
            self.enter(&mut i, EtcdState::Healthy);
        }
    }

    fn enter(&self, i: &mut Inner, state: EtcdState) {
        let from = i.state;
        i.state = state;
        i.since = SystemTime::now();
        if state == EtcdState::Suspect {
            i.first_failure.get_or_insert_with(Instant::now);
        }
        self.link.set_state(state);
        self.transitions.fetch_add(1, Ordering::Relaxed);
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
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        Health::new(
            Arc::new(ClusterLink::new(tx, crate::rule::OnFailure::Local)),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn walks_the_states_in_order() {
        let h = health();
        assert_eq!(h.state(), EtcdState::Suspect);
        h.success();
        assert_eq!(h.state(), EtcdState::Healthy);
        h.failure("boom");
        assert_eq!(h.state(), EtcdState::Suspect);
        h.failure("boom");
        assert_eq!(h.state(), EtcdState::Suspect);
        h.failure("boom");
        assert_eq!(h.state(), EtcdState::Degraded);
        h.failure("boom");
        assert_eq!(h.state(), EtcdState::Degraded);
        h.success();
        assert_eq!(h.state(), EtcdState::Recovering);
        h.recovered();
        assert_eq!(h.state(), EtcdState::Healthy);
        assert_eq!(h.transitions.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn hanging_calls_degrade_by_time() {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let h = Health::new(
            Arc::new(ClusterLink::new(tx, crate::rule::OnFailure::Local)),
            Duration::from_millis(1),
        );
        std::thread::sleep(Duration::from_millis(5));
        h.check_timeout();
        assert_eq!(h.state(), EtcdState::Degraded);
    }
}
