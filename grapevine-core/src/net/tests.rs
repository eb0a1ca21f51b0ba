use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

use super::*;

/// A group and port unlikely to collide between tests running in parallel.
fn group(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([239, 255, 71, last], port))
}

#[test]
fn round_trip_on_loopback_with_batches() {
    let config = MulticastConfig::new(group(1, 47_101));
    let receiver = MulticastSocket::receiver(&config).unwrap();
    let sender = MulticastSocket::sender(&config).unwrap();
    assert_eq!(sender.interface().addr, IpAddr::from([127, 0, 0, 1]));
    assert!(receiver.recv_buffer_size() > 0);
    let datagrams: Vec<Bytes> = (0..10u8)
        .map(|i| Bytes::from(vec![i; 100 + usize::from(i)]))
        .collect();
    assert_eq!(sender.send_batch(&datagrams).unwrap(), 10);
    let mut batch = RecvBatch::new(16, 2048);
    let mut received = Vec::new();
    for _ in 0..20 {
        let n = receiver
            .recv_batch(&mut batch, Duration::from_millis(100))
            .unwrap();
        received.extend(batch.datagrams().take(n).map(<[u8]>::to_vec));
        if received.len() >= 10 {
            break;
        }
    }
    let want: Vec<Vec<u8>> = datagrams.iter().map(|d| d.to_vec()).collect();
    assert_eq!(received, want);
    assert_eq!(batch.kernel_drops(), 0);
}

#[test]
fn the_sender_of_each_datagram_is_known() {
    let config = MulticastConfig::new(group(2, 47_102));
    let receiver = MulticastSocket::receiver(&config).unwrap();
    let stranger = UdpSocket::bind("127.0.0.3:0").unwrap();
    socket2::SockRef::from(&stranger)
        .set_multicast_if_v4(&Ipv4Addr::LOCALHOST)
        .unwrap();
    stranger.send_to(b"who am I", config.group).unwrap();
    let mut batch = RecvBatch::new(4, 2048);
    let n = receiver
        .recv_batch(&mut batch, Duration::from_secs(2))
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(batch.source(0), Some(stranger.local_addr().unwrap()));
    assert_eq!(batch.source(1), None, "only what was received");
}

#[test]
fn kernel_drops_are_counted() {
    let mut config = MulticastConfig::new(group(7, 47_107));
    config.recv_buffer = 1; // the kernel rounds up to its minimum, a few KiB
                            // The kernel counts a dropped coalesced run once: count datagrams one by one here.
    config.receive_offload = false;
    let receiver = MulticastSocket::receiver(&config).unwrap();
    let sender = MulticastSocket::sender(&config).unwrap();
    let datagrams: Vec<Bytes> = (0..200).map(|_| Bytes::from(vec![0u8; 1000])).collect();
    sender.send_batch(&datagrams).unwrap();
    let mut batch = RecvBatch::new(64, 2048);
    let mut received = 0;
    while let Ok(n @ 1..) = receiver.recv_batch(&mut batch, Duration::from_millis(50)) {
        received += n;
    }
    assert!(received < 200, "a tiny buffer cannot hold 200 KB");
    // The kernel stamps its drop count on the datagrams queued after the drops.
    sender.send(&[1u8; 10]).unwrap();
    assert_eq!(
        receiver
            .recv_batch(&mut batch, Duration::from_secs(1))
            .unwrap(),
        1
    );
    assert_eq!(batch.kernel_drops() as usize, 200 - received);
}

#[test]
fn truncated_datagrams_are_flagged() {
    let mut config = MulticastConfig::new(group(2, 47_102));
    // A coalescing receiver grows its buffers to hold any datagram.
    config.receive_offload = false;
    let receiver = MulticastSocket::receiver(&config).unwrap();
    let sender = MulticastSocket::sender(&config).unwrap();
    sender.send(&[1u8; 300]).unwrap();
    let mut batch = RecvBatch::new(4, 100);
    let n = receiver
        .recv_batch(&mut batch, Duration::from_secs(1))
        .unwrap();
    assert_eq!(n, 1);
    assert!(batch.meta()[0].truncated);
}

