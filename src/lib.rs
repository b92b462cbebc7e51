//! rld: a rate limiter daemon that answers local applications over a Unix
//! socket in microseconds.
//!
//! # Module map
//!
//! * [`protocol`]: the wire format (frames, messages, error codes, versions)
//!   and the clients that speak it: [`protocol::Connection`] (one task,
//!   explicit pipelining), [`protocol::Client`] (shared by many tasks) and
//!   [`protocol::client::blocking::Client`].
//! * [`rule`]: what a rule says, how it is validated, and its TOML syntax.
//! * [`daemon`]: the `rld` process: configuration, listener, connections, the
//!   limiter core ([`daemon::limiter`]), the rule book (layers, persistence),
//!   the eviction sweeper, metrics, signals; with etcd, the cluster side
//!   ([`daemon::cluster`]: membership, health, rules in etcd) and the lease
//!   coordinator ([`daemon::lease`]) that feeds global rules' buckets.
//! * [`cli`]: the `rlctl` commands.
//!
//! # The life of one acquire
//!
//! 1. An application sends `Acquire { client, resource, cost, priority, trace }`
//!    in one length-prefixed frame (often many frames per write: pipelining).
//! 2. The connection task (`daemon::conn`) splits every complete frame out of
//!    its read buffer and decodes it, borrowing the strings from the buffer.
//! 3. It calls [`daemon::limiter::Limiter::acquire`], a synchronous function:
//!    hash (client, resource) once, lock one of many shards, find the bucket
//!    (resolving the most specific rule only for a new bucket or after a rule
//!    change), run the GCRA arithmetic on one integer, count, unlock. No I/O,
//!    no `.await`, no global lock, no allocation for an existing bucket.
//!    A bucket of a global rule spends tokens leased from etcd instead, and
//!    only nudges the lease coordinator (`try_send`) when it runs low.
//! 4. The decision (allowed, limit, remaining, retry-after, reset-after, rule
//!    id) is encoded straight into the connection's write buffer; all answers
//!    of one wake-up leave in one write.
//!
//! ```no_run
//! # async fn demo() -> Result<(), rld::protocol::ClientError> {
//! use rld::protocol::{Acquire, Client, Priority};
//! let client = Client::connect("/run/rld/rld.sock").await?;
//! let d = client.acquire(Acquire::new("tenant-42", "api/search").priority(Priority::High)).await?;
//! println!("allowed={} remaining={} rule={}", d.is_allowed(), d.remaining, d.rule);
//! # Ok(()) }
//! ```

#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "daemon")]
pub mod daemon;
pub mod protocol;
pub mod rule;
