//! Typed views of what the filter reads in provider responses: a whole JSON body or one SSE
//! event of OpenAI Chat Completions (and compatible APIs: Azure, DeepSeek, vLLM …), the OpenAI
//! Responses API, and Anthropic Messages.
//!
//! Upstream payloads change shape over time, so every field is *lenient*: a count that is not
//! a non-negative integer, a string that is not a string, an object or list of another shape
//! is read as absent, and the rest of the document is still read. The wrappers ([`Count`],
//! [`Text`], [`Obj`], [`List`]) decide from the JSON token they meet, so nothing is buffered.

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::marker::PhantomData;

/// Implements the visitor methods that read "anything else" as absent.
macro_rules! absent_otherwise {
    ($value:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

/// A count of tokens: a non-negative integer, else absent.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
pub struct Count(pub Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a count")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Count, E> {
                Ok(Count(Some(v)))
            }
            fn visit_str<E>(self, _: &str) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Count, A::Error> {
                skip_seq(seq).map(|_| Count(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Count, A::Error> {
                skip_map(map).map(|_| Count(None))
            }
            absent_otherwise!(Count(None));
        }
        d.deserialize_any(V)
    }
}

/// A string, else absent.
#[derive(Default, Clone, PartialEq, Eq)]
pub struct Text(pub Option<String>);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E>(self, v: &str) -> Result<Text, E> {
                Ok(Text(Some(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text, E> {
                Ok(Text(Some(v)))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Text, A::Error> {
                skip_seq(seq).map(|_| Text(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Text, A::Error> {
                skip_map(map).map(|_| Text(None))
            }
            absent_otherwise!(Text(None));
        }
        d.deserialize_any(V)
    }
}

impl Text {
    fn get(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

/// An object read as `T` (whose fields are lenient themselves), else absent.
#[derive(Clone, PartialEq, Eq)]
pub struct Obj<T>(pub Option<T>);

impl<T> Default for Obj<T> {
    fn default() -> Self {
        Obj(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(|t| Obj(Some(t)))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Obj<T>, A::Error> {
                skip_seq(seq).map(|_| Obj(None))
            }
            absent_otherwise!(Obj(None));
        }
        d.deserialize_any(V(PhantomData))
    }
}

impl<T> Obj<T> {
    fn get(&self) -> Option<&T> {
        self.0.as_ref()
    }
}

/// A list of `T` (whose fields are lenient themselves), else empty.
#[derive(Clone, PartialEq, Eq)]
pub struct List<T>(pub Vec<T>);

impl<T> Default for List<T> {
    fn default() -> Self {
        List(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = List<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<List<T>, A::Error> {
                Vec::<T>::deserialize(SeqAccessDeserializer::new(seq)).map(List)
            }
            fn visit_u64<E>(self, _: u64) -> Result<List<T>, E> {
                Ok(List(Vec::new()))
            }
            fn visit_str<E>(self, _: &str) -> Result<List<T>, E> {
                Ok(List(Vec::new()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<List<T>, A::Error> {
                skip_map(map).map(|_| List(Vec::new()))
            }
            absent_otherwise!(List(Vec::new()));
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// Every string, key and number inside a JSON value, space-separated: a tool call's `input`
/// object, counted by the tokenizer when the response reported no usage.
#[derive(Default, Clone, PartialEq, Eq)]
pub struct Strings(pub String);

impl<'de> Deserialize<'de> for Strings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Strings;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, v: &str) -> Result<Strings, E> {
                Ok(Strings(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Strings, E> {
                Ok(Strings(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Strings, E> {
                Ok(Strings(v.to_string()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Strings, E> {
                // A fraction is a token or two; formatting floats would double this module.
                Ok(Strings("0.0".to_string()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Strings, E> {
                Ok(Strings(v.to_string()))
            }
            fn visit_unit<E>(self) -> Result<Strings, E> {
                Ok(Strings::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strings, A::Error> {
                let mut out = String::new();
                while let Some(Strings(s)) = seq.next_element()? {
                    push_word(&mut out, &s);
                }
                Ok(Strings(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strings, A::Error> {
                let mut out = String::new();
                while let Some((Strings(k), Strings(v))) = map.next_entry()? {
                    push_word(&mut out, &k);
                    push_word(&mut out, &v);
                }
                Ok(Strings(out))
            }
        }
        d.deserialize_any(V)
    }
}

fn push_word(out: &mut String, s: &str) {
    if s.is_empty() {
        return;
    }
    if !out.is_empty() {
        out.push(' ');
    }
    out.push_str(s);
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

// ---- usage objects ----

#[derive(Default, Deserialize)]
#[serde(default)]
struct InputDetails {
    cached_tokens: Count,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct OutputDetails {
    reasoning_tokens: Count,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct CacheCreation {
    ephemeral_5m_input_tokens: Count,
    ephemeral_1h_input_tokens: Count,
}

/// A `usage` object of any of the three shapes.
#[derive(Default, Deserialize)]
#[serde(default)]
struct UsageObj {
    // OpenAI Chat Completions (and compatible)
    prompt_tokens: Count,
    completion_tokens: Count,
    prompt_tokens_details: Obj<InputDetails>,
    completion_tokens_details: Obj<OutputDetails>,
    /// DeepSeek's cache hits.
    prompt_cache_hit_tokens: Count,
    // OpenAI Responses and Anthropic
    input_tokens: Count,
    output_tokens: Count,
    input_tokens_details: Obj<InputDetails>,
    output_tokens_details: Obj<OutputDetails>,
    // Anthropic
    cache_read_input_tokens: Count,
    cache_creation_input_tokens: Count,
    cache_creation: Obj<CacheCreation>,
}

/// What the usage objects of a response reported, field by field (later events override).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reported {
    pub prompt: Option<u64>,
    pub completion: Option<u64>,
    pub input: Option<u64>,
    pub output: Option<u64>,
    pub cached_details: Option<u64>,
    pub cache_hit: Option<u64>,
    pub cache_read: Option<u64>,
    pub cache_write: Option<u64>,
    pub cache_5m: Option<u64>,
    pub cache_1h: Option<u64>,
    pub reasoning: Option<u64>,
    /// `input_tokens_details` / `output_tokens_details` seen: the Responses API's meaning.
    pub responses_shape: bool,
    /// The output count came from a final usage (not Anthropic's `message_start`, whose
    /// `output_tokens` is the first token only).
    pub output_final: bool,
}

fn set(slot: &mut Option<u64>, v: Count) {
    if v.0.is_some() {
        *slot = v.0;
    }
}

impl Reported {
    fn absorb(&mut self, u: &UsageObj, is_final: bool) {
        set(&mut self.prompt, u.prompt_tokens);
        set(&mut self.completion, u.completion_tokens);
        set(&mut self.input, u.input_tokens);
        set(&mut self.output, u.output_tokens);
        set(&mut self.cache_hit, u.prompt_cache_hit_tokens);
        set(&mut self.cache_read, u.cache_read_input_tokens);
        set(&mut self.cache_write, u.cache_creation_input_tokens);
        if let Some(c) = u.cache_creation.get() {
            set(&mut self.cache_5m, c.ephemeral_5m_input_tokens);
            set(&mut self.cache_1h, c.ephemeral_1h_input_tokens);
        }
        for d in [&u.prompt_tokens_details, &u.input_tokens_details] {
            if let Some(d) = d.get() {
                set(&mut self.cached_details, d.cached_tokens);
            }
        }
        for d in [&u.completion_tokens_details, &u.output_tokens_details] {
            if let Some(d) = d.get() {
                set(&mut self.reasoning, d.reasoning_tokens);
            }
        }
        if u.input_tokens_details.get().is_some() || u.output_tokens_details.get().is_some() {
            self.responses_shape = true;
        }
        if is_final && (u.output_tokens.0.is_some() || u.completion_tokens.0.is_some()) {
            self.output_final = true;
        }
    }
}

// ---- generated output ----

#[derive(Default, Deserialize)]
#[serde(default)]
struct Function {
    name: Text,
    arguments: Text,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct ToolCall {
    function: Obj<Function>,
}

/// `choices[].message` or `choices[].delta`.
#[derive(Default, Deserialize)]
#[serde(default)]
struct ChoiceMessage {
    content: Text,
    refusal: Text,
    /// DeepSeek and other compatible APIs.
    reasoning_content: Text,
    reasoning: Text,
    tool_calls: List<ToolCall>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Choice {
    message: Obj<ChoiceMessage>,
    delta: Obj<ChoiceMessage>,
}

/// An Anthropic content block, or a Responses API output item / content part.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Block {
    text: Text,
    thinking: Text,
    /// Anthropic `tool_use` (whole, in a non-streaming body).
    input: Strings,
    /// Responses `function_call`.
    arguments: Text,
    /// Responses `message` items hold parts, `reasoning` items a summary.
    content: List<Block>,
    summary: List<Block>,
}

/// Anthropic's `content_block_delta.delta`.
#[derive(Default, Deserialize)]
#[serde(default)]
struct DeltaObj {
    text: Text,
    partial_json: Text,
    thinking: Text,
}

/// `delta`: an object (Anthropic) or a string (Responses API events).
#[derive(Default)]
enum Delta {
    #[default]
    None,
    Text(String),
    Obj(DeltaObj),
}

impl<'de> Deserialize<'de> for Delta {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Delta;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a delta")
            }
            fn visit_str<E>(self, v: &str) -> Result<Delta, E> {
                Ok(Delta::Text(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Delta, A::Error> {
                DeltaObj::deserialize(MapAccessDeserializer::new(map)).map(Delta::Obj)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Delta, E> {
                Ok(Delta::None)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Delta, A::Error> {
                skip_seq(seq).map(|_| Delta::None)
            }
            absent_otherwise!(Delta::None);
        }
        d.deserialize_any(V)
    }
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Envelope {
    usage: Obj<UsageObj>,
}

/// One JSON document: a whole response body or one stream event.
#[derive(Default, Deserialize)]
#[serde(default)]
pub struct Doc {
    #[serde(rename = "type")]
    kind: Text,
    usage: Obj<UsageObj>,
    /// Anthropic `message_start`.
    message: Obj<Envelope>,
    /// Responses API `response.completed` (and friends).
    response: Obj<Envelope>,
    choices: List<Choice>,
    /// Anthropic, non-streaming.
    content: List<Block>,
    /// Responses API, non-streaming.
    output: List<Block>,
    content_block: Obj<Block>,
    delta: Delta,
}

impl Doc {
    /// The document, if it is a JSON object.
    pub fn parse(bytes: &[u8]) -> Option<Doc> {
        serde_json::from_slice::<Obj<Doc>>(bytes).ok()?.0
    }

    /// Adds this document's usage objects to `r`.
    pub fn report_usage(&self, r: &mut Reported) {
        if let Some(u) = self.message.get().and_then(|m| m.usage.get()) {
            r.absorb(u, false);
        }
        if let Some(u) = self.usage.get() {
            r.absorb(u, true);
        }
        if let Some(u) = self.response.get().and_then(|m| m.usage.get()) {
            r.absorb(u, true);
        }
    }

    /// Calls `f` with every piece of generated output: text, refusals, reasoning / thinking,
    /// tool-call names and arguments, in both shapes, streamed or whole.
    pub fn for_each_output(&self, f: &mut dyn FnMut(&str)) {
        for c in &self.choices.0 {
            for m in [c.message.get(), c.delta.get()].into_iter().flatten() {
                for t in [&m.content, &m.refusal, &m.reasoning_content, &m.reasoning] {
                    t.get().into_iter().for_each(&mut *f);
                }
                for call in &m.tool_calls.0 {
                    if let Some(func) = call.function.get() {
                        func.name.get().into_iter().for_each(&mut *f);
                        func.arguments.get().into_iter().for_each(&mut *f);
                    }
                }
            }
        }
        for b in self.content.0.iter().chain(&self.output.0) {
            b.each(f);
        }
        if let Some(b) = self.content_block.get() {
            b.text.get().into_iter().for_each(&mut *f);
            b.thinking.get().into_iter().for_each(&mut *f);
        }
        match &self.delta {
            Delta::Obj(d) => {
                for t in [&d.text, &d.partial_json, &d.thinking] {
                    t.get().into_iter().for_each(&mut *f);
                }
            }
            // Responses API: `response.output_text.delta`, `…function_call_arguments.delta`,
            // `…reasoning_summary_text.delta`, `…refusal.delta` (not audio, which is bytes).
            Delta::Text(t) => {
                let kind = self.kind.get().unwrap_or_default();
                if ["text.delta", "arguments.delta", "refusal.delta"]
                    .iter()
                    .any(|s| kind.ends_with(s))
                {
                    f(t);
                }
            }
            Delta::None => {}
        }
    }
}

impl Block {
    fn each(&self, f: &mut dyn FnMut(&str)) {
        for t in [&self.text, &self.thinking, &self.arguments] {
            t.get().into_iter().for_each(&mut *f);
        }
        f(&self.input.0);
        for b in self.content.0.iter().chain(&self.summary.0) {
            b.each(f);
        }
    }
}

// ---- the sidecar's answer to a batch of commits ----

/// One item's `status` in `/v1/commit/batch`'s answer: a settlement's status is a string
/// (`committed`), a failure's an HTTP status.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
pub enum ItemStatus {
    Settled,
    Failed(u16),
    #[default]
    Unknown,
}

impl<'de> Deserialize<'de> for ItemStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ItemStatus;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a status")
            }
            fn visit_u64<E>(self, v: u64) -> Result<ItemStatus, E> {
                Ok(u16::try_from(v).map_or(ItemStatus::Unknown, ItemStatus::Failed))
            }
            fn visit_str<E>(self, _: &str) -> Result<ItemStatus, E> {
                Ok(ItemStatus::Settled)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<ItemStatus, A::Error> {
                skip_seq(seq).map(|_| ItemStatus::Unknown)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ItemStatus, A::Error> {
                skip_map(map).map(|_| ItemStatus::Unknown)
            }
            absent_otherwise!(ItemStatus::Unknown);
        }
        d.deserialize_any(V)
    }
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Outcome {
    status: ItemStatus,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Outcomes {
    results: List<Outcome>,
}

/// The status of each item of a batch's answer, in order (empty if unreadable).
pub fn batch_outcomes(body: &[u8]) -> Vec<ItemStatus> {
    serde_json::from_slice::<Obj<Outcomes>>(body)
        .ok()
        .and_then(|o| o.0)
        .map(|o| o.results.0.into_iter().map(|r| r.status).collect())
        .unwrap_or_default()
}
