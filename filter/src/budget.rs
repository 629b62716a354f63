//! Stopping a stream when its budget runs out (a route's `stream_budget`).
//!
//! A streaming response is counted as it passes: each SSE event's generated output (text,
//! tool-call arguments, reasoning) at `bytes_per_token`, or the count the stream's own usage
//! events report, whichever is higher. Events pass whole while the count stays within what the
//! hold covers. When the next events would pass it, the response is held (Envoy buffers it)
//! and the filter asks the sidecar to extend the hold (`/v1/extend`, one atomic script against
//! the same limits and balance). Extended: the held events go on. Refused: the events that fit
//! go on, then a final event the client's SDK understands (an OpenAI-shaped error chunk and
//! `[DONE]`, or an Anthropic-shaped `error` event), and nothing more of the upstream's answer.
//! The commit then counts exactly what was delivered (see [`crate::usage`]).
//!
//! Nothing here trusts the upstream's framing: a line without its end waits for the rest (or
//! the end of the stream), and an event that cannot be read counts by its bytes.

use crate::payload::{Doc, Reported};
use crate::usage::TokenUsage;
use tollgate_protocol::{Decision, DenyReason};

/// How many times a refused extension is retried with a smaller step (what the refusal says
/// is left) before the stream is stopped.
const RETRIES: u8 = 2;

/// One SSE event's end in a held buffer, and the output counted up to it.
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// Offset just past the event's blank line.
    end: usize,
    bytes: u64,
    reported: u64,
}

/// What to do with the response body held now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// All of it fits the hold: let it go.
    Pass,
    /// It ends inside a line: hold it until the rest comes.
    Wait,
    /// Its events need the hold raised to this total of the metered output first.
    Extend(u64),
}

/// Why the stream was stopped, for its final event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The sidecar refused to extend the hold (a limit, or the balance).
    Refused {
        reason: Option<DenyReason>,
        limit: Option<String>,
    },
    /// The sidecar could not be asked, on a route that fails closed.
    Unavailable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Passing,
    /// An extension is out: the response is held.
    Extending {
        target: u64,
        step: u64,
        retries: u8,
    },
    /// The final event went out: the rest of the upstream's answer is dropped.
    Stopped,
    /// The sidecar could not extend and the route fails open: counted no more.
    Off,
}

#[derive(Debug)]
pub struct StreamBudget {
    /// The output the hold covers now (the meter `output_tokens`).
    pub covered: u64,
    step: u64,
    bytes_per_token: u64,
    /// Output passed to the client: its bytes, and the highest count its usage events reported.
    bytes: u64,
    reported: u64,
    /// The stream names its events (`event:` lines): Anthropic's shape, and the Responses API's.
    typed: bool,
    /// What was passed ends after a line that is not an event's end (its final event must end
    /// that event first).
    open_event: bool,
    state: State,
    pub extensions: u32,
    /// The last judged body's length and count, so passing it does not read it again.
    judged: Option<(usize, Mark, bool)>,
}

impl StreamBudget {
    pub fn new(covered: u64, step: u64, bytes_per_token: u64) -> Self {
        StreamBudget {
            covered,
            step: step.max(1),
            bytes_per_token: bytes_per_token.max(1),
            bytes: 0,
            reported: 0,
            typed: false,
            open_event: false,
            state: State::Passing,
            extensions: 0,
            judged: None,
        }
    }

    fn count(&self, bytes: u64, reported: u64) -> u64 {
        bytes.div_ceil(self.bytes_per_token).max(reported)
    }

    /// The output counted so far (what was passed).
    pub fn delivered(&self) -> u64 {
        self.count(self.bytes, self.reported)
    }

    pub fn stopped(&self) -> bool {
        self.state == State::Stopped
    }

    /// Counting is on: the stream is neither stopped nor left to run unbudgeted.
    pub fn active(&self) -> bool {
        matches!(self.state, State::Passing | State::Extending { .. })
    }

    pub fn extending(&self) -> bool {
        matches!(self.state, State::Extending { .. })
    }

