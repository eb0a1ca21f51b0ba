//! Watching traffic without joining it: per topic and publisher, what flows, what is lost and
//! how the snapshot cycle goes. Sans-IO: [`Spy::handle`] takes received datagrams; the caller
//! turns counters into rates.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use grapevine::core::wire::{Datagram, Message};

/// Delta payloads kept per stream for decoding.
pub const LATEST_KEPT: usize = 4;
/// Missing sequence numbers remembered per stream, so that late (reordered) arrivals are not
/// counted as lost.
const MISSING_KEPT: usize = 4096;

/// What the spy saw of one publisher on one topic.
#[derive(Clone, Debug, Default)]
pub struct StreamStats {
    /// The current session.
    pub session: u64,
    /// Sessions seen after the first (publisher restarts).
    pub restarts: u64,
    /// Datagrams.
    pub datagrams: u64,
    /// Datagrams without an authentication trailer (anyone could have sent them; the spy holds
    /// no key, so signed ones are counted, not verified).
    pub unsigned: u64,
    /// Bytes.
    pub bytes: u64,
    /// Delta messages.
    pub deltas: u64,
    /// Snapshot leaves.
    pub leaves: u64,
    /// Heartbeats.
    pub heartbeats: u64,
    /// Fragments.
    pub fragments: u64,
    /// Repair requests for this session (sent by subscribers).
    pub repair_requests: u64,
    /// Highest sequence number seen (deltas and heartbeats).
    pub last_seq: u64,
    /// Jumps in the sequence.
    pub gaps: u64,
    /// Sequence numbers not seen (minus those that arrived late).
    pub lost: u64,
    /// The cycle under way and how many leaves of it were seen.
    pub cycle: Option<(u32, u32)>,
    /// Cycles completed (cycle ends seen).
    pub cycles: u64,
    /// Time between the last two cycle ends.
    pub cycle_period: Option<Duration>,
    /// The latest delta payloads, newest last.
    pub latest: VecDeque<Vec<u8>>,
    next_seq: u64,
    missing: BTreeSet<u64>,
    last_cycle_end: Option<Instant>,
}

impl StreamStats {
    fn sequence(&mut self, seq: u64) {
        if self.next_seq == 0 {
            self.next_seq = seq.saturating_add(1);
        } else if seq >= self.next_seq {
            if seq > self.next_seq {
                self.gaps += 1;
                self.lost += seq - self.next_seq;
                for missing in
                    self.next_seq..seq.min(self.next_seq.saturating_add(MISSING_KEPT as u64))
                {
                    self.missing.insert(missing);
                }
                while self.missing.len() > MISSING_KEPT {
                    self.missing.pop_first();
                }
            }
            self.next_seq = seq.saturating_add(1);
        } else if self.missing.remove(&seq) {
            self.lost -= 1;
        }
        self.last_seq = self.last_seq.max(seq);
    }

    /// A heartbeat says `last_seq` was assigned: anything before it not seen is missing.
    fn heartbeat(&mut self, last_seq: u64) {
        if self.next_seq != 0 && last_seq >= self.next_seq {
            self.sequence(last_seq);
            // `last_seq` itself was not received, only announced.
            if self.missing.insert(last_seq) {
                self.lost += 1;
            }
        } else if self.next_seq == 0 {
            self.next_seq = last_seq.saturating_add(1);
        }
        self.last_seq = self.last_seq.max(last_seq);
    }
}

/// Traffic seen by the spy.
#[derive(Debug, Default)]
pub struct Spy {
    streams: BTreeMap<(u32, u32), StreamStats>,
    /// Repeaters heard on the group (their hellos), by id.
    repeaters: BTreeMap<u64, RepeaterSeen>,
    /// Datagrams that are not GrapeVine datagrams (or are damaged).
    pub malformed: u64,
    /// Every datagram.
    pub datagrams: u64,
}

/// What the spy heard from one repeater.
#[derive(Clone, Debug, Default)]
struct RepeaterSeen {
    hellos: u64,
    last: Option<Instant>,
    signed: bool,
}

/// A repeater on the watched group, as [`Spy::repeaters`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepeaterState {
    /// Its id.
    pub id: u64,
    /// Hellos heard.
    pub hellos: u64,
    /// Time since its last hello.
    pub silent_for: Option<Duration>,
    /// Whether it is the network's forwarder (relays local traffic out).
    pub forwarder: bool,
    /// Whether its hellos are signed.
    pub signed: bool,
}

