//! The operator tools' library half, apart from the `grapevine` command so the fuzz targets and
//! tests can drive it: [`spy`] keeps per-stream traffic statistics for monitoring, and
//! [`recording`] is the file format of recorded traffic (`grapevine record`/`replay`).

pub mod recording;
pub mod spy;
