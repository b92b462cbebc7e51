//! Fair turns: how the runtime's workers are shared between connections
//! with a lot to decide.
//!
//! A connection decides at most [`TURN_ITEMS`] items per turn. The first
//! turn of each wake-up is free ([`FREE_ITEMS`]: a client sending one
//! request at a time never waits here); every further turn is taken from
//! [`Turns`], which lets at most one heavy turn per worker run at once and
//! hands turns out round-robin by uid, first come first served within a
//! uid. So one connection's batches cannot hold a worker, a uid with 512
//! busy connections gets the same service as a uid with one, and a light
//! client waits behind at most one heavy turn per worker (tens of
//! microseconds), however many connections are flooding.
//!
//! One lock per heavy turn (hundreds of decisions), none on a free turn.

use std::collections::VecDeque;

use hashbrown::HashMap;
use parking_lot::Mutex;
use tokio::sync::oneshot;

/// Items a connection decides in the first turn of a wake-up, without a
/// heavy turn.
pub const FREE_ITEMS: usize = 64;
/// Items a heavy turn decides (about 50 to 100 microseconds of work).
pub const TURN_ITEMS: usize = 512;

/// Heavy turns: at most one running per worker, handed out round-robin by
/// uid.
#[derive(Debug)]
pub struct Turns {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    free: usize,
    /// Connections waiting for a turn, per uid, in arrival order.
    waiting: HashMap<u32, VecDeque<oneshot::Sender<()>>>,
    /// Uids with a connection waiting, in the order they are served.
    order: VecDeque<u32>,
}

impl Turns {
    /// `workers` heavy turns may run at once.
    pub fn new(workers: usize) -> Turns {
        Turns {
            state: Mutex::new(State {
                free: workers.max(1),
                waiting: HashMap::new(),
                order: VecDeque::new(),
            }),
        }
    }

    /// Waits for a heavy turn for a connection of `uid`; give it back with
    /// [`Turns::end`]. Cancel-safe: a turn handed to a waiter that is gone
    /// is given on.
    pub async fn take(&self, uid: u32) {
        let rx = {
            let mut guard = self.state.lock();
            let s = &mut *guard;
            if s.free > 0 && s.order.is_empty() {
                s.free -= 1;
                return;
            }
            let (tx, rx) = oneshot::channel();
            let queue = s.waiting.entry(uid).or_default();
            if queue.is_empty() {
                s.order.push_back(uid);
            }
            queue.push_back(tx);
            rx
        };
        let mut waiting = Waiting {
            rx,
            turns: self,
            done: false,
        };
        let _ = (&mut waiting.rx).await;
        waiting.done = true;
    }

    /// Gives a turn back: to the next uid in line, else to the free ones.
    pub fn end(&self) {
        let mut guard = self.state.lock();
        let s = &mut *guard;
        while let Some(uid) = s.order.pop_front() {
            let Some(queue) = s.waiting.get_mut(&uid) else {
                continue;
            };
            let next = queue.pop_front();
            if queue.is_empty() {
                s.waiting.remove(&uid);
            } else {
                s.order.push_back(uid);
            }
            if let Some(tx) = next
                && tx.send(()).is_ok()
            {
                return;
            }
        }
        s.free += 1;
    }

    /// Connections waiting for a turn.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.state.lock().waiting.values().map(VecDeque::len).sum()
    }
}

/// A wait for a turn; a turn handed over after the waiter was dropped goes
/// back.
struct Waiting<'a> {
    rx: oneshot::Receiver<()>,
    turns: &'a Turns,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.rx.close();
            if self.rx.try_recv().is_ok() {
                self.turns.end();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(flavor = "current_thread")]
    async fn turns_go_round_robin_by_uid() {
        let turns = Arc::new(Turns::new(1));
        turns.take(0).await; // held by a connection of uid 0
        let served = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Uid 1 queues four connections, then uid 2 one.
        for (i, uid) in [1u32, 1, 1, 1, 2].into_iter().enumerate() {
            let (turns, served) = (Arc::clone(&turns), Arc::clone(&served));
            tasks.push(tokio::spawn(async move {
                turns.take(uid).await;
                served.lock().push((uid, i));
                turns.end();
            }));
            tokio::task::yield_now().await;
        }
        assert_eq!(turns.waiting(), 5);
        turns.end();
        for t in tasks {
            t.await.unwrap();
        }
        // Uid 2 is served second, not after all of uid 1's connections.
        let order: Vec<u32> = served.lock().iter().map(|s| s.0).collect();
        assert_eq!(order, vec![1, 2, 1, 1, 1]);
        assert_eq!(turns.waiting(), 0);
        // Every turn came back.
        turns.take(9).await;
        assert_eq!(turns.state.lock().free, 0);
        turns.end();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_waiter_that_gives_up_loses_no_turn() {
        let turns = Arc::new(Turns::new(1));
        turns.take(0).await;
        let t = Arc::clone(&turns);
        let waiter = tokio::spawn(async move { t.take(1).await });
        tokio::task::yield_now().await;
        assert_eq!(turns.waiting(), 1);
        waiter.abort();
        let _ = waiter.await;
        turns.end();
        // The turn is free again, whichever way the abort raced the hand-over.
        assert_eq!(turns.state.lock().free, 1);
    }
}
