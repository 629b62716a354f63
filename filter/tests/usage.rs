//! Usage extraction from JSON bodies and SSE streams, split at any byte, and fuzzed.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]
use proptest::prelude::*;
use tollgate_filter::usage::*;

const OPENAI_JSON: &str = r#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46,"prompt_tokens_details":{"cached_tokens":4}}}"#;
const ANTHROPIC_JSON: &str = r#"{"id":"m","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":10,"output_tokens":20,"cache_read_input_tokens":3}}"#;
const OPENAI_SSE: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"he\"}}],\"usage\":null}\n\n\
data: {\"choices\":[{\"delta\":{\"content\":\"llo\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n\
data: [DONE]\n\n";
const ANTHROPIC_SSE: &str = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\r\n\r\n\
event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"Hi\"}}\r\n\r\n\
event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\r\n\r\n\
event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n";

fn json(body: &str) -> Result<TokenUsage, UsageError> {
    let mut j = JsonBody::new(1 << 20);
    j.feed(body.as_bytes());
    j.finish()
}

fn sse_chunks(body: &[u8], cuts: &[usize]) -> Result<TokenUsage, UsageError> {
    let mut s = SseBody::new(64 * 1024);
    let mut at = 0;
    for &c in cuts {
        let c = c.clamp(at, body.len());
        s.feed(&body[at..c]);
        at = c;
    }
    s.feed(&body[at..]);
    s.finish()
}

#[test]
fn json_bodies_of_both_shapes() {
    let o = json(OPENAI_JSON).unwrap();
    assert_eq!(
        (
            o.meter("input_tokens"),
            o.meter("output_tokens"),
            o.meter("tokens")
        ),
        (Some(8), Some(34), Some(46))
    );
    assert_eq!(o.cached_input_tokens, Some(4));
    let a = json(ANTHROPIC_JSON).unwrap();
    assert_eq!(
        (
            a.meter("input_tokens"),
            a.meter("output_tokens"),
            a.meter("tokens")
        ),
        (Some(10), Some(20), Some(33))
    );
    assert_eq!(a.cached_input_tokens, Some(3));
}

#[test]
fn broken_bodies_are_errors_not_panics() {
    assert_eq!(
        json(r#"{"usage": {"prompt_tokens": 1"#),
        Err(UsageError::Malformed)
    );
    assert_eq!(json(r#"{"choices": []}"#), Err(UsageError::Missing));
    assert_eq!(
        json(r#"{"usage": {"prompt_tokens": -1}}"#),
        Err(UsageError::Missing)
    );
    let mut j = JsonBody::new(10);
    j.feed(OPENAI_JSON.as_bytes());
    assert_eq!(j.finish(), Err(UsageError::TooLarge));
    let mut s = SseBody::new(16);
    s.feed(OPENAI_SSE.as_bytes());
    assert_eq!(s.finish(), Err(UsageError::TooLarge));
    assert_eq!(
        sse_chunks(b"data: {nope\n\ndata: [x\n\n", &[]),
        Err(UsageError::Malformed)
    );
    assert_eq!(header_amount(" 42 "), Some(42));
    for bad in ["", "-1", "4.2", "1e3", "99999999999999999999"] {
        assert_eq!(header_amount(bad), None, "{bad}");
    }
}

#[test]
fn streams_of_both_shapes_at_every_split() {
    for (body, want) in [(OPENAI_SSE, (7, 2)), (ANTHROPIC_SSE, (25, 15))] {
        let b = body.as_bytes();
        for cut in 0..=b.len() {
            let u = sse_chunks(b, &[cut]).unwrap();
            assert_eq!(
                (u.input_tokens.unwrap(), u.output_tokens.unwrap()),
                want,
                "cut at {cut}"
            );
        }
        // Byte by byte.
        let cuts: Vec<usize> = (0..b.len()).collect();
        assert!(sse_chunks(b, &cuts).is_ok());
    }
    // A final event without its newline still counts.
    let u = sse_chunks(
        b"data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":5}}",
        &[],
    )
    .unwrap();
    assert_eq!(u.output_tokens, Some(5));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_split_of_a_stream_reads_the_same(cuts in proptest::collection::vec(0usize..700, 0..12)) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        let a = sse_chunks(ANTHROPIC_SSE.as_bytes(), &cuts).unwrap();
        prop_assert_eq!((a.input_tokens, a.output_tokens), (Some(25), Some(15)));
        let o = sse_chunks(OPENAI_SSE.as_bytes(), &cuts).unwrap();
        prop_assert_eq!(o.meter("tokens"), Some(9));
    }

    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..2048),
                                   cuts in proptest::collection::vec(0usize..2048, 0..8)) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        let _ = sse_chunks(&body, &cuts);
        let mut j = JsonBody::new(1024);
        j.feed(&body);
        let _ = j.finish();
    }

    #[test]
    fn arbitrary_sse_lines_never_panic(lines in proptest::collection::vec("(data: |event: |: )?[ -~]{0,80}", 0..40)) {
        let body = lines.join("\n");
        let _ = sse_chunks(body.as_bytes(), &[body.len() / 2]);
    }
}

