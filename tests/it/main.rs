//! Integration tests: one binary, shared harness (`harness.rs`).

mod harness;

mod audit;
mod bad_input;
mod cli;
mod client;
mod decisions;
mod docs;
mod etcd_security;
mod eviction;
mod faults;
mod fuzz;
mod global;
mod limits;
mod metrics;
mod ops;
mod persistence;
mod stacked;
mod traces;
mod wire;
