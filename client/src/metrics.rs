//! Metrics of a mount (and of any program using the client core): every
//! name in one place, listed in docs/METRICS.md. Recorded through the
//! `metrics` facade; `musicfs mount --metrics-listen` serves them.

pub const FUSE_OPS: &str = "musicfs_client_fuse_ops_total";
pub const FUSE_SECONDS: &str = "musicfs_client_fuse_op_seconds";
pub const FUSE_ERRORS: &str = "musicfs_client_fuse_errors_total";
pub const CACHE_HITS: &str = "musicfs_client_chunk_cache_hits_total";
pub const CACHE_MISSES: &str = "musicfs_client_chunk_cache_misses_total";
pub const PREFETCHED: &str = "musicfs_client_prefetched_chunks_total";
pub const RETRIES: &str = "musicfs_client_retries_total";
pub const HEDGED: &str = "musicfs_client_hedged_reads_total";
pub const DISK_CACHE_HITS: &str = "musicfs_client_disk_cache_hits_total";
pub const DISK_CACHE_BYTES: &str = "musicfs_client_disk_cache_bytes";

/// Serves every metric recorded in this process over HTTP at `addr`.
pub fn serve(addr: std::net::SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(FUSE_SECONDS.into()),
            &proto::LATENCY_BUCKETS,
        )
        .map_err(|e| format!("metrics buckets: {e}"))?
        .install()
        .map_err(|e| format!("metrics listener on {addr}: {e}"))
}

pub fn fuse_op(op: &'static str, secs: f64) {
    metrics::counter!(FUSE_OPS, "op" => op).increment(1);
    metrics::histogram!(FUSE_SECONDS, "op" => op).record(secs);
}

pub fn fuse_error(op: &'static str, errno: i32) {
    let name = match errno {
        libc::EIO => "EIO",
        libc::ENOENT => "ENOENT",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EAGAIN => "EAGAIN",
        libc::EBADF => "EBADF",
        _ => "other",
    };
    metrics::counter!(FUSE_ERRORS, "op" => op, "errno" => name).increment(1);
}

pub fn chunk_cache(hit: bool) {
    if hit {
        metrics::counter!(CACHE_HITS).increment(1);
    } else {
        metrics::counter!(CACHE_MISSES).increment(1);
    }
}

pub fn prefetched() {
    metrics::counter!(PREFETCHED).increment(1);
}

/// A chunk read that asked a second replica because the first was slow.
pub fn hedged() {
    metrics::counter!(HEDGED).increment(1);
}

/// A chunk served from the on-disk cache.
pub fn disk_cache_hit() {
    metrics::counter!(DISK_CACHE_HITS).increment(1);
}

/// Bytes the on-disk cache holds.
pub fn disk_cache_bytes(bytes: u64) {
    metrics::gauge!(DISK_CACHE_BYTES).set(bytes as f64);
}

/// A call tried again: `reason` is `not_leader`, `unavailable`, `busy`,
/// `transport` (metadata) or `replica` (a chunk read moving on).
pub fn retry(reason: &'static str) {
    metrics::counter!(RETRIES, "reason" => reason).increment(1);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// Every `musicfs_...` name in `text`.
    fn names(text: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut rest = text;
        while let Some(i) = rest.find("musicfs_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            out.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
        out
    }

    fn read(rel: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// The metric names the node and the mount define.
    fn defined() -> BTreeSet<String> {
        let mut d = names(&read("../node/src/metrics.rs"));
        d.extend(names(include_str!("metrics.rs")));
        // The prefix alone (the scanner above) is no metric.
        d.retain(|n| n.len() > "musicfs_".len());
        d
    }

    #[test]
    fn the_dashboard_alerts_and_docs_name_only_metrics_that_exist() {
        let defined = defined();
        let dashboard =
            read("../deploy/grafana-dashboard.json") + &read("../deploy/prometheus-alerts.yml");
        let docs = read("../docs/METRICS.md");
        for n in names(&dashboard) {
            // Prometheus adds these to histograms.
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(&n);
            assert!(
                defined.contains(base),
                "the dashboard or the alerts use {n}, which nothing defines"
            );
        }
        for n in names(&docs) {
            assert!(
                defined.contains(&n),
                "docs/METRICS.md lists {n}, which nothing defines"
            );
        }
        for n in &defined {
            assert!(
                names(&docs).contains(n),
                "{n} is defined but not in docs/METRICS.md"
            );
        }
    }
}
