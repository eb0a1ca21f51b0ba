//! Payload schemas: how `grapevine spy --schema FILE` shows the messages of any topic whose
//! payload is a serde type, without the application's code. Payloads are postcard (the
//! [`codec`](grapevine::core::codec) of every GrapeVine topic); postcard is not
//! self-describing, so the topic's owner writes the type once, in a small type language:
//!
//! ```text
//! mapdelta<u64, {price: f64, qty: u32, venue: string}>
//! ```
//!
//! | Type | Postcard encoding |
//! |---|---|
//! | `bool`, `u8`, `i8` | one byte |
//! | `u16` … `u128`, `i16` … `i128`, `usize`, `isize` | varint (signed: zigzag) |
//! | `f32`, `f64` | little-endian |
//! | `char`, `string` | length-prefixed UTF-8 |
//! | `bytes` | length-prefixed bytes |
//! | `unit` | nothing |
//! | `option<T>` | 0, or 1 then `T` |
//! | `seq<T>` (also `[T]`) | length then items |
//! | `map<K, V>` | length then pairs |
//! | `(T, U, …)` | the fields in order (tuples, tuple structs) |
//! | `{a: T, b: U}` | the fields in order (structs) |
//! | `enum {A, B(T), C(T, U), D {x: T}}` | variant index (varint) then its fields |
//! | `mapdelta<K, V>` | `enum {Put(K, V), Remove(K)}`, the delta of `KeyedMap` |
//!
//! ```
//! use grapevine_cli::payload_schema::Schema;
//! let schema: Schema = "mapdelta<u32, {price: f64, qty: u32}>".parse()?;
//! let mut payload = Vec::new();
//! grapevine::core::codec::encode_into(
//!     &grapevine::core::state::MapDelta::Put(7u32, (101.5f64, 3u32)), &mut payload)?;
//! assert_eq!(
//!     schema.decode(&payload)?,
//!     serde_json::json!({"Put": [7, {"price": 101.5, "qty": 3}]})
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::str::FromStr;

use serde_json::{json, Map, Value};

/// A payload type, parsed from the type language above.
#[derive(Clone, Debug, PartialEq)]
pub enum Schema {
    /// `bool`.
    Bool,
    /// An unsigned integer of this many bits (8: one byte, otherwise a varint).
    Unsigned(u8),
    /// A signed integer of this many bits (8: one byte, otherwise a zigzag varint).
    Signed(u8),
    /// `f32`.
    F32,
    /// `f64`.
    F64,
    /// `string` or `char`.
    String,
    /// `bytes`.
    Bytes,
    /// `unit`.
    Unit,
    /// `option<T>`.
    Option(Box<Schema>),
    /// `seq<T>`.
    Seq(Box<Schema>),
    /// `map<K, V>`.
    Map(Box<Schema>, Box<Schema>),
    /// `(T, U, …)`.
    Tuple(Vec<Schema>),
    /// `{a: T, …}`.
    Struct(Vec<(String, Schema)>),
    /// `enum {…}`: variants in declaration order.
    Enum(Vec<(String, Variant)>),
}

/// The fields of an enum variant.
#[derive(Clone, Debug, PartialEq)]
pub enum Variant {
    /// `A`.
    Unit,
    /// `A(T, …)`.
    Tuple(Vec<Schema>),
    /// `A {x: T, …}`.
    Struct(Vec<(String, Schema)>),
}

/// A schema that does not parse, with where.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("schema {text:?}, at byte {at}: {what}")]
pub struct SchemaError {
    text: String,
    at: usize,
    what: String,
}

/// A payload that does not match its schema.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PayloadError {
    /// The payload ended inside a value.
    #[error("payload ends inside a value (offset {0})")]
    Truncated(usize),
    /// Bytes left after the value.
    #[error("{0} bytes left after the value")]
    TrailingBytes(usize),
    /// A value the type cannot hold (a bad varint, bool, UTF-8 or variant index).
    #[error("offset {offset}: {what}")]
    Invalid {
        /// Where.
        offset: usize,
        /// What was wrong.
        what: String,
    },
}

/// Most nesting a schema may have: the decoder recurses once per level.
const MAX_DEPTH: usize = 32;

impl FromStr for Schema {
    type Err = SchemaError;

    fn from_str(text: &str) -> Result<Self, SchemaError> {
        let mut parser = Parser { text, at: 0 };
        let schema = parser.schema(0)?;
        parser.skip_space();
        if parser.at != text.len() {
            return Err(parser.error("unexpected text after the type"));
        }
        Ok(schema)
    }
}

