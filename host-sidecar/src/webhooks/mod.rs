//! Billing-provider webhooks (Stripe and RevenueCat): verification and parsing.
//!
//! This module holds what is provider-neutral — the [`BillingEvent`] a delivery becomes, the
//! errors, the signature and shared-secret checks (on the raw body and header values) — and the
//! lenient field types both providers' payloads are read with. Each provider's payload is a set
//! of typed structs in its own module ([`stripe`], [`revenuecat`]), read in one pass and mapped
//! to a [`BillingEvent`]. The provider modules use this one, never the other way round.
//!
//! Parsing never panics; the caller bounds the payload size. A payload that cannot be read gives
//! [`WebhookError::Invalid`] naming the field and the reason (`data.object.status: expected
//! string`). Fields are typed, but a field of the wrong type is only an error when the event
//! needs it: an event we only record is not refused for a field we never read.

pub mod revenuecat;
pub mod stripe;

use hmac::{Hmac, Mac};
use serde::de::{self, DeserializeOwned, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use std::fmt;
use std::marker::PhantomData;
use subtle::{Choice, ConstantTimeEq};

/// Maximum length of ids, account ids, product references and event types.
pub const MAX_ID_LEN: usize = 200;

/// Why a webhook was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    /// The signature header is absent.
    #[error("missing signature header")]
    MissingSignature,
    /// The signature header cannot be parsed.
    #[error("malformed signature header")]
    MalformedSignature,
    /// No signature in the header matches the payload.
    #[error("signature does not match")]
    BadSignature,
    /// The signed timestamp is too far from the current time; carries the tolerance.
    #[error("timestamp outside the tolerance of {0} s")]
    Stale(i64),
    /// The authorization header is absent or wrong.
    #[error("unauthorized")]
    Unauthorized,
    /// The payload is not a well-formed event; carries the field path and reason.
    #[error("invalid payload: {0}")]
    Invalid(String),
}

/// A billing provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// Stripe.
    Stripe,
    /// RevenueCat.
    RevenueCat,
}

impl Provider {
    /// Stable lowercase name: `"stripe"` or `"revenuecat"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Stripe => "stripe",
            Provider::RevenueCat => "revenuecat",
        }
    }
}

/// Provider-neutral subscription status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubStatus {
    /// Paid and current.
    Active,
    /// In a trial period.
    Trialing,
    /// Payment failed; still in the grace period.
    PastDue,
    /// Canceled by the user or provider.
    Canceled,
    /// Ended.
    Expired,
}

impl SubStatus {
    /// Stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            SubStatus::Active => "active",
            SubStatus::Trialing => "trialing",
            SubStatus::PastDue => "past_due",
            SubStatus::Canceled => "canceled",
            SubStatus::Expired => "expired",
        }
    }

    /// Whether this status grants access: active, trialing or past due.
    pub fn entitled(self) -> bool {
        matches!(
            self,
            SubStatus::Active | SubStatus::Trialing | SubStatus::PastDue
        )
    }
}

/// What an event asks us to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A subscription's state: `product` is the provider's price/product reference to map to a plan.
    Subscription {
        /// Provider price/product reference.
        product: String,
        /// Status after this event.
        status: SubStatus,
        /// Current period start (unix ms).
        period_start_ms: i64,
        /// Current period end (unix ms).
        period_end_ms: i64,
    },
    /// A one-time purchase of a credit pack (`product` maps to an amount), or an explicit amount.
    Purchase {
        /// Credit pack reference.
        product: String,
        /// Explicit number of credits, when the event carries one.
        amount: Option<u64>,
    },
    /// Money returned: `reference` identifies the original purchase (its grant id).
    Refund {
        /// Grant id of the original purchase.
        reference: String,
    },
    /// A known event type we record but do not act on.
    Ignore,
    /// An event type we do not know: acknowledged and recorded.
    Unknown,
}

