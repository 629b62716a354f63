//! Measuring actual usage from a response, incrementally: bodies arrive in chunks of any size,
//! split at any byte, and may be huge, truncated or not JSON at all. Nothing here panics or
//! buffers more than its cap; a body that cannot be read yields an error and the caller settles
//! at the estimate.
//!
//! Shapes understood (the `usage` object):
//! - OpenAI: `prompt_tokens`, `completion_tokens`, `total_tokens`, `prompt_tokens_details.cached_tokens`
//!   — in a JSON body, or in the last `data:` event of a stream (`stream_options.include_usage`).
//! - Anthropic: `input_tokens`, `output_tokens`, `cache_read_input_tokens` — in a JSON body, or in
//!   a stream's `message_start` (`message.usage`) and `message_delta` (`usage`) events.

use serde_json::Value;

/// Token counts found in a response; later events override earlier ones.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TokenUsage {
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageError {
    /// The body was larger than the cap.
    TooLarge,
    /// The body (or every event) was not JSON.
    Malformed,
    /// Readable, but no usage object in it.
    Missing,
}

impl TokenUsage {
    fn is_empty(&self) -> bool {
        self.input_tokens.is_none() && self.output_tokens.is_none() && self.total_tokens.is_none()
    }

    /// Merges a `usage` object of either shape.
    fn absorb(&mut self, u: &Value) {
        let n = |k: &str| u.get(k).and_then(Value::as_u64);
        if let Some(v) = n("prompt_tokens").or_else(|| n("input_tokens")) {
            self.input_tokens = Some(v);
        }
        if let Some(v) = n("completion_tokens").or_else(|| n("output_tokens")) {
            self.output_tokens = Some(v);
        }
        if let Some(v) = n("total_tokens") {
            self.total_tokens = Some(v);
        }
        let cached = u
            .get("prompt_tokens_details")
            .and_then(|d| d.get("cached_tokens"))
            .and_then(Value::as_u64)
            .or_else(|| n("cache_read_input_tokens"));
        if let Some(v) = cached {
            self.cached_tokens = Some(v);
        }
    }

    /// Finds usage in one JSON document (a whole body or one stream event).
    fn absorb_document(&mut self, doc: &Value) {
        if let Some(u) = doc.get("usage").filter(|u| u.is_object()) {
            self.absorb(u);
        }
        if let Some(u) = doc
            .get("message")
            .and_then(|m| m.get("usage"))
            .filter(|u| u.is_object())
        {
            self.absorb(u);
        }
    }

    /// The amount for one of the route's meters, if this usage says it.
    pub fn meter(&self, name: &str) -> Option<u64> {
        match name {
            "input_tokens" => self.input_tokens,
            "output_tokens" => self.output_tokens,
            "cached_tokens" => self.cached_tokens,
            "tokens" | "total_tokens" => {
                self.total_tokens
                    .or(match (self.input_tokens, self.output_tokens) {
                        (None, None) => None,
                        (i, o) => Some(i.unwrap_or(0).saturating_add(o.unwrap_or(0))),
                    })
            }
            _ => None,
        }
    }
}

/// Most text kept from a response for counting its tokens when it carries no usage.
pub const MAX_TEXT: usize = 512 * 1024;

/// Appends the generated text in one document (a whole body or one stream event), both shapes:
/// OpenAI `choices[].message.content` / `choices[].delta.content`, Anthropic `content[].text` /
/// `delta.text`. Returns false once the text would pass [`MAX_TEXT`].
fn collect_text(doc: &Value, out: &mut String) -> bool {
    let mut push = |t: &str| {
        if out.len() + t.len() > MAX_TEXT {
            return false;
        }
        out.push_str(t);
        true
    };
    let mut ok = true;
    if let Some(choices) = doc.get("choices").and_then(Value::as_array) {
        for c in choices {
            for path in [["message", "content"], ["delta", "content"]] {
                if let Some(t) = c
                    .get(path[0])
                    .and_then(|m| m.get(path[1]))
                    .and_then(Value::as_str)
                {
                    ok &= push(t);
                }
            }
        }
    }
    if let Some(blocks) = doc.get("content").and_then(Value::as_array) {
        for b in blocks {
            if let Some(t) = b.get("text").and_then(Value::as_str) {
                ok &= push(t);
            }
        }
    }
    if let Some(t) = doc
        .get("delta")
        .and_then(|d| d.get("text"))
        .and_then(Value::as_str)
    {
        ok &= push(t);
    }
    ok
}

/// A non-streaming JSON body, buffered up to `cap` bytes.
pub struct JsonBody {
    buf: Vec<u8>,
    cap: usize,
    too_large: bool,
}