struct Parser<'a> {
    text: &'a str,
    at: usize,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> SchemaError {
        SchemaError {
            text: self.text.to_string(),
            at: self.at,
            what: what.to_string(),
        }
    }

    fn skip_space(&mut self) {
        let rest = &self.text[self.at..];
        self.at += rest.len() - rest.trim_start().len();
    }

    fn eat(&mut self, token: char) -> bool {
        self.skip_space();
        if self.text[self.at..].starts_with(token) {
            self.at += token.len_utf8();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, token: char) -> Result<(), SchemaError> {
        if self.eat(token) {
            Ok(())
        } else {
            Err(self.error(&format!("expected '{token}'")))
        }
    }

    fn word(&mut self) -> Result<String, SchemaError> {
        self.skip_space();
        let rest = &self.text[self.at..];
        let len = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if len == 0 {
            return Err(self.error("expected a name"));
        }
        self.at += len;
        Ok(rest[..len].to_string())
    }

    /// `item, item, …` up to `close` (a trailing comma allowed).
    fn list<T>(
        &mut self,
        close: char,
        mut item: impl FnMut(&mut Self) -> Result<T, SchemaError>,
    ) -> Result<Vec<T>, SchemaError> {
        let mut items = Vec::new();
        while !self.eat(close) {
            items.push(item(self)?);
            if !self.eat(',') {
                self.expect(close)?;
                break;
            }
        }
        Ok(items)
    }

    fn fields(&mut self, depth: usize) -> Result<Vec<(String, Schema)>, SchemaError> {
        self.list('}', |p| {
            let name = p.word()?;
            p.expect(':')?;
            Ok((name, p.schema(depth + 1)?))
        })
    }

    fn schema(&mut self, depth: usize) -> Result<Schema, SchemaError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        if self.eat('(') {
            return Ok(Schema::Tuple(self.list(')', |p| p.schema(depth + 1))?));
        }
        if self.eat('{') {
            return Ok(Schema::Struct(self.fields(depth)?));
        }
        if self.eat('[') {
            let item = self.schema(depth + 1)?;
            self.expect(']')?;
            return Ok(Schema::Seq(Box::new(item)));
        }
        let start = self.at;
        let name = self.word()?;
        let bits = |n: &str| n[1..].parse::<u8>().ok();
        let schema = match name.as_str() {
            "bool" => Schema::Bool,
            "usize" => Schema::Unsigned(64),
            "isize" => Schema::Signed(64),
            "u8" | "u16" | "u32" | "u64" | "u128" => Schema::Unsigned(bits(&name).unwrap_or(64)),
            "i8" | "i16" | "i32" | "i64" | "i128" => Schema::Signed(bits(&name).unwrap_or(64)),
            "f32" => Schema::F32,
            "f64" => Schema::F64,
            "string" | "char" => Schema::String,
            "bytes" => Schema::Bytes,
            "unit" => Schema::Unit,
            "option" | "seq" => {
                self.expect('<')?;
                let inner = Box::new(self.schema(depth + 1)?);
                self.expect('>')?;
                if name == "option" {
                    Schema::Option(inner)
                } else {
                    Schema::Seq(inner)
                }
            }
            "map" | "mapdelta" => {
                self.expect('<')?;
                let key = self.schema(depth + 1)?;
                self.expect(',')?;
                let value = self.schema(depth + 1)?;
                self.expect('>')?;
                if name == "map" {
                    Schema::Map(Box::new(key), Box::new(value))
                } else {
                    Schema::Enum(vec![
                        ("Put".into(), Variant::Tuple(vec![key.clone(), value])),
                        ("Remove".into(), Variant::Tuple(vec![key])),
                    ])
                }
            }
            "enum" => {
                self.expect('{')?;
                Schema::Enum(self.list('}', |p| {
                    let variant = p.word()?;
                    let fields = if p.eat('(') {
                        Variant::Tuple(p.list(')', |p| p.schema(depth + 1))?)
                    } else if p.eat('{') {
                        Variant::Struct(p.fields(depth)?)
                    } else {
                        Variant::Unit
                    };
                    Ok((variant, fields))
                })?)
            }
            _ => {
                self.at = start;
                return Err(self.error(&format!("unknown type {name:?}")));
            }
        };
        Ok(schema)
    }
}

