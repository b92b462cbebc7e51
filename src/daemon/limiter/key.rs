//! The key of a bucket: (client, resource) as `client_len: u16 LE`, client
//! bytes, resource bytes. Keys up to [`INLINE`] bytes live inside the table
//! entry (no allocation, and no extra cache miss per lookup); longer ones are
//! boxed. No I/O, no locks.

use std::hash::BuildHasher;

/// Longest encoded key stored inline.
pub const INLINE: usize = 22;

/// A (client, resource) pair, compact.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BucketKey {
    Inline { len: u8, bytes: [u8; INLINE] },
    Boxed(Box<[u8]>),
}

impl BucketKey {
    /// Encodes a pair. Names are at most 512 bytes, so the length fits a `u16`.
    pub fn new(client: &str, resource: &str) -> BucketKey {
        let len = 2 + client.len() + resource.len();
        let write = |out: &mut [u8]| {
            out[..2].copy_from_slice(&(client.len() as u16).to_le_bytes());
            out[2..2 + client.len()].copy_from_slice(client.as_bytes());
            out[2 + client.len()..len].copy_from_slice(resource.as_bytes());
        };
        if len <= INLINE {
            let mut bytes = [0u8; INLINE];
            write(&mut bytes);
            BucketKey::Inline {
                len: len as u8,
                bytes,
            }
        } else {
            let mut bytes = vec![0u8; len].into_boxed_slice();
            write(&mut bytes);
            BucketKey::Boxed(bytes)
        }
    }

    /// Heap bytes this key holds beyond the table entry: none inline; a boxed
    /// key's allocation as glibc sizes it (length plus an 8-byte header,
    /// rounded up to 16, at least 32).
    pub fn heap_bytes(&self) -> usize {
        match self {
            BucketKey::Inline { .. } => 0,
            BucketKey::Boxed(b) => (b.len() + 8).next_multiple_of(16).max(32),
        }
    }

    /// The encoded key (`client_len: u16 LE`, client, resource): stable across
    /// hosts, so it names the global bucket in etcd too.
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        match self {
            BucketKey::Inline { len, bytes } => &bytes[..usize::from(*len)],
            BucketKey::Boxed(b) => b,
        }
    }

    /// Whether this is the key of (client, resource).
    #[inline]
    pub fn matches(&self, client: &str, resource: &str) -> bool {
        let b = self.bytes();
        b.len() == 2 + client.len() + resource.len()
            && b[..2] == (client.len() as u16).to_le_bytes()
            && &b[2..2 + client.len()] == client.as_bytes()
            && &b[2 + client.len()..] == resource.as_bytes()
    }

    /// The (client, resource) pair.
    pub fn names(&self) -> (&str, &str) {
        let b = self.bytes();
        let split = 2 + usize::from(u16::from_le_bytes([b[0], b[1]]));
        let text = |b| std::str::from_utf8(b).expect("keys are built from str");
        (text(&b[2..split]), text(&b[split..]))
    }
}

/// The hash of a bucket's names. A bucket keyed per (client, resource) is
/// named by both (and may change rules as rules change); a stacked bucket
/// (keyed per client, per resource or not at all: the other names empty,
/// which no request's are) belongs to one rule, whose id is mixed in.
#[inline]
pub fn bucket_hash(
    hasher: &hashbrown::DefaultHashBuilder,
    rule: &str,
    client: &str,
    resource: &str,
) -> u64 {
    if client.is_empty() || resource.is_empty() {
        hasher.hash_one((rule, client, resource))
    } else {
        hasher.hash_one((client, resource))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_inline_and_long_ones_boxed() {
        assert_eq!(std::mem::size_of::<BucketKey>(), 24);
        let short = BucketKey::new("client-12345", "api/x");
        assert!(matches!(short, BucketKey::Inline { .. }));
        assert_eq!(short.names(), ("client-12345", "api/x"));
        let long = BucketKey::new("a-rather-long-client-name", "resource");
        assert!(matches!(long, BucketKey::Boxed(_)));
        assert_eq!(long.names(), ("a-rather-long-client-name", "resource"));
        assert!(long.matches("a-rather-long-client-name", "resource"));
    }

    #[test]
    fn the_split_point_is_part_of_the_key() {
        let k = BucketKey::new("ab", "c");
        assert!(k.matches("ab", "c"));
        assert!(!k.matches("a", "bc"));
        assert!(!k.matches("ab", "cd"));
        let empty_resource = BucketKey::new("abc", "");
        assert_eq!(empty_resource.names(), ("abc", ""));
    }
}
