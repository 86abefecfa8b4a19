//! Every metric a node exports, by name, and the one place they are set
//! (docs/METRICS.md lists them). Served in Prometheus' text format at
//! `http://METRICS_LISTEN/metrics` when the node is configured with
//! `metrics_listen`; otherwise the calls below record into nothing.

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

pub const RPC_REQUESTS: &str = "musicfs_rpc_requests_total";
pub const RPC_SECONDS: &str = "musicfs_rpc_duration_seconds";
pub const META_ERRORS: &str = "musicfs_meta_errors_total";
/// Connections open now, and those closed at once because the node's
/// limits were reached (`reason` = `total`, `address`).
pub const CONNECTIONS: &str = "musicfs_connections";
pub const CONNECTIONS_REFUSED: &str = "musicfs_connections_refused_total";
pub const RAFT_TERM: &str = "musicfs_raft_term";
pub const RAFT_LAST_LOG: &str = "musicfs_raft_last_log_index";
pub const RAFT_APPLIED: &str = "musicfs_raft_applied_index";
pub const RAFT_APPLY_LAG: &str = "musicfs_raft_apply_lag";
pub const RAFT_IS_LEADER: &str = "musicfs_raft_is_leader";
pub const RAFT_LEADER_CHANGES: &str = "musicfs_raft_leader_changes_total";
pub const RAFT_BALANCE_PASSES: &str = "musicfs_raft_balance_passes_total";

/// Installs the recorder; the status page's listener serves what it
/// renders at `/metrics`.
pub fn install() -> Result<metrics_exporter_prometheus::PrometheusHandle, String> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(RPC_SECONDS.into()),
            &proto::LATENCY_BUCKETS,
        )
        .map_err(|e| format!("metrics buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("metrics recorder: {e}"))?;
    // Counters of rare events are exported from the start at 0, so a
    // dashboard shows 0 rather than no data on a node that never saw one.
    scrub_found(0, 0);
    gc_reaped(0);
    Ok(handle)
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

/// A wire error a metadata call answered with, by call and code.
pub fn connections(open: usize) {
    metrics::gauge!(CONNECTIONS).set(open as f64);
}

pub fn connection_refused(reason: &'static str) {
    metrics::counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

pub fn meta_error(rpc: &'static str, code: &'static str) {
    metrics::counter!(META_ERRORS, "rpc" => rpc, "code" => code).increment(1);
}

/// One Raft group's state as this node sees it.
pub fn raft_group(group: u32, term: u64, last_log: u64, applied: u64, leader: bool) {
    let g = group.to_string();
    metrics::gauge!(RAFT_TERM, "group" => g.clone()).set(term as f64);
    metrics::gauge!(RAFT_LAST_LOG, "group" => g.clone()).set(last_log as f64);
    metrics::gauge!(RAFT_APPLIED, "group" => g.clone()).set(applied as f64);
    metrics::gauge!(RAFT_APPLY_LAG, "group" => g.clone())
        .set(last_log.saturating_sub(applied) as f64);
    metrics::gauge!(RAFT_IS_LEADER, "group" => g).set(if leader { 1.0 } else { 0.0 });
}

/// A chunk read served over the direct protocol, counted with the gRPC
/// calls under the method `ChunkDirect/Get`.
pub fn direct_read(status: &'static str, took: std::time::Duration) {
    metrics::counter!(RPC_REQUESTS, "method" => "ChunkDirect/Get", "status" => status).increment(1);
    metrics::histogram!(RPC_SECONDS, "method" => "ChunkDirect/Get").record(took.as_secs_f64());
}

/// A chunk upload over the direct protocol, under the method
/// `ChunkDirect/Put`; `status` is "0" or the refusal's error code.
pub fn direct_put(status: &'static str, took: std::time::Duration) {
    metrics::counter!(RPC_REQUESTS, "method" => "ChunkDirect/Put", "status" => status).increment(1);
    metrics::histogram!(RPC_SECONDS, "method" => "ChunkDirect/Put").record(took.as_secs_f64());
}

pub fn raft_balance_pass() {
    metrics::counter!(RAFT_BALANCE_PASSES).increment(1);
}

pub fn raft_leader_change(group: u32) {
    metrics::counter!(RAFT_LEADER_CHANGES, "group" => group.to_string()).increment(1);
}

/// Counts every RPC the node serves and times it, by method and gRPC
/// status (a tower layer around the whole server).
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcLayer;

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner }
    }
}

#[derive(Clone, Debug)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // "/musicfs.meta.MetaService/Propose" -> "MetaService/Propose".
        let path = req.uri().path();
        let method = path
            .rsplit_once('.')
            .map_or(path, |(_, m)| m)
            .trim_start_matches('/')
            .to_string();
        let start = std::time::Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            // Errors travel as `grpc-status` in a trailers-only response;
            // a success's status comes in the trailers (0).
            let status = match &res {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0")
                    .to_string(),
                Err(_) => "transport".to_string(),
            };
            metrics::counter!(RPC_REQUESTS, "method" => method.clone(), "status" => status)
                .increment(1);
            metrics::histogram!(RPC_SECONDS, "method" => method)
                .record(start.elapsed().as_secs_f64());
            res
        })
    }
}
