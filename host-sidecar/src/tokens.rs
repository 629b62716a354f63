//! Counting tokens of text a response carried without a `usage` object (a stream that does not
//! report usage): the filter sends the text it saw, the sidecar counts it with the model's
//! tokenizer (tiktoken's BPE tables are compiled into the binary; nothing is downloaded).

use std::sync::OnceLock;
use tiktoken_rs::CoreBPE;

/// The tokenizer family of a model: o200k for the GPT-4o / GPT-4.1 / GPT-5 / o-series, cl100k
/// for GPT-4 and GPT-3.5, o200k when the model is unknown.
fn tokenizer(model: Option<&str>) -> Option<&'static CoreBPE> {
    static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();
    static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();
    let m = model.unwrap_or_default();
    let old = (m.starts_with("gpt-4") && !m.starts_with("gpt-4o") && !m.starts_with("gpt-4.1"))
        || m.starts_with("gpt-3.5");
    if old {
        CL100K
            .get_or_init(|| tiktoken_rs::cl100k_base().ok())
            .as_ref()
    } else {
        O200K
            .get_or_init(|| tiktoken_rs::o200k_base().ok())
            .as_ref()
    }
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

/// [`count`], off the async workers for long texts.
pub async fn count_async(model: Option<&str>, text: &str) -> u64 {
    if text.len() <= INLINE_BYTES {
        return count(model, text);
    }
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
