//! The query port, served on its own thread: a valid QUERY for this node starts a snapshot
//! cycle of its topic now. Every datagram costs bounded work (a fixed buffer, one decode, a
//! per-address rate limit), and QUERYs arriving while a cycle is due are answered by that one
//! cycle.

use std::collections::HashMap;
use std::net::{IpAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use grapevine_core::limit::SourceLimiter;
use grapevine_snapshotter::CycleRequester;

use crate::elp::{ELP_TOPIC, VDEV_TOPIC};
use crate::query::{Query, QueryKey};

/// How long a receive waits at most, so that a stop request is noticed.
const RECEIVE_WAIT: Duration = Duration::from_millis(50);

/// What the query port did.
#[derive(Debug, Default)]
pub(crate) struct QueryCounters {
    pub(crate) answered: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) limited: AtomicU64,
}

/// Who a query server answers for and how.
pub(crate) struct QueryService {
    /// This node.
    pub(crate) node: u64,
    /// The network's QUERY key: unsigned and forged QUERYs are rejected when set.
    pub(crate) key: Option<QueryKey>,
    /// The announcement period: one cycle per topic per quarter of it at most.
    pub(crate) period: Duration,
    /// Cycles of the ELP topic.
    pub(crate) elp: CycleRequester,
    /// Cycles of the VDEV topic.
    pub(crate) vdevs: CycleRequester,
}

/// The query port's thread; stopped and joined on drop.
pub(crate) struct QueryServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<QueryCounters>,
}

impl QueryServer {
    /// Serves `socket` until dropped.
    pub(crate) fn start(socket: UdpSocket, service: QueryService) -> std::io::Result<Self> {
        socket.set_read_timeout(Some(RECEIVE_WAIT))?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(QueryCounters::default());
        let thread = {
            let (stop, counters) = (Arc::clone(&stop), Arc::clone(&counters));
            std::thread::Builder::new()
                .name("gvd-query".into())
                .spawn(move || serve(&socket, &service, &stop, &counters))?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
            counters,
        })
    }

    /// Its counters.
    pub(crate) fn counters(&self) -> &QueryCounters {
        &self.counters
    }
}

impl Drop for QueryServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // A panic in the thread was already reported by the panic hook.
            let _ = thread.join();
        }
    }
}

fn serve(socket: &UdpSocket, service: &QueryService, stop: &AtomicBool, counters: &QueryCounters) {
    let mut buffer = [0u8; 64];
    // A node asks a peer again only after a period: a few per second per address is plenty for
    // a host running several nodes.
    let mut sources = SourceLimiter::<IpAddr>::new(10.0, 10.0, 4096);
    let mut cycle_asked: HashMap<u32, Instant> = HashMap::new();
    let count = |counter: &AtomicU64| {
        counter.fetch_add(1, Ordering::Relaxed);
    };
    while !stop.load(Ordering::Relaxed) {
        let (len, from) = match socket.recv_from(&mut buffer) {
            Ok(received) => received,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(error) => {
                tracing::warn!(%error, "query port receive failed");
                std::thread::sleep(RECEIVE_WAIT);
                continue;
            }
        };
        let decoded = Query::decode_checked(
            &buffer[..len],
            service.key.as_ref(),
            std::time::SystemTime::now(),
        );
        let query = match decoded {
            Ok(query) if query.to == service.node => query,
            Ok(_) => {
                count(&counters.rejected);
                continue;
            }
            Err(error) => {
                count(&counters.rejected);
                tracing::debug!(%from, %error, "not a QUERY");
                continue;
            }
        };
        let cycles = match query.topic {
            ELP_TOPIC => &service.elp,
            VDEV_TOPIC => &service.vdevs,
            _ => {
                count(&counters.rejected);
                continue;
            }
        };
        let now = Instant::now();
        if !sources.admit(now, from.ip(), 1.0) {
            count(&counters.limited);
            continue;
        }
        // One cycle answers every QUERY that arrives while it is due: ask for another only
        // after a quarter of the announcement period.
        let recent = cycle_asked
            .get(&query.topic)
            .is_some_and(|at| now.saturating_duration_since(*at) < service.period / 4);
        if recent {
            count(&counters.limited);
            continue;
        }
        cycle_asked.insert(query.topic, now);
        tracing::debug!(%from, topic = query.topic, "QUERY answered");
        cycles.request_cycle();
        count(&counters.answered);
    }
}
