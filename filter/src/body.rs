//! What a route reads from a JSON request body: the estimate fields, the model, whether it
//! streams — and the one change the filter makes to a body, adding
//! `stream_options.include_usage` so an OpenAI-shaped stream reports its exact usage.
//!
//! The body is read once into its top-level members with their values left as raw JSON text
//! (borrowed, not copied); only the members a route names are parsed, each into its type. A
//! member named twice (`{"max_tokens":1,"max_tokens":9999}`) is ambiguous — servers disagree on
//! which one counts — so an estimate read from it is refused like any unreadable value.

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::fmt;

/// The top-level members of a JSON object, in order.
pub struct RequestBody<'a> {
    members: Vec<(String, &'a RawValue)>,
}

/// A member looked up by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<T> {
    Missing,
    /// Present but not of the expected type (or present twice).
    Bad,
    Value(T),
}

struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(entry);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

impl<'a> RequestBody<'a> {
    /// The body's members, if it is a JSON object.
    pub fn parse(bytes: &'a [u8]) -> Option<Self> {
        serde_json::from_slice::<Members<'a>>(bytes)
            .ok()
            .map(|m| RequestBody { members: m.0 })
    }

    fn raw(&self, name: &str) -> Field<&'a RawValue> {
        let mut found = self.members.iter().filter(|(k, _)| k == name);
        match (found.next(), found.next()) {
            (None, _) => Field::Missing,
            (Some((_, v)), None) => Field::Value(*v),
            (Some(_), Some(_)) => Field::Bad,
        }
    }

    fn typed<T: Deserialize<'a>>(&self, name: &str) -> Field<T> {
        match self.raw(name) {
            Field::Value(v) => serde_json::from_str::<T>(v.get()).map_or(Field::Bad, Field::Value),
            Field::Missing => Field::Missing,
            Field::Bad => Field::Bad,
        }
    }

    /// The first of `names` present, as a non-negative integer (`"8192"`, `8192.0` and `-1`
    /// are [`Field::Bad`]).
    pub fn amount(&self, names: &[String]) -> Field<u64> {
        names
            .iter()
            .map(|n| self.typed::<u64>(n))
            .find(|f| *f != Field::Missing)
            .unwrap_or(Field::Missing)
    }

    /// A string member (the model), if it is one.
    pub fn string(&self, name: &str) -> Option<String> {
        match self.typed::<String>(name) {
            Field::Value(s) => Some(s),
            _ => None,
        }
    }

    /// `"stream": true`.
    pub fn streams(&self) -> bool {
        self.typed::<bool>("stream") == Field::Value(true)
    }

    /// `"stream_options": {"include_usage": true}`.
    pub fn includes_usage(&self) -> bool {
        matches!(
            self.typed::<StreamOptions>("stream_options"),
            Field::Value(StreamOptions {
                include_usage: Some(true)
            })
        )
    }

    /// The body again, with `stream_options.include_usage` set to true (other stream options
    /// kept). The caller checked [`Self::streams`], so the object has members.
    pub fn with_include_usage(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            64 + self
                .members
                .iter()
                .map(|(k, v)| k.len() + v.get().len() + 4)
                .sum::<usize>(),
        );
        out.push(b'{');
        let mut wrote_options = false;
        for (k, v) in &self.members {
            // A second `stream_options` would override the first where the last one wins.
            if k == "stream_options" && wrote_options {
                continue;
            }
            if out.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(serde_json::to_string(k).unwrap_or_default().as_bytes());
            out.push(b':');
            if k == "stream_options" {
                wrote_options = true;
                out.extend_from_slice(&merged_options(v));
            } else {
                out.extend_from_slice(v.get().as_bytes());
            }
        }
        if !wrote_options {
            if out.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(br#""stream_options":{"include_usage":true}"#);
        }
        out.push(b'}');
        out
    }
}

/// A `stream_options` value with `include_usage: true` (its other members kept).
fn merged_options(v: &RawValue) -> Vec<u8> {
    let mut out = b"{\"include_usage\":true".to_vec();
    if let Ok(Members(members)) = serde_json::from_str::<Members>(v.get()) {
        for (k, v) in members.iter().filter(|(k, _)| k != "include_usage") {
            out.push(b',');
            out.extend_from_slice(serde_json::to_string(k).unwrap_or_default().as_bytes());
            out.push(b':');
            out.extend_from_slice(v.get().as_bytes());
        }
    }
    out.push(b'}');
    out
}
