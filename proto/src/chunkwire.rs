//! The direct chunk protocol: chunk reads over a plain TCP connection to a
//! node's gRPC port, without HTTP/2 framing or protobuf.
//!
//! A gRPC chunk read costs a copy on each side that the bytes do not need:
//! the node encodes the chunk into the reply's buffer and the client
//! gathers HTTP/2 frames into the message before decoding it. On this
//! protocol the node hands the chunk file to the socket (`sendfile`) and
//! the client reads it straight into the buffer it keeps. A chunk upload
//! goes from the client's buffer to the socket and from the socket into
//! the aligned buffer the node writes to disk with `O_DIRECT`. It serves
//! clusters without TLS only (a TLS connection is gRPC's).
//!
//! A node tells the two apart by the first byte a connection sends: the
//! HTTP/2 preface starts with `P`, a TLS handshake with `0x16`, this
//! protocol's hello with `M`.
//!
//! - Hello, once per connection: [`HELLO`] (magic and version, 5 bytes).
//! - Request: op (1 byte, [`OP_GET`]), chunk id (16 bytes), tag length
//!   (1 byte) and tag (the request tag the node logs, at most
//!   [`MAX_TAG_LEN`] bytes).
//! - Upload: the same with op [`OP_PUT`], then the chunk's length (4 bytes,
//!   big-endian, at most [`MAX_REPLY_BYTES`]) and its bytes.
//! - Reply: status (1 byte) and length (4 bytes, big-endian), then that
//!   many bytes: for a read, the chunk for [`STATUS_OK`], a UTF-8 message
//!   otherwise; for an upload, one byte for [`STATUS_OK`] (1: stored now,
//!   0: already held), an encoded `musicfs.meta.Error` for
//!   [`STATUS_REFUSED`] (a full disk, a chunk that does not match its id),
//!   a UTF-8 message otherwise.
//!
//! The reply carries no checksum: the chunk id is the checksum, and the
//! client verifies every chunk against it.

/// What a direct connection sends first: magic `MFSC` and version 1.
pub const HELLO: [u8; 5] = *b"MFSC\x01";
/// The first byte of [`HELLO`]: what a node looks for.
pub const FIRST_BYTE: u8 = HELLO[0];

pub const OP_GET: u8 = 1;
pub const OP_PUT: u8 = 2;
/// Largest payload a reply may announce: no chunk is larger.
pub const MAX_REPLY_BYTES: u32 = 16 << 20;
pub const MAX_TAG_LEN: usize = 64;
/// Bytes of a request before its tag.
pub const REQUEST_HEAD: usize = 1 + 16 + 1;
pub const REPLY_HEAD: usize = 5;

pub const STATUS_OK: u8 = 0;
pub const STATUS_NOT_FOUND: u8 = 1;
/// The node could not read the chunk (an I/O error, a file of an
/// impossible size): the client asks again over gRPC, whose path checks
/// the file and moves a damaged one aside.
pub const STATUS_ERROR: u8 = 2;
/// A malformed request or an unknown version; the node closes the
/// connection after it.
pub const STATUS_BAD_REQUEST: u8 = 3;
/// An upload the node refused; the payload says why as a wire error.
pub const STATUS_REFUSED: u8 = 4;

/// A request to read chunk `id`, tagged `tag` (cut to [`MAX_TAG_LEN`]).
pub fn encode_get(id: &[u8; 16], tag: &str) -> Vec<u8> {
    let tag = &tag.as_bytes()[..tag.len().min(MAX_TAG_LEN)];
    let mut out = Vec::with_capacity(REQUEST_HEAD + tag.len());
    out.push(OP_GET);
    out.extend_from_slice(id);
    out.push(tag.len() as u8);
    out.extend_from_slice(tag);
    out
}

/// The head of an upload of `len` bytes of chunk `id`, tagged `tag`: the
/// chunk's bytes follow it.
pub fn encode_put(id: &[u8; 16], tag: &str, len: u32) -> Vec<u8> {
    let mut out = encode_get(id, tag);
    out[0] = OP_PUT;
    out.extend_from_slice(&len.to_be_bytes());
    out
}

/// A request's fixed part: (op, chunk id, tag length).
pub fn decode_request_head(head: &[u8; REQUEST_HEAD]) -> (u8, [u8; 16], usize) {
    let mut id = [0u8; 16];
    id.copy_from_slice(&head[1..17]);
    (head[0], id, head[17] as usize)
}

pub fn encode_reply_head(status: u8, len: u32) -> [u8; REPLY_HEAD] {
    let l = len.to_be_bytes();
    [status, l[0], l[1], l[2], l[3]]
}

/// (status, length) of a reply.
pub fn decode_reply_head(head: &[u8; REPLY_HEAD]) -> (u8, u32) {
    (
        head[0],
        u32::from_be_bytes([head[1], head[2], head[3], head[4]]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let id = [7u8; 16];
        let req = encode_get(&id, "00ab:1f");
        let mut head = [0u8; REQUEST_HEAD];
        head.copy_from_slice(&req[..REQUEST_HEAD]);
        let (op, got, tag_len) = decode_request_head(&head);
        assert_eq!((op, got, tag_len), (OP_GET, id, 7));
        assert_eq!(&req[REQUEST_HEAD..], b"00ab:1f");
        let put = encode_put(&id, "00ab:1f", 5 << 20);
        assert_eq!(put[0], OP_PUT);
        assert_eq!(&put[1..REQUEST_HEAD], &req[1..REQUEST_HEAD]);
        assert_eq!(&put[put.len() - 4..], &(5u32 << 20).to_be_bytes());
        let long = "x".repeat(200);
        assert_eq!(encode_get(&id, &long).len(), REQUEST_HEAD + MAX_TAG_LEN);
        assert_eq!(
            decode_reply_head(&encode_reply_head(STATUS_NOT_FOUND, 4 << 20)),
            (STATUS_NOT_FOUND, 4 << 20)
        );
    }

    #[test]
    fn the_first_byte_is_neither_http2_nor_tls() {
        assert_ne!(FIRST_BYTE, b"PRI * HTTP/2.0"[0]);
        assert_ne!(FIRST_BYTE, 0x16);
    }
}
