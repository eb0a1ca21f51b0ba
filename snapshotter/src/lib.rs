//! grapevine-snapshotter
