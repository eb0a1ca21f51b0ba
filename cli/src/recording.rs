//! The recording file format: every datagram of some groups with its receive time, framed so
//! that a truncated or damaged file reads up to the damage and says where it stopped.
//!
//! A file starts with the 8 bytes `GVREC\0\x01\n` (the last two: format version 1, newline).
//! Then records, each:
//!
//! | bytes | field                                                          |
//! |-------|----------------------------------------------------------------|
//! | 4     | sync word `GVR1`                                               |
//! | 4     | payload length *n*, big-endian (at most 16 MiB)                |
//! | 8     | receive time, nanoseconds since the Unix epoch, big-endian     |
//! | 16    | group address (IPv4 as IPv4-mapped IPv6)                       |
//! | 2     | group port, big-endian                                         |
//! | 1     | 4 or 6: the group's address family                             |
//! | 1     | reserved, 0                                                    |
//! | *n*   | the datagram                                                   |
//! | 4     | CRC-32 (IEEE) of everything from the length to the datagram    |

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime};

/// First bytes of a recording.
pub const FILE_MAGIC: &[u8; 8] = b"GVREC\x00\x01\n";
const SYNC: &[u8; 4] = b"GVR1";
const HEADER_LEN: usize = 4 + 4 + 8 + 16 + 2 + 1 + 1;
/// Largest datagram a record may hold.
pub const MAX_RECORD: usize = 16 << 20;

/// One recorded datagram.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Record {
    /// When it was received.
    pub time: SystemTime,
    /// The group it was received on.
    pub group: SocketAddr,
    /// The datagram.
    pub payload: Vec<u8>,
}

/// Where and why reading stopped before the end.
#[derive(Debug, thiserror::Error)]
#[error("recording damaged at byte {offset}: {reason}")]
pub struct RecordError {
    /// Byte offset of the record that could not be read.
    pub offset: u64,
    /// What was wrong.
    pub reason: String,
}

/// Writes a recording.
#[derive(Debug)]
pub struct RecordWriter<W: Write> {
    out: W,
    written: u64,
    /// The record being framed, reused (no allocation per datagram).
    frame: Vec<u8>,
}

impl<W: Write> RecordWriter<W> {
    /// Starts a recording on `out` (writes the file header).
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub fn new(mut out: W) -> std::io::Result<Self> {
        out.write_all(FILE_MAGIC)?;
        Ok(Self {
            out,
            written: FILE_MAGIC.len() as u64,
            frame: Vec::new(),
        })
    }

    /// Appends one record; returns the bytes written.
    ///
    /// # Errors
    ///
    /// I/O errors, or a datagram over [`MAX_RECORD`].
    pub fn write(&mut self, record: &Record) -> std::io::Result<usize> {
        if record.payload.len() > MAX_RECORD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "datagram too large to record",
            ));
        }
        let frame = &mut self.frame;
        frame.clear();
        frame.extend_from_slice(SYNC);
        frame.extend_from_slice(&(record.payload.len() as u32).to_be_bytes());
        let nanos = record
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        frame.extend_from_slice(&nanos.to_be_bytes());
        let (ip, family) = match record.group.ip() {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped(), 4u8),
            IpAddr::V6(v6) => (v6, 6u8),
        };
        frame.extend_from_slice(&ip.octets());
        frame.extend_from_slice(&record.group.port().to_be_bytes());
        frame.extend_from_slice(&[family, 0]);
        frame.extend_from_slice(&record.payload);
        let crc = crc32fast::hash(&frame[4..]);
        frame.extend_from_slice(&crc.to_be_bytes());
        self.out.write_all(frame)?;
        self.written += frame.len() as u64;
        Ok(frame.len())
    }

    /// Bytes written so far, header included.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Flushes and returns the output.
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads a recording record by record; stops at the first damage with a [`RecordError`].
#[derive(Debug)]
pub struct RecordReader<R: Read> {
    input: R,
    offset: u64,
    done: bool,
}

