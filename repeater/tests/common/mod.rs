//! What the repeater tests share: convergence checks and a counter of datagram copies.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use grapevine_core::net::MulticastConfig;
use grapevine_core::state::{digest, KeyedMap};
use grapevine_core::StreamStatus;
use grapevine_publisher::Publisher;
use grapevine_subscriber::Subscriber;

pub type Map = KeyedMap<u32, u64>;

/// Whether `subscriber` holds `publisher`'s state, live, within `within`.
pub fn converged(
    subscriber: &Subscriber<Map>,
    publisher: &Publisher<Map>,
    within: Duration,
) -> bool {
    let started = Instant::now();
    while started.elapsed() < within {
        let want = publisher.read(digest);
        let session = publisher.session_id();
        let done = subscriber.read(|s| {
            s.stream(0).is_some_and(|v| {
                v.status == StreamStatus::Live && v.session == session && digest(v.state) == want
            })
        });
        if done {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Copies of each delta datagram seen, and every data datagram counted.
pub type Counted = (std::collections::HashMap<Vec<u8>, usize>, u64);

/// Counts, on one group, how many times each delta datagram was multicast and how many data
/// datagrams arrived at all (hellos and other probes aside).
pub struct GroupCounter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Counted>>,
}

impl GroupCounter {
    pub fn start(group: &MulticastConfig) -> Self {
        use grapevine_core::net::{MulticastSocket, RecvBatch};
        use grapevine_core::wire::{Datagram, Message};
        let socket = MulticastSocket::receiver(group).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut copies = std::collections::HashMap::new();
            let mut data = 0u64;
            let mut batch = RecvBatch::new(32, 2048);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline
            {
                let n = socket
                    .recv_batch(&mut batch, Duration::from_millis(20))
                    .unwrap();
                for bytes in batch.datagrams().take(n) {
                    let Ok(datagram) = Datagram::parse(bytes) else {
                        continue;
                    };
                    if datagram.is_probe() {
                        continue;
                    }
                    data += 1;
                    if matches!(datagram.messages().next(), Some(Message::Delta { .. })) {
                        *copies.entry(bytes.to_vec()).or_insert(0) += 1;
                    }
                }
            }
            (copies, data)
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> Counted {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// `count` loopback addresses whose UDP ports were free a moment ago (taken together from the
/// kernel, then let go): fixed ports could be any other socket's ephemeral port when tests run
/// side by side.
#[allow(dead_code)]
pub fn free_loopback_addresses(count: usize) -> Vec<std::net::SocketAddr> {
    let held: Vec<std::net::UdpSocket> = (0..count)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    held.iter()
        .map(|socket| socket.local_addr().expect("bound"))
        .collect()
}
