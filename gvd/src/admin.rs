//! gvd's admin endpoint: a status page (`/`), the same data as JSON (`/api/status`) and
//! Prometheus metrics (`/metrics`), on loopback by default (`admin_address`). On any other
//! address it needs the network key: requests must carry `Authorization: Bearer <token>`,
//! the token printed by `gvd admin-token` (derived from the key, so the key itself never
//! travels). The daemon publishes an [`AdminStatus`] after every round; requests only read it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;

use crate::daemon::{DaemonStats, NodesFile};
use grapevine_gvd_schema::nodes::{ZoneActivity, ZoneStatus};

/// Samples kept for the page's charts (one per round, a round is a quarter period).
const HISTORY: usize = 240;

/// One point of the charts.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Sample {
    /// Seconds since gvd started.
    pub t: f64,
    /// Datagrams this node sent per second (ELP and VDEV topics, snapshots included).
    pub sent_per_second: f64,
    /// Messages per second received in order, all followed streams together.
    pub messages_per_second: f64,
    /// Nodes alive.
    pub alive: usize,
    /// Versions this node is behind the newest member, summed over its zones.
    pub zone_lag: u64,
}

/// One stream this node follows.
#[derive(Clone, Debug, Serialize)]
pub struct StreamRow {
    /// `elp` or `vdev`.
    pub topic: &'static str,
    /// Publisher id (the low half of its node id).
    pub publisher: u32,
    /// The publisher's session (a restart starts a new one); hex in JSON, as everywhere.
    #[serde(serialize_with = "grapevine_gvd_schema::nodes::hex_id::serialize")]
    pub session: u64,
    /// `joining`, `recovering` or `live`.
    pub status: String,
    /// Nothing heard from the publisher for its timeout.
    pub silent: bool,
    /// Last sequence number processed.
    pub last_seq: u64,
    /// Messages per second processed in order since the previous round.
    pub messages_per_second: f64,
    /// Leaves not trusted yet.
    pub stale: usize,
    /// Gaps in this session of the stream.
    pub gaps: u64,
    /// Messages lost in them.
    pub lost: u64,
    /// Recoveries completed.
    pub recoveries: u64,
}

/// Counters of the topics this node follows.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct TopicCounters {
    /// Gaps declared.
    pub gaps: u64,
    /// Messages declared lost.
    pub lost: u64,
    /// Recoveries completed.
    pub recoveries: u64,
    /// Datagrams received.
    pub datagrams: u64,
}

/// What the page shows, as of the daemon's last round.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AdminStatus {
    /// This node, in hex.
    pub node: String,
    /// Its name.
    pub name: String,
    /// Seconds since it started.
    pub uptime_seconds: f64,
    /// The node list (nodes with liveness, VDEVs, zones).
    pub nodes: Option<NodesFile>,
    /// This node's zones.
    pub zones: Vec<ZoneStatus>,
    /// Streams followed.
    pub streams: Vec<StreamRow>,
    /// Their counters, ELP and VDEV topics together.
    pub topics: TopicCounters,
    /// The daemon's counters.
    pub stats: DaemonStats,
    /// Recent samples for the charts, oldest first.
    pub history: VecDeque<Sample>,
    /// The repeater role, when configured: its counters and each peer's link.
    pub repeater: Option<RepeaterStatus>,
}

/// The repeater role's state.
#[derive(Clone, Debug, Serialize)]
pub struct RepeaterStatus {
    /// Its counters.
    pub stats: grapevine_repeater::RepeaterStats,
    /// Each remote repeater: up or silent, sent to or not, and the QUIC path.
    pub links: Vec<grapevine_repeater::PeerLink>,
}

/// The status the daemon publishes and the endpoint reads.
pub type SharedStatus = Arc<Mutex<AdminStatus>>;

