//! This daemon's operating count `n` (implicit shares are `1/n`): lowered
//! at once when more daemons live, written after; raised only when every
//! other daemon already counts at least as many (compare-and-swap on the
//! member keys), and applied once the view has caught up with that write.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Coordinator, CountWrite, RESEND};
use crate::daemon::lease::audit::Record as AuditRecord;
use crate::daemon::lease::share;

impl Coordinator {
    /// The view changed members: a count write of ours may have landed.
    pub(super) fn count_seen(&mut self) {
        let Some(w) = self.count_write else { return };
        let Some(m) = self.view.members.get(self.me()) else {
            return;
        };
        if m.lease != self.lease || m.n != w.n {
            return;
        }
        if w.raise {
            // Everything recorded before the raise is in the view now.
            if w.committed.is_none_or(|rev| self.view.revision >= rev) {
                self.set_count(w.n);
                self.count_write = None;
            }
        } else {
            self.count_write = None;
        }
    }

    pub(super) fn set_count(&mut self, n: u32) {
        if n == self.count {
            return;
        }
        let first = self.count == 0;
        let lowered = !first && n > self.count;
        self.count = n;
        self.stats.count_changes.fetch_add(1, Ordering::Relaxed);
        self.stats.count.store(u64::from(n), Ordering::Relaxed);
        // Ordered against rule installs by the rules lock (see `Planner`).
        self.planner.count.store(n, Ordering::Release);
        for rule in self.limiter.rules().iter() {
            self.planner.plan(rule);
        }
        if lowered {
            // Every idle bucket too, before the count is written.
            self.limiter.follow_implicit(self.clock.now_ns());
        }
        if first && n > 0 {
            self.registration.set_ready(self.lease);
            self.registration.publish(&self.link);
            tracing::info!(count = n, "shares in force");
        }
    }

    /// Moves the operating count toward the number of live members.
    pub(super) async fn step_count(&mut self) {
        if self.lease == 0 {
            return;
        }
        if let Some(w) = self.count_write {
            if w.committed.is_some() || w.sent.elapsed() < RESEND {
                return;
            }
            // No word of it: decide again from the view.
            self.count_write = None;
        }
        let Some(mine) = self.view.members.get(self.me()) else {
            return;
        };
        if mine.lease != self.lease {
            return;
        }
        let written = mine.n;
        let members = self.view.members.len() as u32;
        let others = self.view.other_counts(self.me());
        let (n, raise) = if self.count > 0 && members > self.count {
            // More daemons: lower now, record after.
            self.set_count(members);
            (members, false)
        } else if (self.count == 0 || members < self.count)
            && share::may_raise_count(members, &others)
        {
            (members, true)
        } else if written != self.count && self.count > 0 {
            (self.count, false)
        } else {
            return;
        };
        let members_at = raise.then_some(self.view.revision);
        self.count_write = Some(CountWrite {
            n,
            raise,
            sent: Instant::now(),
            committed: None,
        });
        let result = self.store.write_count(self.lease, n, members_at).await;
        let (outcome, revision) = match &result {
            Ok(Some(rev)) => ("committed", *rev),
            Ok(None) => ("moved", 0),
            Err(_) => ("unknown", 0),
        };
        if self.audit.enabled() {
            self.audit.write(&AuditRecord::Count {
                node: self.me().to_owned(),
                lease: self.lease,
                n,
                outcome: outcome.into(),
                revision,
                wall_ns: crate::daemon::lease::audit::wall_ns(),
            });
        }
        match result {
            Ok(Some(rev)) => {
                if let Some(w) = &mut self.count_write {
                    w.committed = Some(rev);
                }
                self.count_seen();
            }
            // A member moved since the view: decide again when it shows.
            Ok(None) => self.count_write = None,
            // Unknown: the view tells (or a resend after RESEND).
            Err(_) => {}
        }
    }
}
