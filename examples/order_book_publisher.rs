//! Publishes a simulated order book (several instruments, price-level updates) with its
//! snapshot cycle. Run beside `order_book_subscriber`:
//!
//! ```text
//! cargo run --example order_book_publisher -- --rate 20000
//! ```
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use grapevine::core::net::{InterfaceSpec, MulticastConfig};
use grapevine::core::state::ReplicatedState;
use grapevine::order_book::{MarketGenerator, OrderBook};
use grapevine::publisher::{Publisher, PublisherOptions};
use grapevine::snapshotter::{Snapshotter, SnapshotterOptions};

#[derive(Parser)]
struct Args {
    /// Multicast group and port.
    #[arg(long, default_value = "239.255.70.86:7086")]
    group: SocketAddr,
    /// Interface to send on (loopback unless set).
    #[arg(long, default_value = "lo")]
    iface: InterfaceSpec,
    /// Updates per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Instruments.
    #[arg(long, default_value_t = 8)]
    instruments: u16,
    /// Seconds to run.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let multicast = MulticastConfig::new(args.group).on(args.iface);
    let publisher = Publisher::start(
        PublisherOptions::new(1, multicast.clone()),
        OrderBook::default(),
    )?;
    let snapshotter = Snapshotter::start(&publisher, SnapshotterOptions::new(multicast))?;
    let mut market = MarketGenerator::new(args.instruments, 20, 42);
    let mut book = OrderBook::default();
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(args.seconds) {
        let due = (args.rate as f64 * started.elapsed().as_secs_f64()) as u64;
        let batch: Vec<_> = (sent..due)
            .map(|_| {
                let delta = market.next_delta(&book);
                book.apply(&delta);
                delta
            })
            .collect();
        sent = due;
        publisher.publish_all(batch)?;
        std::thread::sleep(Duration::from_millis(1));
    }
    println!(
        "{} levels, snapshot cycles {}",
        book.len(),
        snapshotter.shutdown().cycles
    );
    let stats = publisher.shutdown();
    println!("{} deltas in {} datagrams", stats.deltas, stats.datagrams);
    Ok(())
}
