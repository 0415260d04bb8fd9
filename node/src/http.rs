//! The node's optional HTTP endpoints: Prometheus metrics at `/metrics`
//! (`[[node]] metrics`) and the read-only status page at `/`
//! (`[[node]] status_page`, loopback only). Both are off unless the topology
//! names an address; the same address serves both. The listeners follow the
//! topology in force: a reload that adds, moves or removes an address takes
//! effect within a second.
//!
//! Every request gathers one [`NodeView`] from the node's actors (its own
//! gossip replica, scheduler, mesh and store); nothing is cached and nothing
//! can be changed through HTTP (only GET and HEAD are answered).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use drmesh_actors::actor::gossip::{CatalogView, GetCatalog, GetMesh, MeshView};
use drmesh_actors::actor::mesh::{GetStatus, MeshStatus};
use drmesh_actors::actor::volumes::{GetReplications, ReplicationStatus};
use drmesh_actors::store::{GcTotals, StoreStats};
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use crate::admin::AdminContext;

/// How often the listeners are compared with the topology in force.
const TICK: Duration = Duration::from_secs(1);
/// A listener that could not bind is tried again after this long.
const RETRY_BIND: Duration = Duration::from_secs(60);
/// Connections served at once per listener; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 32;
/// A client must send its request head within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What one address serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
struct Routes {
    metrics: bool,
    status_page: bool,
}

/// Starts the task that keeps the node's HTTP listeners as the topology says.
pub fn start(ctx: AdminContext) {
    actix_rt::spawn(async move {
        let mut running: BTreeMap<SocketAddr, (Routes, tokio::task::JoinHandle<()>)> = BTreeMap::new();
        let mut failed: BTreeMap<SocketAddr, (Routes, Instant)> = BTreeMap::new();
        loop {
            let wanted = wanted_routes(&ctx);
            running.retain(|addr, (routes, task)| {
                let keep = wanted.get(addr) == Some(routes) && !task.is_finished();
                if !keep {
                    task.abort();
                    tracing::info!(address = %addr, "stopped serving HTTP on this address (the topology no longer asks for it here)");
                }
                keep
            });
            failed.retain(|addr, (routes, _)| wanted.get(addr) == Some(routes));
            for (addr, routes) in &wanted {
                if running.contains_key(addr) || failed.get(addr).is_some_and(|(_, at)| at.elapsed() < RETRY_BIND) {
                    continue;
                }
                match std::net::TcpListener::bind(addr).and_then(|l| {
                    l.set_nonblocking(true)?;
                    tokio::net::TcpListener::from_std(l)
                }) {
                    Ok(listener) => {
                        failed.remove(addr);
                        for (on, path, what) in [(routes.metrics, "/metrics", "Prometheus metrics"), (routes.status_page, "/", "status page")] {
                            if on {
                                tracing::info!(url = %format!("http://{addr}{path}"), "serving the {what}");
                            }
                        }
                        let task = actix_rt::spawn(serve(listener, *routes, ctx.clone()));
                        running.insert(*addr, (*routes, task));
                    }
                    Err(e) => {
                        tracing::warn!(address = %addr, error = %e, "cannot serve HTTP on this address (metrics / status page); trying again in 60 s");
                        failed.insert(*addr, (*routes, Instant::now()));
                    }
                }
            }
            tokio::time::sleep(TICK).await;
        }
    });
}

/// The addresses this node's `[[node]]` table asks for, with what each serves.
fn wanted_routes(ctx: &AdminContext) -> BTreeMap<SocketAddr, Routes> {
    let topology = ctx.data.topology();
    let mut wanted: BTreeMap<SocketAddr, Routes> = BTreeMap::new();
    if let Some(me) = topology.node_by_id(&ctx.data.local()) {
        if let Some(addr) = me.metrics {
            wanted.entry(addr).or_default().metrics = true;
        }
        if let Some(addr) = me.status_page {
            wanted.entry(addr).or_default().status_page = true;
        }
    }
    wanted
}

async fn serve(listener: tokio::net::TcpListener, routes: Routes, ctx: AdminContext) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        actix_rt::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(respond(request, routes, &ctx).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
}