impl<R: Read> RecordReader<R> {
    /// Checks the file header.
    ///
    /// # Errors
    ///
    /// When the input is not a recording (or of another version).
    pub fn new(mut input: R) -> Result<Self, RecordError> {
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic).map_err(|e| RecordError {
            offset: 0,
            reason: format!("no recording header: {e}"),
        })?;
        if &magic != FILE_MAGIC {
            return Err(RecordError {
                offset: 0,
                reason: "not a GrapeVine recording (or another format version)".into(),
            });
        }
        Ok(Self {
            input,
            offset: FILE_MAGIC.len() as u64,
            done: false,
        })
    }

    /// Bytes read so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn read_record(&mut self) -> Result<Option<Record>, String> {
        let mut header = [0u8; HEADER_LEN];
        let mut filled = 0;
        while filled < HEADER_LEN {
            match self.input.read(&mut header[filled..]) {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => {
                    return Err(format!(
                        "truncated record header ({filled} of {HEADER_LEN} bytes)"
                    ))
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        if &header[..4] != SYNC {
            return Err("lost sync (not a record boundary)".into());
        }
        let field = |range: std::ops::Range<usize>| header[range].to_vec();
        let len = u32::from_be_bytes(field(4..8).try_into().unwrap_or_default()) as usize;
        if len > MAX_RECORD {
            return Err(format!("record length {len} over {MAX_RECORD}"));
        }
        let mut rest = vec![0u8; len + 4];
        self.input
            .read_exact(&mut rest)
            .map_err(|_| format!("truncated record ({len} byte datagram announced)"))?;
        let (payload, crc) = rest.split_at(len);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header[4..]);
        hasher.update(payload);
        if hasher.finalize().to_be_bytes() != crc {
            return Err("checksum mismatch".into());
        }
        let nanos = u64::from_be_bytes(field(8..16).try_into().unwrap_or_default());
        let octets: [u8; 16] = field(16..32).try_into().unwrap_or_default();
        let port = u16::from_be_bytes(field(32..34).try_into().unwrap_or_default());
        let v6 = Ipv6Addr::from(octets);
        let ip = match (header[34], v6.to_ipv4_mapped()) {
            (4, Some(v4)) => IpAddr::V4(v4),
            (6, _) => IpAddr::V6(v6),
            (family, _) => return Err(format!("unknown address family {family}")),
        };
        self.offset += (HEADER_LEN + len + 4) as u64;
        Ok(Some(Record {
            time: SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos),
            group: SocketAddr::new(ip, port),
            payload: payload.to_vec(),
        }))
    }
}

impl<R: Read> Iterator for RecordReader<R> {
    type Item = Result<Record, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.read_record() {
            Ok(Some(record)) => Some(Ok(record)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(reason) => {
                self.done = true;
                Some(Err(RecordError {
                    offset: self.offset,
                    reason,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: u8) -> Record {
        Record {
            time: SystemTime::UNIX_EPOCH
                + Duration::from_nanos(1_700_000_000_000_000_000 + u64::from(i)),
            group: if i.is_multiple_of(2) {
                "239.1.2.3:7000".parse().unwrap_or_else(|_| unreachable!())
            } else {
                "[ff02::1]:7001".parse().unwrap_or_else(|_| unreachable!())
            },
            payload: vec![i; usize::from(i) * 10],
        }
    }

    fn recording(n: u8) -> Vec<u8> {
        let mut writer = RecordWriter::new(Vec::new()).unwrap_or_else(|_| unreachable!());
        for i in 0..n {
            writer.write(&sample(i)).unwrap_or_else(|_| unreachable!());
        }
        writer.finish().unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn records_roundtrip() {
        let bytes = recording(5);
        let read: Vec<Record> = RecordReader::new(bytes.as_slice())
            .unwrap_or_else(|_| unreachable!())
            .map(|r| r.unwrap_or_else(|_| unreachable!()))
            .collect();
        assert_eq!(read, (0..5).map(sample).collect::<Vec<_>>());
    }

    #[test]
    fn damage_stops_reading_where_it_is() {
        let bytes = recording(5);
        // Truncated in the middle of the last record.
        let cut = &bytes[..bytes.len() - 7];
        let results: Vec<_> = RecordReader::new(cut)
            .unwrap_or_else(|_| unreachable!())
            .collect();
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 4);
        let Some(Err(error)) = results.last() else {
            panic!("no error")
        };
        assert!(error.reason.contains("truncated"), "{error}");
        // A flipped byte in the second record's datagram.
        let mut flipped = bytes.clone();
        let second_payload = 8 + (HEADER_LEN + 4) + HEADER_LEN + 3;
        flipped[second_payload] ^= 0xff;
        let results: Vec<_> = RecordReader::new(flipped.as_slice())
            .unwrap_or_else(|_| unreachable!())
            .collect();
        assert_eq!(results.len(), 2);
        let Some(Err(error)) = results.last() else {
            panic!("no error")
        };
        assert!(error.reason.contains("checksum"), "{error}");
        assert_eq!(error.offset, 8 + (HEADER_LEN + 4) as u64);
        assert!(
            RecordReader::new(&b"GVREC\x00\x02\n"[..]).is_err(),
            "another version"
        );
    }
}
