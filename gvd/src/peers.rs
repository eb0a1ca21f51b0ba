//! The peer table's decisions, without I/O: which QUERYs to send (and when not to), which
//! zones to pull from whom, and who may pull what here. The daemon reads the table from its
//! subscribers, asks these functions, and carries out the actions they return; unit tests
//! drive them with a fake clock.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use grapevine_fs::remote::Member;
use grapevine_fs::repl::Access;
use grapevine_fs::service::ZoneConfig;

use crate::elp::{Liveness, NodeRecord, VdevList, ELP_TOPIC, VDEV_TOPIC};

/// What this node knows of one peer (or of itself), read from both topics.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Its ELP record.
    pub record: NodeRecord,
    /// Alive, suspect or dead, from how long it has been silent.
    pub liveness: Liveness,
    /// Whether the ELP stream carrying its record is live here.
    pub elp_live: bool,
    /// Its VDEV list, once heard.
    pub vdevs: Option<VdevList>,
    /// Whether the VDEV stream carrying it is live here.
    pub vdevs_live: bool,
}

impl Peer {
    /// The first address it announces that parses.
    pub fn first_ip(&self) -> Option<IpAddr> {
        self.record.addresses.iter().find_map(|a| a.parse().ok())
    }
}

/// A QUERY to send: a snapshot cycle of `topic` wanted from `node`.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum QueryAction {
    /// Ask `node` at `target` (its query port).
    Send {
        /// The topic.
        topic: u32,
        /// The peer asked.
        node: u64,
        /// Its query port.
        target: SocketAddr,
    },
    /// This node's own leaf missed (a loss on the loop back): run a local cycle instead.
    LocalCycle {
        /// The topic.
        topic: u32,
    },
}

/// When each peer was last asked for each topic, so that a peer is asked at most once per
/// half announcement period whatever the loss.
#[derive(Debug)]
pub struct QueryPlanner {
    own: u64,
    period: Duration,
    asked: HashMap<(u64, u32), Instant>,
}

impl QueryPlanner {
    /// For node `own` announcing every `period`.
    pub fn new(own: u64, period: Duration) -> Self {
        Self {
            own,
            period,
            asked: HashMap::new(),
        }
    }

    /// The QUERYs due now: for each peer not dead, its ELP topic while the stream carrying
    /// its record is not live, its VDEV topic while the list held is older than its `unique`
    /// (or not live). Peers that left the table are forgotten.
    pub fn due(&mut self, peers: &BTreeMap<u64, Peer>, now: Instant) -> Vec<QueryAction> {
        let mut actions = Vec::new();
        for (node, peer) in peers {
            if peer.liveness == Liveness::Dead {
                continue;
            }
            let vdevs_missing = !peer.vdevs_live
                || peer
                    .vdevs
                    .as_ref()
                    .is_none_or(|v| v.unique != peer.record.unique);
            for (topic, wanted) in [(ELP_TOPIC, !peer.elp_live), (VDEV_TOPIC, vdevs_missing)] {
                if !wanted {
                    continue;
                }
                let last = self.asked.get(&(*node, topic));
                if last.is_some_and(|t| now < *t + self.period / 2) {
                    continue;
                }
                if *node == self.own {
                    self.asked.insert((*node, topic), now);
                    actions.push(QueryAction::LocalCycle { topic });
                    continue;
                }
                let Some(address) = peer.first_ip() else {
                    continue;
                };
                self.asked.insert((*node, topic), now);
                actions.push(QueryAction::Send {
                    topic,
                    node: *node,
                    target: SocketAddr::new(address, peer.record.query_port),
                });
            }
        }
        self.asked.retain(|(node, _), _| peers.contains_key(node));
        actions
    }
}

/// A zone version a live member announces: pull from it when newer than what was pulled.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct ZoneOffer {
    /// The zone.
    pub zone: String,
    /// The member.
    pub node: u64,
    /// Its replication address.
    pub address: SocketAddr,
    /// The version it announces.
    pub version: u64,
}

