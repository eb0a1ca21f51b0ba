//! Keeps a replica of the order book published by `order_book_publisher` and prints the top of
//! the book and the subscriber's counters every second:
//!
//! ```text
//! cargo run --example order_book_subscriber
//! ```
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use grapevine::core::net::{InterfaceSpec, MulticastConfig};
use grapevine::order_book::OrderBook;
use grapevine::subscriber::{Subscriber, SubscriberOptions};

#[derive(Parser)]
struct Args {
    /// Multicast group and port.
    #[arg(long, default_value = "239.255.70.86:7086")]
    group: SocketAddr,
    /// Interface to join on (loopback unless set).
    #[arg(long, default_value = "lo")]
    iface: InterfaceSpec,
    /// Seconds to run.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut options = SubscriberOptions::new(1, MulticastConfig::new(args.group).on(args.iface));
    options.session.emit_applied = false;
    let subscriber = Subscriber::<OrderBook>::join(options)?;
    for _ in 0..args.seconds {
        std::thread::sleep(Duration::from_secs(1));
        subscriber.read(|session| {
            for view in session.streams() {
                println!(
                    "publisher {} {:?} seq {} ({} stale levels)",
                    view.publisher,
                    view.status,
                    view.last_seq,
                    view.stale.len()
                );
                for instrument in view.state.instruments() {
                    let bid = view
                        .state
                        .best_bid(instrument)
                        .map(|(p, l)| format!("{} x {}", p, l.quantity));
                    let ask = view
                        .state
                        .best_ask(instrument)
                        .map(|(p, l)| format!("{} x {}", p, l.quantity));
                    println!(
                        "  #{instrument}: bid {} / ask {}",
                        bid.unwrap_or("-".into()),
                        ask.unwrap_or("-".into())
                    );
                }
            }
        });
        let stats = subscriber.stats().protocol;
        println!(
            "applied {} gaps {} lost {} recoveries {}",
            stats.deltas_applied, stats.gaps, stats.messages_lost, stats.recoveries
        );
    }
    Ok(())
}
