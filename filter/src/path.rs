//! One path, one route: the path a route is matched on is the path the upstream will serve.
//!
//! The shipped Envoy configurations normalize paths before the filter sees them
//! (`normalize_path`, `merge_slashes`, `path_with_escaped_slashes_action: REJECT_REQUEST`), but
//! the filter does not rely on it: whatever Envoy sends, [`normalize`] gives the canonical form —
//! query and fragment dropped, percent-encoded unreserved characters decoded (`%76%31` → `v1`),
//! other escapes upper-cased, doubled slashes merged, `.` and `..` segments resolved (RFC 3986
//! §5.2.4). A path that cannot be made canonical (an encoded `/` or `\`, a broken escape, a
//! control character) is refused: its meaning differs between servers, so no route can be sure
//! of it. The filter matches the canonical path and, when it differs from what was sent,
//! forwards the canonical one, so the upstream serves exactly what was charged for.

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not starting with `/` (after Envoy, only a malformed request).
    NotAbsolute,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// `%2F`, `%5C`: a slash that is not one.
    EncodedSeparator,
    /// A byte below 0x21 or 0x7f and above, raw or encoded.
    Control,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The canonical form of a request's `:path` (without its query), or why it has none.
pub fn normalize(raw: &str) -> Result<String, PathError> {
    let path = raw.split(['?', '#']).next().unwrap_or(raw).as_bytes();
    if path.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Decode what may be decoded; keep the rest escaped.
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = path.get(i) {
        if b == b'%' {
            let (Some(h), Some(l)) = (
                path.get(i + 1).copied().and_then(hex),
                path.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let c = h * 16 + l;
            if c == b'/' || c == b'\\' {
                return Err(PathError::EncodedSeparator);
            }
            if c < 0x21 || c == 0x7f {
                return Err(PathError::Control);
            }
            if unreserved(c) {
                decoded.push(c);
            } else {
                decoded.push(b'%');
                decoded.extend_from_slice(&[upper_hex(h), upper_hex(l)]);
            }
            i += 3;
            continue;
        }
        if b < 0x21 || b == 0x7f {
            return Err(PathError::Control);
        }
        decoded.push(b);
        i += 1;
    }
    // Segments: empty ones (doubled slashes) and `.` dropped, `..` pops.
    let mut out: Vec<&[u8]> = Vec::new();
    let segments: Vec<&[u8]> = decoded.split(|b| *b == b'/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            b"" | b"." => trailing_slash = n == last,
            b".." => {
                out.pop();
                trailing_slash = n == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut s = String::with_capacity(decoded.len());
    for seg in &out {
        s.push('/');
        s.push_str(&String::from_utf8_lossy(seg));
    }
    if s.is_empty() || trailing_slash {
        s.push('/');
    }
    Ok(s)
}

fn upper_hex(n: u8) -> u8 {
    if n < 10 {
        b'0' + n
    } else {
        b'A' + n - 10
    }
}

/// The query part of a `:path`, with its `?` (empty if none).
pub fn query(raw: &str) -> &str {
    let end = raw.find('#').unwrap_or(raw.len());
    match raw.find('?') {
        Some(q) if q < end => raw.get(q..end).unwrap_or(""),
        _ => "",
    }
}
