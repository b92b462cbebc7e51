//! This daemon's wall-clock offset against its peers, and the decision to
//! stop leasing while it is too large (CockroachDB's max-offset self-check).
//!
//! Global buckets in etcd run GCRA on wall-clock time (`base = max(tat, now)`),
//! which is only correct while the hosts' clocks agree within
//! `max_clock_skew`. So each daemon measures its clock against its peers':
//!
//! * Membership writes `wall_ns` (this daemon's wall clock, read just before
//!   the write is sent) into its member key on every probe tick.
//! * [`Cluster::run_clock_watch`] watches the members prefix. A peer's write
//!   reaches us `d` after the peer read its clock: the write's trip to etcd,
//!   the commit, the watch event's trip to us. One sample of "the peer's clock
//!   minus ours" is `peer.wall_ns - our_wall_at_receipt + d`. The peer's `d`
//!   cannot be observed, but our own member write takes the same path and its
//!   write-to-event latency is measured exactly (monotonic clock, our own
//!   event): its least recent value is the `d` used for every peer.
//! * Error of one sample: `|d_peer - d_own|`, less than the delay itself
//!   (about 0.3-2 ms on loopback, a few ms across a LAN) unless the two paths
//!   differ. A `round trip / 2` correction (NTP style) would be biased by about
//!   half the delay here, because etcd answers the write and emits the event
//!   at the same moment. Of each peer's last five samples the least delayed
//!   one counts (NTP's minimum-delay filter: queueing only adds delay, and a
//!   loaded host or proxy adds tens of ms one way), which removes
//!   one-off stalls (a slow commit, a descheduled task).
//! * [`ClockCheck::tick`] (every membership tick) forgets peers whose member
//!   key is gone and decides. This daemon is *skewed* when it is beyond
//!   `max_clock_skew` plus the measurement's uncertainty (our least write
//!   delay) from a strict majority of its live peers; it stops being
//!   skewed once it is within 0.8 x `max_clock_skew` of enough peers that no
//!   majority can be beyond, three ticks in a row (hysteresis, no flapping).
//!   Peers not measured yet (or whose writes stopped arriving) count neither
//!   way, so entering and leaving both need evidence. While skewed,
//!   `ClusterLink::set_clock_skewed(true)` makes global rules follow their
//!   `on_failure` and stops refills.
//!
//! Two daemons are each other's only peer: when they disagree both stop
//! leasing, since neither can tell whose clock is wrong. Three or more outvote
//! one bad clock.
//!
//! [`OffsetEstimator`] and [`SkewGuard`] are plain data with times passed in
//! (unit-tested without a clock); only the watch task does I/O, and nothing
//! here is on the decision path.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Event, EventType, WatchOptions};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use crate::daemon::limiter::global::{ClusterLink, EtcdState};
use crate::protocol::{ClockReport, PeerClock};

/// Samples kept per peer (and of our own write delay); estimates take the
/// least-delayed one.
const SAMPLES_KEPT: usize = 5;
/// A peer counts as measured from this many samples on.
const MIN_SAMPLES: usize = 3;
/// A peer whose last sample is older than this counts as unmeasured (its
/// writes stopped reaching us): its old offset decides nothing.
const STALE_AFTER: Duration = Duration::from_secs(5);
/// Leave the skewed state within this fraction of `max_clock_skew`...
const LEAVE_FRACTION: f64 = 0.8;
/// ...for this many ticks in a row.
const LEAVE_TICKS: u32 = 3;
/// Re-create the watch when our own successful writes have not come back
/// through it for this long (a stream that stalled silently).
const ECHO_OVERDUE: Duration = Duration::from_secs(3);
/// Our recent writes remembered to time their events.
const SENT_KEPT: usize = 4;

/// The wall clock in nanoseconds since the Unix epoch (0 before it).
pub fn wall_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The median (mean of the middle two for an even count); `None` if empty.
fn median(values: &mut [i64]) -> Option<i64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        ((i128::from(values[mid - 1]) + i128::from(values[mid])) / 2) as i64
    })
}

/// One peer's recent samples.
#[derive(Debug, Default)]
struct PeerSamples {
    /// `peer.wall_ns - our_wall_at_receipt`, without the delay correction
    /// (applied when read, so a better delay estimate improves old samples).
    raw: VecDeque<i64>,
    /// When the last sample arrived (monotonic ns, caller's origin).
    last_ns: u64,
}

