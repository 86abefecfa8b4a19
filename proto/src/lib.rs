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

mod convert;
pub mod display;
pub use convert::*;

/// How logs name a client request: the client's id and the request's
/// sequence number, `CLIENT:SEQ` in hex, the same on the client and on
/// every node that handles it.
pub fn request_tag(client_id: u64, seq: u64) -> String {
    format!("{client_id:016x}:{seq:x}")
}

/// Buckets of every latency histogram the nodes and mounts export, in
/// seconds: a local read takes tens of microseconds, a commit a few
/// milliseconds, a call behind an election or failover seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];
