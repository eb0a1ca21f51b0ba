//! `grapevine selftest`: does multicast flow on this group and interface?

use std::time::Duration;

use anyhow::Result;
use grapevine::core::net::self_test;

use crate::NetArgs;

pub(crate) fn selftest(args: &NetArgs) -> Result<()> {
    let took = self_test(&args.live(), Duration::from_secs(2))?;
    println!(
        "multicast OK on {} ({}): probe came back in {:.3} ms",
        args.group,
        args.iface,
        took.as_secs_f64() * 1e3
    );
    Ok(())
}
