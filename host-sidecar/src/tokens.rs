//! Counting tokens of text a response carried without a `usage` object (a stream that does not
//! report usage): the filter sends the text it saw, the sidecar counts it with the model's
//! tokenizer (tiktoken's BPE tables are compiled into the binary; nothing is downloaded).
//!
//! Building the tables from their compiled-in ranks takes a few hundred milliseconds (both in
//! about 0.3 s in a debug build with the tokenizer crates optimized, see the root Cargo.toml;
//! o200k alone took 0.6 s without): the server builds both at start ([`preload`], on the
//! blocking pool) and `/readyz` answers 503 until they are built ([`loaded`]), so no commit
//! pays for it.

use std::sync::OnceLock;
use tiktoken_rs::CoreBPE;

static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();
static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();

fn o200k() -> Option<&'static CoreBPE> {
    O200K
        .get_or_init(|| tiktoken_rs::o200k_base().ok())
        .as_ref()
}

fn cl100k() -> Option<&'static CoreBPE> {
    CL100K
        .get_or_init(|| tiktoken_rs::cl100k_base().ok())
        .as_ref()
}

/// The tokenizer family of a model: o200k for the GPT-4o / GPT-4.1 / GPT-5 / o-series, cl100k
/// for GPT-4 and GPT-3.5, o200k when the model is unknown.
fn tokenizer(model: Option<&str>) -> Option<&'static CoreBPE> {
    let m = model.unwrap_or_default();
    let old = (m.starts_with("gpt-4") && !m.starts_with("gpt-4o") && !m.starts_with("gpt-4.1"))
        || m.starts_with("gpt-3.5");
    if old {
        cl100k()
    } else {
        o200k()
    }
}

/// Builds both BPE tables now (blocking; a few hundred ms). Idempotent: later calls, and
/// counts, find them built; a count that comes while a preload runs waits for that table.
pub fn preload() {
    let started = std::time::Instant::now();
    let (a, b) = (o200k().is_some(), cl100k().is_some());
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        o200k = a,
        cl100k = b,
        "tokenizers built"
    );
}

/// Whether both tables are built (what `/readyz` reports as `tokenizers`).
pub fn loaded() -> bool {
    O200K.get().is_some() && CL100K.get().is_some()
}

/// Tokens in `text` for `model`.
pub fn count(model: Option<&str>, text: &str) -> u64 {
    match tokenizer(model) {
        Some(bpe) => bpe.encode_ordinary(text).len() as u64,
        // The tables are compiled in; this is only reached if they fail to parse.
        None => (text.len() as u64).div_ceil(4),
    }
}

/// Texts longer than this are counted on the blocking pool: BPE costs about a microsecond per
/// few bytes, and a long completion must not stall the decisions sharing this worker thread.
const INLINE_BYTES: usize = 16 * 1024;

/// The permits for counts on the blocking pool: one fewer than the cores, at least one.
fn counters() -> &'static tokio::sync::Semaphore {
    static PERMITS: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    PERMITS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        tokio::sync::Semaphore::new(cores.saturating_sub(1).max(1))
    })
}

/// [`count`], off the async workers for long texts and before the tables are built.
pub async fn count_async(model: Option<&str>, text: &str) -> u64 {
    // Inline only once the tables are built: a count that comes while the preload still runs
    // would wait for it on an async worker, stalling every decision on that thread.
    if text.len() <= INLINE_BYTES && loaded() {
        return count(model, text);
    }
    // At most all cores but one count at once: a burst of long streams (a hundred 100 KB
    // completions settling together) queues here instead of starving the async workers that
    // decide the next requests against their deadline. Settling waits; deciding does not.
    let _permit = counters().acquire().await;
    let (m, t) = (model.map(str::to_string), text.to_string());
    match tokio::task::spawn_blocking(move || count(m.as_deref(), &t)).await {
        Ok(n) => n,
        // The blocking pool is shutting down: count here rather than lose the number.
        Err(_) => count(model, text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_the_models_tokenizer() {
        assert_eq!(count(Some("gpt-4o"), "Hello world"), 2);
        assert_eq!(count(None, ""), 0);
        let long = "The quick brown fox jumps over the lazy dog. ".repeat(50);
        let (a, b) = (
            count(Some("gpt-4o-mini"), &long),
            count(Some("gpt-3.5-turbo"), &long),
        );
        assert!(a > 400 && b > 400, "{a} {b}");
    }

    #[test]
    fn preload_builds_both_tables() {
        preload();
        assert!(loaded());
        assert_eq!(count(Some("gpt-3.5-turbo"), "Hello world"), 2);
    }

    #[tokio::test]
    async fn long_texts_count_the_same_off_the_workers() {
        let long = "Tokens are counted exactly, whatever the length. ".repeat(1000);
        assert!(long.len() > INLINE_BYTES);
        assert_eq!(
            count_async(Some("gpt-4o"), &long).await,
            count(Some("gpt-4o"), &long)
        );
    }
}