impl Spy {
    /// Takes one received datagram.
    ///
    /// ```
    /// use std::time::Instant;
    /// use grapevine_cli::spy::Spy;
    /// let mut spy = Spy::default();
    /// spy.handle(Instant::now(), b"not a datagram");
    /// assert_eq!(spy.malformed, 1);
    /// ```
    pub fn handle(&mut self, now: Instant, bytes: &[u8]) {
        self.datagrams += 1;
        let Ok(datagram) = Datagram::parse(bytes) else {
            self.malformed += 1;
            return;
        };
        let header = datagram.header();
        if header.flags() & grapevine::core::wire::FLAG_PROBE != 0 {
            // Repeaters announce themselves with probe datagrams (docs/PROTOCOL.md §9); other
            // probes are self-tests. Neither is a stream.
            if header.publisher() == grapevine::repeater::HELLO_PUBLISHER {
                let seen = self.repeaters.entry(header.session()).or_default();
                seen.hellos += 1;
                seen.last = Some(now);
                seen.signed = header.flags() & grapevine::core::wire::FLAG_AUTH != 0;
            }
            return;
        }
        let stream = self
            .streams
            .entry((header.topic(), header.publisher()))
            .or_default();
        if stream.session != header.session() {
            if stream.session != 0 {
                stream.restarts += 1;
            }
            let restarts = stream.restarts;
            *stream = StreamStats {
                session: header.session(),
                restarts,
                ..StreamStats::default()
            };
        }
        stream.datagrams += 1;
        stream.bytes += bytes.len() as u64;
        if header.flags() & grapevine::core::wire::FLAG_AUTH == 0 {
            stream.unsigned += 1;
        }
        for message in datagram.messages() {
            match message {
                Message::Delta { seq, payload, .. } => {
                    stream.deltas += 1;
                    stream.sequence(seq);
                    // The oldest buffer is reused: no allocation per message once full.
                    let mut kept = if stream.latest.len() == LATEST_KEPT {
                        stream.latest.pop_front().unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    kept.clear();
                    kept.extend_from_slice(payload);
                    stream.latest.push_back(kept);
                }
                Message::Heartbeat { last_seq } => {
                    stream.heartbeats += 1;
                    stream.heartbeat(last_seq);
                }
                Message::Leaf { position, .. } => {
                    stream.leaves += 1;
                    stream.cycle = Some((position.cycle, position.index.saturating_add(1)));
                }
                Message::CycleEnd { position } => {
                    stream.cycles += 1;
                    stream.cycle = Some((position.cycle, position.index));
                    if let Some(last) = stream.last_cycle_end {
                        stream.cycle_period = Some(now.saturating_duration_since(last));
                    }
                    stream.last_cycle_end = Some(now);
                }
                Message::Fragment(_) => stream.fragments += 1,
                Message::RepairRequest { .. } => stream.repair_requests += 1,
            }
        }
    }

    /// Repeaters heard on the group, by id, and which of them is the network's forwarder as of
    /// `now` (the lowest id heard within the election window), as the repeaters elect it.
    pub fn repeaters(&self, now: Instant) -> Vec<RepeaterState> {
        let recent = |seen: &RepeaterSeen| {
            seen.last.is_some_and(|t| {
                now.saturating_duration_since(t) < grapevine::repeater::FORWARDER_TIMEOUT
            })
        };
        let forwarder = self
            .repeaters
            .iter()
            .filter(|(_, seen)| recent(seen))
            .map(|(id, _)| *id)
            .min();
        self.repeaters
            .iter()
            .map(|(id, seen)| RepeaterState {
                id: *id,
                hellos: seen.hellos,
                silent_for: seen.last.map(|t| now.saturating_duration_since(t)),
                forwarder: Some(*id) == forwarder,
                signed: seen.signed,
            })
            .collect()
    }

    /// Every (topic, publisher) seen, with its counters.
    pub fn streams(&self) -> impl Iterator<Item = (&(u32, u32), &StreamStats)> {
        self.streams.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grapevine::core::proto::{PublisherConfig, PublisherSession};
    use grapevine::core::state::{KeyedMap, MapDelta};

    #[test]
    fn repeaters_and_their_forwarder_are_shown_not_counted_as_streams() {
        use grapevine::repeater::{Relay, FORWARDER_TIMEOUT};
        let now = Instant::now();
        let mut spy = Spy::default();
        let (mut low, mut high) = (Relay::with_id(3, None, None), Relay::with_id(9, None, None));
        spy.handle(now, &low.hello());
        spy.handle(now, &high.hello());
        spy.handle(now, &high.hello());
        assert_eq!(spy.streams().count(), 0, "hellos are not streams");
        let seen = spy.repeaters(now);
        assert_eq!(seen.len(), 2);
        assert!(seen[0].id == 3 && seen[0].forwarder && seen[0].hellos == 1);
        assert!(seen[1].id == 9 && !seen[1].forwarder && seen[1].hellos == 2);
        // The forwarder goes silent: the other takes over, as the repeaters' election does.
        let later = now + FORWARDER_TIMEOUT;
        spy.handle(later, &high.hello());
        let seen = spy.repeaters(later);
        assert!(!seen[0].forwarder && seen[1].forwarder, "{seen:?}");
    }

    #[test]
    fn counts_streams_gaps_and_late_arrivals() {
        let now = Instant::now();
        let mut config = PublisherConfig::new(9);
        config.publisher = 4;
        let mut publisher = PublisherSession::new(config, 77, KeyedMap::<u32, u32>::default(), now);
        let mut datagrams = Vec::new();
        for key in 0..10u32 {
            publisher.publish(now, MapDelta::Put(key, key)).unwrap();
            publisher.flush(now);
            datagrams.extend(std::iter::from_fn(|| publisher.poll_transmit()));
        }
        assert_eq!(datagrams.len(), 10);
        let mut spy = Spy::default();
        for (i, datagram) in datagrams.iter().enumerate() {
            // Drop 3 and 4; deliver 6 late (after 7).
            match i {
                3 | 4 | 6 => {}
                7 => {
                    spy.handle(now, datagram);
                    spy.handle(now, &datagrams[6]);
                }
                _ => spy.handle(now, datagram),
            }
        }
        spy.handle(now, b"garbage");
        let (key, stream) = spy.streams().next().unwrap();
        assert_eq!(*key, (9, 4));
        assert_eq!(stream.session, 77);
        assert_eq!(stream.deltas, 8);
        assert_eq!(stream.last_seq, 10);
        assert_eq!(stream.gaps, 2);
        assert_eq!(stream.lost, 2, "6 arrived late: only 4 and 5 are lost");
        assert_eq!(stream.latest.len(), LATEST_KEPT);
        assert_eq!(spy.malformed, 1);
    }
}
