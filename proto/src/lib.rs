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
