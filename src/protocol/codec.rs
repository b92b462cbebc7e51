//! Framing: a 4-byte big-endian length, then that many bytes of postcard.
//!
//! [`FrameCodec`] splits frames out of a read buffer, refusing any above an
//! explicit maximum; [`encode`] appends one frame to a write buffer;
//! [`decode_request`] and [`decode_response`] turn frame bodies into messages.
//! No sockets here and no allocation on the request path: requests borrow from
//! the frame, encoding writes straight into the caller's buffer.

use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;

use super::message::{REQUEST_VARIANTS, RequestFrame, ResponseFrame};
use super::{MAX_RESPONSE_FRAME, ProtocolError};

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Splits length-prefixed frames out of a byte stream.
///
/// Stateless: it only looks at the buffer, so it can name the announced length
/// of an oversized frame before any of its body arrives.
///
/// ```
/// use bytes::BytesMut;
/// use rld::protocol::codec::{FrameCodec, encode};
/// use rld::protocol::{Request, RequestFrame};
///
/// let mut buf = BytesMut::new();
/// encode(&RequestFrame { id: 7, request: Request::Stats }, &mut buf).unwrap();
/// assert_eq!(&buf[..], &[0, 0, 0, 2, 7, 7]);
/// let frame = FrameCodec::new(64).decode_frame(&mut buf).unwrap().unwrap();
/// assert_eq!(&frame[..], &[7, 7]);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_frame: usize,
}

impl FrameCodec {
    /// A codec refusing frames longer than `max_frame` bytes (header excluded).
    pub fn new(max_frame: usize) -> FrameCodec {
        FrameCodec { max_frame }
    }

