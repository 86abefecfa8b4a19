//! `musicfs-node`: one process per machine running the metadata role (Raft
//! groups over RocksDB holding the namespace and chunk index) and the
//! storage role (a content-addressed chunk store).

// The cross-shard coordinator's futures nest deeply (RPC retries inside
// transaction steps inside the service).
#![recursion_limit = "256"]

pub mod aligned;
pub mod app;
pub mod background;
pub mod check;
pub mod chunk_service;
pub mod chunkstore;
pub mod conns;
pub mod coordinator;
pub mod direct;
pub mod gc;
pub mod metrics;
pub mod namespace;
pub mod repair;
pub mod router;
pub mod scrub;
pub mod server;
pub mod service;
pub mod status_page;
pub mod worker;
