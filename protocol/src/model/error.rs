//! Limits, precise errors, and the parse/write entry points of the model.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Size limits on the strings of the model, chosen from config at startup. Byte lengths are UTF-8
/// bytes, not characters, because buffers are sized in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelLimits {
    /// A message's `text`.
    pub text_bytes_max: usize,
    /// A visitor's display name.
    pub name_bytes_max: usize,
    /// A `client_msg_id` (idempotency key).
    pub client_msg_id_bytes_max: usize,
    /// Agent, group, participant, tenant and attachment ids.
    pub id_bytes_max: usize,
    /// `channel` (`web`, `app`, `api`, ...).
    pub channel_bytes_max: usize,
    /// Server-written reasons and error strings.
    pub reason_bytes_max: usize,
    /// A visitor token as the server hands it out.
    pub token_bytes_max: usize,
    /// Entries of one `MessagesPage` a client accepts.
    pub page_entries_max: usize,
}

impl ModelLimits {
    pub const DEFAULT: ModelLimits = ModelLimits {
        text_bytes_max: 64 * 1024,
        name_bytes_max: 128,
        client_msg_id_bytes_max: 64,
        id_bytes_max: 64,
        channel_bytes_max: 32,
        reason_bytes_max: 1024,
        token_bytes_max: 256,
        page_entries_max: 10_000,
    };
}

impl ModelLimits {
    /// Check limits read from config at startup: every limit is positive, and every string the
    /// binary protocol carries with a `u16` length prefix fits it.
    pub fn check(&self) -> Result<(), String> {
        let fields = [
            ("text_bytes_max", self.text_bytes_max, u32::MAX as usize),
            ("name_bytes_max", self.name_bytes_max, usize::MAX),
            (
                "client_msg_id_bytes_max",
                self.client_msg_id_bytes_max,
                u16::MAX as usize,
            ),
            ("id_bytes_max", self.id_bytes_max, u16::MAX as usize),
            ("channel_bytes_max", self.channel_bytes_max, usize::MAX),
            ("reason_bytes_max", self.reason_bytes_max, u16::MAX as usize),
            ("token_bytes_max", self.token_bytes_max, u16::MAX as usize),
            ("page_entries_max", self.page_entries_max, usize::MAX),
        ];
        for (name, value, max) in fields {
            if value == 0 {
                return Err(format!("{name} must be at least 1"));
            }
            if value > max {
                return Err(format!("{name} = {value} exceeds {max}"));
            }
        }
        Ok(())
    }
}

impl Default for ModelLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why a JSON body was refused. The `Display` form is meant for the client, as the `error`
/// string of a 400 answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// Not JSON at all (or trailing garbage).
    #[error("malformed JSON at line {line} column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    /// The body ended inside a value.
    #[error("truncated JSON at line {line} column {column}")]
    Eof { line: usize, column: usize },
    /// Well-formed JSON of the wrong shape: unknown field, wrong type, missing field, a field a
    /// message type does not allow. `path` is the dotted field path (empty at top level).
    #[error("{}{message}{}", path_prefix(path), position_suffix(*line, *column))]
    Shape {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("field `{field}`: {len} bytes exceeds limit {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("field `{field}`: {len} entries exceeds limit {max}")]
    TooMany {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("field `{field}`: must not be empty")]
    Empty { field: &'static str },
    #[error("field `{field}`: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
}

fn path_prefix(path: &str) -> String {
    if path.is_empty() || path == "." {
        String::new()
    } else {
        format!("field `{path}`: ")
    }
}

fn position_suffix(line: usize, column: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(" at line {line} column {column}")
    }
}

/// Checks that serde cannot express: sizes against [`ModelLimits`], emptiness, character sets.
pub trait Validate {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError>;
}

impl<T: Validate> Validate for Option<T> {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        match self {
            Some(v) => v.validate(limits),
            None => Ok(()),
        }
    }
}

/// Parse one JSON value of type `T` from `bytes` and validate it. The whole of `bytes` must be the
/// value (trailing whitespace allowed). On failure the error names the field path and position.
pub fn parse_json<T: DeserializeOwned + Validate>(
    bytes: &[u8],
    limits: &ModelLimits,
) -> Result<T, ModelError> {
    let value: T = match serde_json::from_slice::<Object<T>>(bytes) {
        Ok(v) => v.0,
        Err(e) => return Err(explain::<T>(bytes, e)),
    };
    value.validate(limits)?;
    Ok(value)
}

/// [`parse_json`] for a type that borrows from `bytes` (its strings are `Cow`s, borrowed
/// unless they hold escapes): no allocation for a well-formed value. `Owned` is the same
/// shape with owned fields; an error is explained through it.
pub fn parse_json_borrowed<'a, T, Owned>(
    bytes: &'a [u8],
    limits: &ModelLimits,
) -> Result<T, ModelError>
where
    T: serde::Deserialize<'a> + Validate,
    Owned: DeserializeOwned,
{
    let value: T = match serde_json::from_slice::<Object<T>>(bytes) {
        Ok(v) => v.0,
        Err(e) => return Err(explain::<Owned>(bytes, e)),
    };
    value.validate(limits)?;
    Ok(value)
}