/// A parsed, provider-neutral webhook event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingEvent {
    /// Sending provider.
    pub provider: Provider,
    /// Provider event id.
    pub id: String,
    /// Provider event type string as sent.
    pub kind: String,
    /// When the provider says it happened (unix ms).
    pub at_ms: i64,
    /// Our account id, when the event names one.
    pub account: Option<String>,
    /// The provider's subscription/transaction id: Stripe's subscription (or checkout session,
    /// charge) id, RevenueCat's original transaction id. A subscription event changes an
    /// account only if it is about the subscription on record for it (same provider, same
    /// subject), or if it starts a new one.
    pub subject: Option<String>,
    /// Sent from the provider's test environment (Stripe `livemode: false`, RevenueCat
    /// `environment: SANDBOX`): recorded, applied only with `billing.accept_test_events`.
    pub test: bool,
    /// What to do.
    pub action: Action,
}

// ---------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------

/// Verifies a Stripe `Stripe-Signature` header value against the raw body.
///
/// The header is `t=<unix s>,v1=<hex hmac>[,v1=...][,v0=...]`; the signed payload is
/// `"<t>.<raw body>"`, HMAC-SHA256 keyed with the full `whsec_...` secret. Any
/// matching `v1` is accepted. The signature is checked before the timestamp, so
/// `Stale` is only returned for authentic events. An empty secret never verifies.
pub fn verify_stripe(
    payload: &[u8],
    header: Option<&str>,
    secret: &str,
    now_s: i64,
    tolerance_s: i64,
) -> Result<(), WebhookError> {
    let header = header.ok_or(WebhookError::MissingSignature)?;
    let (t, signatures) = parse_stripe_header(header)?;
    if secret.is_empty() {
        return Err(WebhookError::BadSignature);
    }
    let expected = stripe_tag(payload, secret, t).ok_or(WebhookError::BadSignature)?;
    let mut matched = Choice::from(0u8);
    for sig in &signatures {
        matched |= expected[..].ct_eq(&sig[..]);
    }
    if !bool::from(matched) {
        return Err(WebhookError::BadSignature);
    }
    let skew = (i128::from(now_s) - i128::from(t)).abs();
    if skew > i128::from(tolerance_s) {
        return Err(WebhookError::Stale(tolerance_s));
    }
    Ok(())
}

/// Returns the `Stripe-Signature` header value Stripe would send for `payload` at time `t`.
pub fn sign_stripe(payload: &[u8], secret: &str, t: i64) -> String {
    match stripe_tag(payload, secret, t) {
        Some(tag) => format!("t={t},v1={}", hex::encode(tag)),
        // HMAC accepts keys of any length, so this is not reached.
        None => format!("t={t}"),
    }
}

/// Verifies a RevenueCat `Authorization` header: equal to `secret`, or `Bearer <secret>`.
///
/// The comparison is constant-time (over SHA-256 digests, so lengths do not leak).
/// The `Bearer` scheme name is matched case-insensitively. An empty secret never verifies.
pub fn verify_revenuecat(authorization: Option<&str>, secret: &str) -> Result<(), WebhookError> {
    let auth = authorization.ok_or(WebhookError::Unauthorized)?;
    if secret.is_empty() {
        return Err(WebhookError::Unauthorized);
    }
    let raw = ct_str_eq(auth, secret);
    let bearer = match (auth.get(..7), auth.get(7..)) {
        (Some(scheme), Some(token)) if scheme.eq_ignore_ascii_case("bearer ") => {
            ct_str_eq(token, secret)
        }
        _ => Choice::from(0u8),
    };
    if bool::from(raw | bearer) {
        Ok(())
    } else {
        Err(WebhookError::Unauthorized)
    }
}

fn ct_str_eq(a: &str, b: &str) -> Choice {
    let da = Sha256::digest(a.as_bytes());
    let db = Sha256::digest(b.as_bytes());
    da.as_slice().ct_eq(db.as_slice())
}

fn stripe_tag(payload: &[u8], secret: &str, t: i64) -> Option<[u8; 32]> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).ok()?;
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    Some(mac.finalize().into_bytes().into())
}