impl JsonBody {
    pub fn new(cap: usize) -> Self {
        Self {
            buf: Vec::new(),
            cap,
            too_large: false,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if self.too_large {
            return;
        }
        if self.buf.len().saturating_add(chunk.len()) > self.cap {
            self.too_large = true;
            self.buf = Vec::new();
            return;
        }
        self.buf.extend_from_slice(chunk);
    }

    pub fn finish(self) -> Result<TokenUsage, UsageError> {
        self.finish_with_text().0
    }

    /// The usage, and the generated text when there was no usage (to count it instead).
    pub fn finish_with_text(self) -> (Result<TokenUsage, UsageError>, Option<String>) {
        if self.too_large {
            return (Err(UsageError::TooLarge), None);
        }
        let Ok(doc) = serde_json::from_slice::<Value>(&self.buf) else {
            return (Err(UsageError::Malformed), None);
        };
        let mut u = TokenUsage::default();
        u.absorb_document(&doc);
        if !u.is_empty() {
            return (Ok(u), None);
        }
        let mut text = String::new();
        let complete = collect_text(&doc, &mut text);
        (
            Err(UsageError::Missing),
            (complete && !text.is_empty()).then_some(text),
        )
    }
}

/// A `text/event-stream` body, read line by line as chunks arrive. Only the current line is
/// buffered (up to `max_line` bytes; a longer line is skipped), so a stream of any length costs
/// constant memory.
pub struct SseBody {
    line: Vec<u8>,
    max_line: usize,
    skipping: bool,
    usage: TokenUsage,
    events: u64,
    unreadable: u64,
    skipped_lines: u64,
    text: String,
    text_complete: bool,
}

impl SseBody {
    pub fn new(max_line: usize) -> Self {
        Self {
            line: Vec::new(),
            max_line,
            skipping: false,
            usage: TokenUsage::default(),
            events: 0,
            unreadable: 0,
            skipped_lines: 0,
            text: String::new(),
            text_complete: true,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(pos) = rest.iter().position(|b| *b == b'\n') {
            let (head, tail) = rest.split_at(pos);
            self.push(head);
            self.end_line();
            rest = tail.get(1..).unwrap_or_default();
        }
        self.push(rest);
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.skipping {
            return;
        }
        if self.line.len().saturating_add(bytes.len()) > self.max_line {
            self.skipping = true;
            self.skipped_lines += 1;
            self.line = Vec::new();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn end_line(&mut self) {
        if !self.skipping {
            let line = std::mem::take(&mut self.line);
            self.handle(&line);
        }
        self.skipping = false;
        self.line.clear();
    }

    fn handle(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return; // event:, id:, comments and blank lines carry no usage
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" || data.is_empty() {
            return;
        }
        self.events += 1;
        match serde_json::from_slice::<Value>(data) {
            Ok(doc) => {
                self.usage.absorb_document(&doc);
                if self.text_complete {
                    self.text_complete = collect_text(&doc, &mut self.text);
                }
            }
            Err(_) => self.unreadable += 1,
        }
    }

    /// Events seen, unreadable events, over-long lines skipped.
    pub fn counts(&self) -> (u64, u64, u64) {
        (self.events, self.unreadable, self.skipped_lines)
    }

    /// The generated text seen so far, if all of it was kept (and the stream had no usage, the
    /// caller counts it instead).
    pub fn text(&self) -> Option<&str> {
        (self.text_complete && self.skipped_lines == 0 && !self.text.is_empty())
            .then_some(self.text.as_str())
    }

    pub fn finish(self) -> Result<TokenUsage, UsageError> {
        self.finish_with_text().0
    }

    /// The usage, and the generated text when there was no usage (to count it instead) — also
    /// for a stream cut short, whose text is all the client received.
    pub fn finish_with_text(mut self) -> (Result<TokenUsage, UsageError>, Option<String>) {
        if !self.line.is_empty() || self.skipping {
            self.end_line(); // a last line without its newline
        }
        let usage = self.usage_result();
        let text = match usage {
            Err(UsageError::Missing) => self.text().map(str::to_string),
            _ => None,
        };
        (usage, text)
    }

    fn usage_result(&mut self) -> Result<TokenUsage, UsageError> {
        if !self.usage.is_empty() {
            return Ok(std::mem::take(&mut self.usage));
        }
        if self.events > 0 && self.unreadable == self.events {
            return Err(UsageError::Malformed);
        }
        if self.skipped_lines > 0 {
            return Err(UsageError::TooLarge);
        }
        Err(UsageError::Missing)
    }
}

/// A usage header's value: a non-negative integer, nothing else.
pub fn header_amount(value: &str) -> Option<u64> {
    let v = value.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse()
        .ok()
        .filter(|n| *n <= tollgate_protocol::MAX_AMOUNT)
}
