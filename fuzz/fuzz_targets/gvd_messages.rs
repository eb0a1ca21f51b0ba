//! gvd's decoders of network input never panic: QUERY datagrams, and the ELP records and VDEV
//! lists that arrive as leaf payloads. What they accept encodes back to the same bytes.
#![no_main]

use grapevine_core::codec;
use gvd::elp::{NodeRecord, VdevList};
use gvd::query::Query;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(query) = Query::decode(data) {
        assert_eq!(&query.encode()[..], data);
    }
    let _ = codec::decode::<(u64, NodeRecord)>(data);
    let _ = codec::decode::<(u64, VdevList)>(data);
});