/// Parses `t=...,v1=...`; every item must be `key=value`, exactly one `t`, at least
/// one `v1`, and every `v1` must be 64 hex digits. Other keys are ignored.
fn parse_stripe_header(header: &str) -> Result<(i64, Vec<[u8; 32]>), WebhookError> {
    let mut t = None;
    let mut signatures = Vec::new();
    for item in header.split(',') {
        let (key, value) = item
            .trim()
            .split_once('=')
            .ok_or(WebhookError::MalformedSignature)?;
        match key {
            "t" => {
                let parsed = value
                    .parse::<i64>()
                    .map_err(|_| WebhookError::MalformedSignature)?;
                if t.replace(parsed).is_some() {
                    return Err(WebhookError::MalformedSignature);
                }
            }
            "v1" => {
                let mut sig = [0u8; 32];
                hex::decode_to_slice(value, &mut sig)
                    .map_err(|_| WebhookError::MalformedSignature)?;
                signatures.push(sig);
            }
            _ => {}
        }
    }
    let t = t.ok_or(WebhookError::MalformedSignature)?;
    if signatures.is_empty() {
        return Err(WebhookError::MalformedSignature);
    }
    Ok((t, signatures))
}

// ---------------------------------------------------------------------------
// Reading payloads: ids and lenient typed fields
// ---------------------------------------------------------------------------

/// Whether `s` is 1..=[`MAX_ID_LEN`] characters of `[A-Za-z0-9_.:-]`.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// `Invalid("<path>: <reason>")`.
pub(crate) fn invalid(path: &str, reason: &str) -> WebhookError {
    WebhookError::Invalid(format!("{path}: {reason}"))
}

/// `s` as an id, or why not (naming `path`).
pub(crate) fn check_id(path: &str, s: &str) -> Result<String, WebhookError> {
    if is_valid_id(s) {
        Ok(s.to_owned())
    } else {
        Err(invalid(
            path,
            "expected 1..=200 characters of [A-Za-z0-9_.:-]",
        ))
    }
}

/// Seconds (the provider's unit) to unix milliseconds.
pub(crate) fn secs_to_ms(path: &str, secs: i64) -> Result<i64, WebhookError> {
    secs.checked_mul(1000)
        .ok_or_else(|| invalid(path, "timestamp out of range"))
}

/// Reads a whole payload as `T` (a struct of lenient fields): `(root): …` when it is not JSON
/// or not an object.
pub(crate) fn parse_root<T: DeserializeOwned + Default>(payload: &[u8]) -> Result<T, WebhookError> {
    let root: Obj<T> = serde_json::from_slice(payload)
        .map_err(|e| WebhookError::Invalid(format!("(root): {e}")))?;
    match root.shape {
        Shape::Found => Ok(root.value),
        Shape::Absent | Shape::Wrong => Err(invalid("(root)", "expected object")),
    }
}

/// One field of a provider's payload as it was sent: absent (or `null`), of the wrong type, or
/// a value. Reading it names its path in the error.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Got<T> {
    /// Absent or `null`.
    #[default]
    Absent,
    /// Present but not a `T`: why, e.g. `expected string`.
    Wrong(&'static str),
    /// Present and well-formed.
    Value(T),
}

impl<T> Got<T> {
    /// The value, `None` when absent; an error (naming `path`) when of the wrong type.
    pub(crate) fn opt(&self, path: &str) -> Result<Option<&T>, WebhookError> {
        match self {
            Got::Absent => Ok(None),
            Got::Wrong(why) => Err(invalid(path, why)),
            Got::Value(v) => Ok(Some(v)),
        }
    }

    /// The value; `<path>: missing` when absent.
    pub(crate) fn req(&self, path: &str) -> Result<&T, WebhookError> {
        self.opt(path)?.ok_or_else(|| invalid(path, "missing"))
    }
}

/// A JSON string.
pub(crate) type Text = Got<String>;
/// A JSON integer that fits an `i64` (times, amounts).
pub(crate) type Int = Got<i64>;
/// A JSON boolean.
pub(crate) type Flag = Got<bool>;
/// A non-negative integer sent as a JSON integer or as a string of ASCII digits (Stripe's
/// metadata values are strings).
pub(crate) type Count = Got<u64>;