#[test]
fn recv_times_out_with_nothing() {
    let config = MulticastConfig::new(group(3, 47_103));
    let receiver = MulticastSocket::receiver(&config).unwrap();
    let mut batch = RecvBatch::new(4, 2048);
    assert_eq!(
        receiver
            .recv_batch(&mut batch, Duration::from_millis(20))
            .unwrap(),
        0
    );
}

#[test]
fn self_test_passes_on_loopback() {
    let config = MulticastConfig::new(group(4, 47_104));
    let took = self_test(&config, Duration::from_secs(2)).unwrap();
    assert!(took < Duration::from_secs(2));
}

#[test]
fn clear_errors_for_bad_settings() {
    let unicast = MulticastConfig::new("127.0.0.1:47105".parse().unwrap());
    let err = MulticastSocket::receiver(&unicast).unwrap_err();
    assert!(matches!(err, NetError::NotMulticast(_)), "{err}");
    assert!(err.to_string().contains("not a multicast address"));

    let config = MulticastConfig::new(group(5, 47_105)).on("no-such-if0".parse().unwrap());
    let err = MulticastSocket::sender(&config).unwrap_err();
    assert!(
        matches!(err, NetError::NoSuchInterface(ref name) if name == "no-such-if0"),
        "{err}"
    );

    let config = MulticastConfig::new(group(5, 47_105)).on("192.0.2.77".parse().unwrap());
    assert!(matches!(
        MulticastSocket::sender(&config).unwrap_err(),
        NetError::NoSuchInterface(_)
    ));
}

#[test]
fn interface_spec_parses() {
    assert_eq!(
        "lo".parse::<InterfaceSpec>().unwrap(),
        InterfaceSpec::Loopback
    );
    assert_eq!(
        "10.0.0.1".parse::<InterfaceSpec>().unwrap(),
        InterfaceSpec::Addr("10.0.0.1".parse().unwrap())
    );
    assert_eq!(
        "eth1".parse::<InterfaceSpec>().unwrap(),
        InterfaceSpec::Name("eth1".into())
    );
}

#[tokio::test]
async fn tokio_round_trip() {
    let config = MulticastConfig::new(group(6, 47_106));
    let receiver = MulticastSocket::receiver(&config)
        .unwrap()
        .into_tokio()
        .unwrap();
    let sender = MulticastSocket::sender(&config)
        .unwrap()
        .into_tokio()
        .unwrap();
    sender.send(b"over tokio").await.unwrap();
    let mut buf = [0u8; 64];
    let (len, from) = tokio::time::timeout(Duration::from_secs(2), receiver.recv_from(&mut buf))
        .await
        .expect("datagram within 2 s")
        .unwrap();
    assert_eq!(&buf[..len], b"over tokio");
    assert!(from.ip().is_loopback());
}

#[tokio::test]
async fn a_tokio_receiver_gets_a_segmented_run_one_datagram_at_a_time() {
    let config = MulticastConfig::new(group(14, 47_114));
    let receiver = MulticastSocket::receiver(&config)
        .unwrap()
        .into_tokio()
        .unwrap();
    let sender = MulticastSocket::sender(&config).unwrap();
    let datagrams: Vec<Bytes> = (0..10u8).map(|i| Bytes::from(vec![i; 100])).collect();
    assert_eq!(sender.send_batch(&datagrams).unwrap(), 10);
    let mut buf = [0u8; 4096];
    for datagram in &datagrams {
        let (len, _) = tokio::time::timeout(Duration::from_secs(2), receiver.recv_from(&mut buf))
            .await
            .expect("datagram within 2 s")
            .unwrap();
        assert_eq!(&buf[..len], &datagram[..]);
    }
}

/// IPv6 groups join with the interface as scope. (Linux does not loop IPv6 multicast back on
/// `lo`, so a v6 data round trip needs a veth pair in a namespace.)
#[test]
fn ipv6_receiver_joins_on_loopback() {
    let config = MulticastConfig::new("[ff12::4756:1]:47108".parse().unwrap());
    let receiver = MulticastSocket::receiver(&config).unwrap();
    assert_eq!(receiver.interface().addr, IpAddr::from(Ipv6Addr::LOCALHOST));
    assert!(receiver.interface().index > 0);
}

