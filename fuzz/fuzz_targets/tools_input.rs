//! The operator tools' inputs never panic: any bytes as a recording (reading stops at the
//! damage with an offset inside the input), any datagrams through the spy, and any bytes
//! through the authentication check (which accepts nothing unsigned), and any bytes as a
//! payload decoded by a schema (an error or a value, never a panic or a runaway allocation).
#![no_main]

use std::time::{Duration, Instant};

use grapevine_core::auth::{Keyring, Verifier};
use grapevine_cli::payload_schema::Schema;
use grapevine_cli::recording::RecordReader;
use grapevine_cli::spy::Spy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(reader) = RecordReader::new(data) {
        for record in reader {
            match record {
                Ok(record) => assert!(record.payload.len() <= data.len()),
                Err(damage) => assert!(damage.offset <= data.len() as u64),
            }
        }
    }
    let schema: Schema = "mapdelta<(u32, i64), {a: string, b: [option<f64>], c: map<u16, bytes>, \
         d: enum {X, Y(i8, u128), Z {w: bool}}}>"
        .parse()
        .expect("a valid schema");
    if let Ok(value) = schema.decode(data) {
        assert!(value.to_string().len() <= 64 * data.len() + 64);
    }
    let mut verifier = Verifier::new(std::sync::Arc::new(Keyring::single(1, [9; 32])));
    // Forging a tag by chance is out of reach: anything the fuzzer makes is refused.
    assert!(verifier.verify(data, 1, 1).is_err());
    // The input as datagrams: split on a marker byte, so one input holds several.
    let mut spy = Spy::default();
    let start = Instant::now();
    for (i, datagram) in data.split(|b| *b == 0xA5).enumerate() {
        spy.handle(start + Duration::from_millis(i as u64), datagram);
    }
    for (_, stream) in spy.streams() {
        assert!(stream.deltas + stream.heartbeats + stream.leaves + stream.fragments <= data.len() as u64);
    }
});
