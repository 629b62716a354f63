//! Authorizes past one callout per request, through the wasmtime host: while a worker's
//! authorize is out, further requests wait in the root context and go as one
//! `/v1/authorize/batch` callout as soon as it answers; the root answers each request (resumed,
//! refused, failed by its mode) and gives back what was held for a request that went away.

use serde_json::{json, Value};
use wasm_host::{Filter, HttpCall, CONTINUE, PAUSE};

fn config() -> String {
    json!({
        "sidecar": {"cluster": "sidecar", "timeout_ms": 200},
        "deadline_ms": 100,
        "key": {"header": "x-api-key"},
        "commit_batch": 10,
        "commit_interval_ms": 50,
        "routes": [
            {"name": "open", "path_prefix": "/open/", "failure_mode": "open",
             "charges": {"requests": {"fixed": 1}}},
            {"name": "closed", "path_prefix": "/closed/", "failure_mode": "closed",
             "charges": {"requests": {"fixed": 1}}},
            {"name": "chat", "method": "POST", "path_prefix": "/v1/chat/",
             "charges": {"requests": {"fixed": 1}, "output_tokens": {"body_field": "max_tokens", "cap": 4096}},
             "idempotency_header": "idempotency-key"}
        ]
    })
    .to_string()
}

fn load() -> Filter {
    let f = Filter::load(&config()).expect("filter loads");
    assert!(f.configured, "configuration refused: {:?}", f.logs());
    f
}

/// Starts a GET to `path`; returns its context and what it returned.
fn start(f: &mut Filter, path: &str, key: &str) -> (u32, i32) {
    let ctx = f.new_request().unwrap();
    let a = f
        .request_headers(
            ctx,
            &[(":method", "GET"), (":path", path), ("x-api-key", key)],
            true,
        )
        .unwrap();
    (ctx, a)
}

fn allowed(hold: &str, remaining: u64) -> Value {
    json!({"allowed": true, "status": 200, "account": "acme", "hold_id": hold, "credits": 0,
           "limit": {"name": "account:requests:minute", "max": 600, "remaining": remaining,
                     "reset_ms": 1_795_348_860_000u64}})
}

fn denied() -> Value {
    json!({"allowed": false, "status": 429, "reason": "limit", "retry_after_s": 30, "credits": 0,
           "limit": {"name": "account:requests:minute", "max": 600, "remaining": 0,
                     "reset_ms": 1_795_348_860_000u64}})
}

/// A first request whose own callout fills the line: (its context, its callout).
fn fill_the_line(f: &mut Filter) -> (u32, HttpCall) {
    let (ctx, a) = start(f, "/open/1", "k1");
    assert_eq!(a, PAUSE);
    (ctx, f.take_calls().remove(0))
}

/// The first request's callout answers (allowed, hold `acme/1`): the line has room.
fn free_the_line(f: &mut Filter, single: &HttpCall) {
    let body = allowed("acme/1", 9).to_string();
    f.answer(single.token, 200, body.as_bytes()).unwrap();
}

fn decided(d: Value) -> Value {
    json!({"decision": d})
}

fn answer_batch(f: &mut Filter, call: &HttpCall, results: Vec<Value>) {
    let body = json!({ "results": results }).to_string();
    f.answer(call.token, 200, body.as_bytes()).unwrap();
}

/// Ticks past the commit interval and returns the settlement callouts.
fn flush(f: &mut Filter) -> Vec<HttpCall> {
    f.advance_ms(60);
    f.tick().unwrap();
    f.take_calls()
}

