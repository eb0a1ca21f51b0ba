//! `grapevine keygen`: shared keys, or a publisher's signing key pair.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

/// `grapevine keygen`.
#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the key (refused if the file exists). With --ed25519, the publisher's
    /// secret key.
    file: PathBuf,
    /// Make a publisher's ed25519 key pair instead of a shared key: subscribers then get only
    /// the public key (--public) and cannot sign.
    #[arg(long, requires = "public")]
    ed25519: bool,
    /// With --ed25519: where to write the public key for subscribers.
    #[arg(long)]
    public: Option<PathBuf>,
    /// The key id (0..=255), to tell keys apart during a rotation.
    #[arg(long, default_value_t = 1)]
    id: u8,
}

/// Writes `text` to a new file readable by its owner only; an existing file is never replaced.
fn write_new_private(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {} (it is never overwritten)", path.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

/// `grapevine keygen`: a shared key, or an ed25519 key pair.
pub fn keygen(args: &KeygenArgs) -> Result<()> {
    use grapevine::core::auth::Keyring;
    let seed: [u8; 32] = {
        use rand::RngCore;
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        seed
    };
    if args.ed25519 {
        let public_path = args
            .public
            .as_deref()
            .context("--ed25519 needs --public FILE")?;
        let keyring = Keyring::ed25519_secret(args.id, seed);
        write_new_private(&args.file, &keyring.to_file_text(), 0o600)?;
        write_new_private(public_path, &keyring.public_only().to_file_text(), 0o644)?;
        eprintln!(
            "wrote the publisher's secret key to {} and its public key to {}",
            args.file.display(),
            public_path.display()
        );
    } else {
        write_new_private(
            &args.file,
            &Keyring::single(args.id, seed).to_file_text(),
            0o600,
        )?;
        eprintln!("wrote a shared key to {}", args.file.display());
    }
    Ok(())
}
