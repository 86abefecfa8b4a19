//! The node's read-only HTTP side (`metrics_listen`): `/` is a status page
//! an operator opens in a browser (this node's view of the cluster: health,
//! nodes, groups and leaders, replication, background work), `/metrics`
//! Prometheus' text format. Nothing here changes state; anything but GET
//! is refused.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use proto::admin::admin_service_server::AdminService;
use proto::admin::{StatusRequest, StatusResponse};
use proto::display::{eta, human, limit};
use proto::meta::StorageState;

use crate::service::AdminSvc;

/// Serves the page and the metrics on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    admin: Arc<AdminSvc>,
    metrics: PrometheusHandle,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "status page: accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (admin, metrics) = (admin.clone(), metrics.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (admin, metrics) = (admin.clone(), metrics.clone());
                async move { Ok::<_, Infallible>(answer(req, &admin, &metrics).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            // A browser may hold a connection open: bound its life.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
        });
    }
}

fn reply(status: StatusCode, kind: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = kind.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn answer<B>(
    req: Request<B>,
    admin: &AdminSvc,
    metrics: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "read-only: GET only\n",
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        "/" => match admin.status(tonic::Request::new(StatusRequest {})).await {
            Ok(st) => reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                render(&st.into_inner()),
            ),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("status: {}\n", e.message()),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try / or /metrics\n",
        ),
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// What puts data or availability at risk, as this node sees it.
pub fn problems(st: &StatusResponse) -> Vec<String> {
    let mut p = Vec::new();
    if st.cluster_id.is_empty() {
        p.push("this node is not part of a cluster yet (musicfs cluster init)".into());
    }
    for g in st.groups.iter().filter(|g| g.leader_id == 0) {
        p.push(format!("group {} has no leader", g.group_id));
    }
    for n in &st.storage_nodes {
        if n.state() != StorageState::StorageRemoved && !st.storage_up.contains(&n.node_id) {
            p.push(format!(
                "storage node {} ({}) does not answer",
                n.node_id, n.addr
            ));
        }
    }
    if let Some(r) = &st.repair {
        if r.unavailable > 0 {
            p.push(format!("{} chunk(s) have no reachable copy", r.unavailable));
        }
        if r.under_replicated > 0 {
            p.push(format!(
                "{} chunk(s) have fewer copies than the replication factor",
                r.under_replicated
            ));
        }
    }
    p
}

/// What an operator should know about how the node is secured, if it is
/// not TLS with an admin token.
pub fn security_warning(st: &StatusResponse) -> Option<String> {
    match (st.tls, st.admin_token) {
        (true, true) => None,
        (true, false) => Some(
            "TLS without an admin token: any holder of a client certificate may change the cluster"
                .into(),
        ),
        (false, token) => Some(format!(
            "PLAIN TCP: nothing is encrypted and clients are not authenticated{}; \
             node calls are {}",
            if token {
                "; the admin token travels in clear text"
            } else {
                "; no admin token is asked for"
            },
            if st.cluster_secret {
                "signed with the cluster secret"
            } else {
                "NOT signed"
            }
        )),
    }
}

/// The status page.
pub fn render(st: &StatusResponse) -> String {
    let problems = problems(st);
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <title>MusicFS node {id}</title><style>\
         body{{font-family:sans-serif;margin:2em;color:#222}}\
         table{{border-collapse:collapse;margin-bottom:1.5em}}\
         th,td{{border:1px solid #ccc;padding:.3em .7em;text-align:right}}\
         th{{background:#eee}} td.l{{text-align:left}}\
         .ok{{background:#2e7d32;color:#fff}} .bad{{background:#c62828;color:#fff}}\
         .banner{{padding:.6em 1em;font-size:1.4em;margin-bottom:1em}}\
         </style></head><body>",
        id = st.node_id
    );
    let _ = write!(
        h,
        "<div class=\"banner {}\" id=\"health\">cluster {}: {}</div>",
        if problems.is_empty() { "ok" } else { "bad" },
        esc(&st.cluster_id),
        if problems.is_empty() {
            "HEALTHY"
        } else {
            "DEGRADED"
        }
    );
    if let Some(w) = security_warning(st) {
        let _ = write!(h, "<p class=\"bad\" id=\"security\">{}</p>", esc(&w));
    }
    if !problems.is_empty() {
        h.push_str("<ul id=\"problems\">");
        for p in &problems {
            let _ = write!(h, "<li>{}</li>", esc(p));
        }
        h.push_str("</ul>");
    }
    let _ = write!(
        h,
        "<p>Node {} (version {}), as this node sees the cluster; refreshed every 5 s. \
         Disk: {} free of {}; {} chunks, {}. Replication {}.</p>",
        st.node_id,
        esc(&st.version),
        human(st.disk_free_bytes),
        human(st.disk_total_bytes),
        st.chunk_count,
        human(st.chunk_bytes),
        st.replication
    );

    h.push_str("<h2>Nodes</h2><table id=\"nodes\"><tr><th>node</th><th>address</th><th>metadata</th><th>storage</th><th>answers</th><th>leads</th></tr>");
    let mut ids: Vec<(u64, String)> = st
        .peers
        .iter()
        .map(|p| (p.node_id, p.addr.clone()))
        .collect();
    for n in &st.storage_nodes {
        if !ids.iter().any(|(id, _)| *id == n.node_id) {
            ids.push((n.node_id, n.addr.clone()));
        }
    }
    ids.sort();
    for (id, addr) in &ids {
        let meta = st.peers.iter().any(|p| p.node_id == *id);
        let storage = st
            .storage_nodes
            .iter()
            .find(|n| n.node_id == *id)
            .map(|n| match n.state() {
                StorageState::StorageActive => "active",
                StorageState::StorageDraining => "draining",
                StorageState::StorageRemoved => "removed",
            })
            .unwrap_or("-");
        let up = *id == st.node_id || st.storage_up.contains(id);
        let leads = st.groups.iter().filter(|g| g.leader_id == *id).count();
        let _ = write!(
            h,
            "<tr><td>{id}</td><td class=\"l\">{}</td><td>{}</td><td>{storage}</td><td class=\"{}\">{}</td><td>{leads}</td></tr>",
            esc(addr),
            if meta { "yes" } else { "no" },
            if up { "ok" } else { "bad" },
            if up { "yes" } else { "NO" },
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Raft groups</h2><table id=\"groups\"><tr><th>group</th><th>leader</th><th>term</th><th>here</th><th>voters</th><th>applied</th><th>last log</th><th>snapshot</th><th>inodes</th><th>size</th><th>intents</th><th>queued</th></tr>");
    for g in &st.groups {
        let voters: Vec<String> = g.voters.iter().map(u64::to_string).collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            g.group_id,
            if g.leader_id == 0 { "bad" } else { "" },
            if g.leader_id == 0 {
                "none".to_string()
            } else {
                g.leader_id.to_string()
            },
            g.term,
            esc(&g.state),
            voters.join(", "),
            g.last_applied,
            g.last_log_index,
            g.snapshot_index,
            g.inodes,
            human(g.size_bytes),
            g.open_intents,
            g.queued_ref_batches
        );
    }
    h.push_str("</table>");

    if let Some(r) = &st.repair {
        let _ = write!(
            h,
            "<h2>Replication</h2><table id=\"repair\"><tr><th>short of copies</th><th>waiting for a node</th><th>no reachable copy</th><th>full pass</th><th>copies made</th><th>rate</th><th>ETA</th></tr>\
             <tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}/{}</td><td>{} ({})</td><td>{}/s</td><td>{}</td></tr></table>",
            r.under_replicated,
            r.waiting_for_nodes,
            if r.unavailable > 0 { "bad" } else { "" },
            r.unavailable,
            r.scanned,
            r.total,
            r.copied_chunks,
            human(r.copied_bytes),
            human(r.bytes_per_sec),
            eta(r.eta_secs)
        );
        if !r.last_error.is_empty() {
            let _ = write!(h, "<p>Last repair error: {}</p>", esc(&r.last_error));
        }
    }

    h.push_str("<h2>Background work</h2><table id=\"workers\"><tr><th>worker</th><th>state</th><th>progress</th><th>rate</th><th>limit</th><th>ETA</th><th>moved</th><th>last error</th></tr>");
    for w in &st.workers {
        let _ = write!(
            h,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td>{}/s</td><td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{}</td></tr>",
            esc(&w.name),
            esc(&w.state),
            if w.total > 0 {
                format!("{}/{} {}", w.done, w.total, esc(&w.unit))
            } else {
                "-".into()
            },
            human(w.bytes_per_sec),
            limit(w.limit_bytes_per_sec),
            eta(w.eta_secs),
            human(w.bytes),
            esc(&w.last_error)
        );
    }
    h.push_str("</table><p><a href=\"/metrics\">metrics</a></p></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::admin::{GroupStatus, Peer, RepairStatus};
    use proto::meta::StorageNode;

    fn status() -> StatusResponse {
        StatusResponse {
            node_id: 1,
            cluster_id: "c0ffee".into(),
            peers: vec![Peer {
                node_id: 1,
                addr: "10.0.0.1:7400".into(),
            }],
            groups: vec![GroupStatus {
                group_id: 0,
                leader_id: 1,
                voters: vec![1],
                state: "leader".into(),
                ..Default::default()
            }],
            storage_nodes: vec![StorageNode {
                node_id: 1,
                addr: "10.0.0.1:7400".into(),
                ..Default::default()
            }],
            storage_up: vec![1],
            repair: Some(RepairStatus::default()),
            ..Default::default()
        }
    }

    #[test]
    fn a_healthy_cluster_says_so_and_a_degraded_one_names_its_problems() {
        let ok = render(&status());
        assert!(ok.contains("HEALTHY") && !ok.contains("DEGRADED"));

        let mut st = status();
        st.groups[0].leader_id = 0;
        st.storage_up.clear();
        st.repair = Some(RepairStatus {
            unavailable: 3,
            ..Default::default()
        });
        st.peers[0].addr = "<script>".into();
        let bad = render(&st);
        assert!(bad.contains("DEGRADED"));
        assert!(bad.contains("group 0 has no leader"));
        assert!(bad.contains("storage node 1 (10.0.0.1:7400) does not answer"));
        assert!(bad.contains("3 chunk(s) have no reachable copy"));
        assert!(
            !bad.contains("<script>") && bad.contains("&lt;script&gt;"),
            "text is escaped"
        );
    }
}
