//! Glob matching for `KEYS` and `CONFIG GET`: a port of Redis' `stringmatchlen` (`*`, `?`,
//! `[abc]`, `[^a]`, `[a-z]`, `\` escapes), so patterns match the same keys as in Redis.
//! Like newer Redis versions, a pattern nesting more than 1000 `*` matches nothing, so a
//! hostile pattern cannot exhaust the stack.

/// Whether `s` matches the glob `pattern` (case-sensitive).
pub fn matches(pattern: &[u8], s: &[u8]) -> bool {
    let mut skip_longer = false;
    match_impl(pattern, s, &mut skip_longer, 0)
}

const MAX_NESTING: usize = 1000;

fn at(b: &[u8], i: usize) -> u8 {
    b.get(i).copied().unwrap_or(0)
}

fn match_impl(pat: &[u8], s: &[u8], skip_longer: &mut bool, nesting: usize) -> bool {
    if nesting > MAX_NESTING {
        return false;
    }
    let (mut p, mut i) = (0usize, 0usize);
    while p < pat.len() && i < s.len() {
        match pat[p] {
            b'*' => {
                while p + 1 < pat.len() && pat[p + 1] == b'*' {
                    p += 1;
                }
                if p + 1 == pat.len() {
                    return true;
                }
                while i < s.len() {
                    if match_impl(&pat[p + 1..], &s[i..], skip_longer, nesting + 1) {
                        return true;
                    }
                    if *skip_longer {
                        return false;
                    }
                    i += 1;
                }
                *skip_longer = true;
                return false;
            }
            b'?' => i += 1,
            b'[' => {
                p += 1;
                let not = at(pat, p) == b'^';
                if not {
                    p += 1;
                }
                let mut hit = false;
                loop {
                    let c = at(pat, p);
                    if c == b'\\' && pat.len() - p >= 2 {
                        p += 1;
                        if pat[p] == s[i] {
                            hit = true;
                        }
                    } else if c == b']' && p < pat.len() {
                        break;
                    } else if p >= pat.len() {
                        p -= 1;
                        break;
                    } else if pat.len() - p >= 3 && pat[p + 1] == b'-' {
                        let (mut start, mut end) = (pat[p], pat[p + 2]);
                        if start > end {
                            std::mem::swap(&mut start, &mut end);
                        }
                        p += 2;
                        if (start..=end).contains(&s[i]) {
                            hit = true;
                        }
                    } else if c == s[i] {
                        hit = true;
                    }
                    p += 1;
                }
                if not {
                    hit = !hit;
                }
                if !hit {
                    return false;
                }
                i += 1;
            }
            c => {
                let c = if c == b'\\' && pat.len() - p >= 2 {
                    p += 1;
                    pat[p]
                } else {
                    c
                };
                if c != s[i] {
                    return false;
                }
                i += 1;
            }
        }
        p += 1;
        if i == s.len() {
            while at(pat, p) == b'*' && p < pat.len() {
                p += 1;
            }
            break;
        }
    }
    p >= pat.len() && i == s.len()
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs() {
        assert!(matches(b"*", b"abc"));
        assert!(matches(b"a*", b"abc"));
        assert!(matches(b"a*c", b"abc"));
        assert!(matches(b"a?c", b"abc"));
        assert!(!matches(b"a?c", b"ac"));
        assert!(matches(b"a[bx]c", b"abc"));
        assert!(matches(b"a[^x]c", b"abc"));
        assert!(!matches(b"a[^b]c", b"abc"));
        assert!(matches(b"a[a-c]c", b"abc"));
        assert!(matches(b"a\\*c", b"a*c"));
        assert!(!matches(b"a\\*c", b"abc"));
        assert!(matches(b"abc*", b"abc"));
        assert!(!matches(b"", b"a"));
        assert!(matches(b"", b""));
        // As in Redis, only the `KEYS *` shortcut matches the empty key.
        assert!(!matches(b"*", b""));
        assert!(!matches(b"abc", b"ab"));
        assert!(matches(b"tg:*:x", b"tg:1:2:x"));
        let hostile = "a*".repeat(5000);
        assert!(!matches(hostile.as_bytes(), "a".repeat(6000).as_bytes()));
    }
}
