//! `gvd`, the GrapeVine daemon: loads VDRIVERs and announces their VDEVs, finds the other
//! nodes by echolocation and keeps the node list file, serves KOS clients through per-client
//! agent processes, runs the GrapeVineFS zones and, as a role, a stream repeater
//! (docs/GVD.md, docs/KOS.md, docs/GVFS.md).

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use gvd::daemon::{self, Config};
use gvd::inventory::{probe_here, scan, search_path};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// The GrapeVine daemon.
#[derive(Debug, Parser)]
#[command(name = "gvd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text, or as one JSON object per line (for log collectors).
    #[arg(long, global = true, env = "GVD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a shell completion script (e.g. `gvd completions bash`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff: `gvd manpage | man -l -`).
    Manpage,
    /// Run the daemon: announce this node, track the others, keep the node list file.
    Run(Box<RunArgs>),
    /// Print the bearer token the admin endpoint asks for when it is not on loopback (derived
    /// from the network key file).
    AdminToken {
        /// The network's key file.
        #[arg(long, env = "GVD_KEY_FILE")]
        key_file: PathBuf,
    },
    /// Check the configuration `run` would use (file, then environment, then flags): print it
    /// merged, as TOML, and exit 0; or say what is wrong and exit 2.
    CheckConfig(Box<RunArgs>),
    /// Find the VDRIVERs in VDRIVER_PATH, check each, and print the VDEVs and `unique`.
    Inventory {
        /// Colon-separated directories of driver libraries.
        #[arg(long, env = "VDRIVER_PATH", default_value = "/usr/lib/gvd/vdrivers")]
        vdriver_path: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Serve one KOS connection on standard input (started by gvd for each connection).
    #[command(hide = true)]
    Agent {
        /// The node serving, in hex.
        #[arg(long)]
        node_id: String,
        /// gvd's inventory file.
        #[arg(long)]
        inventory: PathBuf,
        /// Longest a driver call may run, ms.
        #[arg(long, default_value_t = 30_000)]
        call_timeout_ms: u64,
        /// Largest request frame.
        #[arg(long, default_value_t = grapevine_kos::proto::DEFAULT_MAX_FRAME)]
        max_frame: usize,
        /// The client's address, for logs.
        #[arg(long, default_value = "?")]
        peer: String,
        /// The network key file: the client must prove it holds the key.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Load one driver in this process and print its inventory as JSON (used by gvd itself, in
    /// a child process, so that a bad driver cannot take the daemon down).
    #[command(hide = true)]
    ProbeDriver {
        /// The library.
        path: PathBuf,
    },
}

/// Settings for `gvd run`: flags override the environment, which overrides the file.
#[derive(Args, Debug)]
struct RunArgs {
    /// TOML configuration file (keys as the long flags, with underscores).
    #[arg(long, env = "GVD_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name [default: the host name].
    #[arg(long, env = "GVD_NAME")]
    name: Option<String>,
    /// Directory for the node id, the node list and zone metadata [default: /var/lib/gvd].
    #[arg(long, env = "GVD_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// The node list file for local readers [default: <state-dir>/nodes.json].
    #[arg(long, env = "GV_NODES_PATH")]
    nodes_path: Option<PathBuf>,
    /// Colon-separated directories of VDRIVERs [default: /usr/lib/gvd/vdrivers].
    #[arg(long, env = "VDRIVER_PATH")]
    vdriver_path: Option<String>,
    /// Multicast group of the ELP (echolocation: node announcements) topic
    /// [default: 239.255.71.71:7171].
    #[arg(long, env = "GVD_GROUP")]
    group: Option<SocketAddr>,
    /// Multicast group of the VDEV topic (default: the ELP group's address, next port).
    #[arg(long, env = "GVD_VDEV_GROUP")]
    vdev_group: Option<SocketAddr>,
    /// UDP port for QUERYs from peers (0 picks a free one) [default: 7173].
    #[arg(long, env = "GVD_QUERY_PORT")]
    query_port: Option<u16>,
    /// Ask drivers for their VDEVs (virtual devices) this often (ms) even without file changes
    /// or SIGHUP [default: 10000].
    #[arg(long, env = "GVD_RESCAN_INTERVAL_MS")]
    rescan_interval_ms: Option<u64>,
    /// TCP port for KOS (remote client) connections (0 picks a free one) [default: 7174].
    #[arg(long, env = "GVD_KOS_PORT")]
    kos_port: Option<u16>,
    /// Most KOS connections (agent processes) at once [default: 64].
    #[arg(long, env = "GVD_MAX_AGENTS")]
    max_agents: Option<usize>,
    /// Most KOS connections at once from one client address [default: 8].
    #[arg(long, env = "GVD_MAX_AGENTS_PER_SOURCE")]
    max_agents_per_source: Option<usize>,
    /// Longest a driver call may run before its agent gives up, ms [default: 30000].
    #[arg(long, env = "GVD_CALL_TIMEOUT_MS")]
    call_timeout_ms: Option<u64>,
    /// The network's key file: ELP and VDEV datagrams are signed and verified with it, and
    /// KOS and replication peers must prove it. Without one, anyone on the LAN is trusted.
    #[arg(long, env = "GVD_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// A DHT bootstrap node (repeat for several): announce and find nodes of `--network` on
    /// other networks.
    #[arg(
        long = "dht-bootstrap",
        env = "GVD_DHT_BOOTSTRAP",
        value_delimiter = ','
    )]
    dht_bootstrap: Vec<String>,
    /// The network name looked up on the DHT [default: grapevine].
    #[arg(long, env = "GVD_NETWORK")]
    network: Option<String>,
    /// TCP port of the zone replication server (0 picks a free one) [default: 7175].
    #[arg(long, env = "GVD_REPL_PORT")]
    repl_port: Option<u16>,
    /// Drop this fraction of received ELP/VDEV datagrams (for loss experiments).
    #[arg(long, env = "GVD_INJECT_LOSS", hide = true)]
    inject_loss: Option<f64>,
    /// Interface to announce on, a name or an address [default: lo].
    #[arg(long, env = "GVD_IFACE")]
    iface: Option<String>,
    /// Announcement period in milliseconds (10 to 3600000) [default: 1000].
    #[arg(long, env = "ELP_DELAY")]
    elp_delay_ms: Option<u64>,
    /// Periods of silence after which a node is dead (1 to 1000) [default: 5].
    #[arg(long, env = "NODE_TTL")]
    node_ttl: Option<u32>,
    /// Where to serve the status page, JSON status and metrics (port 0 picks a free one;
    /// not loopback needs key_file) [default: 127.0.0.1:7176].
    #[arg(long, env = "GVD_ADMIN_ADDRESS")]
    admin_address: Option<SocketAddr>,
    /// Do not serve the status page, JSON status and metrics.
    #[arg(long, env = "GVD_NO_ADMIN")]
    no_admin: bool,
    /// Largest KOS request frame, bytes (1024 to 2^30) [default: 16777216].
    #[arg(long, env = "GVD_MAX_FRAME")]
    max_frame: Option<usize>,
    /// How long a file written over NFS must be quiet before it replicates, ms [default: 200].
    #[arg(long, env = "GVD_ZONE_DEBOUNCE_MS")]
    zone_debounce_ms: Option<u64>,
    /// How often zone directories are scanned for changes made outside NFS, ms
    /// [default: 5000].
    #[arg(long, env = "GVD_ZONE_SCAN_INTERVAL_MS")]
    zone_scan_interval_ms: Option<u64>,
    /// Address the DHT node binds to [default: 0.0.0.0].
    #[arg(long, env = "GVD_DHT_BIND")]
    dht_bind: Option<std::net::Ipv4Addr>,
    /// How often to announce and look up on the DHT, ms [default: 30000].
    #[arg(long, env = "GVD_DHT_INTERVAL_MS")]
    dht_interval_ms: Option<u64>,
}

