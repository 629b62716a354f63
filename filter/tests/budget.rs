//! Stream budgets: counting a stream against its hold, the steps asked, and the final events.
#![allow(clippy::unwrap_used, clippy::panic)]
use tollgate_filter::budget::*;
use tollgate_protocol::{Decision, DenyReason};

fn chunk(text: &str) -> String {
    format!(
        "data: {}\n\n",
        serde_json::json!({"choices": [{"delta": {"content": text}}]})
    )
}

#[test]
fn events_within_the_hold_pass_and_the_next_asks_for_a_step() {
    let mut b = StreamBudget::new(3, 10, 4);
    let held = chunk(" the").repeat(3);
    assert_eq!(b.judge(held.as_bytes(), false), Verdict::Pass);
    b.passed(held.as_bytes());
    assert_eq!(b.delivered(), 3);
    let more = chunk(" the");
    assert_eq!(b.judge(more.as_bytes(), false), Verdict::Extend(13));
    b.asking(13);
    b.extended();
    assert_eq!(b.covered, 13);
    assert_eq!(b.judge(more.as_bytes(), false), Verdict::Pass);
}

#[test]
fn a_line_cut_in_two_waits_for_its_end() {
    let mut b = StreamBudget::new(100, 10, 4);
    let e = chunk(" the");
    let (head, _) = e.split_at(10);
    assert_eq!(b.judge(head.as_bytes(), false), Verdict::Wait);
    assert_eq!(b.judge(head.as_bytes(), true), Verdict::Pass);
}

#[test]
fn a_refusal_keeps_what_fits_and_ends_the_stream_the_openai_way() {
    let mut b = StreamBudget::new(2, 10, 4);
    let held = chunk(" the").repeat(5);
    let Verdict::Extend(t) = b.judge(held.as_bytes(), false) else {
        panic!("should extend")
    };
    b.asking(t);
    let (cut, last) = b.stop(
        held.as_bytes(),
        &Stop::Refused {
            reason: Some(DenyReason::Credits),
            limit: None,
        },
    );
    assert_eq!(cut, chunk(" the").len() * 2);
    assert_eq!(b.delivered(), 2);
    let last = String::from_utf8(last).unwrap();
    assert!(last.starts_with("data: {\"error\""), "{last}");
    assert!(last.ends_with("data: [DONE]\n\n"), "{last}");
    assert!(b.stopped() && !b.active());
}

#[test]
fn typed_streams_end_with_an_error_event_and_open_events_are_closed_first() {
    let mut b = StreamBudget::new(0, 10, 4);
    let start = "event: message_start\ndata: {\"type\":\"message_start\"}\n";
    b.judge(start.as_bytes(), false);
    b.passed(start.as_bytes());
    let (cut, last) = b.stop(b"", &Stop::Unavailable);
    assert_eq!(cut, 0);
    let last = String::from_utf8(last).unwrap();
    assert!(last.starts_with("\nevent: error\ndata: "), "{last}");
}

#[test]
fn a_refusal_for_credit_retries_with_what_the_balance_pays() {
    let mut b = StreamBudget::new(100, 100, 4);
    b.asking(200);
    let d = Decision {
        allowed: false,
        status: 402,
        reason: Some(DenyReason::Credits),
        account: None,
        hold_id: None,
        hold_expires_ms: None,
        limit: None,
        retry_after_s: None,
        credits: 100,
        balance: Some(40),
        shadow: vec![],
        over: vec![],
    };
    assert_eq!(b.retry_smaller(&d), Some(140));
    let none_left = Decision {
        balance: Some(0),
        ..d
    };
    assert_eq!(b.retry_smaller(&none_left), None);
}

#[test]
fn usage_events_count_when_they_say_more_than_the_bytes() {
    let mut b = StreamBudget::new(10, 10, 4);
    let e = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":50}}\n\n";
    assert_eq!(b.judge(e.as_bytes(), false), Verdict::Extend(50));
    let junk = "data: not json at all\n\n";
    let mut c = StreamBudget::new(1, 10, 4);
    assert!(matches!(
        c.judge(junk.as_bytes(), false),
        Verdict::Extend(_)
    ));
}
