//! Every metric a node exports, by name, and the one place they are set
//! (docs/METRICS.md lists them). Served in Prometheus' text format at
//! `http://METRICS_LISTEN/metrics` when the node is configured with
//! `metrics_listen`; otherwise the calls below record into nothing.

use std::net::SocketAddr;

/// Bytes a background worker moved (copied, verified, freed).
pub const WORKER_BYTES: &str = "musicfs_worker_bytes_total";
/// Progress of a worker's current pass, in the worker's unit.
pub const WORKER_DONE: &str = "musicfs_worker_pass_done";
pub const WORKER_TOTAL: &str = "musicfs_worker_pass_total";
pub const WORKER_ERRORS: &str = "musicfs_worker_errors_total";
/// Chunks of the groups this node leads with fewer copies than the
/// replication factor; of those, the ones with no usable node to copy to,
/// and chunks whose every copy is unreachable.
pub const UNDER_REPLICATED: &str = "musicfs_chunks_under_replicated";
pub const WAITING_FOR_NODES: &str = "musicfs_chunks_waiting_for_nodes";
pub const UNAVAILABLE: &str = "musicfs_chunks_unavailable";
pub const REPAIR_COPIES: &str = "musicfs_repair_copies_total";
/// Repair's estimate of the seconds left.
pub const REPAIR_ETA: &str = "musicfs_repair_eta_seconds";
pub const SCRUB_CORRUPT: &str = "musicfs_scrub_corrupt_total";
pub const SCRUB_MISSING: &str = "musicfs_scrub_missing_total";
pub const GC_REAPED: &str = "musicfs_gc_reaped_chunks_total";
pub const GC_DELETED_FILES: &str = "musicfs_gc_deleted_files_total";
pub const GC_DELETED_BYTES: &str = "musicfs_gc_deleted_bytes_total";
/// This node's chunk store.
pub const STORE_CHUNKS: &str = "musicfs_store_chunks";
pub const STORE_BYTES: &str = "musicfs_store_bytes";
pub const STORE_FREE_BYTES: &str = "musicfs_store_disk_free_bytes";
/// 1 when a storage node answered this node's last probe, 0 when it did
/// not, -1 once it is removed (no longer expected to answer).
pub const STORAGE_NODE_UP: &str = "musicfs_storage_node_up";

/// Serves the metrics over HTTP at `addr`.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("metrics listener on {addr}: {e}"))
}

pub fn worker_bytes(worker: &'static str, n: u64) {
    metrics::counter!(WORKER_BYTES, "worker" => worker).increment(n);
}

pub fn worker_progress(worker: &'static str, done: u64, total: u64) {
    metrics::gauge!(WORKER_DONE, "worker" => worker).set(done as f64);
    metrics::gauge!(WORKER_TOTAL, "worker" => worker).set(total as f64);
}

pub fn worker_error(worker: &'static str) {
    metrics::counter!(WORKER_ERRORS, "worker" => worker).increment(1);
}

pub fn repair(under: u64, waiting: u64, unavailable: u64, eta_secs: u64) {
    metrics::gauge!(UNDER_REPLICATED).set(under as f64);
    metrics::gauge!(WAITING_FOR_NODES).set(waiting as f64);
    metrics::gauge!(UNAVAILABLE).set(unavailable as f64);
    metrics::gauge!(REPAIR_ETA).set(eta_secs as f64);
}

pub fn repair_copy() {
    metrics::counter!(REPAIR_COPIES).increment(1);
}

pub fn scrub_found(corrupt: u64, missing: u64) {
    metrics::counter!(SCRUB_CORRUPT).increment(corrupt);
    metrics::counter!(SCRUB_MISSING).increment(missing);
}

pub fn gc_reaped(n: u64) {
    metrics::counter!(GC_REAPED).increment(n);
}

pub fn gc_deleted(files: u64, bytes: u64) {
    metrics::counter!(GC_DELETED_FILES).increment(files);
    metrics::counter!(GC_DELETED_BYTES).increment(bytes);
}

pub fn store(chunks: u64, bytes: u64, free: u64) {
    metrics::gauge!(STORE_CHUNKS).set(chunks as f64);
    metrics::gauge!(STORE_BYTES).set(bytes as f64);
    metrics::gauge!(STORE_FREE_BYTES).set(free as f64);
}

pub fn storage_node_up(node: u64, up: bool) {
    metrics::gauge!(STORAGE_NODE_UP, "node" => node.to_string()).set(if up { 1.0 } else { 0.0 });
}

pub fn storage_node_removed(node: u64) {
    metrics::gauge!(STORAGE_NODE_UP, "node" => node.to_string()).set(-1.0);
}
