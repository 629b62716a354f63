//! A mock upstream that speaks enough of the OpenAI and Anthropic APIs for tests and the demo,
//! and behaves like them where a client could otherwise get usage for free:
//!
//! - `POST /v1/chat/completions` answers JSON, or an SSE stream when the body asks
//!   `"stream": true`; like OpenAI, a stream reports `usage` only when the request asks
//!   `stream_options.include_usage`. A model named `gpt-unknown` gets a 404 with an error body.
//!   A response is gzipped when the request accepts gzip (as real APIs do).
//! - `POST /v1/messages` answers Anthropic-shaped JSON or SSE, with cache reads and writes.
//! - Request headers shape the answer: `x-mock-no-usage: 1` (no `usage` at all),
//!   `x-mock-cached: 1` (4 of the 10 prompt tokens cached), `x-mock-tools: 1` (a stream of
//!   tool-call deltas only), `x-mock-text-bytes: N` (a stream carrying N bytes of text),
//!   `x-mock-stream-tokens: N` (a stream of N one-token events `" the"`, sent over time in
//!   groups of 20, reporting N completion tokens).
//! - `POST /v1/chat/stalled` sends one event and then stalls (for clients that give up).
//!
//! - `x-mock-delay-ms: N` (at most 10,000) holds a chat completion N ms before it answers, so
//!   requests overlap at the upstream.
//!
//! [`Mock::served`] counts the completions it generated: what a platform pays its provider for;
//! [`Mock::peak_in_flight`] the most chat completions it was working on at once.

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::json;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Tokens every completion reports: 10 in, 20 out.
pub const PROMPT_TOKENS: u64 = 10;
pub const COMPLETION_TOKENS: u64 = 20;
/// With `x-mock-cached`: cached prompt tokens (OpenAI), cache reads and writes (Anthropic).
pub const CACHED_TOKENS: u64 = 4;
pub const CACHE_READ_TOKENS: u64 = 5;
pub const CACHE_WRITE_TOKENS: u64 = 7;
/// The arguments of the tool call `x-mock-tools` streams.
pub const TOOL_ARGUMENTS: &str = r#"{"city":"Paris","unit":"celsius"}"#;

#[derive(Deserialize, Default)]
#[serde(default)]
struct StreamOptions {
    include_usage: bool,
}

/// The request fields the mock looks at.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Ask {
    model: String,
    stream: bool,
    stream_options: Option<StreamOptions>,
}

/// A running mock: its port, how many completions it served and how many it worked on at once.
#[derive(Clone)]
pub struct Mock {
    pub port: u16,
    served: Arc<AtomicU64>,
    load: Arc<Load>,
}

impl Mock {
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    /// The most chat completions in flight at once since the mock started.
    pub fn peak_in_flight(&self) -> u64 {
        self.load.peak.load(Ordering::SeqCst)
    }
}

/// Chat completions in flight now, and the most there were.
#[derive(Default)]
struct Load {
    now: AtomicU64,
    peak: AtomicU64,
}

/// Counts one completion in flight for as long as it lives.
struct InFlight(Arc<Load>);