    /// Takes the next complete frame body out of `buf`, or `None` if more bytes
    /// are needed (reserving room for them).
    ///
    /// # Errors
    /// [`ProtocolError::FrameTooLarge`] as soon as a header announces a frame
    /// above the maximum (the stream cannot be resynchronised after that).
    pub fn decode_frame(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, ProtocolError> {
        let Some(len) = self.frame_len(buf)? else {
            return Ok(None);
        };
        buf.advance(HEADER_LEN);
        Ok(Some(buf.split_to(len)))
    }

    /// The body length of the complete frame at the start of `buf`, or `None`
    /// if more bytes are needed (reserving room for them). The body is
    /// `buf[HEADER_LEN..HEADER_LEN + len]`; the caller advances past it.
    ///
    /// # Errors
    /// As [`FrameCodec::decode_frame`].
    #[inline]
    pub fn frame_len(&self, buf: &mut BytesMut) -> Result<Option<usize>, ProtocolError> {
        let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*header) as usize;
        if len > self.max_frame {
            return Err(ProtocolError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if buf.len() < HEADER_LEN + len {
            // Room for the rest of the frame, grown as its bytes arrive (at
            // most doubling): a peer that announces a large frame and sends
            // it a byte at a time is not given the whole frame's memory.
            let missing = HEADER_LEN + len - buf.len();
            buf.reserve(missing.min(buf.len().max(4096)));
            return Ok(None);
        }
        Ok(Some(len))
    }
}

/// Appends one frame holding `msg` to `out`.
///
/// # Errors
/// [`ProtocolError::FrameTooLarge`] if the encoded message is above
/// [`MAX_RESPONSE_FRAME`]; `out` is left as it was.
pub fn encode<T: Serialize>(msg: &T, out: &mut BytesMut) -> Result<(), ProtocolError> {
    let start = begin_frame(out);
    if let Err(e) = append(msg, out) {
        out.truncate(start);
        return Err(e);
    }
    finish_frame(out, start)
}

/// Starts a frame built piece by piece with [`append`]: writes a placeholder
/// header and returns where the frame starts, for [`finish_frame`].
pub fn begin_frame(out: &mut BytesMut) -> usize {
    let start = out.len();
    out.put_u32(0);
    start
}

/// Appends `value` in postcard form, without a frame header.
///
/// # Errors
/// Only if `value`'s `Serialize` fails (not for the types of this crate).
pub fn append<T: Serialize + ?Sized>(value: &T, out: &mut BytesMut) -> Result<(), ProtocolError> {
    postcard::serialize_with_flavor(value, BytesFlavor(out))
        .map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// Writes the header of the frame begun at `start`.
///
/// # Errors
/// [`ProtocolError::FrameTooLarge`] above [`MAX_RESPONSE_FRAME`]; the frame
/// is then removed from `out`.
pub fn finish_frame(out: &mut BytesMut, start: usize) -> Result<(), ProtocolError> {
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_RESPONSE_FRAME {
        out.truncate(start);
        return Err(ProtocolError::FrameTooLarge {
            len,
            max: MAX_RESPONSE_FRAME,
        });
    }
    out[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// postcard output straight into a `BytesMut` (no intermediate `Vec`).
struct BytesFlavor<'a>(&'a mut BytesMut);

impl postcard::ser_flavors::Flavor for BytesFlavor<'_> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.put_u8(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// A request frame that could not be decoded, with the id to answer under
/// (0 if even the id was unreadable).
#[derive(Debug)]
pub struct BadRequest {
    pub id: u64,
    pub error: ProtocolError,
}

/// Decodes a request frame body, borrowing strings from `frame`.
///
/// # Errors
/// [`ProtocolError::UnknownRequest`] for a variant this version does not know,
/// [`ProtocolError::Malformed`] for anything else that is not exactly one
/// well-formed request.
#[inline]
pub fn decode_request(frame: &[u8]) -> Result<RequestFrame<'_>, BadRequest> {
    // One pass when the frame is good; the slow path explains a bad one.
    match postcard::take_from_bytes::<RequestFrame<'_>>(frame) {
        Ok((msg, [])) => Ok(msg),
        _ => Err(explain_bad_request(frame)),
    }
}

/// The id and item count of an `AcquireMany` frame (`None` for other
/// requests), read without decoding the items: a daemon refuses an oversized
/// batch before building it.
pub fn batch_len(frame: &[u8]) -> Option<(u64, usize)> {
    let (id, rest) = postcard::take_from_bytes::<u64>(frame).ok()?;
    let (variant, rest) = postcard::take_from_bytes::<u32>(rest).ok()?;
    if variant != ACQUIRE_MANY_VARIANT {
        return None;
    }
    let (items, _) = postcard::take_from_bytes::<u64>(rest).ok()?;
    Some((id, usize::try_from(items).unwrap_or(usize::MAX)))
}

/// The wire index of `Request::AcquireMany` (see rld-protocol(7)).
const ACQUIRE_MANY_VARIANT: u32 = 2;

/// Why `frame` is not a request: which id to answer under and what is wrong.
#[cold]
fn explain_bad_request(frame: &[u8]) -> BadRequest {
    let Ok((id, rest)) = postcard::take_from_bytes::<u64>(frame) else {
        return BadRequest {
            id: 0,
            error: ProtocolError::Malformed("unreadable request id".into()),
        };
    };
    let error = match postcard::take_from_bytes::<u32>(rest) {
        Err(e) => ProtocolError::Malformed(format!("unreadable request type: {e}")),
        Ok((variant, _)) if variant >= REQUEST_VARIANTS => ProtocolError::UnknownRequest(variant),
        Ok(_) => match postcard::take_from_bytes::<RequestFrame<'_>>(frame) {
            Ok((_, trailing)) => ProtocolError::Malformed(format!(
                "{} unexpected bytes after the request",
                trailing.len()
            )),
            Err(e) => ProtocolError::Malformed(e.to_string()),
        },
    };
    BadRequest { id, error }
}

/// Decodes a response frame body into owned values.
///
/// # Errors
/// [`ProtocolError::Malformed`] when the bytes are not one response.
pub fn decode_response(frame: &[u8]) -> Result<ResponseFrame<'static>, ProtocolError> {
    match postcard::take_from_bytes::<ResponseFrame<'static>>(frame) {
        Ok((msg, [])) => Ok(msg),
        Ok((_, trailing)) => Err(ProtocolError::Malformed(format!(
            "{} unexpected bytes after the response",
            trailing.len()
        ))),
        Err(e) => Err(ProtocolError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_len_reads_the_count_of_acquire_many_only() {
        let items = vec![super::super::Acquire::new("a", "b"); 3];
        let mut buf = BytesMut::new();
        let many = RequestFrame {
            id: 300,
            request: Request::AcquireMany(items),
        };
        encode(&many, &mut buf).unwrap();
        assert_eq!(batch_len(&buf[HEADER_LEN..]), Some((300, 3)));
        buf.clear();
        let health = RequestFrame {
            id: 301,
            request: Request::Health,
        };
        encode(&health, &mut buf).unwrap();
        assert_eq!(batch_len(&buf[HEADER_LEN..]), None);
    }
    use crate::protocol::{Acquire, Decision, Outcome, Request, Response};
    use std::borrow::Cow;

    #[test]
    fn request_round_trip_borrows_strings() {
        let mut buf = BytesMut::new();
        let req = RequestFrame {
            id: 300,
            request: Request::Acquire(Acquire::new("alice", "api/search").cost(2)),
        };
        encode(&req, &mut buf).unwrap();
        let frame = FrameCodec::new(1024)
            .decode_frame(&mut buf)
            .unwrap()
            .unwrap();
        let back = decode_request(&frame).unwrap();
        assert_eq!(back, req);
        let Request::Acquire(a) = back.request else {
            panic!()
        };
        assert!(matches!(a.client, Cow::Borrowed(_)));
    }

    #[test]
    fn response_round_trip() {
        let mut buf = BytesMut::new();
        let resp = ResponseFrame {
            id: 1,
            response: Response::Decision(Decision {
                outcome: Outcome::Denied,
                limit: 10,
                remaining: 0,
                retry_after_ns: 5,
                reset_after_ns: 9,
                rule: "r".into(),
            }),
        };
        encode(&resp, &mut buf).unwrap();
        let frame = FrameCodec::new(1024)
            .decode_frame(&mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(decode_response(&frame).unwrap(), resp);
    }

    #[test]
    fn a_header_split_across_reads_is_not_misread() {
        // Regression: a stateful decoder that consumed the header early made a
        // later size check read body bytes as a length.
        let mut codec = FrameCodec::new(16);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 3, 0xff][..]);
        assert!(codec.decode_frame(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert_eq!(
            &codec.decode_frame(&mut buf).unwrap().unwrap()[..],
            &[0xff; 3]
        );
        assert_eq!(&buf[..], &[0xff]);
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let mut codec = FrameCodec::new(16);
        let mut buf = BytesMut::from(&[0u8, 0, 0][..]);
        assert!(codec.decode_frame(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&[2, 7]);
        assert!(codec.decode_frame(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&[7]);
        assert_eq!(&codec.decode_frame(&mut buf).unwrap().unwrap()[..], &[7, 7]);
    }

    #[test]
    fn oversized_header_is_refused_before_the_body_arrives() {
        let mut codec = FrameCodec::new(16);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 17][..]);
        assert!(matches!(
            codec.decode_frame(&mut buf),
            Err(ProtocolError::FrameTooLarge { len: 17, max: 16 })
        ));
    }

    #[test]
    fn unknown_variants_and_trailing_bytes_are_errors() {
        let e = decode_request(&[5, 42]).unwrap_err();
        assert_eq!(e.id, 5);
        assert!(matches!(e.error, ProtocolError::UnknownRequest(42)));
        let e = decode_request(&[5, 7, 0]).unwrap_err();
        assert!(matches!(e.error, ProtocolError::Malformed(_)));
        let e = decode_request(&[0xff]).unwrap_err();
        assert_eq!(e.id, 0);
    }
}
