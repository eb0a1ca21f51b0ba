//! The datagram decoder never panics, and what it accepts re-validates message by message.
#![no_main]

use grapevine_core::wire::{decode_reassembled, Datagram, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(datagram) = Datagram::parse(data) {
        let count = datagram.messages().count();
        assert_eq!(count, usize::from(datagram.header().message_count()));
        for message in datagram.messages() {
            if let Message::Fragment(fragment) = message {
                assert!(fragment.index < fragment.count);
                assert!(fragment.chunk.len() <= fragment.total_len as usize);
            }
        }
    }
    let _ = decode_reassembled(data);
});
