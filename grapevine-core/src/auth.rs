//! Authenticated datagrams: a per-topic shared key, a tag on every datagram, and replay
//! protection.
//!
//! A signed datagram has [`FLAG_AUTH`] set and ends with a
//! 26-byte trailer: the key id (1 byte), the sender (1 byte: 0 the publisher, 1 its
//! snapshotter), a per-sender datagram counter (8 bytes, big-endian) and a 16-byte tag, the
//! keyed BLAKE3 hash of everything before it (header with the flag set, messages, key id,
//! sender, counter), truncated. The tag gives integrity and authenticity, not secrecy.
//!
//! A subscriber with a keyring drops and counts every datagram that is unsigned, signed with a
//! key it does not have, altered, or a replay: within a publisher session each sender's
//! counter must be new, within a sliding window of the highest seen (as IPsec does). Sessions
//! older than the current one are already refused by the protocol.
//!
//! Keys rotate without downtime: a keyring holds up to two keys by id; publishers sign with
//! the last one given, subscribers accept either. Roll out a keyring with the new key second
//! to subscribers, then to publishers, then drop the old key.
//!
//! A shared key lets every holder sign, subscribers included. When subscribers must not be able
//! to forge (or silence) a publisher, give the publisher an ed25519 secret key and subscribers
//! only its public key: datagrams then carry [`FLAG_SIG`] and a 74-byte trailer (key id,
//! sender, counter, a 64-byte ed25519 signature of everything before it). It costs far more
//! CPU per datagram than the shared-key tag (docs/PERFORMANCE.md).
//!
//! Its length (about 700 lines) is ~160 lines of unit tests kept beside the signing and replay
//! rules they test.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use bytes::{BufMut, Bytes, BytesMut};

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

pub use crate::wire::FLAG_SIG;
use crate::wire::{DATAGRAM_HEADER_LEN, FLAG_AUTH};

/// Sender id of repair requests (subscribers sign them; they are checked by tag, not by replay
/// window, since many subscribers share the id: per-source rate limits bound replays).
pub const REQUEST_SENDER: u8 = 2;

pub use crate::wire::{AUTH_TRAILER_LEN, SIG_TRAILER_LEN};
const SIGNATURE_LEN: usize = 64;
const TAG_LEN: usize = 16;
/// Counters this far or more below the highest one seen are refused as replays.
const WINDOW: u64 = 4096;

/// A 256-bit key. Its `Debug` shows only the id's fingerprint, never the key.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Why a keyring could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read the key file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// An entry is not `<id>:<64 hex digits>`.
    #[error("bad key entry {entry} (want <id>:<64 hex digits>, id 0 to 255)")]
    Entry {
        /// The entry, with its key digits masked.
        entry: String,
    },
    /// No key, or more than two of a kind.
    #[error("a keyring holds one or two keys of each kind, got {0}")]
    Count(usize),
}

/// The keys of a topic: the one to sign with, and up to two to verify with; shared keys, or
/// a publisher's ed25519 secret key and the public keys that verify it.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<(u8, Key)>,
    secret: Option<(u8, SigningKey)>,
    public: Vec<(u8, VerifyingKey)>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field(
                "shared",
                &self.keys.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .field("secret", &self.secret.as_ref().map(|(id, _)| id))
            .field(
                "public",
                &self.public.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn hex32(text: &str) -> Option<[u8; 32]> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key).ok()?;
    Some(key)
}

impl Keyring {
    /// A keyring of one key.
    pub fn single(id: u8, key: [u8; 32]) -> Self {
        Self {
            keys: vec![(id, Key(key))],
            secret: None,
            public: Vec::new(),
        }
    }

    /// A publisher's keyring: the ed25519 secret key (32-byte seed) `id` signs.
    pub fn ed25519_secret(id: u8, seed: [u8; 32]) -> Self {
        let secret = SigningKey::from_bytes(&seed);
        Self {
            keys: Vec::new(),
            public: vec![(id, secret.verifying_key())],
            secret: Some((id, secret)),
        }
    }

