//! rld: a rate limiter daemon answering local apps over a Unix socket.

pub mod cli;
pub mod daemon;
pub mod protocol;
pub mod rule;
