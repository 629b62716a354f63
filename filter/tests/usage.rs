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
        (Some(12), Some(34), Some(46))
    );
    assert_eq!(o.cached_tokens, Some(4));
    let a = json(ANTHROPIC_JSON).unwrap();
    assert_eq!(
        (
            a.meter("input_tokens"),
            a.meter("output_tokens"),
            a.meter("tokens")
        ),
        (Some(10), Some(20), Some(30))
    );
    assert_eq!(a.cached_tokens, Some(3));
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
        prop_assert_eq!(o.total_tokens, Some(9));
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
