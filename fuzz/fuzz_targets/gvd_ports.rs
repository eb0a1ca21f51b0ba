//! What strangers can send to gvd's ports never panics and never gets past the checks: zone
//! paths (a path that passes has no way out of the zone), signed QUERYs, the handshake of the
//! authenticated TCP ports, and records sent after a real handshake.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, SystemTime};

use grapevine_core::auth::Keyring;
use grapevine_fs::zpath::{check_name, ZonePath};
use grapevine_kos::secure::{accept_split, connect_split, PortKey, Purpose};
use gvd::query::{Query, QueryKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(path) = ZonePath::new(text) {
            let path = path.as_str();
            assert!(!path.starts_with('/'));
            assert!(!path.contains('\0'));
            assert!(path.is_empty() || path.split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
        }
        if check_name(text).is_ok() {
            assert!(!text.contains('/') && text != ".." && text != ".");
        }
    }

    let Some(query_key) = QueryKey::new(&Keyring::single(1, [7; 32])) else { return };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    if let Ok(query) = Query::decode_checked(data, Some(&query_key), now) {
        // Only a datagram signed with the key passes: the fuzzer cannot forge the tag.
        assert_eq!(&query.encode_signed(&query_key, SystemTime::UNIX_EPOCH + Duration::from_millis(
            u64::from_be_bytes(data[28..36].try_into().unwrap_or_default()))), data);
    }

    // The input as a client's handshake: never accepted without the key.
    let key = PortKey::from_network_key(b"fuzz network key");
    assert!(accept_split(data, std::io::sink(), &key, Purpose::Kos).is_err());

    // The input as raw bytes injected after a real handshake: never taken as data.
    let Ok((client, server)) = UnixStream::pair() else { return };
    let Ok(mut raw) = client.try_clone() else { return };
    let client_key = key.clone();
    let handshake = std::thread::spawn(move || {
        let reader = client.try_clone().ok()?;
        connect_split(reader, client, &client_key, Purpose::Kos).ok().map(drop)
    });
    let Ok(server_reader) = server.try_clone() else { return };
    let accepted = accept_split(server_reader, server, &key, Purpose::Kos);
    let done = handshake.join().ok().flatten();
    let (Ok((mut reader, _)), Some(())) = (accepted, done) else { return };
    if raw.write_all(data).is_err() {
        return;
    }
    drop(raw);
    let mut buffer = [0u8; 256];
    let read = reader.read(&mut buffer);
    assert!(!matches!(read, Ok(n) if n > 0), "injected bytes were taken as data");
});
