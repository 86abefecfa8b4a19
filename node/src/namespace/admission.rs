//! What may enter a group's log, decided before it is proposed: which
//! commands a client may propose at all, and the checks that need no state
//! (sizes, counts, names), so a request the state machine would refuse
//! never costs a log entry on every replica.

use proto::auth::{ClusterSecret, MAX_SKEW_MS};
use proto::meta::command::Op;
use proto::meta::{Command, Error as WireError, ErrorCode, FileKind};
use proto::{validate_name, ChunkId, FORMAT_VERSION};

use super::{MAX_BATCH, MAX_FILE_SIZE};

/// Whether a client may propose `op`: the namespace, layout and tag
/// operations a file system and its tools need. Everything else (init,
/// transaction steps, reference delivery, storage nodes, locations, garbage
/// collection) is the nodes' own work.
pub fn is_client_op(op: &Op) -> bool {
    matches!(
        op,
        Op::Create(_)
            | Op::Link(_)
            | Op::Remove(_)
            | Op::Rename(_)
            | Op::SetAttr(_)
            | Op::CommitLayout(_)
            | Op::CreateBatch(_)
            | Op::SetTags(_)
            | Op::IndexTags(_)
            | Op::SetTagsBatch(_)
    )
}

/// An operation's name, for messages and logs.
pub fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Init(_) => "Init",
        Op::Create(_) => "Create",
        Op::Link(_) => "Link",
        Op::Remove(_) => "Remove",
        Op::Rename(_) => "Rename",
        Op::SetAttr(_) => "SetAttr",
        Op::CommitLayout(_) => "CommitLayout",
        Op::CreateBatch(_) => "CreateBatch",
        Op::TxnPrepare(_) => "TxnPrepare",
        Op::TxnDecide(_) => "TxnDecide",
        Op::TxnResolve(_) => "TxnResolve",
        Op::TxnForget(_) => "TxnForget",
        Op::TxnGc(_) => "TxnGc",
        Op::DeliverRefs(_) => "DeliverRefs",
        Op::AckRefs(_) => "AckRefs",
        Op::SetStorageNode(_) => "SetStorageNode",
        Op::UpdateLocations(_) => "UpdateLocations",
        Op::ReapChunks(_) => "ReapChunks",
        Op::Settle(_) => "Settle",
        Op::SetTags(_) => "SetTags",
        Op::IndexTags(_) => "IndexTags",
        Op::SetTagsBatch(_) => "SetTagsBatch",
    }
}

/// The largest encoded command a client may propose. A file's whole layout
/// travels in one command: 8 MiB holds about 200,000 extents, a 200 GB
/// file of 1 MiB chunks. Every replica writes each command into its log,
/// so one oversized proposal costs every node.
pub const MAX_PROPOSAL_BYTES: usize = 8 << 20;

/// The checks of a client's command that need no state, made before it is
/// proposed: the state machine would refuse it the same way, after it had
/// cost a log entry on every replica. Per-item errors of a batch stay the
/// state machine's (each item of a batch applies on its own).
pub fn check(cmd: &Command, encoded_len: usize) -> Result<(), WireError> {
    let invalid = |m: String| Err(WireError::new(ErrorCode::Invalid, m));
    if encoded_len > MAX_PROPOSAL_BYTES {
        return invalid(format!(
            "the command is {encoded_len} bytes; at most {MAX_PROPOSAL_BYTES} are accepted"
        ));
    }
    let Some(op) = &cmd.op else {
        return invalid("command has no operation".into());
    };
    if cmd.version > FORMAT_VERSION {
        return invalid(format!(
            "command format {} is newer than this node understands ({FORMAT_VERSION})",
            cmd.version
        ));
    }
    match op {
        Op::Create(c) => {
            validate_name(&c.name)?;
            if c.kind == FileKind::Symlink as i32
                && (c.symlink_target.is_empty() || c.symlink_target.len() > MAX_SYMLINK_TARGET)
            {
                return invalid(format!(
                    "symlink target must be 1..{MAX_SYMLINK_TARGET} bytes"
                ));
            }
        }
        Op::Link(l) => validate_name(&l.new_name)?,
        Op::Remove(r) => validate_name(&r.name)?,
        Op::Rename(r) => {
            validate_name(&r.name)?;
            validate_name(&r.new_name)?;
        }
        Op::CreateBatch(b) if b.creates.len() > MAX_BATCH => {
            return invalid(format!("a batch carries at most {MAX_BATCH} creates"));
        }
        Op::SetTagsBatch(b) if b.items.len() > MAX_BATCH => {
            return invalid(format!("a tag batch carries at most {MAX_BATCH} files"));
        }
        Op::CommitLayout(c) if c.size > MAX_FILE_SIZE => {
            return Err(WireError::new(
                ErrorCode::FileTooBig,
                format!("file size {} exceeds the maximum", c.size),
            ));
        }
        _ => {}
    }
    Ok(())
}

