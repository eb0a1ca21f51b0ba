//! The guide's sensor-fleet example, run short: a custom state written with `LeafChanges`,
//! a blocking and an async subscriber under injected loss, caught up without polling.

#[allow(dead_code)]
#[path = "../examples/sensor_fleet.rs"]
mod sensor_fleet;

use sensor_fleet::{run, Args};

#[test]
fn the_sensor_fleet_example_replicates_exactly_under_loss() {
    let report = run(&Args {
        deltas: 20_000,
        sensors: 500,
        loss: 0.05,
        group: "239.255.77.2:7702".parse().unwrap(),
        timeout_seconds: 30,
    })
    .unwrap();
    assert_eq!(report.replicas, [report.published; 2]);
    for stats in [report.blocking, report.asynchronous] {
        // The loss was real, and was repaired from snapshots rather than ignored.
        assert!(stats.protocol.gaps > 0, "{stats:?}");
        assert_eq!(stats.protocol.joins, 1, "{stats:?}");
    }
}