impl InFlight {
    fn start(load: &Arc<Load>) -> Self {
        let n = load.now.fetch_add(1, Ordering::SeqCst) + 1;
        load.peak.fetch_max(n, Ordering::SeqCst);
        InFlight(load.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

fn flag(headers: &HeaderMap, name: &str) -> bool {
    headers.get(name).is_some()
}

/// Gzips the body when the request accepts gzip.
fn encoded(headers: &HeaderMap, content_type: &str, body: String) -> Response {
    let gzip = headers
        .get("accept-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("gzip"));
    if !gzip {
        return ([("content-type", content_type.to_string())], body).into_response();
    }
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = enc.write_all(body.as_bytes());
    let bytes = enc.finish().unwrap_or_default();
    (
        [
            ("content-type", content_type.to_string()),
            ("content-encoding", "gzip".to_string()),
        ],
        bytes,
    )
        .into_response()
}

fn sse(events: &[serde_json::Value]) -> String {
    let mut out = String::new();
    for e in events {
        out += &format!("data: {e}\n\n");
    }
    out + "data: [DONE]\n\n"
}

async fn completions(
    served: Arc<AtomicU64>,
    load: Arc<Load>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let _in_flight = InFlight::start(&load);
    let delay = headers
        .get("x-mock-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        .min(10_000);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let ask: Ask = serde_json::from_str(&body).unwrap_or_default();
    if ask.model == "gpt-unknown" {
        let err = json!({"error": {"message": "The model `gpt-unknown` does not exist",
                                   "type": "invalid_request_error", "code": "model_not_found"}});
        return (axum::http::StatusCode::NOT_FOUND, axum::Json(err)).into_response();
    }
    served.fetch_add(1, Ordering::SeqCst);
    let cached = if flag(&headers, "x-mock-cached") {
        CACHED_TOKENS
    } else {
        0
    };
    let usage = (!flag(&headers, "x-mock-no-usage")).then(|| {
        json!({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
               "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
               "prompt_tokens_details": {"cached_tokens": cached}})
    });
    if !ask.stream {
        let mut v = json!({"choices": [{"message": {"content": "Hello from the mock"}}]});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        return encoded(&headers, "application/json", v.to_string());
    }
    if let Some(n) = headers
        .get("x-mock-stream-tokens")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        let usage = (ask.stream_options.is_some_and(|o| o.include_usage)
            && !flag(&headers, "x-mock-no-usage"))
        .then(|| json!({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}));
        return token_stream(n.min(100_000), usage);
    }
    let mut events = Vec::new();
    if flag(&headers, "x-mock-tools") {
        events.push(json!({"choices": [{"delta": {"role": "assistant", "content": null, "tool_calls":
            [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}}]}));
        for part in TOOL_ARGUMENTS.as_bytes().chunks(6) {
            let part = String::from_utf8_lossy(part);
            events.push(json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": part}}]}}]}));
        }
    } else if let Some(n) = headers
        .get("x-mock-text-bytes")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        let word = "tollgate meters every token ";
        for _ in 0..n.div_ceil(word.len()) {
            events.push(json!({"choices": [{"delta": {"content": word}}], "usage": null}));
        }
    } else {
        for word in ["Hel", "lo", " from", " the", " mock"] {
            events.push(json!({"choices": [{"delta": {"content": word}}], "usage": null}));
        }
    }
    let asked = ask.stream_options.is_some_and(|o| o.include_usage);
    if let (Some(u), true) = (usage, asked) {
        events.push(json!({"choices": [], "usage": u}));
    }
    encoded(&headers, "text/event-stream", sse(&events))
}

async fn messages(served: Arc<AtomicU64>, headers: HeaderMap, body: String) -> Response {
    let ask: Ask = serde_json::from_str(&body).unwrap_or_default();
    served.fetch_add(1, Ordering::SeqCst);
    let usage = json!({"input_tokens": PROMPT_TOKENS, "output_tokens": COMPLETION_TOKENS,
        "cache_read_input_tokens": CACHE_READ_TOKENS, "cache_creation_input_tokens": CACHE_WRITE_TOKENS,
        "cache_creation": {"ephemeral_5m_input_tokens": CACHE_WRITE_TOKENS, "ephemeral_1h_input_tokens": 0}});
    if !ask.stream {
        let v = json!({"type": "message", "content": [{"type": "text", "text": "Hello from the mock"}],
                       "usage": usage});
        return encoded(&headers, "application/json", v.to_string());
    }
    let mut start = usage.clone();
    start["output_tokens"] = json!(1);
    let events = [
        (
            "message_start",
            json!({"type": "message_start", "message": {"content": [], "usage": start}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": COMPLETION_TOKENS}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ];
    let mut out = String::new();
    for (name, e) in events {
        out += &format!("event: {name}\ndata: {e}\n\n");
    }
    encoded(&headers, "text/event-stream", out)
}

/// `n` events of one token each, in groups of 20 a millisecond apart (as a model streams),
/// then the usage (if asked) and `[DONE]`.
fn token_stream(n: u64, usage: Option<serde_json::Value>) -> Response {
    let event = format!(
        "data: {}\n\n",
        json!({"choices": [{"index": 0, "delta": {"content": " the"}}], "usage": null})
    );
    let groups = n.div_ceil(20);
    let events = futures::stream::unfold(0u64, move |g| {
        let (event, usage) = (event.clone(), usage.clone());
        async move {
            if g > groups {
                return None;
            }
            if g == groups {
                let mut last = String::new();
                if let Some(u) = usage {
                    last += &format!("data: {}\n\n", json!({"choices": [], "usage": u}));
                }
                last += "data: [DONE]\n\n";
                return Some((Ok::<_, std::io::Error>(last), g + 1));
            }
            if g > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let k = (n - g * 20).min(20) as usize;
            Some((Ok(event.repeat(k)), g + 1))
        }
    });
    (
        [("content-type", "text/event-stream")],
        axum::body::Body::from_stream(events),
    )
        .into_response()
}

/// Like a real API it reads the whole request first (the filter holds the body back until the
/// request is authorized), then sends one event and stalls.
async fn stalled(_body: String) -> Response {
    let first = format!(
        "data: {}\n\n",
        json!({"choices": [{"delta": {"content": "He"}}], "usage": null})
    );
    let events = futures::stream::unfold(0u8, move |n| {
        let first = first.clone();
        async move {
            match n {
                0 => Some((Ok::<_, std::io::Error>(first), 1)),
                _ => {
                    tokio::time::sleep(Duration::from_secs(20)).await;
                    None
                }
            }
        }
    });
    (
        [("content-type", "text/event-stream")],
        axum::body::Body::from_stream(events),
    )
        .into_response()
}

/// Starts the mock on a loopback port (it lives as long as the runtime).
pub async fn start_mock() -> std::io::Result<Mock> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let served = Arc::new(AtomicU64::new(0));
    let load = Arc::new(Load::default());
    let (c, m, l) = (served.clone(), served.clone(), load.clone());
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            post(move |h: HeaderMap, b: String| completions(c.clone(), l.clone(), h, b)),
        )
        .route(
            "/v1/messages",
            post(move |h: HeaderMap, b: String| messages(m.clone(), h, b)),
        )
        .route("/v1/chat/stalled", post(stalled));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(Mock { port, served, load })
}

/// Starts the mock; returns its port.
pub async fn start() -> std::io::Result<u16> {
    start_mock().await.map(|m| m.port)
}
