//! Several hosts on one machine (DESIGN.md §7): network namespaces, bridges and veth links
//! made by a test and removed when its [`Lab`] is dropped, whatever happened.

use std::process::{Child, Command, Stdio};

use crate::run;

/// A host made by [`Lab::add_routed_networks`]: its namespace, its link and its address.
pub type RoutedHost = (String, String, String);

/// Namespaces and processes of one test. Names carry a prefix unique to the test process so
/// parallel tests and leftovers of a killed run do not collide.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Lab {
    /// A lab whose names start with `tag` and this process's id; panics with what is missing
    /// unless the test runs as root with iproute2 and each of `tools` (e.g. `nft`).
    ///
    /// # Panics
    ///
    /// Not root, or a tool is missing: such tests are `#[ignore = "why"]` and CI runs them
    /// after installing what they need, so missing pieces must fail, not skip.
    pub fn new(tag: &str, tools: &[&str]) -> Self {
        let uid = run(&["id", "-u"]).map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        assert!(matches!(uid, Ok(true)), "cannot run: needs root");
        run(&["ip", "-V"]).unwrap_or_else(|e| panic!("cannot run: needs iproute2 ({e})"));
        for tool in tools {
            run(&[tool, "--version"]).unwrap_or_else(|e| panic!("cannot run: needs {tool} ({e})"));
        }
        Self {
            prefix: format!("{tag}{}", std::process::id() % 100_000),
            namespaces: Vec::new(),
            children: Vec::new(),
        }
    }

    /// The full name of namespace `name`.
    pub fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A link name unique to this lab: `kind` and an index (`v0`, `p3`, ...).
    pub fn link(&self, kind: char, index: usize) -> String {
        format!("{}{kind}{index}", self.prefix)
    }

    /// Creates namespace `name` with its loopback up; removed on drop.
    ///
    /// # Errors
    ///
    /// An `ip` command failed.
    pub fn add_namespace(&mut self, name: &str) -> Result<String, String> {
        let ns = self.ns(name);
        run(&["ip", "netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Creates namespace `name` holding a bridge `br0` (multicast snooping off, so groups
    /// flood like on a plain switch).
    ///
    /// # Errors
    ///
    /// An `ip` command failed.
    pub fn add_bridge(&mut self, name: &str) -> Result<String, String> {
        let ns = self.add_namespace(name)?;
        run(&[
            "ip",
            "-n",
            &ns,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        run(&["ip", "-n", &ns, "link", "set", "br0", "up"])?;
        Ok(ns)
    }

    /// Joins namespace `ns` to the bridge of namespace `bridge` with a veth pair: `inner` in
    /// `ns` with address `addr` (CIDR), `outer` on the bridge.
    ///
    /// # Errors
    ///
    /// An `ip` command failed.
    pub fn attach(
        &self,
        bridge: &str,
        ns: &str,
        inner: &str,
        outer: &str,
        addr: &str,
    ) -> Result<(), String> {
        run(&[
            "ip", "link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer,
            "netns", bridge,
        ])?;
        run(&[
            "ip", "-n", bridge, "link", "set", outer, "master", "br0", "up",
        ])?;
        run(&["ip", "-n", ns, "addr", "add", addr, "dev", inner])?;
        run(&["ip", "-n", ns, "link", "set", inner, "up"])?;
        Ok(())
    }

    /// Host `h{index}` on `bridge` with address `addr`, multicast routed out of its link
    /// (`v{index}`, whose name is returned with the namespace's).
    ///
    /// # Errors
    ///
    /// An `ip` command failed.
    pub fn add_bridged_host(
        &mut self,
        bridge: &str,
        index: usize,
        addr: &str,
    ) -> Result<(String, String), String> {
        let ns = self.add_namespace(&format!("h{index}"))?;
        let (inner, outer) = (self.link('v', index), self.link('p', index));
        self.attach(bridge, &ns, &inner, &outer, addr)?;
        run(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "224.0.0.0/4",
            "dev",
            &inner,
        ])?;
        Ok((ns, inner))
    }

    /// Two bridged networks joined by a router (namespace `rt`) that forwards unicast only
    /// (no multicast routing) and drops `loss_percent` of what it forwards (nftables), as a
    /// WAN would: network 1 is `{prefix}.1.0/24`, network 2 `{prefix}.2.0/24`, the router is
    /// `.254` on both. Host `h{i}` (`i` counted across both networks, `per_network` on each)
    /// has address `.{i + 1}` and routes `{prefix}.0.0/16` through the router. Returns each
    /// network's hosts as (namespace, link, address).
    ///
    /// # Errors
    ///
    /// An `ip`, `sysctl` or `nft` command failed.
    pub fn add_routed_networks(
        &mut self,
        prefix: &str,
        per_network: usize,
        loss_percent: u32,
    ) -> Result<[Vec<RoutedHost>; 2], String> {
        let router = self.add_namespace("rt")?;
        run(&[
            "ip",
            "netns",
            "exec",
            &router,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        let mut networks = [Vec::new(), Vec::new()];
        for (side, hosts) in networks.iter_mut().enumerate() {
            let net = side + 1;
            let bridge = self.add_bridge(if net == 1 { "brA" } else { "brB" })?;
            let gateway = format!("{prefix}.{net}.254");
            self.attach(
                &bridge,
                &router,
                &self.link('r', net),
                &self.link('q', net),
                &format!("{gateway}/24"),
            )?;
            for i in 0..per_network {
                let index = side * per_network + i;
                let address = format!("{prefix}.{net}.{}", index + 1);
                let (host, link) =
                    self.add_bridged_host(&bridge, index, &format!("{address}/24"))?;
                let wide = format!("{prefix}.0.0/16");
                run(&["ip", "-n", &host, "route", "add", &wide, "via", &gateway])?;
                hosts.push((host, link, address));
            }
        }
        if loss_percent > 0 {
            let nft = |command: &str| run(&["ip", "netns", "exec", &router, "nft", command]);
            nft("add table inet wan")?;
            nft("add chain inet wan forward { type filter hook forward priority 0; }")?;
            nft(&format!(
                "add rule inet wan forward numgen random mod 100 < {loss_percent} drop"
            ))?;
        }
        Ok(networks)
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn exec(&self, ns: &str, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns, program]);
        command
    }

    /// Starts `program` with `args` in namespace `ns`, stdout and stderr captured; killed on
    /// drop. Returns its index for [`child`](Self::child) and [`finish`](Self::finish).
    ///
    /// # Panics
    ///
    /// The process cannot be started.
    pub fn spawn(&mut self, ns: &str, program: &str, args: &[&str]) -> usize {
        let child = self
            .exec(ns, program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program} in {ns}: {e}"));
        self.adopt(child)
    }

    /// Takes a child started elsewhere, to be killed on drop; returns its index.
    pub fn adopt(&mut self, child: Child) -> usize {
        self.children.push(child);
        self.children.len() - 1
    }

    /// Child `index`.
    pub fn child(&mut self, index: usize) -> &mut Child {
        &mut self.children[index]
    }

    /// Puts `child` in the place of child `index` (a restart); the old one is killed.
    pub fn replace(&mut self, index: usize, child: Child) {
        let mut old = std::mem::replace(&mut self.children[index], child);
        // It may have ended already: then there is nothing to kill.
        let _ = old.kill();
        // Reaps it; an error means it was reaped already.
        let _ = old.wait();
    }

    /// Waits for child `index` (killing it past `deadline`); returns what it printed.
    pub fn finish(&mut self, index: usize, deadline: std::time::Instant) -> String {
        crate::finish(&mut self.children[index], deadline)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            // A child that already ended only needs reaping.
            let _ = child.kill();
            // Reaps it; an error means it was reaped already.
            let _ = child.wait();
        }
        // Deleting a namespace deletes the links inside it; bridges last.
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