    /// The events of `held` (the whole response body held now, whose start follows what was
    /// passed), with the output counted at each event's end; and whether `held` ends at a line
    /// end.
    fn scan(&mut self, held: &[u8]) -> (Vec<Mark>, Mark, bool) {
        self.judged = None;
        let mut marks = Vec::new();
        let mut at = Mark {
            end: 0,
            bytes: self.bytes,
            reported: self.reported,
        };
        let mut pos = 0;
        while let Some(n) = held
            .get(pos..)
            .and_then(|r| r.iter().position(|b| *b == b'\n'))
        {
            let line = held.get(pos..pos + n).unwrap_or_default();
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            pos += n + 1;
            if line.is_empty() {
                at.end = pos;
                marks.push(at);
            } else if line.starts_with(b"event:") {
                self.typed = true;
            } else if let Some(data) = line.strip_prefix(b"data:") {
                let data = data.strip_prefix(b" ").unwrap_or(data);
                let (bytes, reported) = event_output(data);
                at.bytes = at.bytes.saturating_add(bytes);
                at.reported = at.reported.max(reported.unwrap_or(0));
            }
        }
        at.end = pos;
        (marks, at, pos == held.len())
    }

    /// Judges the held body. `end_of_stream`: nothing more will come.
    pub fn judge(&mut self, held: &[u8], end_of_stream: bool) -> Verdict {
        if !self.active() {
            return Verdict::Pass;
        }
        let (marks, all, whole_lines) = self.scan(held);
        let ends_event = marks.last().is_some_and(|m| m.end == held.len());
        self.judged = Some((held.len(), all, ends_event));
        let need = self.count(all.bytes, all.reported);
        if need > self.covered {
            let short = need - self.covered;
            let steps = short.div_ceil(self.step);
            return Verdict::Extend(
                self.covered
                    .saturating_add(steps.saturating_mul(self.step))
                    .min(tollgate_protocol::MAX_AMOUNT),
            );
        }
        if !whole_lines && !end_of_stream {
            return Verdict::Wait;
        }
        Verdict::Pass
    }

    /// The held body passes whole: count it as delivered.
    pub fn passed(&mut self, held: &[u8]) {
        if !self.active() {
            return;
        }
        let (all, ends_event) = match self.judged.take() {
            Some((len, all, ends)) if len == held.len() => (all, ends),
            _ => {
                let (marks, all, _) = self.scan(held);
                (all, marks.last().is_some_and(|m| m.end == held.len()))
            }
        };
        self.bytes = all.bytes;
        self.reported = all.reported;
        // Open if the body's last line is not an event's end.
        if !held.is_empty() {
            self.open_event = !ends_event;
        }
    }

    /// An extension to `target` is being asked.
    pub fn asking(&mut self, target: u64) {
        let (step, retries) = match self.state {
            State::Extending { step, retries, .. } => (step, retries),
            _ => (target.saturating_sub(self.covered), RETRIES),
        };
        self.state = State::Extending {
            target,
            step,
            retries,
        };
    }

    /// The sidecar extended the hold.
    pub fn extended(&mut self) {
        if let State::Extending { target, .. } = self.state {
            self.covered = self.covered.max(target);
            self.extensions += 1;
        }
        self.state = State::Passing;
    }

    /// The sidecar refused: a smaller extension to try (what the refusal says is left), if any.
    pub fn retry_smaller(&mut self, d: &Decision) -> Option<u64> {
        let State::Extending {
            target,
            step,
            retries,
        } = self.state
        else {
            return None;
        };
        let wanted = target.saturating_sub(self.covered);
        if retries == 0 || wanted == 0 {
            return None;
        }
        let smaller = match d.reason {
            // Credit is priced per unit of output (near enough): take what the balance pays.
            Some(DenyReason::Credits) => {
                let (need, left) = (d.credits, d.balance.unwrap_or(0));
                (need > 0).then(|| {
                    u64::try_from(u128::from(wanted) * u128::from(left) / u128::from(need))
                        .unwrap_or(0)
                })?
            }
            Some(DenyReason::Limit) => d.limit.as_ref().map_or(0, |l| l.remaining),
            _ => 0,
        }
        .min(wanted.saturating_sub(1));
        if smaller == 0 {
            return None;
        }
        let target = self.covered.saturating_add(smaller);
        self.state = State::Extending {
            target,
            step,
            retries: retries - 1,
        };
        Some(target)
    }