#[test]
fn unicast_batches_keep_order_and_tell_the_sender() {
    let receiver = unicast_socket(SocketAddr::from(([127, 0, 0, 1], 0)), 1 << 20).unwrap();
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = receiver.local_addr().unwrap();
    let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
    let outgoing: Vec<(&[u8], SocketAddr)> = payloads.iter().map(|p| (&p[..], to)).collect();
    assert_eq!(send_batch_to(&sender, &outgoing).unwrap(), 40);
    let mut batch = RecvBatch::new(64, 2048);
    let mut received = Vec::new();
    for _ in 0..50 {
        let n = recv_batch_on(&receiver, &mut batch, Duration::from_millis(100)).unwrap();
        for (index, bytes) in batch.datagrams().take(n).enumerate() {
            assert_eq!(batch.source(index), Some(sender.local_addr().unwrap()));
            received.push(bytes.to_vec());
        }
        if received.len() == 40 {
            break;
        }
    }
    assert_eq!(received, payloads);
}

#[test]
fn unicast_runs_to_several_peers_are_segmented_and_coalesced_and_each_peer_gets_its_own_in_order() {
    let near = unicast_socket(SocketAddr::from(([127, 0, 0, 1], 0)), 4 << 20).unwrap();
    let far = unicast_socket(SocketAddr::from(([127, 0, 0, 1], 0)), 4 << 20).unwrap();
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    let datagrams = mixed_datagrams();
    // Every datagram to both peers, interleaved as a repeater relays them.
    let outgoing: Vec<(&[u8], SocketAddr)> = datagrams
        .iter()
        .flat_map(|d| {
            [
                (&d[..], near.local_addr().unwrap()),
                (&d[..], far.local_addr().unwrap()),
            ]
        })
        .collect();
    assert_eq!(send_batch_to(&sender, &outgoing).unwrap(), outgoing.len());
    let want: Vec<Vec<u8>> = datagrams.iter().map(|d| d.to_vec()).collect();
    for socket in [&near, &far] {
        // Room for one small receive: the batch grows for the coalesced runs.
        let mut batch = RecvBatch::new(1, 100);
        let mut received = Vec::new();
        let mut most_in_one_receive = 0;
        for _ in 0..500 {
            let n = recv_batch_on(socket, &mut batch, Duration::from_millis(100)).unwrap();
            most_in_one_receive = most_in_one_receive.max(n);
            for (index, bytes) in batch.datagrams().enumerate() {
                assert_eq!(batch.source(index), Some(sender.local_addr().unwrap()));
                received.push(bytes.to_vec());
            }
            if received.len() >= want.len() || n == 0 {
                break;
            }
        }
        assert_eq!(received, want);
        assert!(
            most_in_one_receive > 1,
            "runs were sent segmented and received coalesced"
        );
    }
}

/// Datagrams of mixed sizes: runs of equal ones (segmented), short tails, singles, an empty one.
fn mixed_datagrams() -> Vec<Bytes> {
    let mut datagrams = Vec::new();
    for (count, len) in [
        (20, 1200),
        (1, 700),
        (70, 300),
        (1, 0),
        (3, 1400),
        (2, 90),
        (5, 64),
    ] {
        for _ in 0..count {
            let tag = (datagrams.len() % 251) as u8;
            datagrams.push(Bytes::from(vec![tag; len]));
        }
    }
    // A shorter datagram inside a run of equal ones ends that run.
    datagrams.insert(10, Bytes::from(vec![0xee; 1000]));
    datagrams
}

fn receive_all(receiver: &MulticastSocket, want: usize) -> Vec<Vec<u8>> {
    let mut batch = RecvBatch::new(64, 2048);
    let mut received = Vec::new();
    for _ in 0..50 {
        let n = receiver
            .recv_batch(&mut batch, Duration::from_millis(100))
            .unwrap();
        received.extend(batch.datagrams().take(n).map(<[u8]>::to_vec));
        if received.len() >= want {
            break;
        }
    }
    received
}

