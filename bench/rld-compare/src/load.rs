//! One load generator for every target, so client cost is the same: closed
//! loop, `pipeline` requests in flight per connection, each wake-up parses
//! every complete answer, refills and writes once. Requests are encoded and
//! answers parsed by hand (length-prefixed postcard for rld, RESP for Redis)
//! with no allocation per request.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{BufMut, BytesMut};
use rld::daemon::metrics::{LatencyHistogram, LocalHistogram};
use rld::protocol::codec::encode;
use rld::protocol::{Acquire, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::keys::KeyChooser;

/// What a request looks like on the wire.
#[derive(Debug, Clone)]
pub enum Wire {
    /// rld `Acquire`, or `AcquireMany` of `batch` items when above 1.
    Rld { batch: usize },
    /// `EVALSHA <sha> 1 <key> <rate> <burst> 1` of the Lua token bucket
    /// (numbers pre-rendered, so encoding allocates nothing).
    RedisLua {
        sha: String,
        rate: String,
        burst: String,
    },
    /// `CL.THROTTLE <key> <burst-1> <rate> 1 1` of redis-cell.
    RedisCell { max_burst: String, rate: String },
}

impl Wire {
    /// Decisions per request.
    pub fn batch(&self) -> usize {
        match self {
            Wire::Rld { batch } => *batch,
            _ => 1,
        }
    }

    fn encode(&self, keys: &mut KeyChooser, id: u64, out: &mut BytesMut) {
        match self {
            Wire::Rld { batch: 1 } => {
                let req = Request::Acquire(Acquire::new(keys.next(), "bench"));
                encode(&(id, &req), out).expect("bench requests fit in a frame");
            }
            Wire::Rld { batch } => {
                let items = (0..*batch)
                    .map(|_| Acquire::new(keys.next(), "bench"))
                    .collect();
                encode(&(id, &Request::AcquireMany(items)), out).expect("fits in a frame");
            }
            Wire::RedisLua { sha, rate, burst } => {
                resp(out, &["EVALSHA", sha, "1", keys.next(), rate, burst, "1"]);
            }
            Wire::RedisCell { max_burst, rate } => {
                resp(
                    out,
                    &["CL.THROTTLE", keys.next(), max_burst, rate, "1", "1"],
                );
            }
        }
    }

    /// Parses one complete answer at the start of `buf`: (bytes, allowed).
    fn parse(&self, buf: &[u8]) -> anyhow::Result<Option<(usize, u64)>> {
        match self {
            Wire::Rld { .. } => parse_rld(buf),
            Wire::RedisLua { .. } => Ok(parse_resp_int(buf)?.map(|(n, v)| (n, u64::from(v == 1)))),
            Wire::RedisCell { .. } => parse_cell(buf),
        }
    }
}

fn resp(out: &mut BytesMut, parts: &[&str]) {
    out.put_u8(b'*');
    put_decimal(out, parts.len());
    out.put_slice(b"\r\n");
    for p in parts {
        out.put_u8(b'$');
        put_decimal(out, p.len());
        out.put_slice(b"\r\n");
        out.put_slice(p.as_bytes());
        out.put_slice(b"\r\n");
    }
}

fn put_decimal(out: &mut BytesMut, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[i..]);
}

/// Reads a LEB128 varint.
fn varint(buf: &[u8], at: &mut usize) -> anyhow::Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at).context("truncated varint")?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    bail!("varint too long")
}

/// Skips a decision after its outcome byte; returns whether it allowed.
fn decision(buf: &[u8], at: &mut usize) -> anyhow::Result<bool> {
    let outcome = varint(buf, at)?;
    for _ in 0..4 {
        varint(buf, at)?; // limit, remaining, retry_after, reset_after
    }
    let rule_len = varint(buf, at)? as usize;
    *at += rule_len;
    Ok(outcome != 1)
}

