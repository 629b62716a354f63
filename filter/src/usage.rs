//! Measuring actual usage from a response, incrementally: bodies arrive in chunks of any size,
//! split at any byte, and may be huge, truncated or not JSON at all. Nothing here panics or
//! buffers more than its cap; a body that cannot be read yields an error and the caller settles
//! by its policy.
//!
//! Payloads are parsed into typed structs ([`crate::payload`]); a field of an unexpected shape
//! is read as absent, never fails the rest. Token kinds have one meaning whatever the provider
//! (docs/FILTER.md, "Token meters"):
//!
//! | meter | OpenAI chat / compatible | OpenAI Responses | Anthropic |
//! |---|---|---|---|
//! | `input_tokens` (uncached) | `prompt_tokens` − cached | `input_tokens` − cached | `input_tokens` |
//! | `cached_input_tokens` | `prompt_tokens_details.cached_tokens` (DeepSeek `prompt_cache_hit_tokens`) | `input_tokens_details.cached_tokens` | `cache_read_input_tokens` |
//! | `cache_write_tokens` | 0 | 0 | `cache_creation_input_tokens` |
//! | `cache_write_5m_tokens`, `_1h_` | 0 | 0 | `cache_creation.ephemeral_{5m,1h}_input_tokens` |
//! | `output_tokens` (reasoning included) | `completion_tokens` | `output_tokens` | `output_tokens` |
//! | `reasoning_tokens` (part of output) | `completion_tokens_details.reasoning_tokens` | `output_tokens_details.reasoning_tokens` | — |
//! | `tokens` | every input kind + output | same | same |

use crate::payload::{Doc, Reported};

/// Token counts found in a response, each kind with its one meaning (module docs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TokenUsage {
    /// Input not read from a cache.
    pub input_tokens: Option<u64>,
    pub cached_input_tokens: Option<u64>,
    pub cache_write_tokens: Option<u64>,
    pub cache_write_5m_tokens: Option<u64>,
    pub cache_write_1h_tokens: Option<u64>,
    /// Output, reasoning included.
    pub output_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
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
    /// What the provider's usage object means, in our kinds.
    pub fn from_reported(r: &Reported) -> Self {
        let sub = |total: Option<u64>, part: u64| total.map(|t| t.saturating_sub(part));
        if r.prompt.is_some() {
            // Chat Completions and compatible APIs: prompt_tokens includes cached tokens.
            let cached = r.cached_details.or(r.cache_hit).unwrap_or(0);
            let cached = r.prompt.map_or(cached, |p| cached.min(p));
            TokenUsage {
                input_tokens: sub(r.prompt, cached),
                cached_input_tokens: Some(cached),
                cache_write_tokens: Some(0),
                cache_write_5m_tokens: Some(0),
                cache_write_1h_tokens: Some(0),
                output_tokens: r.completion.or(r.output),
                reasoning_tokens: r.reasoning,
            }
        } else if r.responses_shape {
            // The Responses API: input_tokens includes cached tokens.
            let cached = r.cached_details.unwrap_or(0);
            let cached = r.input.map_or(cached, |i| cached.min(i));
            TokenUsage {
                input_tokens: sub(r.input, cached),
                cached_input_tokens: r.input.map(|_| cached),
                cache_write_tokens: Some(0),
                cache_write_5m_tokens: Some(0),
                cache_write_1h_tokens: Some(0),
                output_tokens: r.output,
                reasoning_tokens: r.reasoning,
            }
        } else {
            // Anthropic: input_tokens excludes cache reads and writes.
            let known = |v: Option<u64>| v.or(r.input.map(|_| 0));
            let write = r.cache_write.or(match (r.cache_5m, r.cache_1h) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
            });
            let one_hour = known(r.cache_1h);
            let five_min = r
                .cache_5m
                .or_else(|| write.map(|w| w.saturating_sub(one_hour.unwrap_or(0))));
            TokenUsage {
                input_tokens: r.input,
                cached_input_tokens: known(r.cache_read),
                cache_write_tokens: known(write),
                cache_write_5m_tokens: known(five_min),
                cache_write_1h_tokens: one_hour,
                output_tokens: r.output,
                reasoning_tokens: r.reasoning,
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.input_tokens.is_none() && self.output_tokens.is_none()
    }

    /// The amount for one of the route's meters, if this usage says it.
    pub fn meter(&self, name: &str) -> Option<u64> {
        match name {
            "input_tokens" => self.input_tokens,
            "cached_input_tokens" | "cached_tokens" => self.cached_input_tokens,
            "cache_write_tokens" => self.cache_write_tokens,
            "cache_write_5m_tokens" => self.cache_write_5m_tokens,
            "cache_write_1h_tokens" => self.cache_write_1h_tokens,
            "output_tokens" => self.output_tokens,
            "reasoning_tokens" => self.reasoning_tokens,
            "tokens" | "total_tokens" => {
                if self.is_empty() {
                    return None;
                }
                Some(
                    [
                        self.input_tokens,
                        self.cached_input_tokens,
                        self.cache_write_tokens,
                        self.output_tokens,
                    ]
                    .into_iter()
                    .flatten()
                    .fold(0u64, u64::saturating_add),
                )
            }
            _ => None,
        }
    }
}

