//! The MusicFS wire: generated protobuf types and gRPC stubs, plus helpers
//! that convert between wire values and domain values.

// Generated code: a transaction's decision carries the reply it records,
// which makes that command variant large; commands are not kept in bulk.
#[allow(clippy::large_enum_variant)]
pub mod meta {
    tonic::include_proto!("musicfs.meta");
}
pub mod raft {
    tonic::include_proto!("musicfs.raft");
}
pub mod storage {
    tonic::include_proto!("musicfs.storage");
}
pub mod admin {
    tonic::include_proto!("musicfs.admin");
}

pub mod auth;
pub mod chunkwire;
mod convert;
pub mod display;
pub mod tags;
pub mod transport;
pub use convert::*;

/// How logs name a client request: the client's id and the request's
/// sequence number, `CLIENT:SEQ` in hex, the same on the client and on
/// every node that handles it.
pub fn request_tag(client_id: u64, seq: u64) -> String {
    format!("{client_id:016x}:{seq:x}")
}

/// The gRPC header that carries a request's tag on calls that are not
/// commands of their own: chunk transfers, and a node passing a client's
/// transaction on to the leaders of other groups.
pub const REQUEST_TAG_HEADER: &str = "musicfs-req";

/// Puts `tag` (from [`request_tag`]) on an outgoing call.
pub fn tag_request<T>(req: &mut tonic::Request<T>, tag: &str) {
    if let Ok(v) = tonic::metadata::MetadataValue::try_from(tag) {
        req.metadata_mut().insert(REQUEST_TAG_HEADER, v);
    }
}

/// The tag a call carries, if it is well-formed (hex digits and one ':';
/// anything else is dropped rather than logged, since it comes from the
/// network).
pub fn request_tag_of<T>(req: &tonic::Request<T>) -> Option<String> {
    let v = req.metadata().get(REQUEST_TAG_HEADER)?.to_str().ok()?;
    let (client, seq) = v.split_once(':')?;
    let hex = |s: &str| !s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(client) && hex(seq)).then(|| v.to_string())
}

/// Buckets of every latency histogram the nodes and mounts export, in
/// seconds: a local read takes tens of microseconds, a commit a few
/// milliseconds, a call behind an election or failover seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

#[cfg(test)]
mod tag_tests {
    #[test]
    fn only_well_formed_tags_are_taken_from_a_call() {
        let mut r = tonic::Request::new(());
        super::tag_request(&mut r, &super::request_tag(0xabc, 0x12));
        assert_eq!(
            super::request_tag_of(&r).as_deref(),
            Some("0000000000000abc:12")
        );
        for bad in ["x:1", "1", "1:2:3", ":1", "abc:", "00000000000000000:1"] {
            let mut r = tonic::Request::new(());
            super::tag_request(&mut r, bad);
            assert_eq!(super::request_tag_of(&r), None, "{bad}");
        }
    }
}
