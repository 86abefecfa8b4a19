//! `musicfs-node`: one process per machine running the metadata role (Raft
//! groups over RocksDB holding the namespace and chunk index) and the
//! storage role (a content-addressed chunk store).

pub mod app;
pub mod chunkstore;
pub mod namespace;
pub mod server;
pub mod service;