/// Checks that every location a client's layout commit gives for a new
/// chunk comes with that node's receipt, made after the index answer the
/// commit relies on (less the clock leeway): a location enters the chunk
/// index only with evidence that the node held the chunk, so no client can
/// make a writer skip the upload of a chunk nobody holds. The commit
/// window bounds `checked_at_ms` (the state machine refuses an older
/// answer), so it bounds every receipt's age too.
pub fn check_receipts(cmd: &Command, secret: &ClusterSecret, now_ms: u64) -> Result<(), WireError> {
    let Some(Op::CommitLayout(c)) = &cmd.op else {
        return Ok(());
    };
    for nc in &c.new_chunks {
        for loc in &nc.locations {
            let valid = nc.receipts.iter().any(|r| {
                r.node == *loc
                    && r.at_ms.saturating_add(MAX_SKEW_MS) >= c.checked_at_ms
                    && r.at_ms <= now_ms.saturating_add(MAX_SKEW_MS)
                    && secret.check_receipt(*loc, &nc.chunk_id, nc.size, r.at_ms, &r.mac)
            });
            if !valid {
                return Err(WireError::new(
                    ErrorCode::Invalid,
                    format!(
                        "chunk {}: no valid receipt from storage node {loc} (a location is \
                         recorded only with the node's receipt of a recent upload)",
                        ChunkId::try_from(&nc.chunk_id[..])
                            .map(|id| id.to_string())
                            .unwrap_or_else(|_| "with a malformed id".into())
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Longest symlink target (PATH_MAX less its terminating NUL).
pub const MAX_SYMLINK_TARGET: usize = 4095;

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proto::meta::{
        CommitLayoutOp, CreateBatchOp, CreateOp, NewChunk, Receipt, RemoveOp, TxnForgetOp,
    };

    fn cmd(op: Op) -> Command {
        Command {
            version: FORMAT_VERSION,
            op: Some(op),
            ..Default::default()
        }
    }

    fn code(c: &Command) -> Option<ErrorCode> {
        check(c, prost::Message::encoded_len(c))
            .err()
            .map(|e| e.code())
    }

    #[test]
    fn clients_may_propose_only_file_system_operations() {
        assert!(is_client_op(&Op::Create(CreateOp::default())));
        assert!(is_client_op(&Op::Remove(RemoveOp::default())));
        assert!(!is_client_op(&Op::TxnForget(TxnForgetOp::default())));
        assert!(!is_client_op(&Op::Init(Default::default())));
        assert!(!is_client_op(&Op::SetStorageNode(Default::default())));
        assert!(!is_client_op(&Op::DeliverRefs(Default::default())));
        assert!(!is_client_op(&Op::UpdateLocations(Default::default())));
        assert!(!is_client_op(&Op::ReapChunks(Default::default())));
        assert_eq!(op_name(&Op::Settle(Default::default())), "Settle");
    }

    #[test]
    fn bad_names_and_oversized_commands_are_refused_before_proposing() {
        let create = |name: Vec<u8>| {
            cmd(Op::Create(CreateOp {
                parent: 1,
                name: name.into(),
                kind: FileKind::Regular as i32,
                ..Default::default()
            }))
        };
        assert_eq!(code(&create(b"ok.flac".to_vec())), None);
        assert_eq!(code(&create(vec![b'a'; 256])), Some(ErrorCode::NameTooLong));
        assert_eq!(
            code(&create(vec![b'a'; 30 << 20])),
            Some(ErrorCode::Invalid),
            "a 30 MiB name is refused by its size"
        );
        assert_eq!(code(&create(b"a/b".to_vec())), Some(ErrorCode::Invalid));
        let link = cmd(Op::Create(CreateOp {
            parent: 1,
            name: "l".into(),
            kind: FileKind::Symlink as i32,
            symlink_target: vec![b'x'; 4096].into(),
            ..Default::default()
        }));
        assert_eq!(code(&link), Some(ErrorCode::Invalid));
        let batch = cmd(Op::CreateBatch(CreateBatchOp {
            creates: vec![CreateOp::default(); MAX_BATCH + 1],
        }));
        assert_eq!(code(&batch), Some(ErrorCode::Invalid));
        // A batch's bad item is the state machine's to refuse, alone.
        let batch = cmd(Op::CreateBatch(CreateBatchOp {
            creates: vec![CreateOp::default(); 3],
        }));
        assert_eq!(code(&batch), None);
    }

    #[test]
    fn chunk_locations_need_their_nodes_receipts() {
        let secret = ClusterSecret::from_hex(&ClusterSecret::generate_hex()).expect("secret");
        let id = [7u8; 16];
        let now = 10_000_000;
        let receipt = |node: u64, at_ms: u64| Receipt {
            node,
            at_ms,
            mac: Bytes::copy_from_slice(&secret.receipt(node, &id, 70_000, at_ms)),
        };
        let commit = |locations: Vec<u64>, receipts: Vec<Receipt>, checked_at_ms: u64| {
            cmd(Op::CommitLayout(CommitLayoutOp {
                ino: 5,
                checked_at_ms,
                new_chunks: vec![NewChunk {
                    chunk_id: Bytes::copy_from_slice(&id),
                    size: 70_000,
                    locations,
                    receipts,
                }],
                ..Default::default()
            }))
        };
        let ok = |c: &Command| check_receipts(c, &secret, now).is_ok();
        let fresh = vec![receipt(1, now - 5), receipt(2, now - 3)];
        assert!(ok(&commit(vec![1, 2], fresh.clone(), now - 10)));
        // A location without its node's receipt (dedup poisoning).
        assert!(!ok(&commit(vec![1, 2, 3], fresh.clone(), now - 10)));
        // Another node's receipt does not vouch for node 3.
        let mut moved = receipt(1, now - 5);
        moved.node = 3;
        assert!(!ok(&commit(vec![3], vec![moved], now - 10)));
        // A receipt for another size, or a forged one.
        let mut forged = receipt(1, now - 5);
        forged.mac = Bytes::from_static(&[0u8; 16]);
        assert!(!ok(&commit(vec![1], vec![forged], now - 10)));
        // An old receipt replayed under a fresh index answer.
        let old = receipt(1, now - 3_600_000);
        assert!(!ok(&commit(vec![1], vec![old], now - 10)));
        // A chunk the index already knew carries no location: nothing to prove.
        assert!(ok(&commit(vec![], vec![], now - 10)));
        // Another cluster's secret makes receipts that do not count here.
        let other = ClusterSecret::from_hex(&ClusterSecret::generate_hex()).expect("secret");
        assert!(check_receipts(&commit(vec![1, 2], fresh, now - 10), &other, now).is_err());
    }
}
