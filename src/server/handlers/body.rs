//! JSON request bodies, read by one function so that every refusal is in
//! the API's own words: what the body must look like, which field is wrong
//! and how. serde's messages name Rust types (`expected struct TagRequest
//! with 2 elements`) and say nothing of the API, so they never reach a
//! client: the body is checked against its [`Shape`] first, and only a body
//! that fits is handed to serde.

use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::server::error::{cut, ApiError, ApiResult};

/// What a field of a body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    String,
    /// An array of strings.
    Strings,
}

/// The body an endpoint takes: every field is required, no other is
/// allowed.
#[derive(Debug)]
pub struct Shape {
    /// A complete, valid body, quoted in every refusal.
    pub example: &'static str,
    pub fields: &'static [(&'static str, Kind)],
}

/// Longest string a field may hold. Every valid value is far shorter (names
/// and versions are at most 64 bytes), and the later checks quote the value
/// they refuse: this keeps those quotes short.
pub const MAX_STRING: usize = 256;

/// Reads `body` as the JSON object `shape` describes, into `T` (whose serde
/// fields must be `shape`'s: a unit test per shape checks it).
pub fn json_body<T: DeserializeOwned>(body: &[u8], shape: &Shape) -> ApiResult<T> {
    let refuse = |what: String| {
        ApiError::bad_request(format!(
            "{what}: the body must be a JSON object like {}",
            shape.example
        ))
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(refuse("the request body is empty".into()));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        refuse(if e.is_eof() {
            "the request body ends before its JSON does".into()
        } else {
            format!(
                "the request body is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            )
        })
    })?;
    if !value.is_object() {
        return Err(refuse(format!(
            "the request body is {}, not an object",
            describe(&value)
        )));
    }
    // A second reading keeps the keys as sent: `Value` would quietly keep
    // the last of two fields of one name.
    let Fields(fields) = serde_json::from_slice(body)
        .map_err(|_| refuse("the request body could not be read as a JSON object".into()))?;
    let mut seen: Vec<&str> = Vec::with_capacity(fields.len());
    for (key, value) in &fields {
        let Some((_, kind)) = shape.fields.iter().find(|(name, _)| name == key) else {
            return Err(refuse(format!(
                "the request body has an unknown field {}",
                quote(key)
            )));
        };
        if seen.contains(&key.as_str()) {
            return Err(refuse(format!(
                "the request body gives the field {key:?} twice"
            )));
        }
        seen.push(key);
        check_kind(key, value, *kind).map_err(refuse)?;
    }
    if let Some((missing, _)) = shape.fields.iter().find(|(name, _)| !seen.contains(name)) {
        return Err(refuse(format!(
            "the request body lacks the field {missing:?}"
        )));
    }
    // The body fits the shape, so serde cannot refuse it unless the shape
    // and `T` disagree, which is this program's fault, not the client's.
    serde_json::from_value(value).map_err(ApiError::internal)
}

fn check_kind(key: &str, value: &Value, kind: Kind) -> Result<(), String> {
    let too_long = |v: &Value| v.as_str().is_some_and(|s| s.len() > MAX_STRING);
    match kind {
        Kind::String if too_long(value) => Err(format!(
            "the field {key:?} is longer than {MAX_STRING} bytes"
        )),
        Kind::String if value.is_string() => Ok(()),
        Kind::String => Err(format!(
            "the field {key:?} must be a string, not {}",
            describe(value)
        )),
        Kind::Strings => {
            let Some(items) = value.as_array() else {
                return Err(format!(
                    "the field {key:?} must be an array of strings, not {}",
                    describe(value)
                ));
            };
            if let Some(i) = items.iter().position(|v| !v.is_string()) {
                return Err(format!(
                    "the field {key:?} must be an array of strings, but item {} is {}",
                    i + 1,
                    describe(&items[i])
                ));
            }
            match items.iter().position(too_long) {
                None => Ok(()),
                Some(i) => Err(format!(
                    "item {} of the field {key:?} is longer than {MAX_STRING} bytes",
                    i + 1
                )),
            }
        }
    }
}

/// A JSON value's kind, as a message names it.
fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A client's text in quotes, cut.
fn quote(s: &str) -> String {
    format!("{:?}", cut(s))
}

