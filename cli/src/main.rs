//! `grapevine`: run a replication demo, a publisher or a subscriber from the command line.

mod bench;
mod cmd;
mod metrics;
mod values;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use grapevine::core::net::{InterfaceSpec, MulticastConfig};
use grapevine::core::proto::{SnapshotConfig, SnapshotRate};
use grapevine::publisher::PublisherOptions;
use grapevine::subscriber::SubscriberOptions;

/// Replicated state over UDP multicast.
#[derive(Debug, Parser)]
#[command(name = "grapevine", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publisher, snapshotter and N subscribers in one process on loopback, with injected loss;
    /// exits 0 only when every subscriber converged to the publisher's state.
    Demo(cmd::demo::DemoArgs),
    /// Publish a simulated order book until stopped (or for --seconds).
    Pub(cmd::publish::PubArgs),
    /// Subscribe to an order book and print top of book and counters every second.
    Sub(cmd::subscribe::SubArgs),
    /// Check that multicast flows on the group and interface.
    Selftest(cmd::selftest::SelftestArgs),
    /// Watch groups: per topic and publisher, rates, sequence, gaps, losses, snapshot cycles.
    Spy(cmd::spy::SpyArgs),
    /// Record every datagram of some groups, with receive times, into a file.
    Record(cmd::record::RecordArgs),
    /// Play recordings back onto groups, or rebuild a topic's state from them offline.
    Replay(cmd::replay::ReplayArgs),
    /// Relay topics between the local group and repeaters on other networks (unicast UDP).
    Repeat(cmd::repeat::RepeatArgs),
    /// Make a key file: a shared key (every holder can sign), or a publisher's ed25519 secret
    /// key and the public key its subscribers verify with.
    Keygen(cmd::keygen::KeygenArgs),
    /// Measure GrapeVine against raw UDP multicast in the same run (use a release build).
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Print a shell completion script (e.g. `grapevine completions bash > /etc/bash_completion.d/grapevine`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff: `grapevine manpage | man -l -`).
    Manpage,
}

#[derive(Args, Clone, Debug)]
struct NetArgs {
    /// Multicast group and port of the live stream.
    #[arg(long, env = "GRAPEVINE_GROUP", default_value = "239.255.70.86:7086", value_parser = crate::values::group)]
    group: SocketAddr,
    /// Separate group for snapshots, joined by subscribers only while recovering.
    #[arg(long, env = "GRAPEVINE_RECOVERY_GROUP", value_parser = crate::values::group)]
    recovery_group: Option<SocketAddr>,
    /// Interface (name or address) to join and send on; loopback unless set.
    #[arg(long, env = "GRAPEVINE_IFACE", default_value = "lo")]
    iface: InterfaceSpec,
    /// Topic id.
    #[arg(long, env = "GRAPEVINE_TOPIC", default_value_t = 1)]
    topic: u32,
    /// Sign (pub) or require (sub) authenticated datagrams with the keys in this file (made by
    /// `grapevine keygen`): shared keys `<id>:<64 hex digits>` (the last signs, all verify), or
    /// a publisher's `ed25519-secret` key and, for subscribers, its `ed25519-public` key.
    /// See docs/SECURITY.md.
    #[arg(long, env = "GRAPEVINE_KEY_FILE")]
    key_file: Option<std::path::PathBuf>,
}

impl NetArgs {
    /// The keyring of `--key-file`, read once; the keys themselves are never printed.
    fn keyring(&self) -> Result<Option<Arc<grapevine::core::auth::Keyring>>> {
        if self.key_file.is_none() {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    group = %self.group,
                    "no --key-file: anyone who can send to this group can forge or silence the \
                     feed (see docs/SECURITY.md)"
                );
            });
        }
        self.key_file
            .as_deref()
            .map(|path| grapevine::core::auth::Keyring::from_file(path).map(Arc::new))
            .transpose()
            .context("--key-file")
    }

    fn live(&self) -> MulticastConfig {
        MulticastConfig::new(self.group).on(self.iface.clone())
    }

    fn recovery(&self) -> Option<MulticastConfig> {
        self.recovery_group
            .map(|g| MulticastConfig::new(g).on(self.iface.clone()))
    }

    fn snapshots(&self) -> MulticastConfig {
        self.recovery().unwrap_or_else(|| self.live())
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: in a log file they are escape-code clutter.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    end_quietly_on_broken_pipes();
    let cli = Cli::parse();
    // Ctrl-C / SIGTERM end `pub` and `sub` cleanly: the publisher flushes what is batched.
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while the first is being handled ends the process at once.
        let registered =
            signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&interrupted))
                .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&interrupted)));
        if let Err(error) = registered {
            eprintln!("warning: cannot handle signal {signal}: {error}");
        }
    }
    // Set once, in main, before any command runs.
    let _ = STOP.set(interrupted);
    let result = match cli.command {
        Command::Demo(args) => cmd::demo::demo(&args),
        Command::Pub(args) => cmd::publish::publish(&args).map(|()| true),
        Command::Sub(args) => cmd::subscribe::subscribe(&args).map(|()| true),
        Command::Selftest(args) => cmd::selftest::selftest(&args).map(|()| true),
        Command::Spy(args) => cmd::spy::spy(&args).map(|()| true),
        Command::Record(args) => cmd::record::record(&args).map(|()| true),
        Command::Replay(args) => cmd::replay::replay(&args).map(|()| true),
        Command::Repeat(args) => cmd::repeat::repeat(&args).map(|()| true),
        Command::Bench { command } => bench::run(&command).map(|()| true),
        Command::Keygen(args) => cmd::keygen::keygen(&args).map(|()| true),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "grapevine",
                &mut std::io::stdout(),
            );
            Ok(true)
        }
        Command::Manpage => clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
            .render(&mut std::io::stdout())
            .map(|()| true)
            .map_err(anyhow::Error::from),
    };
    // Exit codes: 0 success, 1 a runtime failure (or a demo that did not converge), 2 a usage
    // error (clap's, before any command runs).
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error)
            if error.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            // The reader went away (`| head`): its choice, not a failure.
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}

/// `grapevine sub | head` closes the pipe early: printing then fails, and `println!` panics.
/// That is the reader's choice, not an error: end at once, quietly, as `cat` does.
fn end_quietly_on_broken_pipes() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default_hook(info);
    }));
}

static STOP: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// Whether Ctrl-C or SIGTERM arrived.
fn interrupted() -> bool {
    STOP.get().is_some_and(|flag| flag.load(Ordering::Relaxed))
}

fn snapshot_config(rate: u32, net: &NetArgs) -> Result<SnapshotConfig> {
    let mut config = SnapshotConfig::default();
    config.rate = SnapshotRate::LeavesPerSecond(rate.max(1));
    config.keyring = net.keyring()?;
    Ok(config)
}

fn publisher_options(net: &NetArgs) -> Result<PublisherOptions> {
    let mut options = PublisherOptions::new(net.topic, net.live());
    options.session.keyring = net.keyring()?;
    if options
        .session
        .keyring
        .as_ref()
        .is_some_and(|keyring| !keyring.can_sign())
    {
        bail!("--key-file holds only a public key: a publisher needs its secret key to sign");
    }
    Ok(options)
}

fn subscriber_options(net: &NetArgs, loss: f64) -> Result<SubscriberOptions> {
    let mut options = SubscriberOptions::new(net.topic, net.live());
    options.recovery = net.recovery();
    options.inject_loss = loss;
    options.session.emit_applied = false;
    options.session.keyring = net.keyring()?;
    Ok(options)
}
