//! Every message a node accepts from the network, decoded from arbitrary
//! bytes, then put through the checks and conversions the node applies to
//! it: nothing may panic, and a decoded message must survive re-encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::{admin, meta, raft, storage, validate_name, ChunkId};

/// Decodes `data` as `M`; on success checks that encode/decode gives the
/// same message back and hands it to `check`.
fn decode<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8], check: impl FnOnce(&M)) {
    if let Ok(m) = M::decode(data) {
        let again = M::decode(m.encode_to_vec().as_slice()).expect("re-decoding an encoded message");
        assert_eq!(m, again);
        check(&m);
    }
}

fn chunk_id(b: &[u8]) {
    if let Ok(id) = ChunkId::try_from(b) {
        assert_eq!(ChunkId::from_hex(&id.to_hex()), Some(id));
    }
}

fn time(t: &Option<meta::Timespec>) {
    if let Some(t) = t {
        let _ = t.as_millis();
        let _ = std::time::SystemTime::from(*t);
    }
}

fn command(c: &meta::Command) {
    use meta::command::Op;
    time(&c.now);
    match &c.op {
        Some(Op::Create(o)) => {
            let _ = validate_name(&o.name);
        }
        Some(Op::Link(o)) => {
            let _ = validate_name(&o.new_name);
        }
        Some(Op::Remove(o)) => {
            let _ = validate_name(&o.name);
        }
        Some(Op::Rename(o)) => {
            let _ = validate_name(&o.name);
            let _ = validate_name(&o.new_name);
        }
        Some(Op::SetAttr(o)) => {
            if let Some(f) = &o.fields {
                time(&f.atime);
                time(&f.mtime);
            }
        }
        Some(Op::CommitLayout(o)) => {
            time(&o.mtime);
            o.new_chunks.iter().for_each(|c| chunk_id(&c.chunk_id));
        }
        Some(Op::ReapChunks(o)) => {
            o.chunk_ids.iter().for_each(|id| chunk_id(id));
            time(&o.zero_before);
        }
        _ => {}
    }
    let _ = proto::group_of_ino(c.client_id);
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, data)) = data.split_first() else {
        return;
    };
    match kind % 16 {
        0 => decode::<meta::ProposeRequest>(data, |r| {
            if let Some(c) = &r.command {
                command(c);
            }
        }),
        1 => decode::<meta::Command>(data, command),
        2 => decode::<meta::QueryRequest>(data, |_| {}),
        3 => decode::<storage::PutChunkRequest>(data, |r| {
            if let Ok(id) = ChunkId::try_from(&r.chunk_id[..]) {
                let _ = id.verify(&r.data);
            }
        }),
        4 => decode::<storage::GetChunkRequest>(data, |r| chunk_id(&r.chunk_id)),
        5 => decode::<storage::HasChunksRequest>(data, |r| r.chunk_ids.iter().for_each(|i| chunk_id(i))),
        6 => decode::<storage::ReplicateRequest>(data, |r| chunk_id(&r.chunk_id)),
        7 => decode::<storage::DeleteChunksRequest>(data, |r| r.chunk_ids.iter().for_each(|i| chunk_id(i))),
        8 => decode::<admin::InitRequest>(data, |_| {}),
        9 => decode::<admin::SetStorageNodeRequest>(data, |r| {
            let _ = meta::StorageState::try_from(r.state);
        }),
        10 => decode::<admin::TransferLeaderRequest>(data, |_| {}),
        11 => decode::<admin::JoinRequest>(data, |_| {}),
        12 => decode::<raft::AppendEnvelope>(data, |_| {}),
        13 => decode::<raft::VoteEnvelope>(data, |_| {}),
        14 => decode::<raft::SnapshotChunk>(data, |_| {}),
        _ => decode::<raft::TransferLeaderEnvelope>(data, |_| {}),
    }
});
