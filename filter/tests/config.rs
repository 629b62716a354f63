//! The plugin configuration: validation that names the field, and route matching.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]
use proptest::prelude::*;
use tollgate_filter::config::*;

const GOOD: &str = r#"{
    "sidecar": {"cluster": "tollgate"},
    "key": {"header": "x-api-key"},
    "routes": [
        {"name": "chat", "method": "POST", "path_prefix": "/v1/chat/",
         "charges": {"requests": {"fixed": 1},
                     "output_tokens": {"body_field": "max_tokens", "default": 256, "cap": 4096}},
         "usage": {"source": "body"}, "model_field": "model"},
        {"name": "files", "host": "files.example.com",
         "charges": {"bytes": {"fixed": 0}}, "usage": {"source": "bytes", "meter": "bytes"}}
    ]
}"#;

#[test]
fn a_good_config_parses_with_defaults() {
    let c = FilterConfig::parse(GOOD.as_bytes()).unwrap();
    assert_eq!(c.deadline_ms, 100);
    assert_eq!(c.failure_mode, FailureMode::Closed);
    assert_eq!(c.routes[0].charges["output_tokens"].cap, Some(4096));
    assert_eq!(c.key, KeySource::Header("x-api-key".into()));
}

#[test]
fn bad_configs_name_the_field() {
    let cases = [
        ("{", "configuration"),
        (
            r#"{"sidecar":{"cluster":""},"key":"bearer","routes":[]}"#,
            "sidecar.cluster",
        ),
        (
            r#"{"sidecar":{"cluster":"c"},"key":"bearer","routes":[]}"#,
            "routes",
        ),
        (
            r#"{"sidecar":{"cluster":"c"},"key":{"header":"X-Key"},"routes":[{"name":"a","charges":{"requests":{"fixed":1}}}]}"#,
            "key.header",
        ),
        (
            r#"{"sidecar":{"cluster":"c"},"key":"bearer","routes":[{"name":"a b","charges":{"requests":{"fixed":1}}}]}"#,
            "routes[0].name",
        ),
        (
            r#"{"sidecar":{"cluster":"c"},"key":"bearer","routes":[{"name":"a","charges":{"t":{"body_field":"max_tokens","default":10,"cap":5}}}]}"#,
            "routes[0].charges.t.cap",
        ),
        (
            r#"{"sidecar":{"cluster":"c"},"key":"bearer","routes":[{"name":"a","charges":{"t":{}}}]}"#,
            "routes[0].charges.t",
        ),
        (
            r#"{"sidecar":{"cluster":"c"},"key":"bearer","routes":[{"name":"a","charges":{"t":{"fixed":1}},"usage":{"source":"bytes","meter":"b"}}]}"#,
            "routes[0].usage.meter",
        ),
        (
            r#"{"sidecar":{"cluster":"c"},"key":"bearer","routes":[{"name":"a","charges":{"t":{"fixed":1}}}],"bogus":1}"#,
            "bogus",
        ),
    ];
    for (text, field) in cases {
        let e = FilterConfig::parse(text.as_bytes()).unwrap_err();
        assert!(e.to_string().contains(field), "{e} does not name {field}");
    }
}

#[test]
fn routes_match_method_host_and_path() {
    let c = FilterConfig::parse(GOOD.as_bytes()).unwrap();
    assert_eq!(
        c.route_for("POST", "api", "/v1/chat/completions?x=1")
            .unwrap()
            .name,
        "chat"
    );
    assert!(c.route_for("GET", "api", "/v1/chat/completions").is_none());
    assert_eq!(
        c.route_for("GET", "FILES.example.com:8443", "/a")
            .unwrap()
            .name,
        "files"
    );
    assert!(c.route_for("GET", "other", "/a").is_none());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Arbitrary bytes are refused with an error, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = FilterConfig::parse(&bytes);
    }

    /// A valid configuration with one byte changed parses or is refused with a field; a route
    /// it accepts still matches without panicking.
    #[test]
    fn mutated_configurations_never_panic(at in 0usize..2000, byte in any::<u8>(), path in "[ -~]{0,40}") {
        let mut bytes = GOOD.as_bytes().to_vec();
        let i = at % bytes.len();
        bytes[i] = byte;
        if let Ok(c) = FilterConfig::parse(&bytes) {
            let _ = c.route_for("POST", "api:x", &path);
        } else {
            prop_assert!(!FilterConfig::parse(&bytes).unwrap_err().field.is_empty());
        }
    }
}
