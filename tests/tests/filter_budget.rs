//! Stream budgets (`stream_budget`) through the wasmtime host: a stream outgrowing its hold is
//! held while the sidecar extends the hold, goes on when it does, and ends with a final event
//! the client's SDK understands when it does not — charged exactly what the client received.

use serde_json::{json, Value};
use wasm_host::{Filter, HttpCall, CONTINUE, PAUSE};

fn config() -> String {
    let route = |name: &str, prefix: &str, mode: &str| {
        json!({"name": name, "method": "POST", "path_prefix": prefix, "failure_mode": mode,
               "charges": {"requests": {"fixed": 1},
                           "output_tokens": {"body_field": "max_tokens", "default": 100, "cap": 100}},
               "usage": {"source": "body", "include_usage": false},
               "stream_budget": {"step": 100, "bytes_per_token": 4}})
    };
    json!({
        "sidecar": {"cluster": "sidecar", "timeout_ms": 200},
        "deadline_ms": 500,
        "key": {"header": "x-api-key"},
        "commit_interval_ms": 50,
        "routes": [route("chat", "/v1/", "closed"), route("open", "/open/", "open")]
    })
    .to_string()
}

fn allowed(hold: &str) -> Vec<u8> {
    json!({"allowed": true, "status": 200, "account": "acme", "hold_id": hold, "credits": 100, "balance": 200})
        .to_string()
        .into_bytes()
}