/// One peer's clock against ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerOffset {
    pub node: String,
    /// Our clock minus the peer's, nanoseconds: positive means we are ahead.
    pub offset_ns: i64,
    /// Samples behind the estimate.
    pub samples: usize,
    /// How far off the estimate may be: the least delay of our own writes'
    /// round (a one-way path can be up to that much longer or shorter than
    /// the one we corrected for). Under load it grows, and an offset within
    /// it proves nothing.
    pub uncertainty_ns: u64,
}

/// Per-peer offset estimates from write samples. Monotonic times are
/// nanoseconds since any origin the caller picks.
#[derive(Debug, Default)]
pub struct OffsetEstimator {
    peers: HashMap<String, PeerSamples>,
    /// Our own writes' write-to-event latencies, ns.
    delays: VecDeque<u64>,
}

impl OffsetEstimator {
    /// Our own member write came back through the watch `delay` after it
    /// was sent.
    pub fn record_delay(&mut self, delay: Duration) {
        if self.delays.len() == SAMPLES_KEPT {
            self.delays.pop_front();
        }
        self.delays
            .push_back(u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX));
    }

    /// The correction added to peer samples: the least of our own recent
    /// write-to-event latencies (zero before the first). Queueing only ever
    /// adds delay, so the least-delayed sample is the one closest to the
    /// path's real latency (NTP's minimum-delay filter).
    pub fn delay(&self) -> Duration {
        Duration::from_nanos(self.delays.iter().copied().min().unwrap_or(0))
    }

    /// `peer` wrote `peer_wall_ns`; the write reached us at our wall time
    /// `received_wall_ns`, monotonic time `at_ns`.
    pub fn record(&mut self, peer: &str, peer_wall_ns: u64, received_wall_ns: u64, at_ns: u64) {
        let raw = (i128::from(peer_wall_ns) - i128::from(received_wall_ns))
            .clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        let samples = self.peers.entry(peer.to_owned()).or_default();
        if samples.raw.len() == SAMPLES_KEPT {
            samples.raw.pop_front();
        }
        samples.raw.push_back(raw);
        samples.last_ns = at_ns;
    }

    /// Drops a peer (its member key is gone).
    pub fn forget(&mut self, peer: &str) {
        self.peers.remove(peer);
    }

    /// Keeps only the peers for which `live` holds.
    pub fn retain(&mut self, live: impl Fn(&str) -> bool) {
        self.peers.retain(|node, _| live(node));
    }

    /// The peers measured well enough to count at monotonic time `now_ns`
    /// (at least [`MIN_SAMPLES`], the last within [`STALE_AFTER`]), by node id.
    pub fn estimates(&self, now_ns: u64) -> Vec<PeerOffset> {
        let delay = i64::try_from(self.delay().as_nanos()).unwrap_or(i64::MAX);
        let stale = STALE_AFTER.as_nanos() as u64;
        let mut out: Vec<PeerOffset> = self
            .peers
            .iter()
            .filter(|(_, s)| {
                s.raw.len() >= MIN_SAMPLES && now_ns.saturating_sub(s.last_ns) <= stale
            })
            .map(|(node, s)| {
                // The least-delayed sample (queueing makes a peer's write
                // arrive later, so its clock look behind): the largest.
                let peer_minus_ours = s
                    .raw
                    .iter()
                    .copied()
                    .max()
                    .expect("MIN_SAMPLES > 0")
                    .saturating_add(delay);
                PeerOffset {
                    node: node.clone(),
                    offset_ns: peer_minus_ours.saturating_neg(),
                    samples: s.raw.len(),
                    uncertainty_ns: u64::try_from(delay).unwrap_or(0),
                }
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }
}

/// Our clock minus the median clock of all the daemons measured, ourselves
/// (at offset 0) included, nanoseconds. With one bad clock among three the
/// good ones read about 0 and the bad one its full offset; with two daemons
/// each reads half the difference.
pub fn own_offset(estimates: &[PeerOffset]) -> i64 {
    let mut all: Vec<i64> = std::iter::once(0)
        .chain(estimates.iter().map(|p| p.offset_ns))
        .collect();
    median(&mut all).unwrap_or(0)
}

/// A change of the skew decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Beyond `max_clock_skew` from a majority of peers: stop leasing.
    Entered,
    /// Back within: lease again.
    Left,
}

