//! The daemon.
pub mod limiter;