/// A request on `path`, admitted with hold `acme/<id>`, its SSE response headers sent.
fn admitted(f: &mut Filter, path: &str, id: &str) -> u32 {
    let ctx = f.new_request().unwrap();
    let headers = [
        (":method", "POST"),
        (":path", path),
        (":authority", "api"),
        ("x-api-key", "tg_key"),
    ];
    assert_eq!(f.request_headers(ctx, &headers, false).unwrap(), CONTINUE);
    assert_eq!(
        f.request_body(ctx, br#"{"stream":true}"#, true).unwrap(),
        PAUSE
    );
    let call = f.take_calls().remove(0);
    f.answer(call.token, 200, &allowed(&format!("acme/{id}")))
        .unwrap();
    f.response_headers(
        ctx,
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
    )
    .unwrap();
    ctx
}

fn openai_event(text: &str) -> String {
    format!(
        "data: {}\n\n",
        json!({"choices": [{"index": 0, "delta": {"content": text}}]})
    )
}

/// Streams `body` in chunks of `size` bytes; each extension the filter asks for is answered by
/// `answer(target)` (status, body). Returns the extension targets asked.
fn run(
    f: &mut Filter,
    ctx: u32,
    body: &[u8],
    size: usize,
    answer: &mut dyn FnMut(u64) -> (u16, Vec<u8>),
) -> Vec<u64> {
    let mut asked = Vec::new();
    let chunks: Vec<&[u8]> = body.chunks(size).collect();
    for (i, c) in chunks.iter().enumerate() {
        let action = f.response_body(ctx, c, i + 1 == chunks.len()).unwrap();
        // Answer extensions until the filter asks no more (a retry asks again at once).
        loop {
            let calls: Vec<HttpCall> = f.take_calls();
            if calls.is_empty() {
                break;
            }
            assert_eq!(action, PAUSE, "held while the hold is extended");
            for call in calls {
                assert_eq!(call.header(":path"), Some("/v1/extend"));
                let req = call.json();
                assert_eq!(req["hold_id"], format!("acme/{}", "s"), "{req}");
                let target = req["meters"]["output_tokens"].as_u64().unwrap();
                asked.push(target);
                let (status, body) = answer(target);
                f.answer(call.token, status, &body).unwrap();
            }
        }
    }
    asked
}

fn commit(f: &mut Filter, ctx: u32) -> Value {
    f.finish(ctx).unwrap();
    f.advance_ms(60);
    f.tick().unwrap();
    let calls = f.take_calls();
    assert_eq!(calls.len(), 1);
    calls[0].json()["commits"][0].clone()
}

/// How a delivered `" the"` event reads (the final event's message has the word too).
const THE: &str = r#""content":" the""#;

fn deny_credits(need: u64, balance: u64) -> (u16, Vec<u8>) {
    let d = json!({"allowed": false, "status": 402, "reason": "credits", "credits": need, "balance": balance});
    (200, d.to_string().into_bytes())
}

fn extended(target: u64) -> (u16, Vec<u8>) {
    let d = json!({"allowed": true, "status": 200, "hold_id": "acme/s", "credits": target});
    (200, d.to_string().into_bytes())
}

#[test]
fn a_stream_is_extended_twice_then_stopped_the_openai_way_and_charged_what_it_delivered() {
    for size in [37, 512, 4096, 1 << 20] {
        let mut f = Filter::load(&config()).unwrap();
        let ctx = admitted(&mut f, "/v1/chat/completions", "s");
        let mut body = openai_event("");
        body += &openai_event(" the").repeat(1000);
        body += "data: [DONE]\n\n";
        // 300 credits in all, one a token: the hold has 100, the balance 200 more.
        let mut covered = 100;
        let asked = run(&mut f, ctx, body.as_bytes(), size, &mut |t| {
            if t <= 300 {
                covered = t;
                extended(t)
            } else {
                deny_credits(t - covered, 300 - covered)
            }
        });
        if size <= 4096 {
            assert_eq!(asked, vec![200, 300, 400], "chunks of {size}");
        } else {
            // Many events at once: the hold is asked to cover them all, then what is left.
            assert!(asked.contains(&300) && asked[0] > 300, "{asked:?}");
        }
        let got = String::from_utf8(f.delivered(ctx)).unwrap();
        assert_eq!(got.matches(THE).count(), 300, "chunks of {size}");
        let tail = got.rsplit("\n\n").nth(2).unwrap();
        let err: Value = serde_json::from_str(tail.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(err["error"]["code"], "budget_exhausted", "{got}");
        assert_eq!(err["error"]["type"], "insufficient_quota");
        assert!(got.ends_with("data: [DONE]\n\n"));
        // Nothing of the upstream's answer after the final event.
        assert_eq!(got.matches("[DONE]").count(), 1);
        assert!(f.metric("tollgate.stream_extensions") >= 1);
        assert_eq!(f.metric("tollgate.streams_stopped"), 1);
        let c = commit(&mut f, ctx);
        assert_eq!(c["output_text"], " the".repeat(300), "chunks of {size}");
        // Counted exactly by the sidecar from the text; the estimate it falls back on is the
        // extended hold.
        assert_eq!(c["meters"]["output_tokens"], 300);
    }
}

#[test]
fn a_stream_that_fits_its_extensions_runs_to_its_end() {
    let mut f = Filter::load(&config()).unwrap();
    let ctx = admitted(&mut f, "/v1/chat/completions", "s");
    let mut body = openai_event(" the").repeat(250);
    body += &format!(
        "data: {}\n\ndata: [DONE]\n\n",
        json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 250}})
    );
    let asked = run(&mut f, ctx, body.as_bytes(), 1000, &mut extended);
    assert_eq!(asked, vec![200, 300]);
    assert_eq!(f.delivered(ctx), body.as_bytes());
    let c = commit(&mut f, ctx);
    assert_eq!(c["meters"]["output_tokens"], 250);
    assert_eq!(f.metric("tollgate.streams_stopped"), 0);
}