/// An rld answer: a frame holding `Decision` (variant 1) or `Decisions` (2),
/// read field by field without allocating (see rld-protocol(7)).
fn parse_rld(buf: &[u8]) -> anyhow::Result<Option<(usize, u64)>> {
    let Some(header) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*header) as usize;
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let body = &buf[4..4 + len];
    let mut at = 0;
    varint(body, &mut at)?; // id
    let allowed = match varint(body, &mut at)? {
        1 => u64::from(decision(body, &mut at)?),
        2 => {
            let mut allowed = 0;
            for _ in 0..varint(body, &mut at)? {
                match varint(body, &mut at)? {
                    0 => allowed += u64::from(decision(body, &mut at)?),
                    _ => bail!("rld answered an error item"),
                }
            }
            allowed
        }
        v => bail!(
            "rld answered variant {v}: {:?}",
            rld::protocol::codec::decode_response(body)
        ),
    };
    Ok(Some((4 + len, allowed)))
}

fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..end], end + 2))
}

fn parse_resp_int(buf: &[u8]) -> anyhow::Result<Option<(usize, i64)>> {
    let Some((l, n)) = line(buf) else {
        return Ok(None);
    };
    match l.first() {
        Some(b':') => Ok(Some((n, std::str::from_utf8(&l[1..])?.parse()?))),
        _ => bail!("redis answered {:?}", String::from_utf8_lossy(l)),
    }
}

/// `*5` then five integers; the first is 0 when allowed.
fn parse_cell(buf: &[u8]) -> anyhow::Result<Option<(usize, u64)>> {
    let Some((l, mut at)) = line(buf) else {
        return Ok(None);
    };
    if l != b"*5" {
        bail!("redis-cell answered {:?}", String::from_utf8_lossy(l));
    }
    let mut first = None;
    for _ in 0..5 {
        let Some((n, v)) = parse_resp_int(&buf[at..])? else {
            return Ok(None);
        };
        first.get_or_insert(v);
        at += n;
    }
    Ok(Some((at, u64::from(first == Some(0)))))
}

