//! gvd's decoders of network input never panic: QUERY datagrams, the ELP records and VDEV
//! lists that arrive as leaf payloads, KOS frames, zone replication messages, and the agent's
//! handling of any frame
//! (against fake devices). What the QUERY decoder accepts encodes back to the same bytes.
#![no_main]

use grapevine_core::codec;
use grapevine_kos::proto::{decode, frame_len, ErrorKind, Reply, Request, DEFAULT_MAX_FRAME};
use grapevine_fs::repl::{ReplReply, ReplRequest};
use gvd::agent::{Action, AgentSession, Devices};
use gvd::elp::{NodeRecord, VdevList};
use gvd::query::Query;
use gvd::vdriver::Vdev;
use libfuzzer_sys::fuzz_target;

struct Fake;

impl Devices for Fake {
    fn find(&mut self, vdev: &str, _: Option<&str>) -> Result<(String, Vdev), (ErrorKind, String)> {
        if vdev.len() < 8 {
            Ok((
                "fake".into(),
                Vdev {
                    name: vdev.into(),
                    kind: "echo".into(),
                    attributes: "{}".into(),
                },
            ))
        } else {
            Err((ErrorKind::NoSuchVdev, vdev.into()))
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(query) = Query::decode(data) {
        assert_eq!(&query.encode()[..], data);
    }
    let _ = codec::decode::<(u64, NodeRecord)>(data);
    let _ = codec::decode::<(u64, VdevList)>(data);
    let _ = decode::<Reply>(data);
    let _ = decode::<Request>(data);
    let _ = decode::<ReplRequest>(data);
    let _ = decode::<ReplReply>(data);
    if let Some(header) = data.get(..4) {
        let _ = frame_len([header[0], header[1], header[2], header[3]], DEFAULT_MAX_FRAME);
    }
    // A connected session fed the input as a stream of small frames.
    let mut session = AgentSession::new(1, 2);
    let conn = postcard::to_stdvec(&Request::Conn { version: 1, client: "fuzz".into() })
        .unwrap_or_default();
    assert!(matches!(session.handle(&conn, &mut Fake), Action::Reply(Reply::Conn { .. })));
    for chunk in data.chunks(16) {
        if let Action::ReplyAndClose(_) = session.handle(chunk, &mut Fake) {
            break;
        }
    }
});