#[test]
fn segmented_sends_arrive_as_the_same_datagrams() {
    for (last, offload, coalescing) in [
        (8u8, true, true),
        (9, false, true),
        (11, true, false),
        (12, false, false),
    ] {
        let mut config = MulticastConfig::new(group(last, 47_100 + u16::from(last)));
        config.segmentation_offload = offload;
        config.receive_offload = coalescing;
        let receiver = MulticastSocket::receiver(&config).unwrap();
        let sender = MulticastSocket::sender(&config).unwrap();
        let datagrams = mixed_datagrams();
        assert_eq!(sender.send_batch(&datagrams).unwrap(), datagrams.len());
        let want: Vec<Vec<u8>> = datagrams.iter().map(|d| d.to_vec()).collect();
        assert_eq!(
            receive_all(&receiver, want.len()),
            want,
            "segmentation {offload}, coalescing {coalescing}"
        );
        // Loopback on Linux 4.18 and later segments, and 5.0 and later coalesces; this
        // machine's kernel does both.
        assert_eq!(sender.segmentation_offload(), offload);
        assert_eq!(receiver.receive_offload(), coalescing);
    }
}

#[test]
fn a_coalesced_run_is_handed_over_whole_and_cut_into_its_datagrams() {
    let config = MulticastConfig::new(group(13, 47_113));
    let receiver = MulticastSocket::receiver(&config).unwrap();
    let sender = MulticastSocket::sender(&config).unwrap();
    // One run of 40 equal datagrams and a shorter tail: one segmented send.
    let mut datagrams: Vec<Bytes> = (0..40u8).map(|i| Bytes::from(vec![i; 1000])).collect();
    datagrams.push(Bytes::from(vec![0xff; 10]));
    assert_eq!(sender.send_batch(&datagrams).unwrap(), datagrams.len());
    // Room for one receive of 100 bytes: a coalescing batch grows its buffer, and the whole
    // run comes in that one receive.
    let mut batch = RecvBatch::new(1, 100);
    let n = receiver
        .recv_batch(&mut batch, Duration::from_secs(2))
        .unwrap();
    assert_eq!(n, datagrams.len(), "the run arrived coalesced");
    let received: Vec<&[u8]> = batch.datagrams().collect();
    let want: Vec<&[u8]> = datagrams.iter().map(|d| &d[..]).collect();
    assert_eq!(received, want);
    assert_eq!(batch.meta().len(), n);
    assert!(batch.meta().iter().all(|meta| !meta.truncated));
    let sender_address = batch.source(0).unwrap();
    assert!((0..n).all(|i| batch.source(i) == Some(sender_address)));
    assert_eq!(batch.source(n), None);
}

#[test]
fn a_socket_whose_kernel_refuses_segmentation_sends_one_by_one_and_loses_nothing() {
    let config = MulticastConfig::new(group(10, 47_110));
    let receiver = MulticastSocket::receiver(&config).unwrap();
    let sender = MulticastSocket::sender(&config).unwrap();
    // Without UDP checksums the kernel refuses UDP_SEGMENT (EINVAL).
    batch::disable_udp_checksums(&sender.socket).unwrap();
    // A single datagram goes out first, then the first run is refused part-way through the
    // batch: what follows must still go.
    let mut datagrams = vec![Bytes::from(vec![0xaa; 500])];
    datagrams.extend((0..10u8).map(|i| Bytes::from(vec![i; 1000])));
    datagrams.extend(mixed_datagrams());
    assert_eq!(sender.send_batch(&datagrams).unwrap(), datagrams.len());
    assert!(
        !sender.segmentation_offload(),
        "turned off after the refusal"
    );
    let want: Vec<Vec<u8>> = datagrams.iter().map(|d| d.to_vec()).collect();
    assert_eq!(receive_all(&receiver, want.len()), want);
    // And later batches go one by one from the start.
    assert_eq!(sender.send_batch(&datagrams).unwrap(), datagrams.len());
    assert_eq!(receive_all(&receiver, want.len()), want);
}

