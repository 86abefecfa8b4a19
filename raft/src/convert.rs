//! Conversions between openraft's types and their protobuf form, for the log
//! on disk and the wire.

use std::collections::{BTreeMap, BTreeSet};

use openraft::entry::RaftEntry;
use openraft::{BasicNode, EntryPayload, Membership, StoredMembership};
use proto::raft as pb;

use crate::{AppRequest, TypeConfig};

pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type LeaderId = openraft::type_config::alias::LeaderIdOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type StoredMem = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;

#[derive(Debug, thiserror::Error)]
#[error("malformed raft message: {0}")]
pub struct Malformed(pub String);

fn missing(what: &str) -> Malformed {
    Malformed(format!("{what} missing"))
}

pub fn leader_id_to_pb(l: &LeaderId) -> pb::LeaderId {
    pb::LeaderId {
        term: l.term,
        node_id: l.node_id,
    }
}

pub fn leader_id_from_pb(l: &pb::LeaderId) -> LeaderId {
    LeaderId {
        term: l.term,
        node_id: l.node_id,
    }
}

pub fn log_id_to_pb(l: &LogId) -> pb::LogId {
    pb::LogId {
        leader_id: Some(leader_id_to_pb(&l.leader_id)),
        index: l.index,
    }
}

pub fn log_id_from_pb(l: &pb::LogId) -> Result<LogId, Malformed> {
    let leader = l
        .leader_id
        .as_ref()
        .ok_or_else(|| missing("log id leader"))?;
    Ok(LogId::new(leader_id_from_pb(leader), l.index))
}

pub fn opt_log_id_from_pb(l: &Option<pb::LogId>) -> Result<Option<LogId>, Malformed> {
    l.as_ref().map(log_id_from_pb).transpose()
}

pub fn vote_to_pb(v: &Vote) -> pb::Vote {
    pb::Vote {
        leader_id: Some(leader_id_to_pb(&v.leader_id)),
        committed: v.committed,
    }
}

pub fn vote_from_pb(v: &pb::Vote) -> Result<Vote, Malformed> {
    let l = v.leader_id.as_ref().ok_or_else(|| missing("vote leader"))?;
    Ok(Vote {
        leader_id: leader_id_from_pb(l),
        committed: v.committed,
    })
}

pub fn membership_to_pb(m: &Membership<u64, BasicNode>) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|c| pb::NodeIdSet {
                node_ids: c.iter().copied().collect(),
            })
            .collect(),
        nodes: m
            .nodes()
            .map(|(id, n)| pb::NodeAddr {
                node_id: *id,
                addr: n.addr.clone(),
            })
            .collect(),
    }
}

pub fn membership_from_pb(m: &pb::Membership) -> Result<Membership<u64, BasicNode>, Malformed> {
    let configs: Vec<BTreeSet<u64>> = m
        .configs
        .iter()
        .map(|c| c.node_ids.iter().copied().collect())
        .collect();
    let nodes: BTreeMap<u64, BasicNode> = m
        .nodes
        .iter()
        .map(|n| {
            (
                n.node_id,
                BasicNode {
                    addr: n.addr.clone(),
                },
            )
        })
        .collect();
    Membership::new(configs, nodes).map_err(|e| Malformed(format!("membership: {e}")))
}

pub fn stored_membership_to_pb(m: &StoredMem) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: m.log_id().as_ref().map(log_id_to_pb),
        membership: Some(membership_to_pb(m.membership())),
    }
}

pub fn stored_membership_from_pb(m: &pb::StoredMembership) -> Result<StoredMem, Malformed> {
    let mem = match &m.membership {
        Some(mm) => membership_from_pb(mm)?,
        None => Membership::default(),
    };
    Ok(StoredMembership::new(opt_log_id_from_pb(&m.log_id)?, mem))
}

pub fn entry_to_pb(e: &Entry) -> pb::Entry {
    let payload = match &e.payload {
        EntryPayload::Blank => pb::entry::Payload::Blank(true),
        EntryPayload::Normal(r) => pb::entry::Payload::Normal(r.0.clone()),
        EntryPayload::Membership(m) => pb::entry::Payload::Membership(membership_to_pb(m)),
    };
    pb::Entry {
        log_id: Some(log_id_to_pb(&e.log_id)),
        payload: Some(payload),
    }
}

pub fn entry_from_pb(e: &pb::Entry) -> Result<Entry, Malformed> {
    let log_id = log_id_from_pb(e.log_id.as_ref().ok_or_else(|| missing("entry log id"))?)?;
    let payload = match e.payload.as_ref().ok_or_else(|| missing("entry payload"))? {
        pb::entry::Payload::Blank(_) => EntryPayload::Blank,
        pb::entry::Payload::Normal(b) => EntryPayload::Normal(AppRequest(b.clone())),
        pb::entry::Payload::Membership(m) => EntryPayload::Membership(membership_from_pb(m)?),
    };
    Ok(Entry::new(log_id, payload))
}

pub fn snapshot_meta_to_pb(m: &SnapshotMeta, id: &str) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: m.last_log_id.as_ref().map(log_id_to_pb),
        last_membership: Some(stored_membership_to_pb(&m.last_membership)),
        snapshot_id: id.to_string(),
    }
}

pub fn snapshot_meta_from_pb(m: &pb::SnapshotMeta) -> Result<SnapshotMeta, Malformed> {
    Ok(SnapshotMeta {
        last_log_id: opt_log_id_from_pb(&m.last_log_id)?,
        last_membership: match &m.last_membership {
            Some(sm) => stored_membership_from_pb(sm)?,
            None => StoredMembership::default(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn entries_round_trip() {
        let lid = LogId::new(
            LeaderId {
                term: 3,
                node_id: 2,
            },
            17,
        );
        let mut nodes = BTreeMap::new();
        nodes.insert(1, BasicNode { addr: "a:1".into() });
        nodes.insert(2, BasicNode { addr: "b:2".into() });
        let mem = Membership::new(vec![[1u64, 2].into_iter().collect()], nodes).unwrap();
        for payload in [
            EntryPayload::Blank,
            EntryPayload::Normal(AppRequest(Bytes::from_static(b"cmd"))),
            EntryPayload::Membership(mem),
        ] {
            let e = Entry::new(lid, payload);
            let back = entry_from_pb(&entry_to_pb(&e)).unwrap();
            assert_eq!(back.log_id, e.log_id);
            assert_eq!(format!("{:?}", back.payload), format!("{:?}", e.payload));
        }
    }

    #[test]
    fn malformed_entries_are_rejected() {
        let e = pb::Entry {
            log_id: None,
            payload: None,
        };
        assert!(entry_from_pb(&e).is_err());
    }
}
