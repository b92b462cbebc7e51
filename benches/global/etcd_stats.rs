//! What etcd itself did during a run, from its members' Prometheus
//! endpoints (the client URL serves `/metrics`): keys put and deleted,
//! transactions, raft proposals committed, database size. Every member
//! applies every write, so one member's counters are the cluster's.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Counters of one member at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct EtcdCounters {
    pub puts: f64,
    pub deletes: f64,
    pub txns: f64,
    pub proposals: f64,
    pub db_bytes: f64,
}

impl EtcdCounters {
    /// Reads the first member of `endpoints` that answers.
    pub fn read(endpoints: &str) -> EtcdCounters {
        for endpoint in endpoints.split(',') {
            if let Some(text) = get_metrics(endpoint) {
                return parse(&text);
            }
        }
        EtcdCounters::default()
    }

    /// `after - self`, per second over `secs` (the size as of `after`).
    pub fn rates(&self, after: &EtcdCounters, secs: f64) -> EtcdCounters {
        let per = |a: f64, b: f64| (b - a) / secs.max(1e-9);
        EtcdCounters {
            puts: per(self.puts, after.puts),
            deletes: per(self.deletes, after.deletes),
            txns: per(self.txns, after.txns),
            proposals: per(self.proposals, after.proposals),
            db_bytes: after.db_bytes,
        }
    }
}

fn get_metrics(endpoint: &str) -> Option<String> {
    let addr = endpoint.strip_prefix("http://")?;
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

fn parse(text: &str) -> EtcdCounters {
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    EtcdCounters {
        puts: value("etcd_mvcc_put_total"),
        deletes: value("etcd_mvcc_delete_total"),
        txns: value("etcd_mvcc_txn_total"),
        proposals: value("etcd_server_proposals_committed_total"),
        db_bytes: value("etcd_mvcc_db_total_size_in_bytes"),
    }
}
