//! Several hosts on one machine (DESIGN.md §7): network namespaces, bridges and veth links
//! made by a test and removed when its [`Lab`] is dropped, whatever happened.

use std::process::{Child, Command, Stdio};

use crate::run;

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