#[test]
fn a_refusal_for_credit_tries_what_the_balance_pays_and_a_limit_ends_an_anthropic_stream() {
    let mut f = Filter::load(&config()).unwrap();
    let ctx = admitted(&mut f, "/v1/messages", "s");
    let mut body = String::from(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n",
    );
    let delta = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"the \"}}\n\n";
    body += &delta.repeat(400);
    body += "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    let mut n = 0;
    let asked = run(&mut f, ctx, body.as_bytes(), 300, &mut |t| {
        n += 1;
        match n {
            // Half the credit the step needs: the next ask is for what the balance pays.
            1 => {
                let d = json!({"allowed": false, "status": 402, "reason": "credits", "credits": 100, "balance": 50});
                (200, d.to_string().into_bytes())
            }
            2 => extended(t),
            _ => {
                let d = json!({"allowed": false, "status": 429, "reason": "limit",
                               "limit": {"name": "account:output_tokens:day", "max": 150, "remaining": 0, "reset_ms": 0},
                               "credits": 100});
                (200, d.to_string().into_bytes())
            }
        }
    });
    assert_eq!(&asked[..2], &[200, 150], "{asked:?}");
    let got = String::from_utf8(f.delivered(ctx)).unwrap();
    assert_eq!(got.matches(r#""text":"the ""#).count(), 150, "{got}");
    assert!(
        got.ends_with("\n\n") && got.contains("event: error\ndata: "),
        "{got}"
    );
    let last = got.rsplit("event: error\ndata: ").next().unwrap();
    let err: Value = serde_json::from_str(last.trim_end()).unwrap();
    assert_eq!(err["type"], "error");
    assert_eq!(err["error"]["type"], "rate_limit_error");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("account:output_tokens:day"));
    assert!(!got.contains("[DONE]") && !got.contains("message_stop"));
    let c = commit(&mut f, ctx);
    assert_eq!(c["output_text"], "the ".repeat(150));
    assert_eq!(c["meters"]["requests"], 1);
}

#[test]
fn a_sidecar_that_cannot_extend_ends_a_closed_route_and_lets_an_open_one_run() {
    let mut body = openai_event(" the").repeat(200);
    body += "data: [DONE]\n\n";
    // Closed: the stream ends where the hold ends, with an `unavailable` error.
    let mut f = Filter::load(&config()).unwrap();
    let ctx = admitted(&mut f, "/v1/chat/completions", "s");
    let asked = run(&mut f, ctx, body.as_bytes(), 700, &mut |_| (503, vec![]));
    assert_eq!(asked, vec![200]);
    let got = String::from_utf8(f.delivered(ctx)).unwrap();
    assert_eq!(got.matches(THE).count(), 100);
    assert!(got.contains("\"code\":\"unavailable\""), "{got}");
    assert_eq!(f.metric("tollgate.failed_closed"), 1);
    let c = commit(&mut f, ctx);
    assert_eq!(c["output_text"], " the".repeat(100));

    // Open: the stream runs uncounted to its end; the commit charges all of it.
    let mut f = Filter::load(&config()).unwrap();
    let ctx = admitted(&mut f, "/open/chat", "s");
    let asked = run(&mut f, ctx, body.as_bytes(), 700, &mut |_| (0, vec![]));
    assert_eq!(asked, vec![200]);
    assert_eq!(f.delivered(ctx), body.as_bytes());
    assert_eq!(f.metric("tollgate.failed_open"), 1);
    let c = commit(&mut f, ctx);
    assert_eq!(c["output_text"], " the".repeat(200));
}

#[test]
fn a_client_that_leaves_while_the_hold_is_extended_is_charged_what_it_received() {
    let mut f = Filter::load(&config()).unwrap();
    let ctx = admitted(&mut f, "/v1/chat/completions", "s");
    let body = openai_event(" the").repeat(150);
    let (a, b) = body.as_bytes().split_at(openai_event(" the").len() * 80);
    assert_eq!(f.response_body(ctx, a, false).unwrap(), CONTINUE);
    assert_eq!(f.response_body(ctx, b, false).unwrap(), PAUSE);
    let calls = f.take_calls();
    assert_eq!(calls.len(), 1);
    // The client goes away before the sidecar answers: only what it received is charged.
    f.reset(ctx).unwrap();
    f.advance_ms(60);
    f.tick().unwrap();
    let calls = f.take_calls();
    let c = &calls.last().unwrap().json()["commits"][0];
    assert_eq!(c["output_text"], " the".repeat(80));
}

#[test]
fn a_stream_budget_needs_a_hold_of_its_own_and_a_read_stream() {
    for (patch, field) in [
        (
            json!({"lease": {"requests": 10}}),
            "routes[0].stream_budget",
        ),
        (
            json!({"usage": {"source": "estimate"}}),
            "routes[0].stream_budget",
        ),
        (
            json!({"stream_budget": {"step": 0}}),
            "routes[0].stream_budget.step",
        ),
        (
            json!({"stream_budget": {"bytes_per_token": 40}}),
            "routes[0].stream_budget.bytes_per_token",
        ),
        (
            json!({"charges": {"requests": {"fixed": 1}}}),
            "routes[0].stream_budget",
        ),
    ] {
        let mut cfg: Value = serde_json::from_str(&config()).unwrap();
        let route = cfg["routes"][0].as_object_mut().unwrap();
        for (k, v) in patch.as_object().unwrap() {
            route.insert(k.clone(), v.clone());
        }
        let f = Filter::load(&cfg.to_string()).unwrap();
        assert!(!f.configured, "{patch}");
        assert!(
            f.logs().iter().any(|(_, l)| l.contains(field)),
            "{patch}: {:?}",
            f.logs()
        );
    }
}
