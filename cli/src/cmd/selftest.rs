//! `grapevine selftest`: does multicast flow on this group and interface?

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use grapevine::core::net::{self_test, InterfaceSpec, MulticastConfig};

/// `grapevine selftest`: only what the probe uses (no topic, key or recovery group).
#[derive(Args, Debug)]
pub(crate) struct SelftestArgs {
    /// Multicast group (ADDRESS:PORT) to probe.
    #[arg(long, env = "GRAPEVINE_GROUP", default_value = "239.255.70.86:7086", value_parser = crate::values::group)]
    group: SocketAddr,
    /// Interface to probe on (name or address); loopback unless set.
    #[arg(long, env = "GRAPEVINE_IFACE", default_value = "lo")]
    iface: InterfaceSpec,
}

pub(crate) fn selftest(args: &SelftestArgs) -> Result<()> {
    let config = MulticastConfig::new(args.group).on(args.iface.clone());
    let took = self_test(&config, Duration::from_secs(2))?;
    println!(
        "multicast OK on {} ({}): probe came back in {:.3} ms",
        args.group,
        args.iface,
        took.as_secs_f64() * 1e3
    );
    Ok(())
}
