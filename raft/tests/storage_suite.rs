//! openraft's storage test suite, run against the RocksDB log store and the
//! group state machine, with two groups sharing one database.

use std::sync::Arc;

use bytes::Bytes;
use musicfs_raft::{Application, GroupStateMachine, KvView, KvWrites, LogStore, Store, TypeConfig};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

/// An application that keeps no state of its own.
struct NoApp;

impl Application for NoApp {
    fn apply(&self, _group: u32, _view: &KvView<'_>, command: &[u8]) -> (KvWrites, Bytes) {
        (Vec::new(), Bytes::copy_from_slice(command))
    }
}

struct Builder {
    group: u32,
}

impl StoreBuilder<TypeConfig, LogStore, GroupStateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, GroupStateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db")).expect("open store");
        let log = LogStore::new(store.clone(), self.group);
        let sm =
            GroupStateMachine::open(store, self.group, Arc::new(NoApp), dir.path().join("snap"))
                .expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_group_0() {
    Suite::test_all(Builder { group: 0 })
        .await
        .expect("storage suite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_group_7() {
    Suite::test_all(Builder { group: 7 })
        .await
        .expect("storage suite");
}
