//! GrapeVineFS: replication zones. A zone is a directory tree that lives on several member
//! nodes, each serving it over NFSv3 ([`nfs`]) and pulling what the others changed
//! ([`repl`]). Each member keeps an index of the zone ([`store`]): stable file ids, per-file
//! version vectors ([`version`]) that tell a later change from a concurrent one, and tombstones
//! so that deletions replicate. Nodes that do not hold a zone serve it by forwarding to a
//! member ([`remote`]); [`service`] runs it all for gvd.

mod attr_cache;
mod journal;
pub mod nfs;
pub mod remote;
pub mod repl;
pub mod service;
pub mod store;
pub mod version;
pub mod zpath;
