//! Number parsing and printing exactly as Redis does it.
//!
//! Replies must be byte-identical to Redis', so the conversions are ports of Redis' own
//! helpers rather than Rust's: `string2ll` (strict integers: no `+`, no leading zeros, no
//! spaces), `strtod` (what `ZADD` scores and range bounds accept), `string2ull` (stream ids) and
//! C's `%.17g` / `%.14g` (how Redis prints doubles and how lua-cjson prints numbers).

/// Redis' `string2ll`: a strict base-10 `i64`.
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() >= 21 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut v: u64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    if neg {
        if v > (i64::MAX as u64) + 1 {
            return None;
        }
        Some((v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

/// Redis' `string2ull`: `string2ll` first, then C's `strtoull` (which also takes spaces, `+`,
/// leading zeros and even a wrapping `-`). Used for stream ids.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    if let Some(v) = parse_i64(s) {
        return u64::try_from(v).ok();
    }
    let mut i = 0;
    while i < s.len() && is_c_space(s[i]) {
        i += 1;
    }
    let mut neg = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        neg = s[i] == b'-';
        i += 1;
    }
    let start = i;
    let mut v: u64 = 0;
    while i < s.len() && s[i].is_ascii_digit() {
        v = v.checked_mul(10)?.checked_add(u64::from(s[i] - b'0'))?;
        i += 1;
    }
    if i == start || i != s.len() {
        return None;
    }
    Some(if neg { v.wrapping_neg() } else { v })
}

fn is_c_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

/// The result of [`strtod`].
#[derive(Debug, Clone, Copy)]
pub struct Strtod {
    pub value: f64,
    /// Bytes consumed; 0 when nothing could be parsed.
    pub len: usize,
    /// C's `ERANGE`: the literal overflowed to ±inf or underflowed to 0.
    pub range_error: bool,
}

/// C's `strtod` on the longest accepted prefix: leading spaces, a sign, decimal or hex
/// (`0x1.8p3`) mantissas with exponents, `inf`, `infinity` and `nan`.
pub fn strtod(s: &[u8]) -> Strtod {
    let none = Strtod {
        value: 0.0,
        len: 0,
        range_error: false,
    };
    let mut i = 0;
    while i < s.len() && is_c_space(s[i]) {
        i += 1;
    }
    let mut neg = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        neg = s[i] == b'-';
        i += 1;
    }
    let sign = |v: f64| if neg { -v } else { v };
    let rest = &s[i..];
    if starts_with_ci(rest, b"infinity") {
        return Strtod {
            value: sign(f64::INFINITY),
            len: i + 8,
            range_error: false,
        };
    }
    if starts_with_ci(rest, b"inf") {
        return Strtod {
            value: sign(f64::INFINITY),
            len: i + 3,
            range_error: false,
        };
    }
    if starts_with_ci(rest, b"nan") {
        let mut len = i + 3;
        if s.get(len) == Some(&b'(') {
            let mut j = len + 1;
            while j < s.len() && (s[j].is_ascii_alphanumeric() || s[j] == b'_') {
                j += 1;
            }
            if s.get(j) == Some(&b')') {
                len = j + 1;
            }
        }
        return Strtod {
            value: sign(f64::NAN),
            len,
            range_error: false,
        };
    }
    if rest.len() >= 2 && rest[0] == b'0' && (rest[1] | 0x20) == b'x' {
        if let Some((v, n)) = hex_float(&rest[2..]) {
            return Strtod {
                value: sign(v),
                len: i + 2 + n,
                range_error: v.is_infinite(),
            };
        }
        // "0x" with no hex digits: strtod parses just the "0".
        return Strtod {
            value: sign(0.0),
            len: i + 1,
            range_error: false,
        };
    }
    let start = i;
    let mut any_digit = false;
    let mut nonzero = false;
    while i < s.len() && s[i].is_ascii_digit() {
        any_digit = true;
        nonzero |= s[i] != b'0';
        i += 1;
    }
    if i < s.len() && s[i] == b'.' {
        let mut j = i + 1;
        let mut frac = false;
        while j < s.len() && s[j].is_ascii_digit() {
            frac = true;
            nonzero |= s[j] != b'0';
            j += 1;
        }
        if any_digit || frac {
            any_digit = true;
            i = j;
        }
    }
    if !any_digit {
        return none;
    }
    if i < s.len() && (s[i] | 0x20) == b'e' {
        let mut j = i + 1;
        if j < s.len() && (s[j] == b'+' || s[j] == b'-') {
            j += 1;
        }
        let exp_start = j;
        while j < s.len() && s[j].is_ascii_digit() {
            j += 1;
        }
        if j > exp_start {
            i = j;
        }
    }
    let text = std::str::from_utf8(&s[start..i]).unwrap_or("0");
    let v: f64 = text.parse().unwrap_or(0.0);
    let range_error = v.is_infinite() || (v == 0.0 && nonzero);
    Strtod {
        value: sign(v),
        len: i,
        range_error,
    }
}