    /// A subscriber's keyring for an ed25519-signing publisher: its public key only, which
    /// verifies but cannot sign.
    #[must_use]
    pub fn public_only(&self) -> Self {
        Self {
            keys: Vec::new(),
            secret: None,
            public: self.public.clone(),
        }
    }

    /// The key file text of this keyring (secret keys included: keep it private).
    pub fn to_file_text(&self) -> String {
        let mut text = String::new();
        for (id, key) in &self.keys {
            text.push_str(&format!("{id}:{}\n", hex::encode(key.0)));
        }
        if let Some((id, secret)) = &self.secret {
            text.push_str(&format!(
                "ed25519-secret {id}:{}\n",
                hex::encode(secret.to_bytes())
            ));
        } else {
            for (id, public) in &self.public {
                text.push_str(&format!(
                    "ed25519-public {id}:{}\n",
                    hex::encode(public.as_bytes())
                ));
            }
        }
        text
    }

    /// Whether this keyring can sign datagrams (a shared key, or an ed25519 secret key).
    pub fn can_sign(&self) -> bool {
        !self.keys.is_empty() || self.secret.is_some()
    }

    /// Whether it holds a shared key (every holder can sign: subscribers can sign their repair
    /// requests, and a holder is trusted to publish).
    pub fn is_shared(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Parses `<id>:<hex>[,<id>:<hex>]` (or the same one per line): the last key signs, all
    /// verify.
    ///
    /// # Errors
    ///
    /// [`KeyError`]; the message never contains key material.
    ///
    /// ```
    /// use grapevine_core::auth::Keyring;
    /// let keyring = Keyring::parse(&format!("1:{}", "ab".repeat(32)))?;
    /// assert_eq!(keyring.signing_id(), 1);
    /// assert_eq!(format!("{keyring:?}").contains("ab"), false);
    /// # Ok::<(), grapevine_core::auth::KeyError>(())
    /// ```
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        let mut secret = None;
        let mut public: Vec<(u8, VerifyingKey)> = Vec::new();
        for entry in text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty() && !e.starts_with('#'))
        {
            let (kind, rest) = match entry.split_once(char::is_whitespace) {
                Some((kind, rest)) if kind.starts_with("ed25519-") => (kind, rest.trim()),
                _ => ("shared", entry),
            };
            let masked = || KeyError::Entry {
                entry: format!(
                    "{}{}:…",
                    if kind == "shared" {
                        String::new()
                    } else {
                        format!("{kind} ")
                    },
                    rest.split(':').next().unwrap_or("")
                ),
            };
            let (id, hex) = rest.split_once(':').ok_or_else(masked)?;
            let id: u8 = id.trim().parse().map_err(|_| masked())?;
            let bytes = hex32(hex).ok_or_else(masked)?;
            match kind {
                "shared" => {
                    keys.retain(|(existing, _)| *existing != id);
                    keys.push((id, Key(bytes)));
                }
                "ed25519-secret" => {
                    let key = SigningKey::from_bytes(&bytes);
                    public.retain(|(existing, _)| *existing != id);
                    public.push((id, key.verifying_key()));
                    secret = Some((id, key));
                }
                "ed25519-public" => {
                    let key = VerifyingKey::from_bytes(&bytes).map_err(|_| masked())?;
                    public.retain(|(existing, _)| *existing != id);
                    public.push((id, key));
                }
                _ => return Err(masked()),
            }
        }
        if keys.len() > 2 || public.len() > 2 || (keys.is_empty() && public.is_empty()) {
            return Err(KeyError::Count(keys.len().max(public.len())));
        }
        Ok(Self {
            keys,
            secret,
            public,
        })
    }

    /// Reads a key file (see [`Keyring::parse`]).
    ///
    /// # Errors
    ///
    /// [`KeyError`].
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text)
    }

    /// The id of the key that signs.
    pub fn signing_id(&self) -> u8 {
        match &self.secret {
            Some((id, _)) => *id,
            None => self.keys.last().map_or(0, |(id, _)| *id),
        }
    }

    /// Checks the tag of a signed datagram (not whether it was seen before: see [`Verifier`]);
    /// returns its sender and counter.
    ///
    /// # Errors
    ///
    /// [`AuthError`] other than `Replayed`.
    pub fn check(&self, datagram: &[u8]) -> Result<(u8, u64), AuthError> {
        let flags = datagram.get(3).copied().unwrap_or(0);
        if flags & FLAG_SIG != 0 {
            return self.check_signature(datagram);
        }
        if flags & FLAG_AUTH == 0 || datagram.len() < DATAGRAM_HEADER_LEN + AUTH_TRAILER_LEN {
            return Err(AuthError::Unsigned);
        }
        let (signed, tag) = datagram.split_at(datagram.len() - TAG_LEN);
        let trailer = &signed[signed.len() - (AUTH_TRAILER_LEN - TAG_LEN)..];
        let (id, sender) = (trailer[0], trailer[1]);
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&trailer[2..10]);
        let counter = u64::from_be_bytes(counter);
        let key = self.key(id).ok_or(AuthError::UnknownKey(id))?;
        if !tags_equal(&Keyring::tag(key, signed), tag) {
            return Err(AuthError::BadTag);
        }
        Ok((sender, counter))
    }

    fn check_signature(&self, datagram: &[u8]) -> Result<(u8, u64), AuthError> {
        if datagram.len() < DATAGRAM_HEADER_LEN + SIG_TRAILER_LEN {
            return Err(AuthError::Unsigned);
        }
        let (signed, signature) = datagram.split_at(datagram.len() - SIGNATURE_LEN);
        let trailer = &signed[signed.len() - (SIG_TRAILER_LEN - SIGNATURE_LEN)..];
        let (id, sender) = (trailer[0], trailer[1]);
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&trailer[2..10]);
        let key = self
            .public
            .iter()
            .find(|(k, _)| *k == id)
            .map(|(_, key)| key)
            .ok_or(AuthError::UnknownKey(id))?;
        let signature =
            ed25519_dalek::Signature::from_slice(signature).map_err(|_| AuthError::BadTag)?;
        key.verify_strict(signed, &signature)
            .map_err(|_| AuthError::BadTag)?;
        Ok((sender, u64::from_be_bytes(counter)))
    }

    /// A key for another use (a handshake's pre-shared key, say), derived from the signing
    /// key and `context`, so that the signing key itself never leaves the keyring.
    ///
    /// `None` for a keyring without a shared key: a public key is no secret to derive from.
    pub fn derive_key(&self, context: &str) -> Option<[u8; 32]> {
        self.keys
            .last()
            .map(|(_, key)| blake3::derive_key(context, &key.0))
    }

    fn key(&self, id: u8) -> Option<&Key> {
        self.keys.iter().find(|(k, _)| *k == id).map(|(_, key)| key)
    }

    fn tag(key: &Key, signed: &[u8]) -> [u8; TAG_LEN] {
        let hash = blake3::keyed_hash(&key.0, signed);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&hash.as_bytes()[..TAG_LEN]);
        tag
    }
}