/// What one load run measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub decisions: u64,
    pub allowed: u64,
    pub elapsed: Duration,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl LoadResult {
    pub fn per_sec(&self) -> f64 {
        self.decisions as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `connections` closed loops for `duration` against `socket`.
pub async fn run(
    socket: &Path,
    wire: &Wire,
    connections: usize,
    pipeline: usize,
    keys: &KeyChooser,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let hist = Arc::new(LatencyHistogram::default());
    let mut streams = Vec::new();
    for _ in 0..connections {
        let mut s = UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        match wire {
            Wire::Rld { .. } => {
                s.write_all(&[0, 0, 0, 3, 0, 0, 1]).await?; // Hello id 0, version 1
                let mut reply = [0u8; 4];
                s.read_exact(&mut reply).await?;
                let mut body = vec![0u8; u32::from_be_bytes(reply) as usize];
                s.read_exact(&mut body).await?;
            }
            // redis-cell keeps strings and the Lua bucket hashes under the
            // same names: give each its own database.
            Wire::RedisCell { .. } => {
                s.write_all(b"*2\r\n$6\r\nSELECT\r\n$1\r\n1\r\n").await?;
                let mut ok = [0u8; 5];
                s.read_exact(&mut ok).await?;
                if &ok != b"+OK\r\n" {
                    bail!("SELECT 1 answered {:?}", String::from_utf8_lossy(&ok));
                }
            }
            Wire::RedisLua { .. } => {}
        }
        streams.push(s);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for (i, s) in streams.into_iter().enumerate() {
        let wire = wire.clone();
        let hist = Arc::clone(&hist);
        let keys = keys.fork(i as u64);
        tasks.push(tokio::spawn(connection(
            s, wire, pipeline, keys, deadline, hist,
        )));
    }
    let (mut decisions, mut allowed) = (0, 0);
    for t in tasks {
        let (d, a) = t.await??;
        decisions += d;
        allowed += a;
    }
    let summary = hist.summary();
    Ok(LoadResult {
        decisions,
        allowed,
        elapsed: start.elapsed(),
        p50_us: summary.p50_ns as f64 / 1000.0,
        p99_us: summary.p99_ns as f64 / 1000.0,
    })
}

async fn connection(
    mut s: UnixStream,
    wire: Wire,
    pipeline: usize,
    mut keys: KeyChooser,
    deadline: Instant,
    hist: Arc<LatencyHistogram>,
) -> anyhow::Result<(u64, u64)> {
    let mut latency = LocalHistogram::default();
    let mut sent: VecDeque<Instant> = VecDeque::with_capacity(pipeline);
    let mut out = BytesMut::with_capacity(4096);
    let mut inbuf = vec![0u8; 64 * 1024];
    let (mut filled, mut id) = (0usize, 1u64);
    let (mut decisions, mut allowed) = (0u64, 0u64);
    for _ in 0..pipeline {
        wire.encode(&mut keys, id, &mut out);
        id += 1;
        sent.push_back(Instant::now());
    }
    s.write_all(&out).await?;
    out.clear();
    while !sent.is_empty() {
        if filled == inbuf.len() {
            inbuf.resize(inbuf.len() * 2, 0);
        }
        let n = s.read(&mut inbuf[filled..]).await?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        filled += n;
        let mut at = 0;
        let now = Instant::now();
        while let Some((used, ok)) = wire.parse(&inbuf[at..filled])? {
            at += used;
            let t = sent.pop_front().context("an answer without a request")?;
            latency.record(now.duration_since(t).as_nanos() as u64);
            decisions += wire.batch() as u64;
            allowed += ok;
            if now < deadline {
                wire.encode(&mut keys, id, &mut out);
                id += 1;
                sent.push_back(now);
            }
        }
        inbuf.copy_within(at..filled, 0);
        filled -= at;
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
    }
    latency.merge_into(&hist);
    Ok((decisions, allowed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rld_answers_like_the_codec() {
        use rld::protocol::{Decision, Outcome, Response, ResponseFrame};
        let d = |outcome| Decision {
            outcome,
            limit: 1000,
            remaining: 5,
            retry_after_ns: 0,
            reset_after_ns: 123_456,
            rule: "bench".into(),
        };
        let mut buf = BytesMut::new();
        let one = ResponseFrame {
            id: 9,
            response: Response::Decision(d(Outcome::Denied)),
        };
        encode(&one, &mut buf).unwrap();
        assert_eq!(parse_rld(&buf).unwrap(), Some((buf.len(), 0)));
        let mut buf = BytesMut::new();
        let items = vec![
            rld::protocol::BatchItem::Decision(d(Outcome::Allowed)),
            rld::protocol::BatchItem::Decision(d(Outcome::Denied)),
            rld::protocol::BatchItem::Decision(d(Outcome::Bypassed)),
        ];
        encode(
            &ResponseFrame {
                id: 300,
                response: Response::Decisions(items),
            },
            &mut buf,
        )
        .unwrap();
        assert_eq!(parse_rld(&buf).unwrap(), Some((buf.len(), 2)));
        assert_eq!(parse_rld(&buf[..buf.len() - 1]).unwrap(), None);
    }

    #[test]
    fn encodes_resp_commands() {
        let mut out = BytesMut::new();
        resp(&mut out, &["CL.THROTTLE", "k", "14"]);
        assert_eq!(
            &out[..],
            b"*3\r\n$11\r\nCL.THROTTLE\r\n$1\r\nk\r\n$2\r\n14\r\n"
        );
    }

    #[test]
    fn parses_resp_answers() {
        assert_eq!(parse_resp_int(b":1\r\n").unwrap(), Some((4, 1)));
        assert_eq!(parse_resp_int(b":1\r").unwrap(), None);
        let cell = b"*5\r\n:0\r\n:16\r\n:15\r\n:-1\r\n:2\r\n";
        assert_eq!(parse_cell(cell).unwrap(), Some((cell.len(), 1)));
        assert_eq!(parse_cell(&cell[..10]).unwrap(), None);
        assert!(parse_resp_int(b"-ERR no\r\n").is_err());
    }
}
