//! The benchmark's ceiling for any callout design: a proxy-wasm filter that makes exactly one
//! `dispatch_http_call` per request (`POST /noop` on the `tollgate_sidecar` cluster), waits for
//! the answer and lets the request go on, whatever it said. No parsing, no configuration, no
//! settlement. Tollgate's own filter is measured against it (BENCHMARKS.md).
//!
//! `cargo build --profile wasm --target wasm32-wasip1 -p tollgate-filter --example noop_callout`

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot) });
}}

struct NoopRoot;

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(NoopRequest))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct NoopRequest;

impl Context for NoopRequest {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        let _ = hostcalls::resume_http_request();
    }
}

impl HttpContext for NoopRequest {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        let sent = hostcalls::dispatch_http_call(
            "tollgate_sidecar",
            vec![
                (":method", "POST"),
                (":path", "/noop"),
                (":authority", "tollgate-sidecar"),
            ],
            Some(b"{}"),
            vec![],
            Duration::from_secs(1),
        );
        match sent {
            Ok(_) => Action::Pause,
            Err(_) => Action::Continue,
        }
    }
}