#[test]
fn requests_that_come_while_an_authorize_is_out_go_as_one_batch_when_it_answers() {
    let mut f = load();
    let (first, a) = start(&mut f, "/open/1", "k1");
    assert_eq!(a, PAUSE);
    let calls = f.take_calls();
    assert_eq!(
        calls.len(),
        1,
        "the line is idle: no wait, a callout of its own"
    );
    assert_eq!(calls[0].header(":path"), Some("/v1/authorize"));

    // Three more while it is out: they wait, nothing is sent yet.
    let (r2, _) = start(&mut f, "/open/2", "k2");
    let (r3, _) = start(&mut f, "/closed/3", "k3");
    let (r4, _) = start(&mut f, "/closed/4", "k4");
    assert!(f.take_calls().is_empty(), "they wait for the line");

    // The first answers: it goes on, and the three go as one batch, in order, from the root.
    f.answer(
        calls[0].token,
        200,
        allowed("acme/1", 9).to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(f.resumed(first), 1);
    let batch = f.take_calls();
    assert_eq!(batch.len(), 1, "{batch:?}");
    let b = &batch[0];
    assert_eq!(b.header(":path"), Some("/v1/authorize/batch"));
    assert_eq!(b.context_id, 1, "sent by the root context");
    let keys: Vec<Value> = b.json()["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["api_key"].clone())
        .collect();
    assert_eq!(keys, [json!("k2"), json!("k3"), json!("k4")]);

    // Allowed, denied, and an item the sidecar could not decide (a closed route: 503).
    let failed = json!({"status": 503, "error": {"code": "unavailable", "message": "redis"}});
    answer_batch(
        &mut f,
        b,
        vec![decided(allowed("acme/2", 7)), decided(denied()), failed],
    );
    assert_eq!((f.resumed(r2), f.local_response(r2).is_none()), (1, true));
    assert_eq!(f.local_response(r3).map(|r| r.status), Some(429));
    assert_eq!(
        f.local_response(r3)
            .and_then(|r| r.header("retry-after").map(String::from)),
        Some("30".into())
    );
    assert_eq!(f.local_response(r4).map(|r| r.status), Some(503));
    assert_eq!(f.resumed(r3) + f.resumed(r4), 0);

    // The admitted request took up its decision: its limit headers, then its commit.
    assert_eq!(
        f.response_headers(r2, &[(":status", "200")], true).unwrap(),
        CONTINUE
    );
    assert_eq!(
        f.response_header(r2, "ratelimit-remaining").as_deref(),
        Some("7")
    );
    f.finish(r2).unwrap();
    for ctx in [first, r3, r4] {
        f.finish(ctx).unwrap();
    }
    let calls = flush(&mut f);
    assert_eq!(calls.len(), 1, "{calls:?}");
    let mut holds: Vec<String> = calls[0].json()["commits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["hold_id"].as_str().unwrap_or("").to_string())
        .collect();
    holds.sort();
    assert_eq!(holds, ["acme/1", "acme/2"]);
    assert_eq!(f.metric("tollgate.authorize_batches"), 1);
    assert_eq!(f.metric("tollgate.authorize_batched"), 3);
    assert_eq!(f.metric("tollgate.allowed"), 2);
    assert_eq!(f.metric("tollgate.denied"), 1);
    assert_eq!(f.metric("tollgate.failed_closed"), 1);
}

#[test]
fn a_request_that_goes_away_while_it_waits_is_never_sent_and_one_in_a_batch_is_given_back() {
    let mut f = load();
    let (first, single) = fill_the_line(&mut f);
    let (gone_early, _) = start(&mut f, "/open/2", "k2");
    let (gone_late, _) = start(&mut f, "/open/3", "k3");
    let (stays, _) = start(&mut f, "/open/4", "k4");
    // The client of the second leaves before the line frees: it is dropped from the queue.
    f.reset(gone_early).unwrap();
    free_the_line(&mut f, &single);
    let batch = f.take_calls();
    assert_eq!(batch.len(), 1);
    let sent: Vec<Value> = batch[0].json()["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["api_key"].clone())
        .collect();
    assert_eq!(
        sent,
        [json!("k3"), json!("k4")],
        "k2 left before it was sent"
    );
    // The third leaves while its batch is out; the answer admits it: its hold goes back.
    f.reset(gone_late).unwrap();
    answer_batch(
        &mut f,
        &batch[0],
        vec![decided(allowed("acme/3", 8)), decided(allowed("acme/4", 7))],
    );
    assert_eq!(f.resumed(stays), 1);
    for ctx in [first, stays] {
        f.response_headers(ctx, &[(":status", "200")], true)
            .unwrap();
        f.finish(ctx).unwrap();
    }
    let calls = flush(&mut f);
    let paths: Vec<(String, Value)> = calls
        .iter()
        .map(|c| (c.header(":path").unwrap_or("").to_string(), c.json()))
        .collect();
    assert!(
        paths
            .iter()
            .any(|(p, b)| p == "/v1/release" && b["hold_id"] == "acme/3"),
        "{paths:?}"
    );
    let commit = paths
        .iter()
        .find(|(p, _)| p == "/v1/commit/batch")
        .map(|(_, b)| b["commits"].clone())
        .unwrap();
    let holds: Vec<&Value> = commit
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["hold_id"])
        .collect();
    assert_eq!(holds, [&json!("acme/1"), &json!("acme/4")]);
    assert_eq!(
        f.metric("tollgate.decisions_cancelled"),
        0,
        "nothing to cancel"
    );
}

#[test]
fn a_batch_that_gets_no_answer_fails_each_request_by_its_mode_and_cancels_the_gone() {
    let mut f = load();
    let (_first, single) = fill_the_line(&mut f);
    let (open, _) = start(&mut f, "/open/2", "k2");
    let (closed, _) = start(&mut f, "/closed/3", "k3");
    let (gone, _) = start(&mut f, "/open/4", "k4");
    free_the_line(&mut f, &single);
    let batch = f.take_calls().remove(0);
    f.reset(gone).unwrap();
    // The sidecar's cluster timed out (Envoy answers without a status).
    f.answer(batch.token, 0, b"").unwrap();
    assert_eq!(
        (f.resumed(open), f.local_response(open).is_none()),
        (1, true)
    );
    assert_eq!(f.local_response(closed).map(|r| r.status), Some(503));
    // Whatever the batch may have held for the request that left is cancelled by its key.
    let keys = batch.json()["requests"][2]["idempotency_key"].clone();
    let calls = flush(&mut f);
    let cancels: Vec<Value> = calls
        .iter()
        .filter(|c| c.header(":path") == Some("/v1/cancel"))
        .map(|c| c.json())
        .collect();
    assert_eq!(cancels.len(), 1, "{calls:?}");
    assert_eq!(cancels[0]["idempotency_key"], keys);
    assert_eq!(cancels[0]["api_key"], "k4");
    // The open request passed unmetered: nothing is settled for it.
    f.response_headers(open, &[(":status", "200")], true)
        .unwrap();
    f.finish(open).unwrap();
    assert!(flush(&mut f).is_empty());
}

#[test]
fn a_waiting_request_past_its_deadline_gets_its_mode_and_is_never_sent() {
    let mut f = load();
    let (_first, single) = fill_the_line(&mut f);
    let (open, _) = start(&mut f, "/open/2", "k2");
    let (closed, _) = start(&mut f, "/closed/3", "k3");
    f.advance_ms(110);
    f.tick().unwrap();
    assert_eq!(f.resumed(open), 1);
    assert_eq!(f.local_response(closed).map(|r| r.status), Some(503));
    assert!(f.take_calls().is_empty(), "the line is still full");
    // The single answers late: nothing is left to send.
    free_the_line(&mut f, &single);
    assert!(
        f.take_calls()
            .iter()
            .all(|c| c.header(":path") != Some("/v1/authorize/batch")),
        "nothing waits any more"
    );
    // The request that failed open goes on unmetered.
    f.response_headers(open, &[(":status", "200")], true)
        .unwrap();
    f.finish(open).unwrap();
    let calls = flush(&mut f);
    assert!(
        calls
            .iter()
            .all(|c| c.header(":path") == Some("/v1/release")),
        "the late single's hold is given back, nothing else: {calls:?}"
    );
}

#[test]
fn a_replayed_client_key_in_a_batch_is_refused_409_and_a_body_route_waits_with_its_body() {
    let mut f = load();
    let (_first, single) = fill_the_line(&mut f);
    let ctx = f.new_request().unwrap();
    let headers = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("x-api-key", "k2"),
        ("idempotency-key", "order-7"),
    ];
    assert_eq!(f.request_headers(ctx, &headers, false).unwrap(), CONTINUE);
    assert_eq!(
        f.request_body(ctx, br#"{"max_tokens":50}"#, true).unwrap(),
        PAUSE
    );
    assert!(f.take_calls().is_empty());
    free_the_line(&mut f, &single);
    let batch = f.take_calls().remove(0);
    let item = &batch.json()["requests"][0];
    assert_eq!(item["idempotency_key"], "ik:order-7");
    assert_eq!(item["meters"]["output_tokens"], 50);
    answer_batch(
        &mut f,
        &batch,
        vec![json!({"decision": allowed("acme/ik:order-7", 5), "replayed": true})],
    );
    let r = f.local_response(ctx).expect("refused");
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["error"]["code"], "idempotency_key_reused");
    f.finish(ctx).unwrap();
    assert!(
        flush(&mut f).is_empty(),
        "the first request owns that hold: nothing is settled or given back"
    );
}

#[test]
fn authorize_batching_can_be_turned_off() {
    let cfg = config().replacen(
        "\"deadline_ms\"",
        "\"authorize_batch\":0,\"deadline_ms\"",
        1,
    );
    let mut f = Filter::load(&cfg).unwrap();
    assert!(f.configured);
    for k in ["k1", "k2", "k3"] {
        start(&mut f, "/open/x", k);
    }
    let calls = f.take_calls();
    assert_eq!(calls.len(), 3, "a callout per request");
    assert!(calls
        .iter()
        .all(|c| c.header(":path") == Some("/v1/authorize")));
    for bad in [
        "\"authorize_batch\":257,",
        "\"authorize_inflight\":0,",
        "\"authorize_inflight\":65,",
    ] {
        let cfg = config().replacen("\"deadline_ms\"", &format!("{bad}\"deadline_ms\""), 1);
        let f = Filter::load(&cfg).unwrap();
        assert!(!f.configured, "{bad} refused");
        assert!(
            f.logs().iter().any(|(_, m)| m.contains("authorize_")),
            "{:?}",
            f.logs()
        );
    }
}

#[test]
fn a_sidecar_without_the_batch_route_gets_each_request_on_its_own() {
    let mut f = load();
    let (first, single) = fill_the_line(&mut f);
    let (r2, _) = start(&mut f, "/open/2", "k2");
    let (r3, _) = start(&mut f, "/closed/3", "k3");
    free_the_line(&mut f, &single);
    let batch = f.take_calls().remove(0);
    // An older sidecar (a rolling upgrade): the route is unknown.
    let unknown = json!({"error": {"code": "not_found", "message": "no such route"}});
    f.answer(batch.token, 404, unknown.to_string().as_bytes())
        .unwrap();
    let again = f.take_calls();
    assert_eq!(again.len(), 2, "each sent again on its own: {again:?}");
    for (call, key) in again.iter().zip(["k2", "k3"]) {
        assert_eq!(call.header(":path"), Some("/v1/authorize"));
        assert_eq!(call.context_id, 1, "from the root, which answers it");
        assert_eq!(call.json()["api_key"], key);
    }
    f.answer(
        again[0].token,
        200,
        allowed("acme/2", 8).to_string().as_bytes(),
    )
    .unwrap();
    f.answer(again[1].token, 200, denied().to_string().as_bytes())
        .unwrap();
    assert_eq!((f.resumed(r2), f.local_response(r2).is_none()), (1, true));
    assert_eq!(f.local_response(r3).map(|r| r.status), Some(429));
    // From now on no request waits for the line: two at once, a callout each.
    let (_a, _) = start(&mut f, "/open/4", "k4");
    let (_b, _) = start(&mut f, "/open/5", "k5");
    let calls = f.take_calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls
        .iter()
        .all(|c| c.header(":path") == Some("/v1/authorize")));
    // A minute later it tries batches again.
    f.advance_ms(60_001);
    let (_c, _) = start(&mut f, "/open/6", "k6");
    assert!(f.take_calls().is_empty(), "waits for the line again");
    // The request the root answered settles as any other.
    for ctx in [first, r2] {
        f.response_headers(ctx, &[(":status", "200")], true)
            .unwrap();
        f.finish(ctx).unwrap();
    }
    let commits = flush(&mut f);
    let holds: Vec<Value> = commits
        .iter()
        .flat_map(|c| c.json()["commits"].as_array().cloned().unwrap_or_default())
        .map(|c| c["hold_id"].clone())
        .collect();
    assert_eq!(holds, [json!("acme/1"), json!("acme/2")]);
    assert!(f
        .logs()
        .iter()
        .any(|(_, m)| m.contains("no /v1/authorize/batch")));
}