/// Adds a sample, keeping the most recent few hundred.
pub fn record_sample(status: &mut AdminStatus, sample: Sample) {
    if status.history.len() == HISTORY {
        status.history.pop_front();
    }
    status.history.push_back(sample);
}

/// The running endpoint (axum on a current-thread runtime of its own thread); stopped when
/// dropped.
pub struct AdminServer {
    address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The thread may have ended already (its runtime failed): nothing to stop.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // A panic in the thread was already reported by the panic hook.
            let _ = thread.join();
        }
    }
}

impl AdminServer {
    /// Serves `status` on `address`. `token`: required as a bearer token when set.
    ///
    /// # Errors
    ///
    /// The address cannot be bound, or the thread cannot start.
    pub fn start(
        address: SocketAddr,
        status: SharedStatus,
        token: Option<String>,
    ) -> Result<Self, String> {
        let listener = std::net::TcpListener::bind(address).map_err(|e| e.to_string())?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let address = listener.local_addr().map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| e.to_string())?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = router(status, token);
        let thread = std::thread::Builder::new()
            .name("gvd-admin".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(error) => {
                            tracing::error!(%error, "admin endpoint stopped");
                            return;
                        }
                    };
                    // Not a graceful shutdown: a browser's idle keep-alive connection must not
                    // hold gvd's exit. Dropping the runtime ends the connections.
                    tokio::select! {
                        served = axum::serve(listener, app) => {
                            if let Err(error) = served {
                                tracing::error!(%error, "admin endpoint stopped");
                            }
                        }
                        _ = stopped => {}
                    }
                });
            })
            .map_err(|e| e.to_string())?;
        Ok(Self {
            address,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

/// The bearer token for a network key: a keyed hash, so the key itself is never sent.
pub fn token(keyring: &grapevine_core::auth::Keyring) -> Option<String> {
    keyring
        .derive_key("grapevine gvd admin endpoint 2026-12")
        .map(|key| blake3::hash(&key).to_hex()[..32].to_string())
}

/// The endpoint's routes: GET only (axum answers 405 to other methods, 404 to other paths),
/// every one behind the token check when a token is set.
fn router(status: SharedStatus, token: Option<String>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/", get(page))
        .route("/index.html", get(page))
        .route("/api/status", get(api_status))
        .route("/metrics", get(metrics))
        .with_state(status)
        .layer(axum::middleware::from_fn_with_state(
            token.map(Arc::<str>::from),
            authorise,
        ))
}

async fn authorise(
    axum::extract::State(token): axum::extract::State<Option<Arc<str>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Some(token) = token {
        let expected = format!("Bearer {token}");
        let presented = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .map(axum::http::HeaderValue::as_bytes);
        let authorised = presented.is_some_and(|p| {
            use subtle::ConstantTimeEq;
            p.len() == expected.len() && bool::from(p.ct_eq(expected.as_bytes()))
        });
        if !authorised {
            return (
                axum::http::StatusCode::UNAUTHORIZED,
                "a bearer token is needed (gvd admin-token)\n",
            )
                .into_response();
        }
    }
    next.run(request).await
}

async fn page() -> axum::response::Html<&'static str> {
    axum::response::Html(PAGE)
}

async fn api_status(
    axum::extract::State(status): axum::extract::State<SharedStatus>,
) -> impl axum::response::IntoResponse {
    let json = serde_json::to_string(&*status.lock()).unwrap_or_else(|_| "{}".into());
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        json,
    )
}

async fn metrics(
    axum::extract::State(status): axum::extract::State<SharedStatus>,
) -> impl axum::response::IntoResponse {
    let text = prometheus(&status.lock());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
}