/// The skew decision with hysteresis.
#[derive(Debug, Default)]
pub struct SkewGuard {
    skewed: bool,
    /// Consecutive evaluations that would allow leaving.
    calm_ticks: u32,
}

impl SkewGuard {
    pub fn skewed(&self) -> bool {
        self.skewed
    }

    /// One evaluation. `estimates` are the measured peers, `live_peers` the
    /// peers with a member key (measured or not, ourselves excluded).
    pub fn update(
        &mut self,
        estimates: &[PeerOffset],
        live_peers: usize,
        max_skew: Duration,
    ) -> Option<Transition> {
        let live = live_peers.max(estimates.len());
        let majority = live / 2 + 1;
        let max = u64::try_from(max_skew.as_nanos()).unwrap_or(u64::MAX);
        if !self.skewed {
            // Beyond only when beyond by more than the measurement's own
            // uncertainty: a loaded etcd delays every write and must not
            // look like a skewed clock (a real skew of seconds still shows).
            let beyond = estimates
                .iter()
                .filter(|p| p.offset_ns.unsigned_abs() > max.saturating_add(p.uncertainty_ns))
                .count();
            if live > 0 && beyond >= majority {
                self.skewed = true;
                self.calm_ticks = 0;
                return Some(Transition::Entered);
            }
            return None;
        }
        let calm = (max as f64 * LEAVE_FRACTION) as u64;
        let within = estimates
            .iter()
            .filter(|p| p.offset_ns.unsigned_abs() <= calm)
            .count();
        // Leave only when no majority can be beyond, even if every peer not
        // measured now were.
        if within + majority > live {
            self.calm_ticks += 1;
            if self.calm_ticks >= LEAVE_TICKS {
                self.skewed = false;
                self.calm_ticks = 0;
                return Some(Transition::Left);
            }
        } else {
            self.calm_ticks = 0;
        }
        None
    }
}

/// What the clock check keeps between calls.
#[derive(Debug, Default)]
struct Inner {
    estimator: OffsetEstimator,
    guard: SkewGuard,
    /// Peers with a member key at the last count (ourselves excluded).
    live: Vec<String>,
    /// Our last writes: (`wall_ns` written, when sent), to time their events.
    sent: VecDeque<(u64, Instant)>,
    /// The first successful write not echoed by the watch since the last
    /// echo (for the watch's liveness).
    unechoed_since: Option<Instant>,
}

/// The clock check of one daemon, shared by membership (writes and ticks),
/// the watch task (samples) and reports.
#[derive(Debug)]
pub struct ClockCheck {
    node: String,
    max_skew: Duration,
    link: Arc<ClusterLink>,
    /// Origin of the estimator's monotonic nanoseconds.
    origin: Instant,
    inner: Mutex<Inner>,
    /// Times the skew decision changed.
    pub transitions: AtomicU64,
}

impl ClockCheck {
    pub fn new(node: String, max_skew: Duration, link: Arc<ClusterLink>) -> ClockCheck {
        ClockCheck {
            node,
            max_skew,
            link,
            origin: Instant::now(),
            inner: Mutex::new(Inner::default()),
            transitions: AtomicU64::new(0),
        }
    }