#[test]
fn an_ignored_source_is_dropped_in_the_kernel_and_no_other() {
    let config = MulticastConfig::new(group(15, 47_115));
    let receiver = MulticastSocket::receiver(&config).unwrap();
    let ignored = MulticastSocket::sender(&config).unwrap();
    let other = MulticastSocket::sender(&config).unwrap();
    let ignored_at = ignored.as_std().local_addr().unwrap();
    receiver.ignore_source(ignored_at).unwrap();
    // The same port on another loopback address is another sender.
    let same_port = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 3], ignored_at.port()))).unwrap();
    socket2::SockRef::from(&same_port)
        .set_multicast_if_v4(&Ipv4Addr::LOCALHOST)
        .unwrap();
    // A segmented run from the ignored sender goes as one coalesced buffer: dropped whole.
    let run: Vec<Bytes> = (0..8).map(|_| Bytes::from(vec![7u8; 200])).collect();
    assert_eq!(ignored.send_batch(&run).unwrap(), run.len());
    ignored.send(b"ignored").unwrap();
    other.send(b"other").unwrap();
    same_port.send_to(b"same port", config.group).unwrap();
    let mut received = receive_all(&receiver, 2);
    received.sort();
    assert_eq!(received, [b"other".to_vec(), b"same port".to_vec()]);
    let mut batch = RecvBatch::new(4, 2048);
    assert_eq!(
        receiver
            .recv_batch(&mut batch, Duration::from_millis(200))
            .unwrap(),
        0,
        "nothing from the ignored sender"
    );
    // Each sender is still heard by a member without the filter.
    let plain = MulticastSocket::receiver(&config).unwrap();
    ignored.send(b"heard").unwrap();
    assert_eq!(receive_all(&plain, 1), [b"heard".to_vec()]);
}

#[test]
fn an_unspecified_source_is_refused_and_ipv6_sources_compare_every_word() {
    for unspecified in ["0.0.0.0:7000", "127.0.0.1:0", "[::]:7000"] {
        let error = MulticastSocket::receiver(&MulticastConfig::new(group(16, 47_116)))
            .unwrap()
            .ignore_source(unspecified.parse().unwrap())
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{unspecified}");
    }
    let program = batch::drop_source_filter("[fd00::1:2]:7000".parse().unwrap()).unwrap();
    // A port test and four address words, each a load and a comparison, then drop and keep.
    assert_eq!(program.len(), 12);
    let compared: Vec<u32> = program
        .iter()
        .skip(1)
        .step_by(2)
        .take(5)
        .map(|i| i.k)
        .collect();
    assert_eq!(compared, [7000, 0xfd00_0000, 0, 0, 0x0001_0002]);
    for (index, instruction) in program.iter().enumerate().skip(1).step_by(2).take(5) {
        assert_eq!(
            index + 1 + usize::from(instruction.jf),
            11,
            "a mismatch keeps"
        );
    }
    assert_eq!((program[10].k, program[11].k), (0, u32::MAX));
}

proptest::proptest! {
    /// Runs keep every datagram, in order; within a run all have its size but the last, which
    /// may be shorter; runs stay within the kernel's limits.
    #[test]
    fn segment_runs_cover_every_datagram_within_the_limits(
        lengths in proptest::collection::vec(proptest::prop_oneof![proptest::strategy::Just(0usize), proptest::strategy::Just(64), proptest::strategy::Just(1400), 1usize..2000, 30_000usize..65_000], 0..200)
    ) {
        let runs = batch::segment_runs(lengths.iter().copied());
        let mut next = 0;
        for &(first, count, size) in &runs {
            proptest::prop_assert_eq!(first, next);
            proptest::prop_assert!((1..=64).contains(&count));
            let run = &lengths[first..first + count];
            proptest::prop_assert_eq!(run[0], size);
            for (i, &len) in run.iter().enumerate() {
                if i + 1 < count {
                    proptest::prop_assert_eq!(len, size);
                } else {
                    proptest::prop_assert!(len <= size);
                }
            }
            if count > 1 {
                proptest::prop_assert!(size > 0 && count * size <= 65_000);
            }
            next = first + count;
        }
        proptest::prop_assert_eq!(next, lengths.len());
    }
}