/// The Prometheus text of a status.
pub fn prometheus(status: &AdminStatus) -> String {
    let alive = status.history.back().map_or(0, |s| s.alive);
    let lines: [(&str, &str, u64); 11] = [
        ("gvd_nodes_alive", "Nodes alive.", alive as u64),
        (
            "gvd_nodes_joined_total",
            "Nodes that appeared.",
            status.stats.transitions.joined,
        ),
        (
            "gvd_nodes_died_total",
            "Nodes declared dead.",
            status.stats.transitions.died,
        ),
        (
            "gvd_queries_sent_total",
            "QUERYs sent.",
            status.stats.queries_sent,
        ),
        (
            "gvd_queries_answered_total",
            "QUERYs answered.",
            status.stats.queries_answered,
        ),
        (
            "gvd_queries_rejected_total",
            "Datagrams on the query port refused.",
            status.stats.queries_rejected,
        ),
        (
            "gvd_rescans_total",
            "VDRIVER inventory scans.",
            status.stats.rescans,
        ),
        (
            "gvd_stream_gaps_total",
            "Gaps on the ELP and VDEV topics.",
            status.topics.gaps,
        ),
        (
            "gvd_stream_lost_total",
            "Messages lost on the ELP and VDEV topics.",
            status.topics.lost,
        ),
        (
            "gvd_stream_recoveries_total",
            "Recoveries on the ELP and VDEV topics.",
            status.topics.recoveries,
        ),
        (
            "gvd_zone_conflicts",
            "Conflicts kept, all zones.",
            status.zones.iter().map(|z| z.conflicts).sum(),
        ),
    ];
    let node = format!("node=\"{}\"", status.node);
    let mut out = String::new();
    for (name, help, value) in lines {
        family(&mut out, name, help, &[(node.clone(), value)]);
    }
    // Per zone this node holds (zone names are validated config: letters, digits, `-_.`).
    let activity = status
        .nodes
        .as_ref()
        .map_or(&[][..], |n| n.zone_activity.as_slice());
    type ZoneFigure = fn(&ZoneActivity) -> u64;
    let per_zone: [(&str, &str, ZoneFigure); 6] = [
        (
            "gvd_zone_pulls_pending",
            "Pulls wanted or under way.",
            |a| a.pulls_pending,
        ),
        ("gvd_zone_pulls_done_total", "Pulls completed.", |a| {
            a.pulls_done
        }),
        ("gvd_zone_pulls_failed_total", "Pulls that failed.", |a| {
            a.pulls_failed
        }),
        (
            "gvd_zone_stalled_peers",
            "Peers whose last pull failed.",
            |a| a.stalls.len() as u64,
        ),
        (
            "gvd_zone_unsettled_writes",
            "NFS writes not settled yet.",
            |a| a.unsettled_writes,
        ),
        (
            "gvd_zone_skipped_links",
            "Symbolic links never replicated.",
            |a| a.skipped_links,
        ),
    ];
    for (name, help, value) in per_zone {
        let samples: Vec<(String, u64)> = activity
            .iter()
            .map(|a| (format!("{node},zone=\"{}\"", a.name), value(a)))
            .collect();
        family(&mut out, name, help, &samples);
    }
    if let Some(repeater) = &status.repeater {
        let stats = &repeater.stats;
        let repeater_lines: [(&str, &str, u64); 7] = [
            (
                "gvd_repeater_forwarder",
                "1 while this repeater forwards for its network.",
                u64::from(stats.forwarder),
            ),
            (
                "gvd_repeater_relayed_out_total",
                "Datagrams relayed to remote repeaters.",
                stats.relayed_out,
            ),
            (
                "gvd_repeater_relayed_in_total",
                "Datagrams from remote repeaters emitted locally.",
                stats.relayed_in,
            ),
            (
                "gvd_repeater_loops_total",
                "Copies recognised and not relayed again.",
                stats.loops + stats.duplicates,
            ),
            (
                "gvd_repeater_refused_total",
                "Datagrams or connections refused.",
                stats.refused,
            ),
            (
                "gvd_repeater_congestion_drops_total",
                "Datagrams the WAN link's congestion control held back.",
                stats.congestion_drops,
            ),
            (
                "gvd_repeater_peers_up",
                "Remote repeaters heard recently.",
                stats.peers_up,
            ),
        ];
        for (name, help, value) in repeater_lines {
            family(&mut out, name, help, &[(node.clone(), value)]);
        }
        let per_peer = |value: fn(&grapevine_repeater::PeerLink) -> Option<u64>| {
            repeater
                .links
                .iter()
                .filter_map(|link| Some((format!("{node},peer=\"{}\"", link.peer), value(link)?)))
                .collect::<Vec<_>>()
        };
        family(
            &mut out,
            "gvd_repeater_peer_up",
            "1 while the remote repeater is heard.",
            &per_peer(|l| Some(u64::from(l.up))),
        );
        family(
            &mut out,
            "gvd_repeater_peer_rtt_microseconds",
            "Smoothed RTT of the QUIC link.",
            &per_peer(|l| l.quic.as_ref().map(|q| q.rtt_us)),
        );
        family(
            &mut out,
            "gvd_repeater_peer_lost_packets_total",
            "QUIC packets lost on the link.",
            &per_peer(|l| l.quic.as_ref().map(|q| q.lost_packets)),
        );
    }
    let versions: Vec<(String, u64)> = status
        .zones
        .iter()
        .filter(|z| z.member)
        .map(|z| (format!("{node},zone=\"{}\"", z.name), z.version))
        .collect();
    family(
        &mut out,
        "gvd_zone_version",
        "This node's version of the zone.",
        &versions,
    );
    out
}

