//! Multi-group Raft for MusicFS metadata: the openraft type configuration,
//! one RocksDB per node shared by every group (log, vote, state, snapshots)
//! with group-commit fsync, a gRPC transport that names the group in every
//! message, and streamed file snapshots.
//!
//! openraft stays inside this crate: the node sees [`Group`] handles, an
//! [`Application`] to implement, and plain Rust types.

mod convert;
mod group;
mod log_store;
mod network;
mod raft_server;
mod snapshot;
mod state_machine;
mod store;

use std::fmt;

use bytes::Bytes;

pub use group::{Group, GroupError, GroupStatus, RaftSettings, Registry};
pub use log_store::LogStore;
pub use network::Transport;
pub use raft_server::RaftServer;
pub use state_machine::{Application, GroupStateMachine, KvPairs, KvView, KvWrites};
pub use store::{Store, StoreError, CF_SM};

/// A replicated command, encoded by the application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppRequest(pub Bytes);

impl fmt::Display for AppRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request({} bytes)", self.0.len())
    }
}

/// The application's reply to a command, encoded by the application.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppResponse(pub Bytes);

openraft::declare_raft_types!(
    /// Raft types of every MusicFS metadata group.
    pub TypeConfig:
        D = AppRequest,
        R = AppResponse,
        NodeId = u64,
        Node = openraft::BasicNode,
);

pub type NodeId = u64;
pub type GroupId = u32;
pub type Raft = openraft::Raft<TypeConfig, GroupStateMachine>;
