//! What one local client can take from the daemon: connection slots (a total
//! cap, a per-uid cap, and slots kept for admins so that no user can lock
//! `rlctl rules set` out) and the memory budget for large answers (an
//! `AcquireMany` reserves its worst-case answer before anything is decided,
//! keeping only its real size once encoded).
//!
//! Both are consulted at accept or per batch, never per request.

use std::sync::Arc;

use hashbrown::HashMap;
use parking_lot::Mutex;

use super::auth::Peer;
use super::metrics::REFUSAL_REASONS;

/// Why a connection was refused a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRefusal {
    /// Every slot is taken (admins included).
    Full { max: usize },
    /// Only the slots kept for admins are left.
    KeptForAdmins { max: usize, kept: usize },
    /// This uid holds its share already.
    PerUid { uid: u32, max: usize },
}

impl SlotRefusal {
    /// The message sent to the refused client.
    pub fn message(self) -> String {
        match self {
            SlotRefusal::Full { max } => format!(
                "rld is at its limit of {max} connections; retry later or raise max_connections"
            ),
            SlotRefusal::KeptForAdmins { max, kept } => format!(
                "rld has {kept} of its {max} connections left and keeps them for admins; \
                 retry later or raise max_connections"
            ),
            SlotRefusal::PerUid { uid, max } => format!(
                "uid {uid} already holds {max} connections, the most one user may hold; \
                 close idle ones (share a connection: requests pipeline) or raise \
                 max_connections_per_uid"
            ),
        }
    }

    /// The reason label for metrics and logs.
    pub fn reason(self) -> &'static str {
        REFUSAL_REASONS[self.index()]
    }

    /// The reason's place in [`REFUSAL_REASONS`] (and in the refusal counters).
    pub fn index(self) -> usize {
        match self {
            SlotRefusal::Full { .. } => 0,
            SlotRefusal::KeptForAdmins { .. } => 1,
            SlotRefusal::PerUid { .. } => 2,
        }
    }
}

/// Connection slots.
#[derive(Debug)]
pub struct Slots {
    max: usize,
    per_uid: usize,
    kept_for_admins: usize,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    by_uid: HashMap<u32, usize>,
}

impl Slots {
    /// `max` connections in all, at most `per_uid` for one non-admin uid, and
    /// the last `kept_for_admins` of `max` only for admins.
    pub fn new(max: usize, per_uid: usize, kept_for_admins: usize) -> Slots {
        Slots {
            max,
            per_uid: per_uid.max(1),
            kept_for_admins: kept_for_admins.min(max.saturating_sub(1)),
            held: Mutex::new(Held::default()),
        }
    }

    /// Takes a slot for `peer` (`admin`: it may change rules), given back
    /// when the returned guard drops.
    ///
    /// # Errors
    /// No slot this peer may take.
    pub fn take(self: &Arc<Self>, peer: &Peer, admin: bool) -> Result<Slot, SlotRefusal> {
        let mut held = self.held.lock();
        if held.total >= self.max {
            return Err(SlotRefusal::Full { max: self.max });
        }
        if !admin {
            if held.total >= self.max - self.kept_for_admins {
                return Err(SlotRefusal::KeptForAdmins {
                    max: self.max,
                    kept: self.kept_for_admins,
                });
            }
            if held.by_uid.get(&peer.uid).copied().unwrap_or(0) >= self.per_uid {
                return Err(SlotRefusal::PerUid {
                    uid: peer.uid,
                    max: self.per_uid,
                });
            }
        }
        held.total += 1;
        *held.by_uid.entry(peer.uid).or_default() += 1;
        Ok(Slot {
            slots: Arc::clone(self),
            uid: peer.uid,
        })
    }
}

/// A taken connection slot.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock();
        held.total -= 1;
        if let hashbrown::hash_map::Entry::Occupied(mut e) = held.by_uid.entry(self.uid) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// Memory for answers larger than a connection's fixed allowance, shared by