/// One metric family: its help, its type (from the `_total` suffix) and its samples.
fn family(out: &mut String, name: &str, help: &str, samples: &[(String, u64)]) {
    if samples.is_empty() {
        return;
    }
    let kind = if name.ends_with("_total") {
        "counter"
    } else {
        "gauge"
    };
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    for (labels, value) in samples {
        out.push_str(&format!("{name}{{{labels}}} {value}\n"));
    }
}

/// How often the page refreshes.
pub const REFRESH: Duration = Duration::from_secs(1);

/// The status page: one file, no external resources; it polls `/api/status` and draws.
const PAGE: &str = include_str!("admin.html");

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// Status code and body of one request to the router.
    fn call(app: &axum::Router, method: &str, path: &str, auth: Option<&str>) -> (u16, String) {
        let mut request = axum::http::Request::builder().method(method).uri(path);
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        let request = request.body(axum::body::Body::empty()).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let response = app.clone().oneshot(request).await.unwrap();
            let code = response.status().as_u16();
            let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap();
            (code, String::from_utf8_lossy(&body).into_owned())
        })
    }

    #[test]
    fn with_a_token_every_path_needs_it_and_only_get_is_served() {
        let status = SharedStatus::default();
        status.lock().name = "node-a".into();
        let app = router(status, Some("0123abcd".into()));
        for path in ["/", "/api/status", "/metrics", "/nothing"] {
            assert_eq!(call(&app, "GET", path, None).0, 401, "{path}");
            assert_eq!(
                call(&app, "GET", path, Some("Bearer 0123abce")).0,
                401,
                "{path}"
            );
            assert_eq!(
                call(&app, "GET", path, Some("Bearer 0123abcd0")).0,
                401,
                "{path}"
            );
        }
        let (code, body) = call(&app, "GET", "/api/status", Some("Bearer 0123abcd"));
        assert_eq!(code, 200);
        assert!(body.contains("\"name\":\"node-a\""), "{body}");
        assert_eq!(
            call(&app, "POST", "/api/status", Some("Bearer 0123abcd")).0,
            405
        );
        assert_eq!(
            call(&app, "GET", "/nothing", Some("Bearer 0123abcd")).0,
            404
        );
        let (code, page) = call(&app, "GET", "/", Some("Bearer 0123abcd"));
        assert_eq!(code, 200);
        assert!(page.starts_with("<!doctype html>"), "{page}");
    }

    #[test]
    fn without_a_token_loopback_readers_need_none() {
        let app = router(SharedStatus::default(), None);
        let (code, metrics) = call(&app, "GET", "/metrics", None);
        assert_eq!(code, 200);
        assert!(
            metrics.contains("# TYPE gvd_nodes_alive gauge"),
            "{metrics}"
        );
    }

    #[test]
    fn metrics_show_the_repeater_and_each_peer_link() {
        let link = |peer: &str, up: bool, rtt_us: Option<u64>| grapevine_repeater::PeerLink {
            peer: peer.parse().unwrap(),
            up,
            target: up,
            wan: grapevine_repeater::WanTransport::Quic,
            quic: rtt_us.map(|rtt_us| grapevine_repeater::QuicPath {
                rtt_us,
                congestion_window: 12_000,
                congestion_events: 0,
                lost_packets: 7,
                max_datagram: Some(1_400),
            }),
        };
        let status = AdminStatus {
            node: "00000000000000a1".into(),
            repeater: Some(RepeaterStatus {
                stats: grapevine_repeater::RepeaterStats {
                    forwarder: true,
                    relayed_out: 42,
                    ..Default::default()
                },
                links: vec![
                    link("10.0.0.2:7190", true, Some(850)),
                    link("10.0.0.3:7190", false, None),
                ],
            }),
            ..AdminStatus::default()
        };
        let text = prometheus(&status);
        let node = "node=\"00000000000000a1\"";
        for line in [
            format!("gvd_repeater_forwarder{{{node}}} 1\n"),
            format!("gvd_repeater_relayed_out_total{{{node}}} 42\n"),
            format!("gvd_repeater_peer_up{{{node},peer=\"10.0.0.2:7190\"}} 1\n"),
            format!("gvd_repeater_peer_up{{{node},peer=\"10.0.0.3:7190\"}} 0\n"),
            format!("gvd_repeater_peer_rtt_microseconds{{{node},peer=\"10.0.0.2:7190\"}} 850\n"),
        ] {
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
        assert!(
            !text.contains(
                "gvd_repeater_peer_rtt_microseconds{node=\"00000000000000a1\",peer=\"10.0.0.3"
            ),
            "a peer without a QUIC path has no RTT: {text}"
        );
        let without = prometheus(&AdminStatus::default());
        assert!(!without.contains("gvd_repeater"), "{without}");
    }

    #[test]
    fn metrics_have_one_family_per_name_and_one_sample_per_zone() {
        let mut status = AdminStatus {
            node: "00000000000000a1".into(),
            ..AdminStatus::default()
        };
        let activity = |name: &str, failed: u64| ZoneActivity {
            name: name.into(),
            pulls_failed: failed,
            ..ZoneActivity::default()
        };
        status.nodes = Some(NodesFile {
            version: 2,
            local_node: 0xa1,
            nodes: Vec::new(),
            remote_peers: Vec::new(),
            pid: 1,
            written_at_ms: 1,
            period_ms: 1000,
            groups: Vec::new(),
            zone_activity: vec![activity("photos", 3), activity("music", 0)],
        });
        let text = prometheus(&status);
        assert_eq!(
            text.matches("# TYPE gvd_zone_pulls_failed_total counter")
                .count(),
            1
        );
        assert!(
            text.contains(
                "gvd_zone_pulls_failed_total{node=\"00000000000000a1\",zone=\"photos\"} 3\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "gvd_zone_pulls_failed_total{node=\"00000000000000a1\",zone=\"music\"} 0\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE gvd_zone_pulls_pending gauge"),
            "{text}"
        );
        assert!(
            text.contains("gvd_nodes_alive{node=\"00000000000000a1\"} 0\n"),
            "{text}"
        );
        // No zone version without zones.
        assert!(!text.contains("gvd_zone_version"), "{text}");
    }
}
