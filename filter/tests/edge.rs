//! The filter's defences against a caller who would like to pay less: canonical paths and
//! route matching, estimates that cannot be dodged, and the one body change it makes.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]
use proptest::prelude::*;
use tollgate_filter::body::{Field, RequestBody};
use tollgate_filter::config::FilterConfig;
use tollgate_filter::path::{normalize, query, PathError};

#[test]
fn every_spelling_of_a_path_has_one_canonical_form() {
    for p in [
        "/v1/chat/completions",
        "//v1/chat/completions",
        "/./v1/chat/completions",
        "/%76%31/chat/completions",
        "/v1//chat///completions",
        "/x/../v1/chat/completions",
        "/v1/chat/./completions?stream=1",
        "/v1/%63hat/completions#frag",
        "/../v1/chat/completions",
    ] {
        assert_eq!(normalize(p).unwrap(), "/v1/chat/completions", "{p}");
    }
    assert_eq!(normalize("/v1/chat/").unwrap(), "/v1/chat/");
    assert_eq!(normalize("/").unwrap(), "/");
    assert_eq!(normalize("/v1/..").unwrap(), "/");
    assert_eq!(normalize("/a%2bb").unwrap(), "/a%2Bb");
    assert_eq!(normalize("/a%2Fb"), Err(PathError::EncodedSeparator));
    assert_eq!(normalize("/a%5cb"), Err(PathError::EncodedSeparator));
    assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
    assert_eq!(normalize("/a%2"), Err(PathError::BadEscape));
    assert_eq!(normalize("/a%00"), Err(PathError::Control));
    assert_eq!(normalize("/a b"), Err(PathError::Control));
    assert_eq!(normalize("v1"), Err(PathError::NotAbsolute));
    assert_eq!(query("/a?b=1#c"), "?b=1");
    assert_eq!(query("/a#c?d"), "");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    /// Normalizing is idempotent and never panics, and a canonical path has no doubled
    /// slashes or dot segments left.
    #[test]
    fn normalizing_is_idempotent(raw in "(/|[a-z]|\\.|%[0-9a-fA-F]{2}|%|\\?|#){0,40}") {
        if let Ok(n) = normalize(&raw) {
            prop_assert_eq!(normalize(&n).unwrap(), n.clone());
            prop_assert!(!n.contains("//"));
            prop_assert!(!n.split('/').any(|s| s == "." || s == ".."));
        }
    }
}

fn config(routes: serde_json::Value) -> FilterConfig {
    FilterConfig::parse(
        serde_json::json!({"sidecar": {"cluster": "s"}, "key": "bearer", "routes": routes})
            .to_string()
            .as_bytes(),
    )
    .unwrap()
}

#[test]
fn routes_match_the_canonical_path_case_insensitively_unless_told() {
    let cfg = config(serde_json::json!([
        {"name": "exact", "path_prefix": "/Exact/", "case_sensitive": true, "charges": {"requests": {"fixed": 1}}},
        {"name": "chat", "host": "api.example.com", "path_prefix": "/v1/chat/", "charges": {"requests": {"fixed": 1}}}
    ]));
    let route = |host: &str, path: &str| cfg.route_for("POST", host, path).map(|r| r.name.as_str());
    assert_eq!(
        route("api.example.com", "/V1/Chat/completions"),
        Some("chat")
    );
    assert_eq!(route("API.example.com.", "/v1/chat/x"), Some("chat"));
    assert_eq!(route("api.example.com.:443", "/v1/chat/x"), Some("chat"));
    assert_eq!(route("api.example.com", "/v1/cha"), None);
    assert_eq!(route("x", "/Exact/a"), Some("exact"));
    assert_eq!(route("x", "/exact/a"), None);
}

#[test]
fn estimate_fields_read_only_non_negative_integers() {
    let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let b = RequestBody::parse(br#"{"max_completion_tokens": 700, "max_tokens": "8192", "model": "gpt-4o", "stream": true}"#).unwrap();
    assert_eq!(
        b.amount(&names(&["max_completion_tokens", "max_tokens"])),
        Field::Value(700)
    );
    assert_eq!(
        b.amount(&names(&["max_tokens", "max_completion_tokens"])),
        Field::Bad
    );
    assert_eq!(b.amount(&names(&["max_output_tokens"])), Field::Missing);
    assert_eq!(b.string("model").as_deref(), Some("gpt-4o"));
    assert!(b.streams() && !b.includes_usage());
    for bad in [
        r#"{"n": 8192.0}"#,
        r#"{"n": -1}"#,
        r#"{"n": null}"#,
        r#"{"n": 1, "n": 99999}"#,
        r#"{"n": 1e3}"#,
    ] {
        let b = RequestBody::parse(bad.as_bytes()).unwrap();
        assert_eq!(b.amount(&names(&["n"])), Field::Bad, "{bad}");
    }
    for not_an_object in ["[1]", "\"x\"", "{", "", "{\"a\":1} x"] {
        assert!(
            RequestBody::parse(not_an_object.as_bytes()).is_none(),
            "{not_an_object}"
        );
    }
}

#[test]
fn include_usage_is_added_and_nothing_else_changes() {
    let patch = |s: &str| {
        let b = RequestBody::parse(s.as_bytes()).unwrap();
        let out = b.with_include_usage();
        serde_json::from_slice::<serde_json::Value>(&out).unwrap()
    };
    let v =
        patch(r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi \"x\""}]}"#);
    assert_eq!(
        v["stream_options"],
        serde_json::json!({"include_usage": true})
    );
    assert_eq!(v["messages"][0]["content"], "hi \"x\"");
    let v = patch(r#"{"stream":true,"stream_options":{"include_usage":false,"other":1}}"#);
    assert_eq!(
        v["stream_options"],
        serde_json::json!({"include_usage": true, "other": 1})
    );
    // A second stream_options (where the last one wins) is dropped.
    let out = RequestBody::parse(
        br#"{"stream":true,"stream_options":{},"stream_options":{"include_usage":false}}"#,
    )
    .unwrap()
    .with_include_usage();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        r#"{"stream":true,"stream_options":{"include_usage":true}}"#
    );
    let b =
        RequestBody::parse(br#"{"stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
    assert!(b.includes_usage());
}

#[test]
fn body_field_charges_need_a_cap_and_take_lists() {
    let parse = |charge: serde_json::Value| {
        FilterConfig::parse(
            serde_json::json!({"sidecar": {"cluster": "s"}, "key": "bearer",
                "routes": [{"name": "r", "charges": {"output_tokens": charge}}]})
            .to_string()
            .as_bytes(),
        )
    };
    assert!(parse(
        serde_json::json!({"body_field": ["max_tokens", "max_completion_tokens"], "cap": 100})
    )
    .is_ok());
    assert!(parse(serde_json::json!({"body_field": "max_tokens", "default": 100})).is_ok());
    let e = parse(serde_json::json!({"body_field": "max_tokens"})).unwrap_err();
    assert_eq!(e.field, "routes[0].charges.output_tokens.cap");
    let e = parse(serde_json::json!({"body_field": [], "cap": 1})).unwrap_err();
    assert_eq!(e.field, "routes[0].charges.output_tokens.body_field");
}