    /// The sidecar could not extend and the route fails open: the stream goes on uncounted
    /// (its commit still charges what it used).
    pub fn give_up(&mut self) {
        self.state = State::Off;
    }

    /// Stops the stream: returns how much of `held` still fits the hold (a prefix ending at an
    /// event's end; counted as delivered) and the final event to send after it.
    pub fn stop(&mut self, held: &[u8], why: &Stop) -> (usize, Vec<u8>) {
        let (marks, _, _) = self.scan(held);
        let fit = marks
            .iter()
            .rev()
            .find(|m| self.count(m.bytes, m.reported) <= self.covered)
            .copied();
        let cut = match fit {
            Some(m) => {
                self.bytes = m.bytes;
                self.reported = m.reported;
                self.open_event = false;
                m.end
            }
            None => 0,
        };
        self.state = State::Stopped;
        (cut, self.final_event(why))
    }

    fn final_event(&self, why: &Stop) -> Vec<u8> {
        let delivered = self.delivered();
        let (kind, code, message) = match why {
            Stop::Refused {
                reason: Some(DenyReason::Limit),
                limit,
            } => (
                "rate_limit_error",
                "limit_reached",
                format!(
                    "the stream was stopped after about {delivered} output tokens: the limit {} is reached",
                    limit.as_deref().unwrap_or("of this account")
                ),
            ),
            Stop::Refused { .. } => (
                "billing_error",
                "budget_exhausted",
                format!(
                    "the stream was stopped after about {delivered} output tokens: the account's credit ran out"
                ),
            ),
            Stop::Unavailable => (
                "api_error",
                "unavailable",
                format!(
                    "the stream was stopped after about {delivered} output tokens: usage limits cannot be checked right now"
                ),
            ),
        };
        let mut out = Vec::new();
        if self.open_event {
            out.push(b'\n');
        }
        if self.typed {
            // Anthropic's shape (its SDK raises it as an API error; there is no [DONE]).
            let e = TypedError {
                kind: "error",
                error: ErrorBody {
                    kind,
                    message: &message,
                    code,
                    param: None,
                },
            };
            out.extend_from_slice(b"event: error\ndata: ");
            out.extend_from_slice(&serde_json::to_vec(&e).unwrap_or_default());
            out.extend_from_slice(b"\n\n");
        } else {
            // OpenAI's shape: a chunk with `error` (its SDK raises APIError), then [DONE].
            let openai_type = match kind {
                "rate_limit_error" => "rate_limit_exceeded",
                "billing_error" => "insufficient_quota",
                _ => "server_error",
            };
            let e = ChunkError {
                error: ErrorBody {
                    kind: openai_type,
                    message: &message,
                    code,
                    param: Some(()),
                },
            };
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&serde_json::to_vec(&e).unwrap_or_default());
            out.extend_from_slice(b"\n\ndata: [DONE]\n\n");
        }
        out
    }
}

/// A stream's final error: Anthropic's `error` event, or OpenAI's error chunk.
#[derive(serde::Serialize)]
struct TypedError<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    error: ErrorBody<'a>,
}

#[derive(serde::Serialize)]
struct ChunkError<'a> {
    error: ErrorBody<'a>,
}

#[derive(serde::Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
    code: &'a str,
    /// OpenAI's chunk has `"param": null`; Anthropic's error has no such field.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "null")]
    param: Option<()>,
}

fn null<S: serde::Serializer>(_: &Option<()>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_none()
}

/// One event's generated output in bytes, and the output count its usage reports (if any).
fn event_output(data: &[u8]) -> (u64, Option<u64>) {
    if data == b"[DONE]" || data.is_empty() {
        return (0, None);
    }
    let Some(doc) = Doc::parse(data) else {
        // Not JSON: counted by its bytes (an upstream cannot hide output by breaking it).
        return (data.len() as u64, None);
    };
    let mut bytes = 0u64;
    doc.for_each_output(&mut |t: &str| bytes = bytes.saturating_add(t.len() as u64));
    let mut r = Reported::default();
    doc.report_usage(&mut r);
    (bytes, TokenUsage::from_reported(&r).output_tokens)
}
