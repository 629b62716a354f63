//! Tollgate's proxy-wasm filter (issue 3, in progress).
//!
//! What exists so far are the filter's pure parts, unit-tested natively:
//! - [`config`]: the plugin configuration, validated with errors that name the field, and route
//!   matching (method, host, path prefix or exact);
//! - [`usage`]: incremental usage extraction from JSON bodies and SSE streams (OpenAI and
//!   Anthropic shapes), usage headers, with size caps and no panics on any input.
//!
//! The proxy-wasm contexts (authorize callout, deadline on tick, local replies, batched commits)
//! and the wasmtime host that tests the compiled `.wasm` come next.

pub mod config;
pub mod usage;