/// An object's fields in the order sent, repeated keys kept.
struct Fields(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut fields = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    fields.push(entry);
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Pair {
        tag: String,
        version: String,
    }

    const PAIR: Shape = Shape {
        example: r#"{"tag": "stable", "version": "1.1.0"}"#,
        fields: &[("tag", Kind::String), ("version", Kind::String)],
    };

    fn refusal(body: &str) -> String {
        json_body::<Pair>(body.as_bytes(), &PAIR)
            .unwrap_err()
            .message
    }

    #[test]
    fn a_body_that_fits_is_read() {
        let p: Pair = json_body(br#" {"version": "1.0.0", "tag": "beta"} "#, &PAIR).unwrap();
        assert_eq!(
            p,
            Pair {
                tag: "beta".into(),
                version: "1.0.0".into()
            }
        );
    }

    #[test]
    fn every_refusal_says_what_is_wrong_in_the_apis_words() {
        for (body, says) in [
            ("", "the request body is empty"),
            ("  \n", "the request body is empty"),
            ("x", "not valid JSON (line 1, column 1)"),
            (r#"{"tag": "a"} x"#, "not valid JSON (line 1, column 14)"),
            (r#"{"tag": "#, "ends before its JSON does"),
            (r#"["x"]"#, "is an array, not an object"),
            ("null", "is null, not an object"),
            ("1", "is a number, not an object"),
            (r#""tag""#, "is a string, not an object"),
            (
                r#"{"tag": "a", "version": "1.0.0", "extra": 1}"#,
                r#"unknown field "extra""#,
            ),
            (
                r#"{"tag": "a", "tag": "b", "version": "1.0.0"}"#,
                r#"gives the field "tag" twice"#,
            ),
            (r#"{"tag": "a"}"#, r#"lacks the field "version""#),
            (r#"{}"#, r#"lacks the field "tag""#),
            (
                r#"{"tag": 1, "version": "1.0.0"}"#,
                r#"the field "tag" must be a string, not a number"#,
            ),
            (
                r#"{"tag": "a", "version": null}"#,
                r#"the field "version" must be a string, not null"#,
            ),
        ] {
            let m = refusal(body);
            assert!(m.contains(says), "{body:?}: {m}");
            assert!(m.ends_with(PAIR.example), "{body:?}: {m}");
            for serde_word in ["struct", "Pair", "invalid type", "invalid length", "`"] {
                assert!(!m.contains(serde_word), "{body:?}: {m}");
            }
        }
    }

    #[test]
    fn arrays_of_strings_are_checked_item_by_item() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Key {
            name: String,
            scopes: Vec<String>,
        }
        let shape = Shape {
            example: r#"{"name": "ci", "scopes": ["push:*"]}"#,
            fields: &[("name", Kind::String), ("scopes", Kind::Strings)],
        };
        let m = |b: &str| json_body::<Key>(b.as_bytes(), &shape).unwrap_err().message;
        assert!(m(r#"{"name": "ci", "scopes": "push"}"#)
            .contains(r#"the field "scopes" must be an array of strings, not a string"#));
        assert!(m(r#"{"name": "ci", "scopes": ["push", 2]}"#)
            .contains(r#"the field "scopes" must be an array of strings, but item 2 is a number"#));
        assert!(json_body::<Key>(br#"{"name": "ci", "scopes": []}"#, &shape).is_ok());
    }

    /// Each endpoint's shape and its struct agree: the example has exactly
    /// the shape's fields, and it reads into the struct.
    #[test]
    fn every_endpoint_shape_matches_its_struct() {
        use crate::server::handlers::{keys, packages};
        fn check<T: DeserializeOwned>(shape: &Shape) {
            let example: Value = serde_json::from_str(shape.example).unwrap();
            let mut keys: Vec<&str> = example
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            let mut fields: Vec<&str> = shape.fields.iter().map(|(n, _)| *n).collect();
            keys.sort_unstable();
            fields.sort_unstable();
            assert_eq!(keys, fields, "{}", shape.example);
            json_body::<T>(shape.example.as_bytes(), shape).unwrap();
        }
        check::<packages::TagRequest>(&packages::TAG_REQUEST);
        check::<keys::CreateKey>(&keys::CREATE_KEY);
        check::<keys::PublisherKey>(&keys::PUBLISHER_KEY);
    }

    #[test]
    fn long_strings_are_refused_before_anything_quotes_them() {
        let long = "a".repeat(MAX_STRING + 1);
        let m = refusal(&format!(r#"{{"tag": "{long}", "version": "1.0.0"}}"#));
        assert!(
            m.contains(r#"the field "tag" is longer than 256 bytes"#),
            "{m}"
        );
        assert!(!m.contains(&long), "{m}");
        let ok = "a".repeat(MAX_STRING);
        assert!(json_body::<Pair>(
            format!(r#"{{"tag": "{ok}", "version": "1.0.0"}}"#).as_bytes(),
            &PAIR
        )
        .is_ok());
    }

    #[test]
    fn a_long_field_name_is_cut() {
        let name = "é".repeat(400);
        let m = refusal(&format!(r#"{{"{name}": 1}}"#));
        assert!(m.len() < 400, "{m}");
        assert!(m.contains('…'), "{m}");
    }
}