/// The zone versions live members announce, and each zone's live members (every zone in
/// `forwarded` gets a list, empty when none of its members is alive).
pub fn zone_offers<'a>(
    own: u64,
    peers: &BTreeMap<u64, Peer>,
    forwarded: impl Iterator<Item = &'a str>,
) -> (Vec<ZoneOffer>, BTreeMap<String, Vec<Member>>) {
    let mut members: BTreeMap<String, Vec<Member>> = forwarded
        .map(|name| (name.to_string(), Vec::new()))
        .collect();
    let mut offers = Vec::new();
    for (node, peer) in peers {
        if *node == own || peer.liveness != Liveness::Alive || peer.record.repl_port == 0 {
            continue;
        }
        let Some(ip) = peer.first_ip() else {
            continue;
        };
        let address = SocketAddr::new(ip, peer.record.repl_port);
        for zone in peer.record.zones.iter().filter(|z| z.member) {
            offers.push(ZoneOffer {
                zone: zone.name.clone(),
                node: *node,
                address,
                version: zone.version,
            });
            members.entry(zone.name.clone()).or_default().push(Member {
                node: *node,
                address,
            });
        }
    }
    (offers, members)
}

/// Who may pull which zone here: a node not dead that announces membership *and* that this
/// node's configuration names as a member; any node not dead may forward operations.
pub fn zone_access(own: u64, zones: &[ZoneConfig], peers: &BTreeMap<u64, Peer>) -> Access {
    let mut access = Access::default();
    for (node, peer) in peers {
        if *node == own || peer.liveness == Liveness::Dead {
            continue;
        }
        let addresses: Vec<IpAddr> = peer
            .record
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        access.nodes.extend(addresses.iter().copied());
        for zone in peer.record.zones.iter().filter(|z| z.member) {
            let listed = zones
                .iter()
                .any(|z| z.name == zone.name && z.members.contains(&peer.record.name));
            if listed {
                access
                    .members
                    .entry(zone.name.clone())
                    .or_default()
                    .extend(addresses.iter().copied());
            }
        }
    }
    access
}

#[cfg(test)]
mod tests {
    use super::*;
    use grapevine_kos::nodes::ZoneStatus;

    const OWN: u64 = 1;
    const PERIOD: Duration = Duration::from_millis(1000);

    fn peer(name: &str, ip: &str, liveness: Liveness) -> Peer {
        Peer {
            record: NodeRecord {
                node_id: 0,
                name: name.into(),
                addresses: vec![ip.into()],
                query_port: 7173,
                kos_port: 7174,
                repl_port: 7175,
                zones: Vec::new(),
                unique: "u1".into(),
                elp_delay_ms: 1000,
            },
            liveness,
            elp_live: true,
            vdevs: Some(VdevList {
                unique: "u1".into(),
                vdevs: Vec::new(),
            }),
            vdevs_live: true,
        }
    }

    fn member_of(mut peer: Peer, zone: &str, version: u64) -> Peer {
        peer.record.zones.push(ZoneStatus {
            name: zone.into(),
            member: true,
            quota_bytes: 1000,
            members: Vec::new(),
            version,
            used_bytes: 0,
            free_bytes: 0,
            nfs_port: 0,
            conflicts: 0,
        });
        peer
    }

    #[test]
    fn nothing_is_asked_of_peers_whose_streams_are_current() {
        let mut planner = QueryPlanner::new(OWN, PERIOD);
        let peers = BTreeMap::from([(2, peer("b", "10.0.0.2", Liveness::Alive))]);
        assert!(planner.due(&peers, Instant::now()).is_empty());
    }

