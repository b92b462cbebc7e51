//! A runnable client: asks rld for decisions and prints them.
//!
//! ```sh
//! scripts/run-daemon --socket /tmp/rld.sock &
//! cargo run --example client -- --socket /tmp/rld.sock alice api/search 3
//! ```
//!
//! Shows the three ways to talk to rld: the shared async [`Client`] (one
//! request at a time from many tasks), a pipelined batch on a [`Connection`],
//! and the blocking client.

use std::path::PathBuf;

use rld::protocol::client::blocking;
use rld::protocol::{Acquire, BatchItem, Client, ClientError, Connection, Priority};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), ClientError> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let socket = match args.iter().position(|a| a == "--socket") {
        Some(i) => {
            args.remove(i);
            PathBuf::from(args.remove(i))
        }
        None => rld::protocol::client_socket_path(),
    };
    let client_id = args.first().cloned().unwrap_or_else(|| "alice".into());
    let resource = args.get(1).cloned().unwrap_or_else(|| "api/search".into());
    let count: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(3);

    // 1. The shared client: cheap to clone into every task.
    let client = Client::connect(&socket).await?;
    let d = client
        .acquire(Acquire::new(client_id.as_str(), resource.as_str()).priority(Priority::High))
        .await?;
    println!(
        "single: allowed={} remaining={} retry_after={}ms rule={:?}",
        d.is_allowed(),
        d.remaining,
        d.retry_after_ns / 1_000_000,
        d.rule
    );

    // 2. A batch: `count` decisions in one frame, one round trip.
    let mut conn = Connection::connect(&socket).await?;
    let items = (0..count)
        .map(|_| Acquire::new(client_id.as_str(), resource.as_str()))
        .collect();
    for (i, item) in conn.acquire_many(items).await?.iter().enumerate() {
        match item {
            BatchItem::Decision(d) => println!("batch[{i}]: {:?}, {} left", d.outcome, d.remaining),
            BatchItem::Error(e) => println!("batch[{i}]: error {e}"),
        }
    }

    // 3. The blocking client, for code without an async runtime.
    let socket2 = socket.clone();
    let handle = std::thread::spawn(move || -> Result<String, ClientError> {
        let mut c = blocking::Client::connect(&socket2)?;
        Ok(format!("{:?}", c.health()?.state))
    });
    println!("blocking health: {}", handle.join().expect("thread")?);
    Ok(())
}
