//! What gvd shares with its local clients and with GrapeVineFS, apart from the daemon: the
//! node list file's schema ([`nodes`]), length-prefixed postcard frames ([`frame`]), and the
//! Noise-keyed links of gvd's TCP ports ([`secure`]). `grapevine-kos` and `grapevine-fs` build
//! on it without depending on each other.

pub mod frame;
pub mod nodes;
pub mod secure;