    #[test]
    fn a_stale_vdev_list_is_asked_for_once_per_half_period() {
        let mut planner = QueryPlanner::new(OWN, PERIOD);
        let mut b = peer("b", "10.0.0.2", Liveness::Alive);
        b.record.unique = "u2".into(); // it announced a newer list than the one held
        let peers = BTreeMap::from([(2, b)]);
        let start = Instant::now();
        let ask = QueryAction::Send {
            topic: VDEV_TOPIC,
            node: 2,
            target: "10.0.0.2:7173".parse().unwrap(),
        };
        assert_eq!(planner.due(&peers, start), vec![ask]);
        assert!(planner.due(&peers, start + PERIOD / 4).is_empty());
        assert!(planner
            .due(&peers, start + PERIOD / 2 - Duration::from_millis(1))
            .is_empty());
        assert_eq!(planner.due(&peers, start + PERIOD / 2), vec![ask]);
    }

    #[test]
    fn dead_peers_are_not_asked_and_own_losses_cycle_locally() {
        let mut planner = QueryPlanner::new(OWN, PERIOD);
        let mut dead = peer("c", "10.0.0.3", Liveness::Dead);
        dead.elp_live = false;
        let mut own = peer("a", "10.0.0.1", Liveness::Alive);
        own.elp_live = false;
        let peers = BTreeMap::from([(OWN, own), (3, dead)]);
        assert_eq!(
            planner.due(&peers, Instant::now()),
            vec![QueryAction::LocalCycle { topic: ELP_TOPIC }]
        );
    }

    #[test]
    fn a_peer_that_left_is_forgotten_and_asked_at_once_when_back() {
        let mut planner = QueryPlanner::new(OWN, PERIOD);
        let mut b = peer("b", "10.0.0.2", Liveness::Alive);
        b.elp_live = false;
        let start = Instant::now();
        let with_b = BTreeMap::from([(2, b)]);
        assert_eq!(planner.due(&with_b, start).len(), 1);
        assert!(planner.due(&BTreeMap::new(), start).is_empty());
        assert_eq!(
            planner.due(&with_b, start + Duration::from_millis(1)).len(),
            1
        );
    }

    #[test]
    fn zones_are_offered_by_live_members_only() {
        let peers = BTreeMap::from([
            (
                OWN,
                member_of(peer("a", "10.0.0.1", Liveness::Alive), "z", 9),
            ),
            (2, member_of(peer("b", "10.0.0.2", Liveness::Alive), "z", 4)),
            (
                3,
                member_of(peer("c", "10.0.0.3", Liveness::Suspect), "z", 7),
            ),
            (4, peer("d", "10.0.0.4", Liveness::Alive)),
        ]);
        let (offers, members) = zone_offers(OWN, &peers, ["z", "elsewhere"].into_iter());
        let address: SocketAddr = "10.0.0.2:7175".parse().unwrap();
        assert_eq!(
            offers,
            vec![ZoneOffer {
                zone: "z".into(),
                node: 2,
                address,
                version: 4
            }]
        );
        assert_eq!(members["z"].len(), 1);
        assert_eq!(members["z"][0].address, address);
        assert!(
            members["elsewhere"].is_empty(),
            "a forwarded zone with no live member"
        );
    }

    #[test]
    fn only_configured_members_may_pull_and_only_the_living_may_forward() {
        let zones: Vec<ZoneConfig> = toml::from_str::<toml::Table>(
            "z = { name = \"z\", path = \"/tmp/z\", members = [\"b\"], quota_bytes = 1000 }",
        )
        .map(|t| vec![t["z"].clone().try_into().unwrap()])
        .unwrap();
        let peers = BTreeMap::from([
            (2, member_of(peer("b", "10.0.0.2", Liveness::Alive), "z", 1)),
            // Claims membership, but the configuration does not name it.
            (3, member_of(peer("c", "10.0.0.3", Liveness::Alive), "z", 1)),
            (4, member_of(peer("b", "10.0.0.4", Liveness::Dead), "z", 1)),
        ]);
        let access = zone_access(OWN, &zones, &peers);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(access.members["z"], [ip("10.0.0.2")].into_iter().collect());
        assert_eq!(
            access.nodes,
            [ip("10.0.0.2"), ip("10.0.0.3")].into_iter().collect()
        );
    }
}