impl RunArgs {
    fn config(&self) -> Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = &self.name {
            config.name = v.clone();
        }
        if let Some(v) = &self.state_dir {
            config.state_dir = v.clone();
        }
        if let Some(v) = &self.nodes_path {
            config.nodes_path = Some(v.clone());
        }
        if let Some(v) = &self.vdriver_path {
            config.vdriver_path = v.clone();
        }
        if let Some(v) = self.group {
            config.group = v;
        }
        if let Some(v) = self.vdev_group {
            config.vdev_group = Some(v);
        }
        if let Some(v) = self.query_port {
            config.query_port = v;
        }
        if let Some(v) = self.kos_port {
            config.kos_port = v;
        }
        if let Some(v) = self.max_agents {
            config.max_agents = v;
        }
        if let Some(v) = self.max_agents_per_source {
            config.max_agents_per_source = v;
        }
        if let Some(v) = self.call_timeout_ms {
            config.call_timeout_ms = v;
        }
        if let Some(v) = &self.key_file {
            config.key_file = Some(v.clone());
        }
        if !self.dht_bootstrap.is_empty() {
            config.dht_bootstrap = self.dht_bootstrap.clone();
        }
        if let Some(v) = &self.network {
            config.network = v.clone();
        }
        if let Some(v) = self.repl_port {
            config.repl_port = v;
        }
        if let Some(v) = self.rescan_interval_ms {
            config.rescan_interval_ms = v;
        }
        if let Some(v) = self.inject_loss {
            config.inject_loss = v;
        }
        if let Some(v) = &self.iface {
            config.iface = v.clone();
        }
        if let Some(v) = self.elp_delay_ms {
            config.elp_delay_ms = v;
        }
        if let Some(v) = self.node_ttl {
            config.node_ttl = v;
        }
        if let Some(v) = self.admin_address {
            config.admin_address = v;
        }
        if self.no_admin {
            config.admin = false;
        }
        if let Some(v) = self.max_frame {
            config.max_frame = v;
        }
        if let Some(v) = self.zone_debounce_ms {
            config.zone_debounce_ms = v;
        }
        if let Some(v) = self.zone_scan_interval_ms {
            config.zone_scan_interval_ms = v;
        }
        if let Some(v) = self.dht_bind {
            config.dht_bind = v;
        }
        if let Some(v) = self.dht_interval_ms {
            config.dht_interval_ms = v;
        }
        config.validate()?;
        Ok(config)
    }
}