/// Most text kept from a response for counting its tokens when it carries no usage.
pub const MAX_TEXT: usize = 512 * 1024;

/// The generated output of a response that reported no usage: text, tool-call arguments and
/// reasoning, kept up to [`MAX_TEXT`] for the sidecar's tokenizer.
#[derive(Debug, Default)]
struct Generated {
    text: String,
    complete: bool,
}

impl Generated {
    fn new() -> Self {
        Generated {
            text: String::new(),
            complete: true,
        }
    }

    fn absorb(&mut self, doc: &Doc) {
        if !self.complete {
            return;
        }
        let text = &mut self.text;
        let mut fits = true;
        doc.for_each_output(&mut |t: &str| {
            if text.len().saturating_add(t.len()) > MAX_TEXT {
                fits = false;
            } else {
                text.push_str(t);
            }
        });
        self.complete = fits;
    }

    fn take(self) -> Option<String> {
        (self.complete && !self.text.is_empty()).then_some(self.text)
    }
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

    /// The usage, and the generated output when there was no usage (to count it instead).
    pub fn finish_with_text(self) -> (Result<TokenUsage, UsageError>, Option<String>) {
        if self.too_large {
            return (Err(UsageError::TooLarge), None);
        }
        let Some(doc) = Doc::parse(&self.buf) else {
            return (Err(UsageError::Malformed), None);
        };
        let mut reported = Reported::default();
        doc.report_usage(&mut reported);
        let u = TokenUsage::from_reported(&reported);
        if !u.is_empty() {
            return (Ok(u), None);
        }
        let mut g = Generated::new();
        g.absorb(&doc);
        (Err(UsageError::Missing), g.take())
    }
}

/// A `text/event-stream` body, read line by line as chunks arrive. Only the current line is
/// buffered (up to `max_line` bytes; a longer line is skipped), so a stream of any length costs
/// constant memory (plus the generated text, up to [`MAX_TEXT`]).
pub struct SseBody {
    line: Vec<u8>,
    max_line: usize,
    skipping: bool,
    reported: Reported,
    events: u64,
    unreadable: u64,
    skipped_lines: u64,
    generated: Generated,
}

impl SseBody {
    pub fn new(max_line: usize) -> Self {
        Self {
            line: Vec::new(),
            max_line,
            skipping: false,
            reported: Reported::default(),
            events: 0,
            unreadable: 0,
            skipped_lines: 0,
            generated: Generated::new(),
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
        match Doc::parse(data) {
            Some(doc) => {
                doc.report_usage(&mut self.reported);
                self.generated.absorb(&doc);
            }
            None => self.unreadable += 1,
        }
    }

    /// Events seen, unreadable events, over-long lines skipped.
    pub fn counts(&self) -> (u64, u64, u64) {
        (self.events, self.unreadable, self.skipped_lines)
    }

    /// The generated output seen so far, if all of it was kept.
    pub fn text(&self) -> Option<&str> {
        (self.generated.complete && self.skipped_lines == 0 && !self.generated.text.is_empty())
            .then_some(self.generated.text.as_str())
    }

    /// The usage so far (a stream that is still going may report more later).
    pub fn usage(&self) -> TokenUsage {
        TokenUsage::from_reported(&self.reported)
    }

    pub fn finish(self) -> Result<TokenUsage, UsageError> {
        self.finish_with_text().0
    }

    /// The usage, and the generated output when there was no usage (to count it instead) —
    /// also for a stream cut short, whose output is all the client received.
    pub fn finish_with_text(mut self) -> (Result<TokenUsage, UsageError>, Option<String>) {
        if !self.line.is_empty() || self.skipping {
            self.end_line(); // a last line without its newline
        }
        let mut usage = self.usage_result();
        if let Ok(u) = &mut usage {
            if !self.reported.output_final {
                // Anthropic's `message_start` counts the first output token only; a stream cut
                // before its `message_delta` has its output counted from what it carried.
                u.output_tokens = None;
                u.reasoning_tokens = None;
            }
        }
        let text = match usage {
            Err(UsageError::Missing) => self.text().map(str::to_string),
            Ok(u) if u.output_tokens.is_none() => self.text().map(str::to_string),
            _ => None,
        };
        (usage, text)
    }

    fn usage_result(&mut self) -> Result<TokenUsage, UsageError> {
        let u = self.usage();
        if !u.is_empty() {
            return Ok(u);
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
