//! Tollgate's proxy-wasm filter: runs in every Envoy worker, asks the sidecar before a request
//! goes upstream, and settles the actual usage after the response.
//!
//! - [`config`]: the plugin configuration (validated; errors name the field) and route matching.
//! - [`http`]: one request's pipeline — key, estimate, authorize callout, local replies, usage
//!   measurement, settlement.
//! - [`root`]: the tick that enforces decision deadlines, sends settlements in batches and asks
//!   for leases.
//! - [`lease`]: local allowances for routes that opt in (no callout per request).
//! - [`usage`]: incremental usage extraction (JSON bodies, SSE streams, headers), panic-free.
//! - [`reply`], [`shared`]: local replies and RateLimit headers; state shared within a VM.
//!
//! No `unwrap`, `expect`, `panic` or indexing in this crate (denied by clippy in Cargo.toml):
//! a panic would take the request, or the whole VM, down.
//!
//! Tests: the pure parts are unit- and property-tested natively (`filter/tests/`); the compiled
//! `.wasm` runs in our wasmtime proxy-wasm host (`tests/tests/filter.rs`) and in a real Envoy
//! (`tests/tests/e2e_envoy.rs`).

pub mod authz;
pub mod body;
pub mod budget;
pub mod config;
pub mod http;
pub mod lease;
pub mod path;
pub mod payload;
pub mod reply;
pub mod root;
pub mod shared;
pub mod usage;
pub mod vecmap;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::<root::Root>::default()
    });
}}
