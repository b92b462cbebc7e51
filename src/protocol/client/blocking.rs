//! A blocking client for programs without an async runtime: a [`Connection`]
//! driven by a private single-threaded Tokio runtime.
//!
//! ```no_run
//! use rld::protocol::Acquire;
//! use rld::protocol::client::blocking::Client;
//!
//! let mut client = Client::connect("/run/rld/rld.sock")?;
//! let decision = client.acquire(Acquire::new("nightly-backup", "s3/upload").cost(10))?;
//! println!("allowed: {}", decision.is_allowed());
//! # Ok::<(), rld::protocol::ClientError>(())
//! ```

use std::path::Path;

use tokio::runtime::Runtime;

use super::{ClientError, Connection, ServerInfo};
use crate::protocol::{
    Acquire, BatchItem, Decision, HealthReport, Request, Response, RuleInfo, StatsReport,
};
use crate::rule::RuleSpec;

/// A blocking connection to rld. Not for use inside an async runtime.
#[derive(Debug)]
pub struct Client {
    runtime: Runtime,
    conn: Connection,
}

impl Client {
    /// Connects and performs the handshake.
    ///
    /// # Errors
    /// As [`Connection::connect`]; also if the runtime cannot be created.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let conn = runtime.block_on(Connection::connect(path))?;
        Ok(Client { runtime, conn })
    }

    /// The daemon's handshake answer.
    pub fn server(&self) -> &ServerInfo {
        self.conn.server()
    }

    /// See [`Connection::call`].
    ///
    /// # Errors
    /// As [`Connection::call`].
    pub fn call(&mut self, request: &Request<'_>) -> Result<Response<'static>, ClientError> {
        self.runtime.block_on(self.conn.call(request))
    }

    /// See [`Connection::acquire`].
    ///
    /// # Errors
    /// As [`Connection::call`].
    pub fn acquire(&mut self, acquire: Acquire<'_>) -> Result<Decision<'static>, ClientError> {
        self.runtime.block_on(self.conn.acquire(acquire))
    }

    /// See [`Connection::acquire_many`].
    ///
    /// # Errors
    /// As [`Connection::call`].
    pub fn acquire_many(
        &mut self,
        items: Vec<Acquire<'_>>,
    ) -> Result<Vec<BatchItem<'static>>, ClientError> {
        self.runtime.block_on(self.conn.acquire_many(items))
    }

    /// See [`Connection::rule_set`].
    ///
    /// # Errors
    /// As [`Connection::call`].
    pub fn rule_set(&mut self, rules: Vec<RuleSpec>) -> Result<u32, ClientError> {
        self.runtime.block_on(self.conn.rule_set(rules))
    }

    /// See [`Connection::rule_get`].
    ///
    /// # Errors
    /// As [`Connection::call`].
    pub fn rule_get(&mut self, id: &str) -> Result<RuleInfo, ClientError> {
        self.runtime.block_on(self.conn.rule_get(id))
    }

    /// See [`Connection::rule_list`].
    ///
    /// # Errors
    /// As [`Connection::call`].
    pub fn rule_list(&mut self) -> Result<Vec<RuleInfo>, ClientError> {
        self.runtime.block_on(self.conn.rule_list())
    }

    /// See [`Connection::rule_delete`].
    ///
    /// # Errors
    /// As [`Connection::call`].
    pub fn rule_delete(&mut self, id: &str) -> Result<(), ClientError> {
        self.runtime.block_on(self.conn.rule_delete(id))
    }

    /// See [`Connection::stats`].
    ///
    /// # Errors
    /// As [`Connection::call`].
    pub fn stats(&mut self) -> Result<StatsReport, ClientError> {
        self.runtime.block_on(self.conn.stats())
    }

    /// See [`Connection::health`].
    ///
    /// # Errors
    /// As [`Connection::call`].
    pub fn health(&mut self) -> Result<HealthReport, ClientError> {
        self.runtime.block_on(self.conn.health())
    }
}