impl Text {
    /// A required id (1..=200 of `[A-Za-z0-9_.:-]`).
    pub(crate) fn id(&self, path: &str) -> Result<String, WebhookError> {
        check_id(path, self.req(path)?)
    }

    /// An optional id: absent is `None`, anything but a valid id an error.
    pub(crate) fn opt_id(&self, path: &str) -> Result<Option<String>, WebhookError> {
        self.opt(path)?.map(|s| check_id(path, s)).transpose()
    }

    /// Best effort, for events we only record: a valid id or `None`.
    pub(crate) fn loose_id(&self) -> Option<String> {
        match self {
            Got::Value(s) if is_valid_id(s) => Some(s.clone()),
            _ => None,
        }
    }
}

/// Any JSON value, classified; arrays and objects are skipped, not kept.
enum Scalar {
    Null,
    Bool(bool),
    Unsigned(u64),
    Negative(i64),
    Float,
    Str(String),
    Container,
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Scalar, D::Error> {
                Scalar::deserialize(d)
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(b))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Scalar, E> {
                Ok(Scalar::Unsigned(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Scalar, E> {
                Ok(u64::try_from(n).map_or(Scalar::Negative(n), Scalar::Unsigned))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(s.to_owned()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Scalar, E> {
                Ok(Scalar::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Container)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Container)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Scalar::deserialize(d)? {
            Scalar::Null => Got::Absent,
            Scalar::Str(s) => Got::Value(s),
            _ => Got::Wrong("expected string"),
        })
    }
}

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Scalar::deserialize(d)? {
            Scalar::Null => Got::Absent,
            Scalar::Negative(n) => Got::Value(n),
            Scalar::Unsigned(n) => {
                i64::try_from(n).map_or(Got::Wrong("expected integer"), Got::Value)
            }
            _ => Got::Wrong("expected integer"),
        })
    }
}

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Scalar::deserialize(d)? {
            Scalar::Null => Got::Absent,
            Scalar::Bool(b) => Got::Value(b),
            _ => Got::Wrong("expected boolean"),
        })
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Scalar::deserialize(d)? {
            Scalar::Null => Got::Absent,
            Scalar::Unsigned(n) => Got::Value(n),
            Scalar::Negative(_) | Scalar::Float => Got::Wrong("expected non-negative integer"),
            Scalar::Str(s) if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) => {
                Got::Wrong("expected non-negative integer")
            }
            Scalar::Str(s) => s
                .parse::<u64>()
                .map_or(Got::Wrong("integer out of range"), Got::Value),
            Scalar::Bool(_) | Scalar::Container => Got::Wrong("expected string or integer"),
        })
    }
}

/// How a container field was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Shape {
    #[default]
    Absent,
    Wrong,
    Found,
}

/// A JSON object read as `T`. An absent (or `null`) one reads as `T::default()` — every field
/// absent — so a required field inside it is reported by its own path (`data.object.id:
/// missing`); anything but an object is `<path>: expected object` when the event needs it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Obj<T> {
    shape: Shape,
    value: T,
}

impl<T> Obj<T> {
    /// The object (empty when absent); an error naming `path` when it is not an object.
    pub(crate) fn at(&self, path: &str) -> Result<&T, WebhookError> {
        match self.shape {
            Shape::Wrong => Err(invalid(path, "expected object")),
            Shape::Absent | Shape::Found => Ok(&self.value),
        }
    }

    /// Like [`Obj::at`], by value.
    pub(crate) fn into_at(self, path: &str) -> Result<T, WebhookError> {
        match self.shape {
            Shape::Wrong => Err(invalid(path, "expected object")),
            Shape::Absent | Shape::Found => Ok(self.value),
        }
    }

    /// Best effort, for events we only record: the object, or an empty one.
    pub(crate) fn loose(&self) -> &T {
        &self.value
    }
}

