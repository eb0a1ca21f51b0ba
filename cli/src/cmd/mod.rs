//! One module per `grapevine` command; the receive loop that `spy` and `record` share.

pub(crate) mod demo;
pub(crate) mod keygen;
pub(crate) mod publish;
pub(crate) mod record;
pub(crate) mod repeat;
pub(crate) mod replay;
pub(crate) mod selftest;
pub(crate) mod spy;
pub(crate) mod subscribe;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use crossbeam_channel::Receiver;
use grapevine::core::net::{InterfaceSpec, MulticastConfig, MulticastSocket, RecvBatch};

pub(crate) struct Received {
    at: Instant,
    time: SystemTime,
    group: SocketAddr,
    bytes: Vec<u8>,
}

/// One receiving thread per group, all into one channel; they stop when the receiver is
/// dropped.
pub(crate) fn receive_all(
    groups: &[SocketAddr],
    iface: &InterfaceSpec,
) -> Result<Receiver<Received>> {
    let (tx, rx) = crossbeam_channel::bounded::<Received>(65_536);
    for group in groups {
        let config = MulticastConfig::new(*group).on(iface.clone());
        let socket =
            MulticastSocket::receiver(&config).with_context(|| format!("joining {group}"))?;
        let tx = tx.clone();
        let group = *group;
        std::thread::Builder::new()
            .name(format!("rx-{group}"))
            .spawn(move || {
                let mut batch = RecvBatch::new(32, 65_536);
                loop {
                    let Ok(n) = socket.recv_batch(&mut batch, Duration::from_millis(50)) else {
                        continue;
                    };
                    let (at, time) = (Instant::now(), SystemTime::now());
                    for bytes in batch.datagrams().take(n) {
                        let received = Received {
                            at,
                            time,
                            group,
                            bytes: bytes.to_vec(),
                        };
                        if tx.send(received).is_err() {
                            return;
                        }
                    }
                    if n == 0 && tx.is_full() {
                        std::thread::yield_now();
                    }
                }
            })?;
    }
    Ok(rx)
}