/// Compares two tags in constant time (a tag must not leak through timing); tags of different
/// lengths differ.
pub fn tags_equal(expected: &[u8], received: &[u8]) -> bool {
    // `subtle` keeps the compiler from turning the comparison into an early exit.
    subtle::ConstantTimeEq::ct_eq(expected, received).into()
}

/// Signs the datagrams of one sender.
#[derive(Clone, Debug)]
pub struct Signer {
    keyring: std::sync::Arc<Keyring>,
    sender: u8,
    counter: u64,
}

impl Signer {
    /// Signs as `sender` (0 publisher, 1 snapshotter, [`REQUEST_SENDER`] a subscriber's repair
    /// requests) with the keyring's signing key.
    pub fn new(keyring: std::sync::Arc<Keyring>, sender: u8) -> Self {
        Self {
            keyring,
            sender,
            counter: 0,
        }
    }

    /// Starts counting again (a new publisher session).
    pub fn restart(&mut self) {
        self.counter = 0;
    }

    /// `datagram` signed when there is a signer, as is otherwise.
    pub fn sign_if(signer: &mut Option<Self>, datagram: Bytes) -> Bytes {
        match signer {
            Some(signer) => signer.sign(&datagram),
            None => datagram,
        }
    }

    /// The signed copy of `datagram`.
    pub fn sign(&mut self, datagram: &[u8]) -> Bytes {
        self.counter += 1;
        if let Some((id, secret)) = &self.keyring.secret {
            let mut out = BytesMut::with_capacity(datagram.len() + SIG_TRAILER_LEN);
            out.put_slice(datagram);
            if let Some(flags) = out.get_mut(3) {
                *flags |= FLAG_SIG;
            }
            out.put_u8(*id);
            out.put_u8(self.sender);
            out.put_u64(self.counter);
            let signature = secret.sign(&out);
            out.put_slice(&signature.to_bytes());
            return out.freeze();
        }
        let id = self.keyring.signing_id();
        let mut out = BytesMut::with_capacity(datagram.len() + AUTH_TRAILER_LEN);
        out.put_slice(datagram);
        if let Some(flags) = out.get_mut(3) {
            *flags |= FLAG_AUTH;
        }
        out.put_u8(id);
        out.put_u8(self.sender);
        out.put_u64(self.counter);
        let tag = self
            .keyring
            .key(id)
            .map_or([0; TAG_LEN], |key| Keyring::tag(key, &out));
        out.put_slice(&tag);
        out.freeze()
    }
}