impl Schema {
    /// The payload as JSON, shaped as `serde_json` would show the Rust value (structs as
    /// objects, enums as `{"Variant": fields}`, unit variants as `"Variant"`).
    ///
    /// # Errors
    ///
    /// The payload does not hold exactly one value of this type.
    pub fn decode(&self, payload: &[u8]) -> Result<Value, PayloadError> {
        let mut reader = Reader {
            bytes: payload,
            at: 0,
        };
        let value = reader.value(self)?;
        match payload.len() - reader.at {
            0 => Ok(value),
            left => Err(PayloadError::TrailingBytes(left)),
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn invalid(&self, what: impl Into<String>) -> PayloadError {
        PayloadError::Invalid {
            offset: self.at,
            what: what.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], PayloadError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(PayloadError::Truncated(self.at))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn varint(&mut self, bits: u8) -> Result<u128, PayloadError> {
        let max_bytes = usize::from(bits).div_ceil(7);
        let mut value: u128 = 0;
        for i in 0..max_bytes {
            let byte = self.take(1)?[0];
            value |= u128::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                if bits < 128 && value >> bits != 0 {
                    return Err(self.invalid(format!("varint over {bits} bits")));
                }
                return Ok(value);
            }
        }
        Err(self.invalid(format!("varint longer than {max_bytes} bytes")))
    }

    fn length(&mut self) -> Result<usize, PayloadError> {
        let length = usize::try_from(self.varint(64)?).map_err(|_| self.invalid("length"))?;
        // Every item takes at least one byte, except units: refuse lengths the payload
        // cannot hold before looping over them.
        if length > self.bytes.len() - self.at && length > 0 {
            return Err(PayloadError::Truncated(self.at));
        }
        Ok(length)
    }

    fn fields(&mut self, fields: &[(String, Schema)]) -> Result<Value, PayloadError> {
        let mut object = Map::new();
        for (name, schema) in fields {
            object.insert(name.clone(), self.value(schema)?);
        }
        Ok(Value::Object(object))
    }

    fn tuple(&mut self, items: &[Schema]) -> Result<Value, PayloadError> {
        items
            .iter()
            .map(|s| self.value(s))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array)
    }

    fn value(&mut self, schema: &Schema) -> Result<Value, PayloadError> {
        Ok(match schema {
            Schema::Bool => match self.take(1)?[0] {
                0 => json!(false),
                1 => json!(true),
                other => return Err(self.invalid(format!("bool {other}"))),
            },
            Schema::Unsigned(8) => json!(self.take(1)?[0]),
            Schema::Signed(8) => json!(self.take(1)?[0] as i8),
            Schema::Unsigned(bits) => {
                let value = self.varint(*bits)?;
                u64::try_from(value).map_or_else(|_| json!(value.to_string()), |v| json!(v))
            }
            Schema::Signed(bits) => {
                let raw = self.varint(*bits)?;
                let value = (raw >> 1) as i128 ^ -((raw & 1) as i128);
                i64::try_from(value).map_or_else(|_| json!(value.to_string()), |v| json!(v))
            }
            Schema::F32 => {
                let bytes: [u8; 4] = self.take(4)?.try_into().unwrap_or_default();
                json!(f32::from_le_bytes(bytes))
            }
            Schema::F64 => {
                let bytes: [u8; 8] = self.take(8)?.try_into().unwrap_or_default();
                json!(f64::from_le_bytes(bytes))
            }
            Schema::String => {
                let length = self.length()?;
                let at = self.at;
                let bytes = self.take(length)?;
                match std::str::from_utf8(bytes) {
                    Ok(text) => json!(text),
                    Err(_) => {
                        return Err(PayloadError::Invalid {
                            offset: at,
                            what: "text is not UTF-8".into(),
                        })
                    }
                }
            }
            Schema::Bytes => {
                let length = self.length()?;
                json!(self.take(length)?)
            }
            Schema::Unit => Value::Null,
            Schema::Option(inner) => match self.take(1)?[0] {
                0 => Value::Null,
                1 => self.value(inner)?,
                other => return Err(self.invalid(format!("option tag {other}"))),
            },
            Schema::Seq(item) => {
                let length = self.length()?;
                let mut items = Vec::new();
                for _ in 0..length {
                    items.push(self.value(item)?);
                }
                Value::Array(items)
            }
            Schema::Map(key, value) => {
                let length = self.length()?;
                // JSON keys are text: text keys stay as they are, others are written as JSON.
                let mut entries = BTreeMap::new();
                for _ in 0..length {
                    let k = match self.value(key)? {
                        Value::String(text) => text,
                        other => other.to_string(),
                    };
                    entries.insert(k, self.value(value)?);
                }
                json!(entries)
            }
            Schema::Tuple(items) => self.tuple(items)?,
            Schema::Struct(fields) => self.fields(fields)?,
            Schema::Enum(variants) => {
                let index = self.varint(32)?;
                let (name, fields) = usize::try_from(index)
                    .ok()
                    .and_then(|i| variants.get(i))
                    .ok_or_else(|| {
                        self.invalid(format!("variant {index} of {}", variants.len()))
                    })?;
                match fields {
                    Variant::Unit => json!(name),
                    Variant::Tuple(items) if items.len() == 1 => {
                        json!({ name.clone(): self.value(&items[0])? })
                    }
                    Variant::Tuple(items) => json!({ name.clone(): self.tuple(items)? }),
                    Variant::Struct(fields) => json!({ name.clone(): self.fields(fields)? }),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    fn encode<T: Serialize>(value: &T) -> Vec<u8> {
        let mut out = Vec::new();
        grapevine::core::codec::encode_into(value, &mut out).unwrap();
        out
    }

    #[derive(Serialize)]
    struct Quote {
        price: f64,
        qty: u32,
        venue: String,
        note: Option<String>,
        levels: Vec<(i64, u8)>,
        side: Side,
    }

    #[derive(Serialize)]
    enum Side {
        #[allow(dead_code)]
        Bid,
        Ask {
            tick: i16,
        },
    }

    #[test]
    fn a_schema_decodes_what_serde_encoded_as_serde_json_shows_it() {
        let value = grapevine::core::state::MapDelta::Put(
            -42i64,
            Quote {
                price: 101.25,
                qty: 70_000,
                venue: "XPAR é".into(),
                note: None,
                levels: vec![(-1, 255), (i64::MIN, 0)],
                side: Side::Ask { tick: -300 },
            },
        );
        let schema: Schema =
            "mapdelta<i64, {price: f64, qty: u32, venue: string, note: option<string>, \
             levels: [(i64, u8)], side: enum {Bid, Ask {tick: i16}}}>"
                .parse()
                .unwrap();
        assert_eq!(
            schema.decode(&encode(&value)).unwrap(),
            serde_json::to_value(&value).unwrap()
        );
        let removal = grapevine::core::state::MapDelta::<i64, Quote>::Remove(9);
        assert_eq!(
            schema.decode(&encode(&removal)).unwrap(),
            json!({"Remove": 9})
        );
    }

    #[test]
    fn maps_bytes_bools_and_wide_integers() {
        let mut map = BTreeMap::new();
        map.insert("b".to_string(), (true, u128::MAX));
        map.insert("a".to_string(), (false, 1));
        let schema: Schema = "map<string, (bool, u128)>".parse().unwrap();
        assert_eq!(
            schema.decode(&encode(&map)).unwrap(),
            json!({"a": [false, 1], "b": [true, u128::MAX.to_string()]})
        );
        let schema: Schema = "(bytes, unit, f32)".parse().unwrap();
        // A `Vec<u8>` is a sequence of u8: postcard writes it exactly as `bytes`.
        let value = (vec![1u8, 2, 3], (), 0.5f32);
        assert_eq!(
            schema.decode(&encode(&value)).unwrap(),
            json!([[1, 2, 3], null, 0.5])
        );
    }

    #[test]
    fn payloads_that_do_not_match_are_errors_not_panics() {
        let schema: Schema = "{a: u16, b: string, c: [u64]}".parse().unwrap();
        let cases: [(&[u8], &str); 6] = [
            (&[], "ends inside"),
            (&[0xff, 0xff, 0xff, 0x01], "varint"),
            (&[1, 2, 0xc3, 0x28], "UTF-8"),
            (&[1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f], "ends inside"),
            (&[1, 0, 0, 7], "left after"),
            (&[1, 0, 200], "ends inside"),
        ];
        for (payload, expected) in cases {
            let error = schema.decode(payload).unwrap_err().to_string();
            assert!(error.contains(expected), "{payload:?}: {error}");
        }
        let variant: Schema = "enum {A, B}".parse().unwrap();
        assert!(variant
            .decode(&[2])
            .unwrap_err()
            .to_string()
            .contains("variant 2 of 2"));
    }

    #[test]
    fn bad_schemas_say_where() {
        for (text, expected) in [
            ("u33", "unknown type"),
            ("{a u8}", "expected ':'"),
            ("option<u8", "expected '>'"),
            ("u8 u8", "after the type"),
            ("", "expected a name"),
        ] {
            let error = text.parse::<Schema>().unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        let deep = format!("{}u8{}", "[".repeat(40), "]".repeat(40));
        assert!(deep
            .parse::<Schema>()
            .unwrap_err()
            .to_string()
            .contains("too deeply"));
    }
}
