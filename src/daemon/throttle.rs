//! Rate-limited logging: a line that a client can trigger at will (a refused
//! admin request, a failing accept) is logged at most a few times a second,
//! and the next line logged says how many were suppressed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Lines logged per second at most, per throttle.
const LINES_PER_SECOND: u64 = 5;

/// One throttled log site (`static` next to the log call).
#[derive(Debug)]
pub struct LogThrottle {
    /// The current second (since the epoch) << 16 | lines logged in it.
    slot: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    pub const fn new() -> LogThrottle {
        LogThrottle {
            slot: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one logged)` when this line may
    /// be logged now; `None` (and counted) when it must be dropped.
    pub fn allow(&self) -> Option<u64> {
        let second = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.allow_at(second)
    }

    fn allow_at(&self, second: u64) -> Option<u64> {
        let next = self
            .slot
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |slot| {
                if slot >> 16 != second {
                    Some(second << 16 | 1)
                } else if slot & 0xffff < LINES_PER_SECOND {
                    Some(slot + 1)
                } else {
                    None
                }
            });
        if next.is_ok() {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

impl Default for LogThrottle {
    fn default() -> Self {
        LogThrottle::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_lines_a_second_and_the_rest_counted() {
        let t = LogThrottle::new();
        let logged = (0..1000).filter(|_| t.allow_at(7).is_some()).count();
        assert_eq!(logged as u64, LINES_PER_SECOND);
        assert_eq!(t.allow_at(8), Some(1000 - LINES_PER_SECOND));
        assert_eq!(t.allow_at(8), Some(0));
    }
}
