//! The namespace state machine plugged into Raft.

use bytes::Bytes;
use prost::Message;
use proto::meta::{Command, CommandResult, Error as WireError, ErrorCode};
use raft::{Application, KvView, KvWrites};

use crate::namespace::{KvError, KvRead, Namespace, NsError, Txn};

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
        let mut txn = Txn::new(&kv);
        match Namespace::new(group).apply(&mut txn, &cmd) {
            Ok(r) => (txn.into_writes().into_iter().collect(), reply(r)),
            Err(NsError::Kv(KvError::Storage(e))) => {
                // A replica that cannot read its own state must not carry on
                // with a different outcome than its peers: stop the node.
                tracing::error!(group, error = %e, "storage failure while applying; stopping the node");
                eprintln!("musicfs-node: fatal storage failure in group {group}: {e}");
                std::process::exit(70);
            }
            Err(e) => (
                Vec::new(),
                reply(CommandResult {
                    error: Some(e.to_wire()),
                    ..Default::default()
                }),
            ),
        }
    }
}
