//! Several hosts on one machine: network namespaces joined by a bridge (DESIGN.md §7).
//!
//! One publisher host and three subscriber hosts; nftables drops 15 % of the GrapeVine packets
//! arriving at one subscriber. All three must end with the publisher's exact state. Needs root,
//! `ip` and `nft`; skips with a message otherwise. Namespaces, links and processes are removed
//! whatever happens.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use grapevine_test_support::{netns, run};

const SUBSCRIBER_HOSTS: usize = 3;
const LOSSY_HOST: usize = 3;

/// The topologies of these tests, on a [`netns::Lab`] that removes them afterwards.
struct Lab {
    lab: netns::Lab,
}

impl Lab {
    /// Names start with `tag` (one per test: they run in parallel).
    fn new(tag: &str) -> Self {
        Self {
            lab: netns::Lab::new(tag, &["nft"]),
        }
    }

    fn ns(&self, host: &str) -> String {
        self.lab.ns(host)
    }

    fn veth(&self, side: char, i: usize) -> String {
        self.lab.link(side, i)
    }

    /// A publisher host and the subscriber hosts on one bridge, on 10.`subnet`.0.0/24.
    fn setup(&mut self, subnet: u8) -> Result<(), String> {
        let br = self.lab.add_bridge("br")?;
        for i in 0..=SUBSCRIBER_HOSTS {
            let addr = format!("10.{subnet}.0.{}/24", i + 1);
            self.lab.add_bridged_host(&br, i, &addr)?;
        }
        Ok(())
    }

    /// Two hosts joined by one veth pair, with `addrs` (IPv6 ones without DAD wait);
    /// multicast goes out of the link unless `multicast_on_lo`.
    fn setup_pair(&mut self, addrs: [&str; 2], multicast_on_lo: bool) -> Result<(), String> {
        let (h0, h1) = (self.lab.add_namespace("h0")?, self.lab.add_namespace("h1")?);
        let (v0, v1) = (self.veth('v', 0), self.veth('v', 1));
        run(&[
            "ip", "link", "add", &v0, "netns", &h0, "type", "veth", "peer", "name", &v1, "netns",
            &h1,
        ])?;
        for ((host, link), addr) in [(&h0, &v0), (&h1, &v1)].into_iter().zip(addrs) {
            if addr.contains(':') {
                run(&[
                    "ip", "-n", host, "-6", "addr", "add", addr, "dev", link, "nodad",
                ])?;
            } else {
                run(&["ip", "-n", host, "addr", "add", addr, "dev", link])?;
            }
            run(&["ip", "-n", host, "link", "set", link, "up"])?;
            if multicast_on_lo {
                run(&["ip", "-n", host, "route", "add", "224.0.0.0/4", "dev", "lo"])?;
            }
        }
        Ok(())
    }

    /// Two hosts joined by one veth pair, with IPv6 unique-local addresses.
    fn setup_ipv6_pair(&mut self) -> Result<(), String> {
        self.setup_pair(["fd47::1/64", "fd47::2/64"], false)
    }

    /// Two hosts joined by one IPv4 veth pair; each has multicast only on its own loopback, so
    /// they are two networks that multicast does not cross.
    fn setup_two_networks(&mut self) -> Result<(), String> {
        self.setup_pair(["10.233.0.1/24", "10.233.0.2/24"], true)
    }

    /// Two bridged networks joined by a router that forwards unicast only (no multicast
    /// routing): hosts h0–h2 on 10.231.1.0/24, h3–h5 on 10.231.2.0/24; the router drops
    /// `wan_loss_percent` of what it forwards.
    fn setup_routed_networks(&mut self, wan_loss_percent: u32) -> Result<(), String> {
        self.lab
            .add_routed_networks("10.231", 3, wan_loss_percent)
            .map(|_| ())
    }

    /// Starts `grapevine args` on host `h{host}`.
    fn spawn(&mut self, host: usize, args: &[&str]) -> usize {
        let ns = self.ns(&format!("h{host}"));
        self.lab.spawn(&ns, env!("CARGO_BIN_EXE_grapevine"), args)
    }

    /// Waits for child `index` (killing it past `deadline`) and returns its stdout.
    fn finish(&mut self, index: usize, deadline: Instant) -> String {
        self.lab.finish(index, deadline)
    }
}

/// The last JSON line a `grapevine sub --json` printed.
fn last_status(output: &str) -> serde_json::Value {
    output
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no status line in the subscriber's output:\n{output}"))
}

/// The digest a `grapevine pub` printed when it finished.
fn published_digest(output: &str) -> String {
    output
        .lines()
        .find_map(|l| l.split("digest ").nth(1))
        .unwrap_or_else(|| panic!("publisher printed no digest:\n{output}"))
        .trim()
        .to_string()
}