/// Why a datagram was refused.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
pub enum AuthError {
    /// No tag: the sender has no key (or is not GrapeVine).
    #[error("unsigned datagram")]
    Unsigned,
    /// Signed with a key id this keyring lacks.
    #[error("signed with key {0}, which this keyring lacks")]
    UnknownKey(u8),
    /// The tag does not match: altered, or another key with the same id.
    #[error("bad tag (altered datagram, or a different key)")]
    BadTag,
    /// Seen before, or too old.
    #[error("replayed datagram")]
    Replayed,
}

/// Sliding window of datagram counters seen from one sender in one session: the last
/// [`WINDOW`] counters as a bitmap. Wide, because a publisher sends batches of hundreds of
/// datagrams from two threads, and a batch may leave after a later heartbeat.
#[derive(Clone, Debug)]
struct ReplayWindow {
    highest: u64,
    seen: Box<[u64; (WINDOW / 64) as usize]>,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self {
            highest: 0,
            seen: Box::new([0; (WINDOW / 64) as usize]),
        }
    }
}

impl ReplayWindow {
    fn bit(counter: u64) -> (usize, u64) {
        let index = counter % WINDOW;
        ((index / 64) as usize, 1u64 << (index % 64))
    }

    /// Whether `counter` is new; records it.
    fn admit(&mut self, counter: u64) -> bool {
        if counter == 0 {
            return false;
        }
        if counter > self.highest {
            if counter - self.highest >= WINDOW {
                self.seen.fill(0);
            } else {
                for skipped in self.highest + 1..counter {
                    let (word, mask) = Self::bit(skipped);
                    self.seen[word] &= !mask;
                }
            }
            self.highest = counter;
            let (word, mask) = Self::bit(counter);
            self.seen[word] |= mask;
            return true;
        }
        if self.highest - counter >= WINDOW {
            return false;
        }
        let (word, mask) = Self::bit(counter);
        if self.seen[word] & mask != 0 {
            return false;
        }
        self.seen[word] |= mask;
        true
    }
}

/// Checks the datagrams a subscriber receives.
#[derive(Debug)]
pub struct Verifier {
    keyring: std::sync::Arc<Keyring>,
    windows: HashMap<(u32, u64, u8), ReplayWindow>,
}