    fn mono_ns(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Our member write carrying `wall_ns` is being sent now.
    pub fn sending(&self, wall_ns: u64) {
        let mut i = self.inner.lock();
        if i.sent.len() == SENT_KEPT {
            i.sent.pop_front();
        }
        i.sent.push_back((wall_ns, Instant::now()));
    }

    /// Our member write was committed.
    pub fn written(&self) {
        let mut i = self.inner.lock();
        if i.unechoed_since.is_none() {
            i.unechoed_since = i.sent.back().map(|(_, at)| *at);
        }
    }

    /// A member write of `node` carrying `wall_ns` arrived through the watch
    /// at our wall time `received_wall_ns`, monotonic `received_at`.
    pub fn observe(&self, node: &str, wall_ns: u64, received_wall_ns: u64, received_at: Instant) {
        let mut i = self.inner.lock();
        if node == self.node {
            if let Some(pos) = i.sent.iter().position(|(w, _)| *w == wall_ns) {
                let sent_at = i.sent[pos].1;
                i.sent.drain(..=pos);
                i.estimator
                    .record_delay(received_at.saturating_duration_since(sent_at));
            }
            i.unechoed_since = None;
        } else {
            let at = self.mono_ns(received_at);
            i.estimator.record(node, wall_ns, received_wall_ns, at);
        }
    }

    /// `node`'s member key was deleted.
    pub fn forget(&self, node: &str) {
        if node != self.node {
            self.inner.lock().estimator.forget(node);
        }
    }

    /// A new watch stream started: our writes are expected from now on.
    fn watch_started(&self) {
        self.inner.lock().unechoed_since = None;
    }

    /// Our writes have stopped coming back through the watch.
    fn echo_overdue(&self, now: Instant) -> bool {
        self.inner
            .lock()
            .unechoed_since
            .is_some_and(|since| now.saturating_duration_since(since) > ECHO_OVERDUE)
    }

    /// One membership tick: `members` are the node ids with a member key
    /// (`None` when they could not be read: the last ones are kept). Prunes
    /// peers that left, re-evaluates the decision and publishes it.
    pub fn tick(&self, members: Option<&[String]>) {
        self.tick_at(members, Instant::now());
    }

    fn tick_at(&self, members: Option<&[String]>, now: Instant) {
        let mut i = self.inner.lock();
        if let Some(members) = members {
            i.live = members
                .iter()
                .filter(|m| **m != self.node)
                .cloned()
                .collect();
            let live = i.live.clone();
            i.estimator.retain(|n| live.iter().any(|l| l == n));
        }
        let estimates = i.estimator.estimates(self.mono_ns(now));
        let live = i.live.len();
        let Some(transition) = i.guard.update(&estimates, live, self.max_skew) else {
            return;
        };
        drop(i);
        self.transitions.fetch_add(1, Ordering::Relaxed);
        let offset_ms = own_offset(&estimates) as f64 / 1e6;
        let peers = estimates
            .iter()
            .map(|p| format!("{} {:+.1} ms", p.node, p.offset_ns as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ");
        match transition {
            Transition::Entered => {
                self.link.set_clock_skewed(true);
                tracing::error!(
                    offset_ms,
                    max_clock_skew = ?self.max_skew,
                    live_peers = live,
                    "this host's wall clock is {offset_ms:+.1} ms off the cluster's median \
                     (ours minus each peer's: {peers}), beyond max_clock_skew {:?} from a \
                     majority of peers: leasing stopped, global rules follow on_failure \
                     until the clock is fixed (check NTP on this host)",
                    self.max_skew
                );
            }
            Transition::Left => {
                self.link.set_clock_skewed(false);
                tracing::info!(
                    offset_ms,
                    max_clock_skew = ?self.max_skew,
                    "this host's wall clock is back within {:?} of its peers ({peers}): leasing resumes",
                    self.max_skew.mul_f64(LEAVE_FRACTION)
                );
            }
        }
    }

    /// The measurement and decision for `Stats` and `Health`.
    pub fn report(&self) -> ClockReport {
        let i = self.inner.lock();
        let estimates = i.estimator.estimates(self.mono_ns(Instant::now()));
        ClockReport {
            offset_ns: own_offset(&estimates),
            max_skew_ns: u64::try_from(self.max_skew.as_nanos()).unwrap_or(u64::MAX),
            skewed: i.guard.skewed(),
            transitions: self.transitions.load(Ordering::Relaxed),
            delay_ns: u64::try_from(i.estimator.delay().as_nanos()).unwrap_or(u64::MAX),
            peers: estimates
                .into_iter()
                .map(|p| PeerClock {
                    node: p.node,
                    offset_ns: p.offset_ns,
                    samples: p.samples as u32,
                })
                .collect(),
        }
    }
}

/// The `wall_ns` of a member key's value (`None` for values without it,
/// such as an older daemon's).
fn wall_of(value: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Stamp {
        wall_ns: u64,
    }
    serde_json::from_slice::<Stamp>(value)
        .ok()
        .map(|s| s.wall_ns)
}

impl Cluster {
    /// Watches the member keys until `cancel`, feeding every write's
    /// `wall_ns` to the clock check.
    ///
    /// Unlike the rules watch, this one starts at the current revision, not
    /// from the last one seen: a write replayed after a break would arrive
    /// late and read as a clock that is behind, whereas a gap only costs
    /// samples (departures in the gap are caught by the member count). The
    /// watch is re-created when it breaks or is cancelled, when etcd
    /// recovers, and when our own writes stop coming back through it.
    pub async fn run_clock_watch(self: Arc<Self>, cancel: CancellationToken) {
        let prefix = self.key("members/");
        loop {
            let mut client = self.client();
            let options = WatchOptions::new().with_prefix();
            let watch = tokio::time::timeout(
                self.config.timeout,
                client.watch(prefix.as_str(), Some(options)),
            );
            let watch = tokio::select! {
                () = cancel.cancelled() => return,
                w = watch => w,
            };
            match watch {
                Ok(Ok(mut stream)) => {
                    self.clock.watch_started();
                    let mut check = tokio::time::interval(Duration::from_millis(500));
                    loop {
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = self.health.recovering.notified() => break,
                            _ = check.tick() => {
                                if self.link.state() == EtcdState::Healthy
                                    && self.clock.echo_overdue(Instant::now())
                                {
                                    tracing::debug!("member watch silent; re-creating it");
                                    break;
                                }
                            }
                            message = stream.message() => {
                                let (wall, at) = (wall_now_ns(), Instant::now());
                                match message {
                                    Ok(Some(resp)) if resp.canceled() => break,
                                    Ok(Some(resp)) => {
                                        for event in resp.events() {
                                            self.clock_event(&prefix, event, wall, at);
                                        }
                                    }
                                    Ok(None) | Err(_) => break,
                                }
                            }
                        }
                    }
                }
                Ok(Err(e)) => tracing::debug!("cannot watch members: {e}"),
                Err(_) => tracing::debug!("watching members timed out"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    fn clock_event(&self, prefix: &str, event: &Event, wall: u64, at: Instant) {
        let Some(kv) = event.kv() else { return };
        let Some(node) = kv
            .key()
            .strip_prefix(prefix.as_bytes())
            .and_then(|n| std::str::from_utf8(n).ok())
        else {
            return;
        };
        match event.event_type() {
            EventType::Put => {
                if let Some(wall_ns) = wall_of(kv.value()) {
                    self.clock.observe(node, wall_ns, wall, at);
                }
            }
            EventType::Delete => self.clock.forget(node),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000 * MS;
    const SKEW: Duration = Duration::from_millis(10);

    /// `n` samples of a peer `offset_ns` ahead of us (so ours minus theirs is
    /// `-offset_ns`), each arriving `delay_ns` after it was written.
    fn feed(e: &mut OffsetEstimator, peer: &str, offset_ns: i64, delay_ns: u64, n: u64, t: u64) {
        for k in 0..n {
            let true_now = 1_000 * SEC + t + k * 500 * MS;
            let peer_wall = (true_now as i64 + offset_ns) as u64;
            e.record(peer, peer_wall, true_now + delay_ns, t + k * 500 * MS);
        }
    }

    fn est(node: &str, offset_ms: i64) -> PeerOffset {
        PeerOffset {
            node: node.into(),
            offset_ns: offset_ms * MS as i64,
            samples: 5,
            uncertainty_ns: 0,
        }
    }

    #[test]
    fn median_handles_odd_even_and_empty() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3, 1, 2]), Some(2));
        assert_eq!(median(&mut [4, 1, 2, 3]), Some(2));
        assert_eq!(median(&mut [i64::MAX, i64::MAX]), Some(i64::MAX));
    }

    #[test]
    fn the_own_write_delay_corrects_peer_samples() {
        let mut e = OffsetEstimator::default();
        for _ in 0..5 {
            e.record_delay(Duration::from_micros(700));
        }
        // A peer 2 s behind us whose writes take 700 µs to reach us.
        feed(&mut e, "c", -2_000 * MS as i64, 700_000, 5, 0);
        let est = e.estimates(2 * SEC);
        assert_eq!(est.len(), 1);
        assert_eq!(est[0].offset_ns, 2_000 * MS as i64, "we are 2 s ahead");
        assert_eq!(e.delay(), Duration::from_micros(700));
    }

    #[test]
    fn the_median_ignores_one_stalled_delivery() {
        let mut e = OffsetEstimator::default();
        feed(&mut e, "b", 0, 0, 4, 0);
        // One event delivered 300 ms late reads as a peer 300 ms behind.
        e.record("b", 1_000 * SEC, 1_000 * SEC + 300 * MS, 2 * SEC);
        let est = e.estimates(2 * SEC);
        assert_eq!(est[0].offset_ns, 0);
        assert_eq!(est[0].samples, 5);
    }

    #[test]
    fn only_the_last_five_samples_count() {
        let mut e = OffsetEstimator::default();
        feed(&mut e, "b", 50 * MS as i64, 0, 5, 0);
        // The peer's clock was fixed: five new samples replace the old ones.
        feed(&mut e, "b", 0, 0, 5, 3 * SEC);
        assert_eq!(e.estimates(6 * SEC)[0].offset_ns, 0);
    }

    #[test]
    fn too_few_or_stale_samples_do_not_count() {
        let mut e = OffsetEstimator::default();
        feed(&mut e, "b", 0, 0, MIN_SAMPLES as u64 - 1, 0);
        assert!(e.estimates(SEC).is_empty(), "not enough samples yet");
        feed(&mut e, "b", 0, 0, 1, 2 * SEC);
        assert_eq!(e.estimates(2 * SEC).len(), 1);
        let stale = 2 * SEC + STALE_AFTER.as_nanos() as u64 + 1;
        assert!(e.estimates(stale).is_empty(), "the peer stopped writing");
    }

    #[test]
    fn departed_peers_are_pruned() {
        let mut e = OffsetEstimator::default();
        feed(&mut e, "a", 0, 0, 5, 0);
        feed(&mut e, "b", 0, 0, 5, 0);
        feed(&mut e, "c", 0, 0, 5, 0);
        e.forget("a");
        e.retain(|n| n != "b");
        let nodes: Vec<String> = e.estimates(2 * SEC).into_iter().map(|p| p.node).collect();
        assert_eq!(nodes, ["c"]);
    }

    #[test]
    fn own_offset_is_against_the_median_daemon() {
        // Seen from the good daemons: the bad one does not move the median.
        assert_eq!(own_offset(&[est("b", 0), est("c", 2_000)]), 0);
        // Seen from the bad one, 2 s behind both.
        assert_eq!(
            own_offset(&[est("a", -2_000), est("b", -2_000)]),
            -2_000 * MS as i64
        );
        // Two daemons: each reads half the difference.
        assert_eq!(own_offset(&[est("b", -2_000)]), -1_000 * MS as i64);
        assert_eq!(own_offset(&[]), 0);
    }

    #[test]
    fn a_minority_bad_clock_is_skewed_and_the_majority_is_not() {
        let mut bad = SkewGuard::default();
        let mut good = SkewGuard::default();
        assert_eq!(
            bad.update(&[est("a", -2_000), est("b", -2_000)], 2, SKEW),
            Some(Transition::Entered)
        );
        assert_eq!(good.update(&[est("b", 0), est("c", 2_000)], 2, SKEW), None);
        assert!(bad.skewed() && !good.skewed());
    }

    #[test]
    fn one_peer_beyond_the_limit_degrades_both() {
        let mut a = SkewGuard::default();
        let mut b = SkewGuard::default();
        assert_eq!(
            a.update(&[est("b", 20)], 1, SKEW),
            Some(Transition::Entered)
        );
        assert_eq!(
            b.update(&[est("a", -20)], 1, SKEW),
            Some(Transition::Entered)
        );
    }

    #[test]
    fn unmeasured_peers_count_neither_way() {
        let mut g = SkewGuard::default();
        // 4 live peers, 2 measured beyond: not a strict majority of 4.
        assert_eq!(g.update(&[est("a", 50), est("b", 50)], 4, SKEW), None);
        assert_eq!(
            g.update(&[est("a", 50), est("b", 50), est("c", 50)], 4, SKEW),
            Some(Transition::Entered)
        );
        // Back within, but only 1 of 4 measured: the other 3 could still be a
        // majority beyond, so it stays skewed however long that lasts.
        for _ in 0..10 {
            assert_eq!(g.update(&[est("a", 0)], 4, SKEW), None);
        }
        assert!(g.skewed());
        // 2 of 4 within: the 2 others cannot be a majority of 4 beyond.
        let left = (0..LEAVE_TICKS).filter_map(|_| g.update(&[est("a", 0), est("b", 0)], 4, SKEW));
        assert_eq!(left.last(), Some(Transition::Left));
    }

    #[test]
    fn an_offset_within_the_measurement_uncertainty_proves_nothing() {
        let mut g = SkewGuard::default();
        let loaded = |node: &str, off: i64| PeerOffset {
            uncertainty_ns: 25 * MS,
            ..est(node, off)
        };
        // 20 ms off, but our own writes took 25 ms: not evidence of skew.
        assert_eq!(
            g.update(&[loaded("a", 20), loaded("b", -20)], 2, SKEW),
            None
        );
        // 2 s off is, whatever the load.
        assert_eq!(
            g.update(&[loaded("a", 2000), loaded("b", 2000)], 2, SKEW),
            Some(Transition::Entered)
        );
    }

    #[test]
    fn leaving_needs_a_few_calm_ticks_well_within_the_limit() {
        let mut g = SkewGuard::default();
        g.update(&[est("a", 11), est("b", 11)], 2, SKEW);
        assert!(g.skewed());
        // 9 ms is within the limit but not within 0.8 x 10 ms: stay.
        for _ in 0..10 {
            assert_eq!(g.update(&[est("a", 9), est("b", 9)], 2, SKEW), None);
        }
        // Calm ticks must be consecutive.
        g.update(&[est("a", 7), est("b", 7)], 2, SKEW);
        g.update(&[est("a", 7), est("b", 7)], 2, SKEW);
        g.update(&[est("a", 9), est("b", 9)], 2, SKEW);
        assert!(g.skewed());
        for _ in 0..LEAVE_TICKS - 1 {
            assert_eq!(g.update(&[est("a", 7), est("b", -7)], 2, SKEW), None);
        }
        assert_eq!(
            g.update(&[est("a", 7), est("b", 7)], 2, SKEW),
            Some(Transition::Left)
        );
        // Hovering around the limit does not flap: 9 ms does not re-enter.
        assert_eq!(g.update(&[est("a", 9), est("b", 9)], 2, SKEW), None);
    }

    #[test]
    fn alone_is_never_skewed() {
        let mut g = SkewGuard::default();
        assert_eq!(g.update(&[], 0, SKEW), None);
        g.update(&[est("a", 50)], 1, SKEW);
        assert!(g.skewed());
        // The only peer left: nothing to be skewed against.
        for _ in 0..LEAVE_TICKS - 1 {
            assert_eq!(g.update(&[], 0, SKEW), None);
        }
        assert_eq!(g.update(&[], 0, SKEW), Some(Transition::Left));
    }

    #[test]
    fn the_check_times_its_own_writes_and_flags_the_link() {
        let link = Arc::new(ClusterLink::new(
            crate::daemon::limiter::NullSink,
            crate::rule::OnFailure::Closed,
        ));
        let check = ClockCheck::new("c".into(), SKEW, Arc::clone(&link));
        let t0 = check.origin;
        check.inner.lock().sent.push_back((42, t0));
        check.observe("c", 42, 0, t0 + Duration::from_micros(500));
        assert_eq!(check.report().delay_ns, 500_000);
        // Peers a and b, whose clocks read 2 s ahead of ours.
        for k in 0..3u64 {
            let at = t0 + Duration::from_millis(500 * k);
            let ours = 1_000 * SEC + k * 500 * MS;
            for peer in ["a", "b"] {
                check.observe(peer, ours + 2 * SEC, ours + 500_000, at);
            }
        }
        let members = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
        check.tick_at(Some(&members), t0 + Duration::from_secs(1));
        assert!(link.clock_skewed());
        let r = check.report();
        assert!(r.skewed);
        assert_eq!(r.transitions, 1);
        assert_eq!(r.offset_ns, -2_000 * MS as i64);
        assert_eq!(r.peers.len(), 2);
        // Both peers leave: alone, the check lets go after a few ticks.
        for k in 0..LEAVE_TICKS {
            check.tick_at(
                Some(&members[2..]),
                t0 + Duration::from_secs(2 + u64::from(k)),
            );
        }
        assert!(!link.clock_skewed());
        assert_eq!(check.report().transitions, 2);
        assert!(check.report().peers.is_empty());
    }
}