#[test]
fn without_usage_the_generated_text_is_kept_for_counting() {
    let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: [DONE]\n\n";
    let mut s = SseBody::new(1024);
    for c in sse.as_bytes().chunks(5) {
        s.feed(c);
    }
    assert_eq!(s.text(), Some("Hello"));
    assert_eq!(s.finish(), Err(UsageError::Missing));
    let anthropic = "data: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi there\"}}\n\n";
    let mut s = SseBody::new(1024);
    s.feed(anthropic.as_bytes());
    assert_eq!(s.text(), Some("Hi there"));
    let mut j = JsonBody::new(4096);
    j.feed(br#"{"choices":[{"message":{"content":"Bonjour"}}]}"#);
    let (r, text) = j.finish_with_text();
    assert_eq!(
        (r, text.as_deref()),
        (Err(UsageError::Missing), Some("Bonjour"))
    );
    // With usage, no text is needed.
    let mut j = JsonBody::new(4096);
    j.feed(OPENAI_JSON.as_bytes());
    assert!(j.finish_with_text().1.is_none());
}

/// One meaning per token kind, whatever the provider (docs/FILTER.md, "Token meters").
#[test]
fn token_kinds_mean_the_same_across_providers() {
    // In the order of the shared list the sidecar accepts.
    let kinds = |u: &TokenUsage| tollgate_protocol::TOKEN_METERS.map(|m| u.meter(m));
    // OpenAI: prompt_tokens includes the cached ones, completion_tokens the reasoning ones.
    let o = json(r#"{"usage":{"prompt_tokens":1000,"completion_tokens":300,"total_tokens":1300,
        "prompt_tokens_details":{"cached_tokens":600},"completion_tokens_details":{"reasoning_tokens":200}}}"#).unwrap();
    assert_eq!(
        kinds(&o),
        [
            Some(400),
            Some(600),
            Some(0),
            Some(0),
            Some(0),
            Some(300),
            Some(200),
            Some(1300)
        ]
    );
    // DeepSeek reports its cache hits beside prompt_tokens.
    let d = json(r#"{"usage":{"prompt_tokens":1000,"completion_tokens":10,"prompt_cache_hit_tokens":900,"prompt_cache_miss_tokens":100}}"#).unwrap();
    assert_eq!(
        (d.input_tokens, d.cached_input_tokens),
        (Some(100), Some(900))
    );
    // The Responses API: input_tokens includes the cached ones.
    let r = json(r#"{"output":[],"usage":{"input_tokens":1000,"input_tokens_details":{"cached_tokens":600},
        "output_tokens":300,"output_tokens_details":{"reasoning_tokens":200},"total_tokens":1300}}"#).unwrap();
    assert_eq!(kinds(&r), kinds(&o));
    // Anthropic: input_tokens excludes cache reads and writes; writes by TTL where reported.
    let a = json(r#"{"content":[],"usage":{"input_tokens":400,"cache_read_input_tokens":600,
        "cache_creation_input_tokens":250,"cache_creation":{"ephemeral_5m_input_tokens":200,"ephemeral_1h_input_tokens":50},
        "output_tokens":300}}"#).unwrap();
    assert_eq!(
        kinds(&a),
        [
            Some(400),
            Some(600),
            Some(250),
            Some(200),
            Some(50),
            Some(300),
            None,
            Some(1550)
        ]
    );
    // Without the TTL breakdown every write is a 5-minute write.
    let a =
        json(r#"{"usage":{"input_tokens":5,"cache_creation_input_tokens":70,"output_tokens":1}}"#)
            .unwrap();
    assert_eq!(
        (
            a.cache_write_tokens,
            a.cache_write_5m_tokens,
            a.cache_write_1h_tokens
        ),
        (Some(70), Some(70), Some(0))
    );
    // An odd field does not lose the rest.
    let odd = json(r#"{"usage":{"prompt_tokens":10,"completion_tokens":2.5,"prompt_tokens_details":"x","total_tokens":"12"}}"#).unwrap();
    assert_eq!(
        (odd.input_tokens, odd.output_tokens, odd.cached_input_tokens),
        (Some(10), None, Some(0))
    );
}

fn sse_text(body: &str) -> (Result<TokenUsage, UsageError>, Option<String>) {
    let mut s = SseBody::new(64 * 1024);
    s.feed(body.as_bytes());
    s.finish_with_text()
}

#[test]
fn output_without_usage_is_everything_generated() {
    // OpenAI tool calls only: the arguments are the output.
    let (u, text) = sse_text(concat!(
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"index\":0,\"id\":\"c\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\":\"}}]}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"Paris\\\"}\"}}]}}]}\n\n",
        "data: [DONE]\n\n"
    ));
    assert_eq!(u, Err(UsageError::Missing));
    assert_eq!(text.as_deref(), Some("get_weather{\"city\":\"Paris\"}"));
    // DeepSeek-style reasoning before the answer.
    let (_, text) = sse_text(concat!(
        "data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"think \"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"answer\"}}]}\n\n"
    ));
    assert_eq!(text.as_deref(), Some("think answer"));
    // Anthropic: thinking, text and a tool's input_json_delta, cut before message_delta: the
    // first output token message_start reports is not the output.
    let (u, text) = sse_text(concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"content\":[],\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"hmm \"}}\n\n",
        "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"ok \"}}\n\n",
        "data: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"f\",\"input\":{}}}\n\n",
        "data: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":1}\"}}\n\n"
    ));
    let u = u.unwrap();
    assert_eq!((u.input_tokens, u.output_tokens), (Some(25), None));
    assert_eq!(text.as_deref(), Some("hmm ok {\"a\":1}"));
    // Responses API deltas (text and function arguments), not audio.
    let (_, text) = sse_text(concat!(
        "data: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n",
        "data: {\"type\":\"response.function_call_arguments.delta\",\"delta\":\"{}\"}\n\n",
        "data: {\"type\":\"response.audio.delta\",\"delta\":\"AAAA\"}\n\n"
    ));
    assert_eq!(text.as_deref(), Some("Hi{}"));
    // A whole Anthropic body with a tool_use block and no usage.
    let mut j = JsonBody::new(1 << 20);
    j.feed(br#"{"content":[{"type":"text","text":"calling"},{"type":"tool_use","name":"f","input":{"city":"Paris","days":3}}]}"#);
    let (u, text) = j.finish_with_text();
    assert_eq!(u, Err(UsageError::Missing));
    assert_eq!(text.as_deref(), Some("callingcity Paris days 3"));
}
