//! The namespace state machine plugged into Raft.

use bytes::Bytes;
use prost::Message;
use proto::meta::{Command, CommandResult, Error as WireError, ErrorCode};
use raft::{Application, KvView, KvWrites};

use crate::namespace::{KvError, KvRead, Namespace};

/// Adapts the Raft store's view to the namespace's key-value interface.
pub struct ViewKv<'a, 'b>(pub &'a KvView<'b>);

impl KvRead for ViewKv<'_, '_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.0.get(key).map_err(|e| KvError::Storage(e.to_string()))
    }
    fn scan(
        &self,
        prefix: &[u8],
        after: &[u8],
        limit: usize,
    ) -> Result<crate::namespace::KvPairs, KvError> {
        self.0
            .scan(prefix, after, limit)
            .map_err(|e| KvError::Storage(e.to_string()))
    }
}

pub struct NamespaceApp;

impl Application for NamespaceApp {
    fn apply(&self, group: u32, view: &KvView<'_>, command: &[u8]) -> (KvWrites, Bytes) {
        let reply = |r: CommandResult| Bytes::from(r.encode_to_vec());
        let cmd = match Command::decode(command) {
            Ok(c) => c,
            Err(e) => {
                return (
                    Vec::new(),
                    reply(CommandResult {
                        error: Some(WireError::new(
                            ErrorCode::Invalid,
                            format!("undecodable command: {e}"),
                        )),
                        ..Default::default()
                    }),
                )
            }
        };
        let kv = ViewKv(view);
        match Namespace::new(group).apply_request(&kv, &cmd) {
            Ok((writes, r)) => (writes.into_iter().collect(), reply(r)),
            Err(e) => {
                // A replica that cannot read its own state must not carry on
                // with a different outcome than its peers: stop the node.
                tracing::error!(group, error = %e, "storage failure while applying; stopping the node");
                eprintln!("musicfs-node: fatal storage failure in group {group}: {e}");
                std::process::exit(70);
            }
        }
    }
}
