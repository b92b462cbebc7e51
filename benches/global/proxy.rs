//! A TCP proxy in front of each etcd member that holds every chunk of
//! bytes for a fixed delay in each direction (as between zones): the
//! daemons reach etcd through it, the latency between them grows by twice
//! the delay per round trip. Order is kept: each direction is one queue.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Listening proxies; stopped when the runtime is.
pub struct DelayProxy {
    /// Endpoints to give the daemons instead of etcd's.
    pub endpoints: String,
}

impl DelayProxy {
    /// One proxy per member of `endpoints` (http://host:port,...), each on a
    /// loopback port of the kernel's choice.
    pub fn start(rt: &tokio::runtime::Runtime, endpoints: &str, delay: Duration) -> DelayProxy {
        let mut out = Vec::new();
        for endpoint in endpoints.split(',') {
            let target: SocketAddr = endpoint
                .trim_start_matches("http://")
                .parse()
                .expect("an etcd endpoint");
            let listener = rt
                .block_on(TcpListener::bind("127.0.0.1:0"))
                .expect("bind a proxy port");
            out.push(format!(
                "http://{}",
                listener.local_addr().expect("address")
            ));
            rt.spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let Ok(upstream) = TcpStream::connect(target).await else {
                            return;
                        };
                        let (cr, cw) = client.into_split();
                        let (ur, uw) = upstream.into_split();
                        tokio::spawn(pipe(cr, uw, delay));
                        tokio::spawn(pipe(ur, cw, delay));
                    });
                }
            });
        }
        DelayProxy {
            endpoints: out.join(","),
        }
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let at = tokio::time::Instant::now() + delay;
                if tx.send((at, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