#[test]
#[ignore = "needs root, iproute2 and nftables to create network namespaces; .ci/run installs them and runs it with --include-ignored"]
fn hosts_on_a_bridge_converge_with_loss_at_one() {
    let pid = std::process::id();
    let mut lab = Lab::new("gv");
    let subnet = 100 + (pid % 100) as u8;
    if let Err(why) = lab.setup(subnet) {
        panic!("cannot create namespaces: {why}");
    }
    let port = "47400";
    let group = format!("239.255.74.1:{port}");
    let lossy = lab.ns(&format!("h{LOSSY_HOST}"));
    run(&[
        "ip", "netns", "exec", &lossy, "nft", "add", "table", "inet", "gvloss",
    ])
    .unwrap();
    run(&[
        "ip",
        "netns",
        "exec",
        &lossy,
        "nft",
        "add",
        "chain",
        "inet",
        "gvloss",
        "in",
        "{ type filter hook input priority 0; }",
    ])
    .unwrap();
    run(&[
        "ip", "netns", "exec", &lossy, "nft", "add", "rule", "inet", "gvloss", "in", "udp",
        "dport", port, "numgen", "random", "mod", "100", "<", "15", "drop",
    ])
    .unwrap();

    let subscribers: Vec<usize> = (1..=SUBSCRIBER_HOSTS)
        .map(|i| {
            let iface = lab.veth('v', i);
            lab.spawn(
                i,
                &[
                    "sub",
                    "--group",
                    &group,
                    "--iface",
                    &iface,
                    "--json",
                    "--seconds",
                    "7",
                ],
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let iface = lab.veth('v', 0);
    let publisher = lab.spawn(
        0,
        &[
            "pub",
            "--group",
            &group,
            "--iface",
            &iface,
            "--rate",
            "5000",
            "--updates",
            "10000",
            "--seconds",
            "8",
        ],
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    let outputs: Vec<String> = subscribers
        .iter()
        .map(|&index| lab.finish(index, deadline))
        .collect();
    let want = published_digest(&lab.finish(publisher, deadline));
    for (host, output) in outputs.iter().enumerate() {
        let status = last_status(output);
        assert_eq!(status["status"], "live", "host {}: {status}", host + 1);
        assert_eq!(
            status["digest"],
            want.as_str(),
            "host {}: {status}",
            host + 1
        );
        if host + 1 == LOSSY_HOST {
            assert!(
                status["lost"].as_u64().unwrap() > 0,
                "nftables dropped nothing: {status}"
            );
        }
    }
}

#[test]
#[ignore = "needs root, iproute2 and nftables to create network namespaces; .ci/run installs them and runs it with --include-ignored"]
fn ipv6_group_between_two_hosts() {
    let mut lab = Lab::new("gw");
    if let Err(why) = lab.setup_ipv6_pair() {
        panic!("cannot create namespaces: {why}");
    }
    let group = "[ff15::4756:1]:47410";
    let (v0, v1) = (lab.veth('v', 0), lab.veth('v', 1));
    let subscriber = lab.spawn(
        1,
        &[
            "sub",
            "--group",
            group,
            "--iface",
            &v1,
            "--json",
            "--seconds",
            "4",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let publisher = lab.spawn(
        0,
        &[
            "pub",
            "--group",
            group,
            "--iface",
            &v0,
            "--rate",
            "2000",
            "--updates",
            "2000",
            "--seconds",
            "5",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = last_status(&lab.finish(subscriber, deadline));
    let want = published_digest(&lab.finish(publisher, deadline));
    assert_eq!(status["status"], "live", "{status}");
    assert_eq!(status["digest"], want.as_str(), "{status}");
    assert!(
        status["applied"].as_u64().unwrap() > 0,
        "deltas flowed over IPv6: {status}"
    );
}

#[test]
#[ignore = "needs root, iproute2 and nftables to create network namespaces; .ci/run installs them and runs it with --include-ignored"]
fn two_networks_joined_by_repeaters() {
    let mut lab = Lab::new("gr");
    if let Err(why) = lab.setup_two_networks() {
        panic!("cannot create namespaces: {why}");
    }
    let group = "239.255.73.50:47350";
    let repeat = |listen: &str, peer: &str| {
        vec![
            "repeat".to_string(),
            "--group".into(),
            group.into(),
            "--listen".into(),
            listen.into(),
            "--peer".into(),
            peer.into(),
            "--seconds".into(),
            "9".into(),
        ]
    };
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let near = repeat("10.233.0.1:47351", "10.233.0.2:47351");
    let far = repeat("10.233.0.2:47351", "10.233.0.1:47351");
    lab.spawn(0, &args(&near));
    lab.spawn(1, &args(&far));
    let subscriber = lab.spawn(1, &["sub", "--group", group, "--json", "--seconds", "8"]);
    std::thread::sleep(Duration::from_millis(300));
    let publisher = lab.spawn(
        0,
        &[
            "pub",
            "--group",
            group,
            "--rate",
            "2000",
            "--updates",
            "8000",
            "--seconds",
            "7",
        ],
    );
    // Cut the link between the networks for a second while updates flow, then restore it.
    std::thread::sleep(Duration::from_millis(1500));
    let (h0, v0) = (lab.ns("h0"), lab.veth('v', 0));
    run(&["ip", "-n", &h0, "link", "set", &v0, "down"]).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    run(&["ip", "-n", &h0, "link", "set", &v0, "up"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = last_status(&lab.finish(subscriber, deadline));
    let want = published_digest(&lab.finish(publisher, deadline));
    assert_eq!(status["status"], "live", "{status}");
    assert_eq!(
        status["digest"],
        want.as_str(),
        "the far network converged: {status}"
    );
    assert!(
        status["gaps"].as_u64().unwrap() >= 1,
        "the cut was a gap: {status}"
    );
}

/// Two bridged networks joined by a router that forwards unicast only, with 5 % loss on the
/// router; a publisher on A, repeaters h1, h2 on A and h3, h4 on B peered as a full mesh (what
/// DHT discovery builds), subscribers on both networks. Every delta reaches B exactly once (no
/// duplicate at B's subscriber) and nothing comes back to A (no duplicate at A's subscriber);
/// B converges to the publisher's state.
#[test]
#[ignore = "needs root, iproute2 and nftables to create network namespaces; .ci/run installs them and runs it with --include-ignored"]
fn a_full_mesh_of_repeaters_between_routed_networks_delivers_once() {
    let mut lab = Lab::new("gm");
    if let Err(why) = lab.setup_routed_networks(5) {
        panic!("cannot create namespaces: {why}");
    }
    let group = "239.255.73.60:47360";
    let address = |host: usize| format!("10.231.{}.{}", host / 3 + 1, host + 1);
    let listen = |host: usize| format!("{}:47361", address(host));
    for (host, remote) in [(1, [3, 4]), (2, [3, 4]), (3, [1, 2]), (4, [1, 2])] {
        let iface = lab.veth('v', host);
        let own = listen(host);
        let (peer_a, peer_b) = (listen(remote[0]), listen(remote[1]));
        let id = host.to_string();
        lab.spawn(
            host,
            &[
                "repeat",
                "--group",
                group,
                "--iface",
                &iface,
                "--listen",
                &own,
                "--peer",
                &peer_a,
                "--peer",
                &peer_b,
                "--id",
                &id,
                "--seconds",
                "12",
            ],
        );
    }
    let sub_args = |iface: &str| -> Vec<String> {
        [
            "sub",
            "--group",
            group,
            "--iface",
            iface,
            "--json",
            "--seconds",
            "10",
        ]
        .map(String::from)
        .to_vec()
    };
    let (iface_a, iface_b) = (lab.veth('v', 0), lab.veth('v', 5));
    let on_a = sub_args(&iface_a);
    let on_b = sub_args(&iface_b);
    let near = lab.spawn(0, &on_a.iter().map(String::as_str).collect::<Vec<_>>());
    let far = lab.spawn(5, &on_b.iter().map(String::as_str).collect::<Vec<_>>());
    // Hellos every 250 ms and keepalives every 500 ms: the elections and the peers' views of
    // each network settle within about a second; the publisher starts after that.
    std::thread::sleep(Duration::from_millis(2500));
    let publisher = lab.spawn(
        0,
        &[
            "pub",
            "--group",
            group,
            "--iface",
            &iface_a,
            "--rate",
            "2000",
            "--updates",
            "8000",
            "--seconds",
            "6",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(25);
    let far_status = last_status(&lab.finish(far, deadline));
    let near_status = last_status(&lab.finish(near, deadline));
    let want = published_digest(&lab.finish(publisher, deadline));
    assert_eq!(far_status["status"], "live", "{far_status}");
    assert_eq!(
        far_status["digest"],
        want.as_str(),
        "B converged: {far_status}"
    );
    assert_eq!(
        far_status["duplicates"].as_u64(),
        Some(0),
        "every delta reached B once: {far_status}"
    );
    assert_eq!(
        near_status["duplicates"].as_u64(),
        Some(0),
        "no copy came back to A: {near_status}"
    );
    assert!(
        far_status["applied"].as_u64().unwrap_or(0) > 1000,
        "{far_status}"
    );
}
