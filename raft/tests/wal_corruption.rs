//! A write-ahead log damaged before its last record makes the store refuse
//! to open (naming the corruption) instead of dropping what follows the
//! damage, which held acknowledged writes.

use musicfs_raft::Store;

/// Writes 50 synced records into a new store under `path` and closes it.
fn fill(path: &std::path::Path) {
    let store = Store::open(path).expect("open");
    for i in 0..50 {
        store
            .node_set(&format!("key{i:03}"), &"v".repeat(200))
            .expect("synced write");
    }
}

/// The largest WAL file under `dir`.
fn wal_file(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .expect("store dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a WAL file")
}

#[test]
fn a_corrupt_record_before_others_refuses_the_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Intact: every write is there after a reopen.
    let intact = dir.path().join("intact");
    fill(&intact);
    let store = Store::open(&intact).expect("reopen");
    assert_eq!(
        store.node_get("key049").expect("read"),
        Some("v".repeat(200))
    );
    drop(store);

    let damaged = dir.path().join("damaged");
    fill(&damaged);
    let wal = wal_file(&damaged);
    let mut bytes = std::fs::read(&wal).expect("read WAL");
    assert!(bytes.len() > 4096, "WAL of {} bytes", bytes.len());
    // A byte in an early record's payload, far before the last record.
    bytes[300] ^= 0xff;
    std::fs::write(&wal, &bytes).expect("write WAL");
    let err = match Store::open(&damaged) {
        Ok(_) => panic!("a store with a corrupt WAL record opened"),
        Err(e) => e.to_string(),
    };
    assert!(err.to_lowercase().contains("corrupt"), "{err}");
}
