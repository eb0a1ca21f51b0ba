//! gvd, the GrapeVine daemon. This version does the VDRIVER inventory: it finds driver
//! libraries in `VDRIVER_PATH`, checks each one in a child process, lists the virtual devices
//! (VDEVs) they expose and computes `unique`, the digest peers compare to know when a node's
//! VDEVs changed. Discovery (ELP), the node list, KOS agents and GrapeVineFS build on this.
//!
//! # Layout
//!
//! - [`vdriver`]: the C ABI of docs/VDRIVER.md, loading a library and calling it (used inside
//!   the probe and agent processes, never by the daemon itself).
//! - [`inventory`]: scanning directories, probing each driver in a child process, `unique`.

pub mod inventory;
pub mod vdriver;
