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
    #[serde(serialize_with = "hex_u64")]
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

fn hex_u64<S: serde::Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format!("{value:016x}"))
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

/// The running endpoint; stopped when dropped.
pub struct AdminServer {
    address: SocketAddr,
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.server.unblock();
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
    /// The address cannot be bound.
    pub fn start(
        address: SocketAddr,
        status: SharedStatus,
        token: Option<String>,
    ) -> Result<Self, String> {
        let server = Arc::new(tiny_http::Server::http(address).map_err(|e| e.to_string())?);
        let address = server.server_addr().to_ip().ok_or("not an IP address")?;
        let serving = Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("gvd-admin".into())
            .spawn(move || {
                // Ends when `unblock` is called (on drop).
                for request in serving.incoming_requests() {
                    let response = answer(&request, &status, token.as_deref());
                    // A client that went away gets nothing; the next one is answered.
                    let _ = request.respond(response);
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Self {
            address,
            server,
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

type Response = tiny_http::Response<std::io::Cursor<Vec<u8>>>;

fn answer(request: &tiny_http::Request, status: &SharedStatus, token: Option<&str>) -> Response {
    if let Some(token) = token {
        let expected = format!("Bearer {token}");
        let presented = request
            .headers()
            .iter()
            .find(|h| h.field.equiv("Authorization"))
            .map(|h| h.value.as_str().to_string());
        let authorised = presented.is_some_and(|p| {
            use subtle::ConstantTimeEq;
            p.len() == expected.len() && bool::from(p.as_bytes().ct_eq(expected.as_bytes()))
        });
        if !authorised {
            return respond(
                401,
                "text/plain",
                "a bearer token is needed (gvd admin-token)\n",
            );
        }
    }
    if request.method() != &tiny_http::Method::Get {
        return respond(405, "text/plain", "GET only\n");
    }
    let path = request.url().split('?').next().unwrap_or("/");
    match path {
        "/" | "/index.html" => respond(200, "text/html; charset=utf-8", PAGE),
        "/api/status" => {
            let json = serde_json::to_string(&*status.lock()).unwrap_or_else(|_| "{}".into());
            respond(200, "application/json", &json)
        }
        "/metrics" => respond(
            200,
            "text/plain; version=0.0.4",
            &prometheus(&status.lock()),
        ),
        _ => respond(404, "text/plain", "not found\n"),
    }
}

fn respond(code: u16, content_type: &str, body: &str) -> Response {
    let mut response = tiny_http::Response::from_string(body).with_status_code(code);
    if let Ok(header) = tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes())
    {
        response.add_header(header);
    }
    response
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
    let per_zone: [(&str, &str, fn(&ZoneActivity) -> u64); 6] = [
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
        status.nodes = Some(crate::daemon::NodesFile {
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