impl<'de, T: Deserialize<'de> + Default> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de> + Default> Visitor<'de> for V<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
                Ok(Obj {
                    shape: Shape::Found,
                    value: T::deserialize(de::value::MapAccessDeserializer::new(map))?,
                })
            }
            fn visit_unit<E: de::Error>(self) -> Result<Obj<T>, E> {
                Ok(Obj::default())
            }
            fn visit_none<E: de::Error>(self) -> Result<Obj<T>, E> {
                Ok(Obj::default())
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Obj<T>, D::Error> {
                Obj::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Obj<T>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Obj::wrong())
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Obj<T>, E> {
                Ok(Obj::wrong())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Obj<T>, E> {
                Ok(Obj::wrong())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Obj<T>, E> {
                Ok(Obj::wrong())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Obj<T>, E> {
                Ok(Obj::wrong())
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Obj<T>, E> {
                Ok(Obj::wrong())
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

impl<T: Default> Obj<T> {
    fn wrong() -> Self {
        Obj {
            shape: Shape::Wrong,
            value: T::default(),
        }
    }
}

/// The first element of a JSON array read as `T` (the others are skipped); an absent array or
/// an empty one reads as `T::default()`.
#[derive(Debug, Clone, Default)]
pub(crate) struct First<T> {
    shape: Shape,
    value: T,
}

impl<T> First<T> {
    /// The first element (default when there is none); an error naming `path` (the array's)
    /// when it is not an array.
    pub(crate) fn at(&self, path: &str) -> Result<&T, WebhookError> {
        match self.shape {
            Shape::Wrong => Err(invalid(path, "expected array")),
            Shape::Absent | Shape::Found => Ok(&self.value),
        }
    }
}

impl<'de, T: Deserialize<'de> + Default> Deserialize<'de> for First<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de> + Default> Visitor<'de> for V<T> {
            type Value = First<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<First<T>, A::Error> {
                let value = seq.next_element::<T>()?.unwrap_or_default();
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(First {
                    shape: Shape::Found,
                    value,
                })
            }
            fn visit_unit<E: de::Error>(self) -> Result<First<T>, E> {
                Ok(First::default())
            }
            fn visit_none<E: de::Error>(self) -> Result<First<T>, E> {
                Ok(First::default())
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<First<T>, D::Error> {
                First::deserialize(d)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<First<T>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(First::wrong())
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<First<T>, E> {
                Ok(First::wrong())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<First<T>, E> {
                Ok(First::wrong())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<First<T>, E> {
                Ok(First::wrong())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<First<T>, E> {
                Ok(First::wrong())
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<First<T>, E> {
                Ok(First::wrong())
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

impl<T: Default> First<T> {
    fn wrong() -> Self {
        First {
            shape: Shape::Wrong,
            value: T::default(),
        }
    }
}

/// Helpers of the parsers' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::{BillingEvent, WebhookError};

    pub(crate) fn bytes(v: &serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    /// Asserts an `Invalid` error whose message starts with `prefix`.
    pub(crate) fn invalid_at(err: Result<BillingEvent, WebhookError>, prefix: &str) {
        match err {
            Err(WebhookError::Invalid(msg)) => {
                assert!(
                    msg.starts_with(prefix),
                    "{msg:?} should start with {prefix:?}"
                )
            }
            other => panic!("expected Invalid({prefix}..), got {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::revenuecat::tests::rc_event;
    use super::stripe::tests::{charge_refunded, checkout_event, stripe_sub_event};
    use super::testing::{bytes, invalid_at};
    use super::*;
    use serde_json::json;

    const SECRET: &str = "whsec_test_secret";
    const NOW: i64 = 1_700_000_000;

    // ----- Stripe signatures -------------------------------------------------

    #[test]
    fn stripe_known_vector() {
        // python3: hmac.new(b"whsec_test_secret", b'1700000000.{"id":"evt_1"}', sha256)
        assert_eq!(
            sign_stripe(br#"{"id":"evt_1"}"#, SECRET, NOW),
            "t=1700000000,v1=248a374f50f943a28b0f6ab50faf9a7e7e29b710fa26df9fb1618b9bf8ea9c9a"
        );
    }

    #[test]
    fn stripe_round_trip() {
        let body = br#"{"id":"evt_1","type":"invoice.paid"}"#;
        let h = sign_stripe(body, SECRET, NOW);
        assert_eq!(verify_stripe(body, Some(&h), SECRET, NOW, 300), Ok(()));
        assert_eq!(
            verify_stripe(body, Some(&h), SECRET, NOW + 300, 300),
            Ok(())
        );
        assert_eq!(
            verify_stripe(b"", Some(&sign_stripe(b"", SECRET, 5)), SECRET, 5, 0),
            Ok(())
        );
    }

    #[test]
    fn stripe_wrong_secret() {
        let body = b"{}";
        let h = sign_stripe(body, "whsec_other", NOW);
        assert_eq!(
            verify_stripe(body, Some(&h), SECRET, NOW, 300),
            Err(WebhookError::BadSignature)
        );
        let h = sign_stripe(body, "", NOW);
        assert_eq!(
            verify_stripe(body, Some(&h), "", NOW, 300),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn stripe_tampered_body() {
        let h = sign_stripe(br#"{"amount":100}"#, SECRET, NOW);
        assert_eq!(
            verify_stripe(br#"{"amount":900}"#, Some(&h), SECRET, NOW, 300),
            Err(WebhookError::BadSignature)
        );
        // A different timestamp with the same v1 must not verify either.
        let forged = h.replace("t=1700000000", "t=1700000001");
        assert_eq!(
            verify_stripe(br#"{"amount":100}"#, Some(&forged), SECRET, NOW, 300),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn stripe_stale_both_sides() {
        let body = b"{}";
        let h = sign_stripe(body, SECRET, NOW);
        assert_eq!(
            verify_stripe(body, Some(&h), SECRET, NOW + 301, 300),
            Err(WebhookError::Stale(300))
        );
        assert_eq!(
            verify_stripe(body, Some(&h), SECRET, NOW - 301, 300),
            Err(WebhookError::Stale(300))
        );
        assert_eq!(
            verify_stripe(body, Some(&h), SECRET, NOW - 300, 300),
            Ok(())
        );
        // Extreme values do not overflow.
        let h = sign_stripe(body, SECRET, i64::MIN);
        assert_eq!(
            verify_stripe(body, Some(&h), SECRET, i64::MAX, 300),
            Err(WebhookError::Stale(300))
        );
        assert_eq!(
            WebhookError::Stale(300).to_string(),
            "timestamp outside the tolerance of 300 s"
        );
    }

    #[test]
    fn stripe_multiple_v1_one_matches() {
        let body = br#"{"id":"evt_2"}"#;
        let good = sign_stripe(body, SECRET, NOW);
        let good_sig = good.split_once(",v1=").unwrap().1;
        let other = sign_stripe(body, "whsec_rotated_old", NOW);
        let other_sig = other.split_once(",v1=").unwrap().1;
        let zeros = "0".repeat(64);
        let header = format!("t={NOW},v1={other_sig},v1={good_sig},v0={zeros}");
        assert_eq!(verify_stripe(body, Some(&header), SECRET, NOW, 300), Ok(()));
        let header = format!("t={NOW},v0={good_sig},v1={zeros}");
        assert_eq!(
            verify_stripe(body, Some(&header), SECRET, NOW, 300),
            Err(WebhookError::BadSignature),
            "v0 must not be accepted"
        );
        let header = format!("v1={good_sig}, t={NOW}");
        assert_eq!(verify_stripe(body, Some(&header), SECRET, NOW, 300), Ok(()));
    }

    #[test]
    fn stripe_malformed_headers() {
        let body = b"{}";
        let sig = "ab".repeat(32);
        assert_eq!(
            verify_stripe(body, None, SECRET, NOW, 300),
            Err(WebhookError::MissingSignature)
        );
        for h in [
            String::new(),
            " ".to_owned(),
            ",".to_owned(),
            format!("v1={sig}"),                   // no t
            format!("t={NOW}"),                    // no v1
            format!("t={NOW},v0={sig}"),           // only v0
            format!("t=abc,v1={sig}"),             // non-numeric t
            format!("t=,v1={sig}"),                // empty t
            format!("t={NOW},v1=zz{}", &sig[2..]), // non-hex
            format!("t={NOW},v1=abcd"),            // short hex
            format!("t={NOW},v1="),                // empty v1
            format!("t={NOW},v1={sig}00"),         // long hex
            format!("t={NOW},t={NOW},v1={sig}"),   // duplicate t
            format!("t={NOW},v1{sig}"),            // item without '='
            format!("t={NOW},v1={sig},"),          // trailing empty item
            "garbage".to_owned(),
            "t=1,v1=\u{e9}\u{e9}".to_owned(),
        ] {
            assert_eq!(
                verify_stripe(body, Some(&h), SECRET, NOW, 300),
                Err(WebhookError::MalformedSignature),
                "header {h:?}"
            );
        }
    }

    // ----- RevenueCat authorization -----------------------------------------

    #[test]
    fn revenuecat_auth() {
        let s = "rc_hook_9f8e7d";
        assert_eq!(verify_revenuecat(Some(s), s), Ok(()));
        assert_eq!(verify_revenuecat(Some("Bearer rc_hook_9f8e7d"), s), Ok(()));
        assert_eq!(verify_revenuecat(Some("bearer rc_hook_9f8e7d"), s), Ok(()));
        for bad in [
            "rc_hook_9f8e7",
            "rc_hook_9f8e7d ",
            "Bearer rc_hook_wrong",
            "Bearer  rc_hook_9f8e7d",
            "Basic rc_hook_9f8e7d",
            "Bearer",
            "Bearer ",
            "",
            "\u{e9}\u{e9}\u{e9}\u{e9}",
        ] {
            assert_eq!(
                verify_revenuecat(Some(bad), s),
                Err(WebhookError::Unauthorized),
                "{bad:?}"
            );
        }
        assert_eq!(verify_revenuecat(None, s), Err(WebhookError::Unauthorized));
        // An unconfigured (empty) secret never authorizes.
        assert_eq!(
            verify_revenuecat(Some(""), ""),
            Err(WebhookError::Unauthorized)
        );
        assert_eq!(
            verify_revenuecat(Some("Bearer "), ""),
            Err(WebhookError::Unauthorized)
        );
    }
    #[test]
    fn invalid_ids() {
        let long = "a".repeat(201);
        let max = "a".repeat(200);
        assert!(is_valid_id(&max));
        assert!(is_valid_id("evt_1:A.b-C"));
        for bad in [
            "",
            " ",
            "evt 1",
            "evt/1",
            "évt",
            "evt\n",
            "evt\u{0}",
            "a+b",
            long.as_str(),
        ] {
            assert!(!is_valid_id(bad), "{bad:?}");
            let v = json!({"id": bad, "type": "invoice.paid", "created": 1});
            invalid_at(stripe::parse(&bytes(&v)), "id:");
            let v = json!({"id": "evt_1", "type": bad, "created": 1});
            invalid_at(stripe::parse(&bytes(&v)), "type:");
            let mut v = rc_event("INITIAL_PURCHASE");
            v["event"]["app_user_id"] = json!(bad);
            invalid_at(revenuecat::parse(&bytes(&v)), "event.app_user_id:");
            let mut v = rc_event("RENEWAL");
            v["event"]["product_id"] = json!(bad);
            invalid_at(revenuecat::parse(&bytes(&v)), "event.product_id:");
            let mut v = rc_event("RENEWAL");
            v["event"]["id"] = json!(bad);
            invalid_at(revenuecat::parse(&bytes(&v)), "event.id:");
        }
        let v = json!({"id": max, "type": "invoice.paid", "created": 1});
        assert!(stripe::parse(&bytes(&v)).is_ok());
    }
    #[test]
    fn enum_strings() {
        assert_eq!(Provider::Stripe.as_str(), "stripe");
        assert_eq!(Provider::RevenueCat.as_str(), "revenuecat");
        let all = [
            (SubStatus::Active, "active", true),
            (SubStatus::Trialing, "trialing", true),
            (SubStatus::PastDue, "past_due", true),
            (SubStatus::Canceled, "canceled", false),
            (SubStatus::Expired, "expired", false),
        ];
        for (s, name, entitled) in all {
            assert_eq!((s.as_str(), s.entitled()), (name, entitled));
        }
        assert_eq!(
            WebhookError::Invalid("id: missing".into()).to_string(),
            "invalid payload: id: missing"
        );
    }
    // ----- Robustness --------------------------------------------------------

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn exercise(data: &[u8]) {
        let _ = stripe::parse(data);
        let _ = revenuecat::parse(data);
        let text = String::from_utf8_lossy(data);
        let _ = verify_stripe(data, Some(&text), SECRET, NOW, 300);
        let _ = verify_revenuecat(Some(&text), "rc_secret");
    }

    #[test]
    fn fuzz_no_panic() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        const TOKENS: &[&[u8]] = &[
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"",
            b":",
            b",",
            b"null",
            b"true",
            b"-1",
            b"0",
            b"1e400",
            b"18446744073709551616",
            b"-9223372036854775809",
            b"\"\\u0000\"",
            b"\"\\ud800\"",
            b"\xff",
            b"\"data\"",
            b"\"object\"",
            b"\"items\"",
            b"\"0\"",
            b"t=",
            b"v1=",
            b"Bearer ",
        ];
        let mut seeds: Vec<Vec<u8>> = vec![
            bytes(&stripe_sub_event("customer.subscription.updated", "active")),
            bytes(&stripe_sub_event(
                "customer.subscription.deleted",
                "canceled",
            )),
            bytes(&checkout_event(
                "paid",
                json!({"tollgate_account": "a", "tollgate_pack": "p", "tollgate_credits": "5"}),
            )),
            bytes(&charge_refunded(json!({"tollgate_grant": "g"}))),
            sign_stripe(b"{}", SECRET, NOW).into_bytes(),
        ];
        for kind in [
            "INITIAL_PURCHASE",
            "PRODUCT_CHANGE",
            "CANCELLATION",
            "NON_RENEWING_PURCHASE",
            "TEST",
        ] {
            seeds.push(bytes(&rc_event(kind)));
        }
        for seed in &seeds {
            for cut in 0..seed.len() {
                exercise(&seed[..cut]);
            }
        }

        for i in 0..20_000 {
            let data: Vec<u8> = if i % 2 == 0 {
                let len = rng.below(300);
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                let mut d = seeds[rng.below(seeds.len())].clone();
                for _ in 0..=rng.below(8) {
                    match rng.below(5) {
                        0 if !d.is_empty() => {
                            let p = rng.below(d.len());
                            d[p] ^= 1 << rng.below(8);
                        }
                        1 if !d.is_empty() => {
                            let p = rng.below(d.len());
                            d[p] = rng.next() as u8;
                        }
                        2 if !d.is_empty() => {
                            let p = rng.below(d.len());
                            d.truncate(p);
                        }
                        3 if !d.is_empty() => {
                            let p = rng.below(d.len());
                            d.remove(p);
                        }
                        _ => {
                            let p = rng.below(d.len() + 1);
                            let tok = TOKENS[rng.below(TOKENS.len())];
                            d.splice(p..p, tok.iter().copied());
                        }
                    }
                }
                d
            };
            exercise(&data);
        }
    }

    #[test]
    fn deeply_nested_json() {
        let deep = |open: &str, close: &str, n: usize| {
            format!("{}{}", open.repeat(n), close.repeat(n)).into_bytes()
        };
        for n in [127, 128, 129, 1_000, 100_000] {
            exercise(&deep("[", "]", n));
            exercise(&deep("{\"a\":", "}", n));
            exercise(&deep("[", "", n));
            let inner = String::from_utf8(deep("[", "]", n)).unwrap();
            let body =
                format!(r#"{{"id":"evt_1","type":"x","created":1,"data":{{"object":{inner}}}}}"#);
            exercise(body.as_bytes());
            let body = format!(
                r#"{{"event":{{"id":"e","type":"RENEWAL","event_timestamp_ms":1,"app_user_id":{inner}}}}}"#
            );
            exercise(body.as_bytes());
        }
        assert!(matches!(
            stripe::parse(&deep("{\"a\":", "}", 100_000)),
            Err(WebhookError::Invalid(_))
        ));
    }
}
