//! A bounded fuzz run: frames from the man page's test vectors, mutated (bits
//! flipped, cut, extended, spliced, length prefixes rewritten) or random, sent
//! on many connections. The daemon must answer only with frames that decode,
//! close every connection once the peer is done, keep serving a bystander,
//! and keep its config rules. `scripts/fuzz` runs it longer
//! (`RLD_FUZZ_FRAMES`, `RLD_FUZZ_SEED`).

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use rld::protocol::codec::decode_response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::harness::{TestDaemon, rule};
use crate::wire::page_vectors;

const HELLO: [u8; 7] = [0, 0, 0, 3, 1, 0, 1];

/// One fuzzed frame (or a few bytes of garbage) from the vectors.
fn mutate(rng: &mut SmallRng, vectors: &[Vec<u8>]) -> Vec<u8> {
    let mut frame = vectors[rng.random_range(0..vectors.len())].clone();
    match rng.random_range(0..7) {
        0 => {
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..frame.len());
                frame[i] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => frame.truncate(rng.random_range(0..frame.len())),
        2 => frame.extend((0..rng.random_range(1..32)).map(|_| rng.random::<u8>())),
        3 => {
            // The body of another vector under this one's length prefix.
            let other = &vectors[rng.random_range(0..vectors.len())];
            frame.truncate(4);
            frame.extend_from_slice(&other[4.min(other.len())..]);
        }
        4 => {
            let len: u32 = match rng.random_range(0..3) {
                0 => rng.random(),
                1 => rng.random_range(0..70_000),
                _ => (frame.len() as u32).saturating_sub(4) + rng.random_range(0..3) - 1,
            };
            frame[..4].copy_from_slice(&len.to_be_bytes());
        }
        5 => {
            // A valid length prefix over random body bytes.
            let body: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
            frame = (body.len() as u32).to_be_bytes().to_vec();
            frame.extend(body);
        }
        // A varint stretched past its canonical length.
        6 if frame.len() > 5 => {
            let i = rng.random_range(4..frame.len());
            frame[i] |= 0x80;
        }
        _ => {} // an intact vector (perhaps a response sent as a request)
    }
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_frames_never_crash_wedge_or_garble() {
    // Seconds of full load: not alongside the timing-sensitive fault tests.
    let _heavy = crate::harness::HEAVY.write().await;
    let frames: usize = std::env::var("RLD_FUZZ_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let seed: u64 = std::env::var("RLD_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let d = TestDaemon::start(vec![rule(
        "base",
        "*",
        "*",
        1_000_000,
        Duration::from_secs(1),
    )])
    .await;
    let vectors: Vec<Vec<u8>> = page_vectors().into_values().collect();
    assert!(vectors.len() >= 18, "the man page's vectors");
    // Valid requests (Hello aside) keep a connection going between mutations.
    let requests: Vec<Vec<u8>> = vectors
        .iter()
        .filter(|v| v.len() > 4 && v[..] != HELLO)
        .filter(|v| rld::protocol::codec::decode_request(&v[4..]).is_ok())
        .cloned()
        .collect();
    assert!(requests.len() >= 8, "request vectors: {}", requests.len());
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut bystander = d.connect().await;
    let (mut sent, mut connections, mut answers) = (0usize, 0usize, 0usize);
    while sent < frames {
        let mut bytes = Vec::new();
        if rng.random_bool(0.8) {
            bytes.extend_from_slice(&HELLO);
        }
        let n = rng.random_range(1..40).min(frames - sent);
        for _ in 0..n {
            if rng.random_bool(0.1) {
                bytes.extend(mutate(&mut rng, &vectors));
            } else {
                bytes.extend_from_slice(&requests[rng.random_range(0..requests.len())]);
            }
        }
        sent += n;
        connections += 1;
        let mut s = UnixStream::connect(&d.socket).await.unwrap();
        // The daemon may close early (a bad frame): then writing fails.
        let _ = s.write_all(&bytes).await;
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        assert!(
            read.is_ok(),
            "seed {seed}, connection {connections}: not closed 10 s after the peer was done; sent {bytes:02x?}"
        );
        // Every answer is a whole frame that decodes.
        let mut rest = &out[..];
        while rest.len() >= 4 {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            assert!(rest.len() >= 4 + len, "seed {seed}: a cut answer frame");
            decode_response(&rest[4..4 + len]).unwrap_or_else(|e| {
                panic!(
                    "seed {seed}: an answer that does not decode ({e}): {:02x?}",
                    &rest[..4 + len]
                )
            });
            rest = &rest[4 + len..];
            answers += 1;
        }
        assert!(rest.is_empty(), "seed {seed}: trailing bytes {rest:02x?}");
        if connections % 50 == 0 {
            let health = tokio::time::timeout(Duration::from_secs(5), bystander.health()).await;
            assert!(
                matches!(health, Ok(Ok(_))),
                "seed {seed}: the bystander is served"
            );
        }
    }
    let stats = bystander.stats().await.unwrap();
    eprintln!(
        "fuzz: seed {seed}: {sent} frames on {connections} connections, {answers} answers, \
         {} protocol errors",
        stats.protocol_errors
    );
    assert!(
        stats.protocol_errors > 0,
        "the mutations reached the decoder"
    );
    assert!(
        bystander.rule_get("base").await.is_ok(),
        "config rules cannot be changed over the socket"
    );
}