/// A configuration that cannot be used (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadConfiguration(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Start and stop lines and state changes; library chatter and nfsserve's per-request
    // lines only when something is wrong.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,grapevine_core=warn,grapevine_publisher=warn,grapevine_subscriber=warn,\
             grapevine_snapshotter=warn,nfsserve=error",
        )
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        // Colours only on a terminal: in a log file they are escape-code clutter.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            // 2: the configuration (file, environment, flags) is wrong; 1: running failed.
            if error.downcast_ref::<BadConfiguration>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "gvd",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Command::Manpage => {
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut std::io::stdout())?;
            return Ok(());
        }
        _ => {}
    }
    match cli.command {
        // Answered above, before anything else is read.
        Command::Completions { .. } | Command::Manpage => Ok(()),
        Command::Run(args) => {
            let config = args
                .config()
                .map_err(|e| anyhow::Error::new(BadConfiguration(format!("{e:#}"))))?;
            let stop = Arc::new(AtomicBool::new(false));
            let rescan = Arc::new(AtomicBool::new(false));
            for signal in [SIGINT, SIGTERM] {
                signal_hook::flag::register(signal, Arc::clone(&stop))?;
            }
            signal_hook::flag::register(SIGHUP, Arc::clone(&rescan))?;
            daemon::run(&config, &std::env::current_exe()?, &stop, &rescan)
        }
        Command::AdminToken { key_file } => {
            let keyring = grapevine_core::auth::Keyring::from_file(&key_file)?;
            let token = gvd::admin::token(&keyring)
                .ok_or_else(|| anyhow::anyhow!("{} holds no shared key", key_file.display()))?;
            println!("{token}");
            Ok(())
        }
        Command::CheckConfig(args) => {
            let config = args
                .config()
                .map_err(|e| anyhow::Error::new(BadConfiguration(format!("{e:#}"))))?;
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(())
        }
        Command::Inventory { vdriver_path, json } => {
            let exe = std::env::current_exe()?;
            let inventory = scan(&search_path(&vdriver_path), &exe);
            if json {
                println!("{}", serde_json::to_string(&inventory)?);
                return Ok(());
            }
            println!("unique {}", inventory.unique);
            for driver in &inventory.drivers {
                println!("{} ({})", driver.driver, driver.path.display());
                for vdev in &driver.vdevs {
                    println!("  {:<20} {:<8} {}", vdev.name, vdev.kind, vdev.attributes);
                }
            }
            for skipped in &inventory.skipped {
                println!("skipped {}: {}", skipped.path.display(), skipped.reason);
            }
            Ok(())
        }
        Command::Agent {
            node_id,
            inventory,
            call_timeout_ms,
            max_frame,
            peer,
            key_file,
        } => {
            let node_id = u64::from_str_radix(&node_id, 16)?;
            let socket = std::io::stdin().as_fd().try_clone_to_owned()?;
            let stream = std::net::TcpStream::from(socket);
            gvd::agent::exit_with_parent();
            let key = key_file
                .map(|path| grapevine_core::auth::Keyring::from_file(&path))
                .transpose()?
                .map(|keyring| gvd::port_key(&keyring))
                .transpose()?;
            let stream = match grapevine_kos::secure::accept(
                stream,
                key.as_ref(),
                grapevine_kos::secure::Purpose::Kos,
            ) {
                Ok(link) => link,
                Err(error) => {
                    tracing::warn!(%peer, %error, "KOS connection refused");
                    std::process::exit(0);
                }
            };
            let session = gvd::agent::AgentSession::new(node_id, std::process::id());
            let devices = gvd::agent::DriverDevices::new(inventory);
            let limits = gvd::agent::AgentOptions {
                max_frame,
                call_timeout: std::time::Duration::from_millis(call_timeout_ms),
            };
            let ended = gvd::agent::serve(stream, session, devices, &limits)?;
            tracing::info!(%peer, ?ended, "agent ends");
            // A call that timed out is still running on its thread: leave without waiting.
            std::process::exit(0);
        }
        Command::ProbeDriver { path } => {
            let found = probe_here(&path)?;
            println!("{}", serde_json::to_string(&found)?);
            Ok(())
        }
    }
}