fn starts_with_ci(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// The part of a hex float after `0x`: returns the value and the bytes consumed.
fn hex_float(s: &[u8]) -> Option<(f64, usize)> {
    let mut i = 0;
    let mut mant: f64 = 0.0;
    let mut any = false;
    let mut exp: i64 = 0;
    while i < s.len() && s[i].is_ascii_hexdigit() {
        mant = mant * 16.0 + f64::from(hex_val(s[i]));
        any = true;
        i += 1;
    }
    if i < s.len() && s[i] == b'.' {
        let mut j = i + 1;
        while j < s.len() && s[j].is_ascii_hexdigit() {
            mant = mant * 16.0 + f64::from(hex_val(s[j]));
            exp -= 4;
            any = true;
            j += 1;
        }
        if any {
            i = j;
        }
    }
    if !any {
        return None;
    }
    if i < s.len() && (s[i] | 0x20) == b'p' {
        let mut j = i + 1;
        let mut neg = false;
        if j < s.len() && (s[j] == b'+' || s[j] == b'-') {
            neg = s[j] == b'-';
            j += 1;
        }
        let start = j;
        let mut e: i64 = 0;
        while j < s.len() && s[j].is_ascii_digit() {
            e = (e * 10 + i64::from(s[j] - b'0')).min(100_000);
            j += 1;
        }
        if j > start {
            exp += if neg { -e } else { e };
            i = j;
        }
    }
    let exp = i32::try_from(exp.clamp(-5000, 5000)).unwrap_or(0);
    Some((mant * 2f64.powi(exp), i))
}

fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

/// Redis' `getDoubleFromObject`: the whole string must be a number, no leading space, not NaN,
/// no overflow or underflow to zero.
pub fn parse_f64_strict(s: &[u8]) -> Option<f64> {
    if s.is_empty() || is_c_space(s[0]) {
        return None;
    }
    let r = strtod(s);
    if r.len != s.len() || r.value.is_nan() {
        return None;
    }
    if r.range_error && (r.value.is_infinite() || r.value == 0.0) {
        return None;
    }
    Some(r.value)
}

/// C's `printf("%.<prec>g", x)` (glibc output for inf and nan).
pub fn fmt_g(x: f64, prec: usize) -> String {
    if x.is_nan() {
        return if x.is_sign_negative() { "-nan" } else { "nan" }.to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.to_string();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0" } else { "0" }.to_string();
    }
    let prec = prec.max(1);
    let sci = format!("{:.*e}", prec - 1, x);
    let (mant, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if exp < -4 || exp >= prec as i32 {
        let mant = strip_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.unsigned_abs())
    } else {
        let decimals = usize::try_from(prec as i32 - 1 - exp).unwrap_or(0);
        strip_zeros(&format!("{x:.decimals$}")).to_string()
    }
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// How Redis prints a double reply (`addReplyDouble`, RESP2): `%.17g`, with `inf`/`-inf`.
pub fn fmt_double(x: f64) -> String {
    fmt_g(x, 17)
}

/// C's `(long long)d` as x86-64 computes it: out of range and NaN give `i64::MIN`.
pub fn f64_to_i64(x: f64) -> i64 {
    if x.is_nan() || !(-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&x) {
        i64::MIN
    } else {
        x as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_integers() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-12"), Some(-12));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_i64(b"9223372036854775808"), None);
        for bad in [&b""[..], b"+1", b"01", b"-0", b" 1", b"1 ", b"1.0", b"-"] {
            assert_eq!(parse_i64(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse_u64(b"007"), Some(7));
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
    }

    #[test]
    fn printf_g() {
        let cases: &[(f64, &str)] = &[
            (1.5, "1.5"),
            (1e20, "1e+20"),
            (0.1, "0.10000000000000001"),
            (-0.0, "-0"),
            (9007199254740992.0, "9007199254740992"),
            (123.0, "123"),
            (1e17, "1e+17"),
            (1e-5, "1.0000000000000001e-05"),
            (0.0001, "0.0001"),
        ];
        for (x, want) in cases {
            assert_eq!(fmt_g(*x, 17), *want);
        }
        assert_eq!(fmt_g(1.0 / 3.0, 14), "0.33333333333333");
        assert_eq!(fmt_g(2f64.powi(53), 14), "9.007199254741e+15");
        assert_eq!(fmt_g(1e14, 14), "1e+14");
    }

    #[test]
    fn c_strtod() {
        assert_eq!(parse_f64_strict(b"1.5"), Some(1.5));
        assert_eq!(parse_f64_strict(b"-inf"), Some(f64::NEG_INFINITY));
        assert_eq!(parse_f64_strict(b"+3"), Some(3.0));
        assert_eq!(parse_f64_strict(b"0x10"), Some(16.0));
        assert_eq!(parse_f64_strict(b"1e400"), None);
        assert_eq!(parse_f64_strict(b"1e-400"), None);
        assert_eq!(parse_f64_strict(b"nan"), None);
        assert_eq!(parse_f64_strict(b" 1"), None);
        assert_eq!(parse_f64_strict(b"1x"), None);
        assert_eq!(strtod(b"5e").len, 1);
        assert_eq!(strtod(b"").len, 0);
    }
}