/// Turn a serde_json error into a [`ModelError`]. The field path costs a second parse, so it is
/// computed here, on the error path only.
fn explain<T: DeserializeOwned>(bytes: &[u8], e: serde_json::Error) -> ModelError {
    use serde_json::error::Category;
    let (line, column) = (e.line(), e.column());
    match e.classify() {
        Category::Eof => ModelError::Eof { line, column },
        Category::Syntax | Category::Io => ModelError::Syntax {
            line,
            column,
            message: strip_position(&e),
        },
        Category::Data => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let message = strip_position(&e);
            let path = match serde_path_to_error::deserialize::<_, Object<T>>(&mut de) {
                Err(pe) => {
                    let segments: Vec<String> = pe.path().iter().map(|s| s.to_string()).collect();
                    // An unknown key is reported at its own path; the message already names it,
                    // so the useful path is the object that holds it.
                    let keep = if message.starts_with("unknown field") {
                        segments.len().saturating_sub(1)
                    } else {
                        segments.len()
                    };
                    segments[..keep].join(".")
                }
                Ok(_) => String::new(),
            };
            ModelError::Shape {
                path,
                line,
                column,
                message,
            }
        }
    }
}

/// serde_json's message without its " at line L column C" tail, which [`ModelError`] carries as
/// numbers instead.
fn strip_position(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let tail = format!(" at line {} column {}", e.line(), e.column());
    match full.strip_suffix(&tail) {
        Some(head) => head.to_owned(),
        None => full,
    }
}

/// Serialization into a caller-owned buffer, for the model's outbound types. Implemented only for
/// types whose `Serialize` cannot fail (string keys, no custom errors), so writing is infallible.
pub trait WriteJson: Serialize {
    /// Append the JSON form of `self` to `out`.
    fn write_json(&self, out: &mut Vec<u8>) {
        let res = serde_json::to_writer(&mut *out, self);
        // Writing into a Vec never fails and the model's Serialize impls return no errors.
        assert!(res.is_ok(), "model serialization failed: {res:?}");
    }

    fn to_json_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        self.write_json(&mut out);
        out
    }
}

// ---- shared field checks -------------------------------------------------------------------

pub(crate) fn check_len(field: &'static str, s: &str, max: usize) -> Result<(), ModelError> {
    if s.len() > max {
        return Err(ModelError::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

/// A non-empty, bounded string without control characters: names and ids shown to people.
pub(crate) fn check_name(field: &'static str, s: &str, max: usize) -> Result<(), ModelError> {
    if s.is_empty() {
        return Err(ModelError::Empty { field });
    }
    check_len(field, s, max)?;
    if s.chars().any(char::is_control) {
        return Err(ModelError::Invalid {
            field,
            reason: "must not contain control characters",
        });
    }
    Ok(())
}

/// A message text: non-empty and bounded; newlines and tabs are fine.
pub(crate) fn check_text(field: &'static str, s: &str, max: usize) -> Result<(), ModelError> {
    if s.is_empty() {
        return Err(ModelError::Empty { field });
    }
    check_len(field, s, max)
}

/// An idempotency key: printable ASCII without spaces, so it survives logs and headers intact.
pub(crate) fn check_client_msg_id(
    field: &'static str,
    s: &str,
    max: usize,
) -> Result<(), ModelError> {
    if s.is_empty() {
        return Err(ModelError::Empty { field });
    }
    check_len(field, s, max)?;
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ModelError::Invalid {
            field,
            reason: "must be printable ASCII without spaces",
        });
    }
    Ok(())
}

/// A channel name: lowercase ASCII letters, digits, `-` and `_`.
pub(crate) fn check_token_word(field: &'static str, s: &str, max: usize) -> Result<(), ModelError> {
    if s.is_empty() {
        return Err(ModelError::Empty { field });
    }
    check_len(field, s, max)?;
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(ModelError::Invalid {
            field,
            reason: "must be lowercase ASCII letters, digits, `-` or `_`",
        });
    }
    Ok(())
}

// ---- objects only --------------------------------------------------------------------------

/// serde's derived structs also accept a JSON array of the field values in order
/// (`["hi", "k1"]` as a send). The API speaks objects only, so model types are read through this
/// wrapper, which hands the derived code a map and refuses everything else.
pub(crate) struct Object<T>(pub T);

struct ObjectVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for ObjectVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
    }
}

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ObjectVisitor(std::marker::PhantomData))
            .map(Object)
    }
}

/// `deserialize_with` for a required nested object field.
pub(crate) fn object<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Object<T> as serde::Deserialize>::deserialize(d).map(|o| o.0)
}

/// `deserialize_with` for an optional nested object field (`null` = absent); pair it with
/// `#[serde(default)]` so that a missing field is `None` too.
pub(crate) fn object_opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<Object<T>> as serde::Deserialize>::deserialize(d).map(|o| o.map(|o| o.0))
}

/// `deserialize_with` for an optional string that borrows from the input where it can: serde's
/// `#[serde(borrow)]` only borrows a `Cow` field itself, so a plain `Option<Cow<str>>` always
/// comes out owned (serde-rs/serde#1497). Pair it with `#[serde(default)]`.
pub(crate) fn borrowed_str_opt<'de: 'a, 'a, D>(
    d: D,
) -> Result<Option<std::borrow::Cow<'a, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(serde::Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>);
    <Option<Borrowed<'a>> as serde::Deserialize>::deserialize(d).map(|o| o.map(|b| b.0))
}