type Body = Full<Bytes>;

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// Whether a `Host` header names this machine by a loopback-style name or an
/// IP literal: a page fetched by a browser under another name is a DNS
/// rebinding attempt from some web site, and gets nothing.
fn host_allowed(host: Option<&HeaderValue>) -> bool {
    let Some(host) = host.and_then(|h| h.to_str().ok()) else { return true };
    let name = match host.strip_prefix('[') {
        Some(rest) => return rest.split_once(']').is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// Whether a request comes from a web browser: browsers send `Sec-Fetch-*`
/// headers with every request, scrapers (Prometheus, curl) never do.
fn from_browser(request: &Request<hyper::body::Incoming>) -> bool {
    request.headers().keys().any(|k| k.as_str().starts_with("sec-fetch-"))
}

async fn respond(request: Request<hyper::body::Incoming>, routes: Routes, ctx: &AdminContext) -> Response<Body> {
    let mut response = route(&request, routes, ctx).await;
    // Refusals too: nothing this endpoint says is to be kept by a cache.
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if request.method() == Method::HEAD {
        *response.body_mut() = Full::new(Bytes::new());
    }
    response
}

async fn route(request: &Request<hyper::body::Incoming>, routes: Routes, ctx: &AdminContext) -> Response<Body> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD: this endpoint is read-only");
        response.headers_mut().insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let path = request.uri().path();
    match path {
        "/metrics" if routes.metrics => {
            // Scrapers name the node as they like (a DNS name is fine); a
            // browser fetching it under a foreign name is a DNS rebinding
            // attempt from some web site.
            if from_browser(request) && !host_allowed(request.headers().get(HOST)) {
                return plain(StatusCode::FORBIDDEN, "a browser gets the metrics only under localhost or an IP address in the Host header");
            }
            let view = NodeView::gather(ctx).await;
            let mut response = Response::new(Full::new(Bytes::from(crate::metrics::encode(&view))));
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE));
            response
        }
        "/" | "/index.html" if routes.status_page => {
            if !host_allowed(request.headers().get(HOST)) {
                return plain(StatusCode::FORBIDDEN, "the status page answers only to localhost or an IP address in the Host header");
            }
            let view = NodeView::gather(ctx).await;
            let mut response = Response::new(Full::new(Bytes::from(crate::status_page::render(&view))));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"));
            headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
            response
        }
        _ => {
            let mut offered = Vec::new();
            if routes.status_page {
                offered.push("/ (status page)");
            }
            if routes.metrics {
                offered.push("/metrics");
            }
            plain(StatusCode::NOT_FOUND, &format!("not found: this address serves {}", offered.join(" and ")))
        }
    }
}

/// What the metrics and the status page show: one look at the node's actors.
/// A part whose actor did not answer (the node is stopping) is `None`.
pub struct NodeView {
    /// When it was gathered, Unix ms.
    pub now_unix_ms: u64,
    /// The mesh side: this node, its peers and their connections.
    pub mesh: Option<MeshStatus>,
    /// Gossip membership as this node's replica has it.
    pub members: Option<MeshView>,
    /// Volumes and RPs of the whole mesh, from this node's gossip replica.
    pub catalog: Option<CatalogView>,
    /// The replications this node is the source of.
    pub replications: Option<Vec<ReplicationStatus>>,
    /// Figures of this node's store.
    pub store: Option<StoreStats>,
    /// What this node's GCs did since it started.
    pub gc: GcTotals,
}

impl NodeView {
    /// Asks each actor once.
    pub async fn gather(ctx: &AdminContext) -> NodeView {
        let store = ctx.data.store().clone();
        let gc = store.gc_totals();
        let (mesh, members, catalog, replications, store) = tokio::join!(
            ctx.mesh.send(GetStatus),
            ctx.gossip.send(GetMesh),
            ctx.gossip.send(GetCatalog(None)),
            ctx.scheduler.send(GetReplications),
            tokio::task::spawn_blocking(move || store.stats()),
        );
        let store = match store {
            Ok(Ok(stats)) => Some(stats),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the store's figures for metrics / the status page");
                None
            }
            Err(_) => None,
        };
        NodeView {
            now_unix_ms: crate::drill::unix_ms(),
            mesh: mesh.ok(),
            members: members.ok(),
            catalog: catalog.ok(),
            replications: replications.ok(),
            store,
            gc,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::host_allowed;
    use hyper::header::HeaderValue;

    #[test]
    fn host_header_must_be_loopback_name_or_ip() {
        let ok = |h: &str| host_allowed(Some(&HeaderValue::from_str(h).unwrap()));
        assert!(host_allowed(None));
        for good in ["127.0.0.1:9720", "127.0.0.1", "localhost:9720", "LOCALHOST", "[::1]:9720", "[::1]", "10.1.2.3:80"] {
            assert!(ok(good), "{good}");
        }
        for bad in ["evil.example:9720", "evil.example", "localhost.evil.example", "[evil]:80", "127.0.0.1.nip.io:9720"] {
            assert!(!ok(bad), "{bad}");
        }
    }
}