impl Verifier {
    /// Checks against `keyring`.
    pub fn new(keyring: std::sync::Arc<Keyring>) -> Self {
        Self {
            keyring,
            windows: HashMap::new(),
        }
    }

    /// Checks a whole received datagram of `publisher`'s `session`; on success its counter
    /// is recorded.
    ///
    /// # Errors
    ///
    /// [`AuthError`]: drop the datagram.
    pub fn verify(
        &mut self,
        datagram: &[u8],
        publisher: u32,
        session: u64,
    ) -> Result<(), AuthError> {
        let (sender, counter) = self.keyring.check(datagram)?;
        // Bounded: sessions are few; the oldest windows go when there are too many.
        if self.windows.len() > 4096 {
            self.windows.clear();
        }
        let window = self
            .windows
            .entry((publisher, session, sender))
            .or_default();
        if !window.admit(counter) {
            return Err(AuthError::Replayed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::wire::{Datagram, DatagramBuilder};

    fn keyring(id: u8, byte: u8) -> Arc<Keyring> {
        Arc::new(Keyring::single(id, [byte; 32]))
    }

    fn datagram() -> Bytes {
        let mut builder = DatagramBuilder::new(1400, 7, 3, 99);
        assert!(builder.push_heartbeat(5));
        builder.finish().unwrap_or_default()
    }

    #[test]
    fn signed_datagrams_verify_and_still_parse() {
        let mut signer = Signer::new(keyring(1, 7), 0);
        let signed = signer.sign(&datagram());
        assert_eq!(signed.len(), datagram().len() + AUTH_TRAILER_LEN);
        let parsed = Datagram::parse(&signed).map(|d| d.messages().count());
        assert_eq!(parsed, Ok(1), "the trailer is not a message");
        let mut verifier = Verifier::new(keyring(1, 7));
        assert_eq!(verifier.verify(&signed, 3, 99), Ok(()));
        assert_eq!(verifier.verify(&signed, 3, 99), Err(AuthError::Replayed));
    }

    #[test]
    fn forged_altered_and_unsigned_are_refused() {
        let mut verifier = Verifier::new(keyring(1, 7));
        let forged = Signer::new(keyring(1, 8), 0).sign(&datagram());
        assert_eq!(verifier.verify(&forged, 3, 99), Err(AuthError::BadTag));
        let other_id = Signer::new(keyring(2, 7), 0).sign(&datagram());
        assert_eq!(
            verifier.verify(&other_id, 3, 99),
            Err(AuthError::UnknownKey(2))
        );
        assert_eq!(
            verifier.verify(&datagram(), 3, 99),
            Err(AuthError::Unsigned)
        );
        let mut altered = Signer::new(keyring(1, 7), 0).sign(&datagram()).to_vec();
        for i in 0..altered.len() {
            altered[i] ^= 0x01;
            let result = verifier.verify(&altered, 3, 99);
            assert!(result.is_err(), "byte {i} altered and accepted");
            altered[i] ^= 0x01;
        }
        assert_eq!(verifier.verify(&altered, 3, 99), Ok(()));
    }

    #[test]
    fn the_window_takes_late_datagrams_once() {
        let mut window = ReplayWindow::default();
        assert!(window.admit(5));
        assert!(window.admit(3), "late but new");
        assert!(!window.admit(3), "replayed");
        assert!(window.admit(200));
        assert!(window.admit(6), "still inside the window");
        assert!(!window.admit(6));
        assert!(window.admit(5_000));
        assert!(!window.admit(200), "below the window");
        assert!(window.admit(1_000), "inside it, never seen");
        assert!(!window.admit(0));
    }

    #[test]
    fn a_batch_overtaken_by_a_later_datagram_is_accepted() {
        // A publisher sends a batch of hundreds of datagrams from one thread while its flusher
        // sends a heartbeat: the heartbeat (a later counter) may arrive first.
        let mut signer = Signer::new(keyring(1, 7), 0);
        let batch: Vec<Bytes> = (0..300).map(|_| signer.sign(&datagram())).collect();
        let heartbeat = signer.sign(&datagram());
        let mut verifier = Verifier::new(keyring(1, 7));
        assert_eq!(verifier.verify(&heartbeat, 3, 99), Ok(()));
        for signed in &batch {
            assert_eq!(verifier.verify(signed, 3, 99), Ok(()));
        }
    }

    #[test]
    fn rotation_accepts_both_keys() {
        let both = Arc::new(
            Keyring::parse(&format!("1:{},2:{}", "07".repeat(32), "08".repeat(32)))
                .unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(both.signing_id(), 2);
        let mut verifier = Verifier::new(Arc::clone(&both));
        let old = Signer::new(keyring(1, 7), 0).sign(&datagram());
        let new = Signer::new(both, 1).sign(&datagram());
        assert_eq!(verifier.verify(&old, 3, 99), Ok(()));
        assert_eq!(verifier.verify(&new, 3, 99), Ok(()));
    }

    #[test]
    fn bad_key_text_does_not_leak() {
        let secret = "zz".repeat(32);
        let error = Keyring::parse(&format!("1:{secret}"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!error.contains("zz"), "{error}");
        assert!(matches!(Keyring::parse(""), Err(KeyError::Count(0))));
    }

    #[test]
    fn publisher_signatures_verify_with_the_public_key_only() {
        let secret = Keyring::ed25519_secret(4, [21; 32]);
        let public = Arc::new(secret.public_only());
        assert!(secret.can_sign() && !public.can_sign());
        assert!(!public.is_shared());
        let mut signer = Signer::new(Arc::new(secret.clone()), 0);
        let signed = signer.sign(&datagram());
        assert_eq!(signed.len(), datagram().len() + SIG_TRAILER_LEN);
        assert_eq!(signed[3] & FLAG_SIG, FLAG_SIG);
        assert_eq!(
            Datagram::parse(&signed).map(|d| d.messages().count()),
            Ok(1)
        );
        let mut verifier = Verifier::new(Arc::clone(&public));
        assert_eq!(verifier.verify(&signed, 3, 99), Ok(()));
        assert_eq!(verifier.verify(&signed, 3, 99), Err(AuthError::Replayed));
        let mut altered = signer.sign(&datagram()).to_vec();
        for i in 0..altered.len() {
            altered[i] ^= 0x01;
            assert!(
                verifier.verify(&altered, 3, 99).is_err(),
                "byte {i} altered and accepted"
            );
            altered[i] ^= 0x01;
        }
        // A shared key, or another ed25519 key under the same id, cannot stand in for it.
        let shared = Signer::new(keyring(4, 21), 0).sign(&datagram());
        assert!(verifier.verify(&shared, 3, 99).is_err());
        let other =
            Signer::new(Arc::new(Keyring::ed25519_secret(4, [22; 32])), 0).sign(&datagram());
        assert_eq!(verifier.verify(&other, 3, 99), Err(AuthError::BadTag));
    }

    #[test]
    fn key_files_round_trip_and_never_show_secrets() {
        let secret = Keyring::ed25519_secret(4, [0xab; 32]);
        let text = secret.to_file_text();
        assert!(text.starts_with("ed25519-secret 4:"));
        let parsed = Keyring::parse(&text).unwrap_or_else(|_| unreachable!());
        assert!(parsed.can_sign());
        let public_text = secret.public_only().to_file_text();
        assert!(public_text.starts_with("ed25519-public 4:"));
        assert!(!public_text.contains(&"ab".repeat(32)));
        let public = Keyring::parse(&public_text).unwrap_or_else(|_| unreachable!());
        assert!(!public.can_sign());
        assert!(!format!("{secret:?}").contains("ab"));
        let bad = Keyring::parse(&format!("ed25519-secret 4:{}", "zz".repeat(32)))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            bad.contains("ed25519-secret 4") && !bad.contains("zz"),
            "{bad}"
        );
    }
}
