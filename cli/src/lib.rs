//! The operator tools' library half, apart from the `grapevine` command so the fuzz targets and
//! tests can drive it: [`spy`] keeps per-stream traffic statistics for monitoring, and
//! [`recording`] is the file format of recorded traffic (`grapevine record`/`replay`), and
//! [`payload_schema`] decodes any topic's serde payloads from a type written in a line.

pub mod payload_schema;
pub mod recording;
pub mod spy;