/// every connection: reserved before a large batch is decided (or once a
/// large read-only answer is encoded), given back once the answer has been
/// written. One uid may hold at most a quarter of it (or one largest batch,
/// if that is more), so one user cannot starve the others.
#[derive(Debug)]
pub struct AnswerBudget {
    limit: usize,
    per_uid: usize,
    used: Mutex<Used>,
}

#[derive(Debug, Default)]
struct Used {
    total: usize,
    by_uid: HashMap<u32, usize>,
}

impl AnswerBudget {
    /// `limit` bytes in all; a uid may hold `limit / 4`, or `largest` if
    /// that is more (so the largest single answer can always be reserved).
    pub fn new(limit: usize, largest: usize) -> AnswerBudget {
        AnswerBudget {
            limit,
            per_uid: (limit / 4).max(largest),
            used: Mutex::new(Used::default()),
        }
    }

    /// Reserves `bytes` for `uid`, or returns false when the budget or the
    /// uid's share cannot hold them.
    pub fn reserve(&self, uid: u32, bytes: usize) -> bool {
        let mut used = self.used.lock();
        let mine = used.by_uid.get(&uid).copied().unwrap_or(0);
        let fits = used
            .total
            .checked_add(bytes)
            .is_some_and(|t| t <= self.limit)
            && mine.checked_add(bytes).is_some_and(|m| m <= self.per_uid);
        if fits {
            used.total += bytes;
            *used.by_uid.entry(uid).or_default() += bytes;
        }
        fits
    }

    /// Gives back `bytes` of what [`reserve`](Self::reserve) took for `uid`.
    pub fn release(&self, uid: u32, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let mut used = self.used.lock();
        used.total -= bytes;
        if let hashbrown::hash_map::Entry::Occupied(mut e) = used.by_uid.entry(uid) {
            *e.get_mut() -= bytes;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.lock().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32) -> Peer {
        Peer {
            uid,
            gid: uid,
            pid: None,
            in_admin_group: false,
        }
    }

    #[test]
    fn one_uid_cannot_take_every_slot_and_admins_keep_theirs() {
        let slots = Arc::new(Slots::new(10, 4, 2));
        let mut held: Vec<_> = (0..4)
            .map(|_| slots.take(&peer(1000), false).unwrap())
            .collect();
        assert_eq!(
            slots.take(&peer(1000), false).unwrap_err(),
            SlotRefusal::PerUid { uid: 1000, max: 4 }
        );
        held.extend((0..4).map(|_| slots.take(&peer(1001), false).unwrap()));
        // 8 of 10 held: the last 2 are for admins only.
        assert_eq!(
            slots.take(&peer(1002), false).unwrap_err(),
            SlotRefusal::KeptForAdmins { max: 10, kept: 2 }
        );
        held.push(slots.take(&peer(0), true).unwrap());
        held.push(slots.take(&peer(0), true).unwrap());
        assert_eq!(
            slots.take(&peer(0), true).unwrap_err(),
            SlotRefusal::Full { max: 10 }
        );
        // Slots come back when connections end.
        held.truncate(3);
        assert!(slots.take(&peer(1000), false).is_ok());
        drop(held);
        assert_eq!(slots.held.lock().total, 0);
        assert!(slots.held.lock().by_uid.is_empty());
    }

    #[test]
    fn the_answer_budget_never_overcommits_and_no_uid_takes_it_all() {
        let budget = AnswerBudget::new(100, 30);
        assert!(budget.reserve(1, 30));
        assert!(!budget.reserve(1, 1), "uid 1 holds its share");
        assert!(budget.reserve(2, 30));
        assert!(budget.reserve(3, 30));
        assert!(!budget.reserve(4, 11), "only 10 left");
        assert!(budget.reserve(4, 10));
        budget.release(1, 30);
        assert_eq!(budget.used(), 70);
        assert!(budget.reserve(1, 30));
        assert!(!budget.reserve(5, usize::MAX));
        for uid in 1..=4 {
            budget.release(uid, if uid == 4 { 10 } else { 30 });
        }
        assert_eq!(budget.used(), 0);
        assert!(budget.used.lock().by_uid.is_empty());
    }
}
