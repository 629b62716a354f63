//! A mock upstream that speaks enough of the OpenAI chat API for tests and the demo:
//! `POST /v1/chat/completions` answers JSON, or an SSE stream when the body asks `"stream":true`;
//! with `x-mock-no-usage: 1` the answer carries no `usage`; `POST /v1/chat/stalled` sends one
//! event and then stalls (for clients that give up mid-stream).

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;
use std::time::Duration;

/// Tokens every completion reports: 10 in, 20 out.
pub const PROMPT_TOKENS: u64 = 10;
pub const COMPLETION_TOKENS: u64 = 20;

async fn completions(headers: HeaderMap, body: String) -> Response {
    let with_usage = headers.get("x-mock-no-usage").is_none();
    let usage = if with_usage {
        json!({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
               "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS})
    } else {
        serde_json::Value::Null
    };
    if body.contains("\"stream\":true") {
        let mut events = String::new();
        for word in ["Hel", "lo", " from", " the", " mock"] {
            events += &format!(
                "data: {}\n\n",
                json!({"choices": [{"delta": {"content": word}}], "usage": null})
            );
        }
        if with_usage {
            events += &format!("data: {}\n\n", json!({"choices": [], "usage": usage}));
        }
        events += "data: [DONE]\n\n";
        ([("content-type", "text/event-stream")], events).into_response()
    } else {
        let mut v = json!({"choices": [{"message": {"content": "Hello from the mock"}}]});
        if with_usage {
            v["usage"] = usage;
        }
        axum::Json(v).into_response()
    }
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

/// Starts the mock on a loopback port (it lives as long as the runtime); returns the port.
pub async fn start() -> std::io::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/chat/stalled", post(stalled));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(port)
}
