//! RevenueCat webhook events (<https://www.revenuecat.com/docs/integrations/webhooks/event-types-and-fields>)
//! as a typed payload: `{api_version, event: {...}}`. Every field RevenueCat may omit is optional
//! (`#[serde(default)]`, lenient [`Got`](super::Got) fields); an event we act on that lacks what
//! it needs is `Invalid("event.<field>: <reason>")`.

use super::{parse_root, Action, BillingEvent, Int, Obj, Provider, SubStatus, Text, WebhookError};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Payload {
    event: Obj<Event>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Event {
    id: Text,
    #[serde(rename = "type")]
    kind: Text,
    /// Unix ms.
    event_timestamp_ms: Int,
    /// Our account id (an anonymous `$RCAnonymousID:…` is not a valid one).
    app_user_id: Text,
    product_id: Text,
    /// `PRODUCT_CHANGE`: the product changed to.
    new_product_id: Text,
    /// `NORMAL`, `TRIAL`, `INTRO`, …
    period_type: Text,
    purchased_at_ms: Int,
    /// Absent for non-subscription products.
    expiration_at_ms: Int,
    transaction_id: Text,
    /// Identifies the subscription across its renewals.
    original_transaction_id: Text,
    /// `PRODUCTION` or `SANDBOX`.
    environment: Text,
}

enum Mapping {
    /// Subscription; `None` means active or trialing per `period_type`.
    Subscription(Option<SubStatus>),
    Purchase,
    Ignore,
    Unknown,
}

/// Parses a RevenueCat webhook body into a [`BillingEvent`]. The request should be verified first.
///
/// Events we act on require a valid `app_user_id` and a transaction id. For
/// `CANCELLATION`, `EXPIRATION` and `BILLING_ISSUE` without `expiration_at_ms`
/// (non-subscription products) the action is `Ignore`.
pub fn parse(payload: &[u8]) -> Result<BillingEvent, WebhookError> {
    let root: Payload = parse_root(payload)?;
    let e = root.event.at("event")?;
    let id = e.id.id("event.id")?;
    let kind = e.kind.id("event.type")?;
    let at_ms = *e.event_timestamp_ms.req("event.event_timestamp_ms")?;
    let test = e
        .environment
        .opt("event.environment")?
        .is_some_and(|env| env.eq_ignore_ascii_case("SANDBOX"));

    let mapping = match kind.as_str() {
        "INITIAL_PURCHASE" | "RENEWAL" | "PRODUCT_CHANGE" | "UNCANCELLATION" => {
            Mapping::Subscription(None)
        }
        "CANCELLATION" => Mapping::Subscription(Some(SubStatus::Canceled)),
        "EXPIRATION" => Mapping::Subscription(Some(SubStatus::Expired)),
        "BILLING_ISSUE" => Mapping::Subscription(Some(SubStatus::PastDue)),
        "NON_RENEWING_PURCHASE" => Mapping::Purchase,
        "TEST" | "SUBSCRIBER_ALIAS" | "TRANSFER" | "SUBSCRIPTION_PAUSED" => Mapping::Ignore,
        _ => Mapping::Unknown,
    };

    let (account, subject, action) = match mapping {
        Mapping::Ignore | Mapping::Unknown => {
            let subject = e
                .original_transaction_id
                .loose_id()
                .or_else(|| e.transaction_id.loose_id());
            let action = if matches!(mapping, Mapping::Ignore) {
                Action::Ignore
            } else {
                Action::Unknown
            };
            (e.app_user_id.loose_id(), subject, action)
        }
        Mapping::Purchase => {
            let account = e.app_user_id.id("event.app_user_id")?;
            let subject = subject_of(e)?;
            let product = e.product_id.id("event.product_id")?;
            (
                Some(account),
                Some(subject),
                Action::Purchase {
                    product,
                    amount: None,
                },
            )
        }
        Mapping::Subscription(fixed) => {
            let account = e.app_user_id.id("event.app_user_id")?;
            let subject = subject_of(e)?;
            let action = subscription(e, &kind, fixed, at_ms)?;
            (Some(account), Some(subject), action)
        }
    };

    Ok(BillingEvent {
        provider: Provider::RevenueCat,
        id,
        kind,
        at_ms,
        account,
        subject,
        test,
        action,
    })
}

/// The subscription (or purchase) the event is about: its original transaction, else the
/// transaction.
fn subject_of(e: &Event) -> Result<String, WebhookError> {
    match e
        .original_transaction_id
        .opt_id("event.original_transaction_id")?
    {
        Some(s) => Ok(s),
        None => e.transaction_id.id("event.transaction_id"),
    }
}

fn subscription(
    e: &Event,
    kind: &str,
    fixed: Option<SubStatus>,
    at_ms: i64,
) -> Result<Action, WebhookError> {
    let product = match (kind, e.new_product_id.opt_id("event.new_product_id")?) {
        ("PRODUCT_CHANGE", Some(p)) => p,
        _ => e.product_id.id("event.product_id")?,
    };
    let status = match fixed {
        Some(s) => s,
        None => match e.period_type.opt("event.period_type")?.map(String::as_str) {
            Some("TRIAL") => SubStatus::Trialing,
            _ => SubStatus::Active,
        },
    };
    let period_start_ms = e
        .purchased_at_ms
        .opt("event.purchased_at_ms")?
        .copied()
        .unwrap_or(at_ms);
    let end_path = "event.expiration_at_ms";
    let period_end_ms = match (e.expiration_at_ms.opt(end_path)?, fixed) {
        (Some(end), _) => *end,
        (None, Some(_)) => return Ok(Action::Ignore),
        (None, None) => return Err(super::invalid(end_path, "missing")),
    };
    Ok(Action::Subscription {
        product,
        status,
        period_start_ms,
        period_end_ms,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::webhooks::testing::{bytes, invalid_at};
    use serde_json::{json, Value};

    // ----- RevenueCat parsing ------------------------------------------------

    pub(crate) fn rc_event(kind: &str) -> Value {
        json!({
            "api_version": "1.0",
            "event": {
                "id": "CDAD0A42-1E8D-4C2B-9A7D-2F4B5A6C7D8E",
                "type": kind,
                "app_id": "app1a2b3c4",
                "app_user_id": "acct_42",
                "original_app_user_id": "acct_42",
                "aliases": ["acct_42"],
                "product_id": "pro_monthly",
                "entitlement_ids": ["pro"],
                "period_type": "NORMAL",
                "event_timestamp_ms": 1_700_000_500_000_i64,
                "purchased_at_ms": 1_700_000_000_000_i64,
                "expiration_at_ms": 1_702_592_000_000_i64,
                "environment": "PRODUCTION",
                "store": "APP_STORE",
                "transaction_id": "2000000123456790",
                "original_transaction_id": "2000000123456789",
                "is_family_share": false,
                "country_code": "US",
                "currency": "USD",
                "price": 9.99,
                "price_in_purchased_currency": 9.99,
                "takehome_percentage": 0.85
            }
        })
    }

    fn rc_sub(v: &Value) -> (SubStatus, String, i64, i64) {
        match parse(&bytes(v)).unwrap().action {
            Action::Subscription {
                product,
                status,
                period_start_ms,
                period_end_ms,
            } => (status, product, period_start_ms, period_end_ms),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn revenuecat_initial_purchase() {
        let ev = parse(&bytes(&rc_event("INITIAL_PURCHASE"))).unwrap();
        assert_eq!(
            ev,
            BillingEvent {
                provider: Provider::RevenueCat,
                id: "CDAD0A42-1E8D-4C2B-9A7D-2F4B5A6C7D8E".into(),
                kind: "INITIAL_PURCHASE".into(),
                at_ms: 1_700_000_500_000,
                account: Some("acct_42".into()),
                subject: Some("2000000123456789".into()),
                test: false,
                action: Action::Subscription {
                    product: "pro_monthly".into(),
                    status: SubStatus::Active,
                    period_start_ms: 1_700_000_000_000,
                    period_end_ms: 1_702_592_000_000,
                },
            }
        );
        let mut v = rc_event("INITIAL_PURCHASE");
        v["event"]["period_type"] = json!("TRIAL");
        assert_eq!(rc_sub(&v).0, SubStatus::Trialing);
        v["event"]["period_type"] = json!("INTRO");
        assert_eq!(rc_sub(&v).0, SubStatus::Active);
        v["event"]["period_type"] = json!(1);
        invalid_at(parse(&bytes(&v)), "event.period_type: expected string");
    }

    #[test]
    fn revenuecat_sandbox_events_are_marked() {
        let mut v = rc_event("NON_RENEWING_PURCHASE");
        assert!(!parse(&bytes(&v)).unwrap().test);
        v["event"]["environment"] = json!("SANDBOX");
        assert!(parse(&bytes(&v)).unwrap().test);
        v["event"]["environment"] = Value::Null;
        assert!(!parse(&bytes(&v)).unwrap().test);
        v["event"]["environment"] = json!(["SANDBOX"]);
        invalid_at(parse(&bytes(&v)), "event.environment: expected string");
    }

    #[test]
    fn revenuecat_renewal_uncancellation_product_change() {
        for kind in ["RENEWAL", "UNCANCELLATION", "PRODUCT_CHANGE"] {
            let (status, product, _, _) = rc_sub(&rc_event(kind));
            assert_eq!(
                (status, product.as_str()),
                (SubStatus::Active, "pro_monthly"),
                "{kind}"
            );
        }
        let mut v = rc_event("PRODUCT_CHANGE");
        v["event"]["new_product_id"] = json!("pro_yearly");
        assert_eq!(rc_sub(&v).1, "pro_yearly");
        // new_product_id only matters for PRODUCT_CHANGE.
        v["event"]["type"] = json!("RENEWAL");
        assert_eq!(rc_sub(&v).1, "pro_monthly");
        v["event"]["type"] = json!("PRODUCT_CHANGE");
        v["event"]["new_product_id"] = Value::Null;
        assert_eq!(rc_sub(&v).1, "pro_monthly");
    }

    #[test]
    fn revenuecat_cancellation_expiration_billing_issue() {
        let mut v = rc_event("CANCELLATION");
        v["event"]["cancel_reason"] = json!("UNSUBSCRIBE");
        assert_eq!(
            rc_sub(&v),
            (
                SubStatus::Canceled,
                "pro_monthly".into(),
                1_700_000_000_000,
                1_702_592_000_000
            )
        );
        let mut v = rc_event("EXPIRATION");
        v["event"]["expiration_reason"] = json!("UNSUBSCRIBE");
        assert_eq!(rc_sub(&v).0, SubStatus::Expired);
        let mut v = rc_event("BILLING_ISSUE");
        v["event"]["grace_period_expiration_at_ms"] = json!(1_702_678_400_000_i64);
        assert_eq!(rc_sub(&v).0, SubStatus::PastDue);
        // A cancellation (refund) of a non-subscription product has no expiration.
        let mut v = rc_event("CANCELLATION");
        v["event"]["expiration_at_ms"] = Value::Null;
        v["event"]["cancel_reason"] = json!("CUSTOMER_SUPPORT");
        let ev = parse(&bytes(&v)).unwrap();
        assert_eq!(ev.action, Action::Ignore);
        assert_eq!(ev.account.as_deref(), Some("acct_42"));
    }

    #[test]
    fn revenuecat_period_fallbacks_and_required() {
        let mut v = rc_event("RENEWAL");
        v["event"]["purchased_at_ms"] = Value::Null;
        assert_eq!(rc_sub(&v).2, 1_700_000_500_000);
        v["event"]
            .as_object_mut()
            .unwrap()
            .remove("purchased_at_ms");
        assert_eq!(rc_sub(&v).2, 1_700_000_500_000);

        let mut v = rc_event("INITIAL_PURCHASE");
        v["event"]["expiration_at_ms"] = Value::Null;
        invalid_at(parse(&bytes(&v)), "event.expiration_at_ms: missing");
        v["event"]["expiration_at_ms"] = json!("soon");
        invalid_at(
            parse(&bytes(&v)),
            "event.expiration_at_ms: expected integer",
        );

        let mut v = rc_event("RENEWAL");
        v["event"]["original_transaction_id"] = Value::Null;
        assert_eq!(
            parse(&bytes(&v)).unwrap().subject.as_deref(),
            Some("2000000123456790")
        );
        v["event"]["transaction_id"] = Value::Null;
        invalid_at(parse(&bytes(&v)), "event.transaction_id: missing");

        let mut v = rc_event("RENEWAL");
        v["event"].as_object_mut().unwrap().remove("app_user_id");
        invalid_at(parse(&bytes(&v)), "event.app_user_id: missing");
        let mut v = rc_event("RENEWAL");
        v["event"]["app_user_id"] = json!("$RCAnonymousID:8b3f0c1d");
        invalid_at(parse(&bytes(&v)), "event.app_user_id:");
        let mut v = rc_event("RENEWAL");
        v["event"]
            .as_object_mut()
            .unwrap()
            .remove("event_timestamp_ms");
        invalid_at(parse(&bytes(&v)), "event.event_timestamp_ms: missing");
        invalid_at(parse(br#"{"api_version":"1.0"}"#), "event.id: missing");
        invalid_at(parse(br#"{"event":[]}"#), "event: expected object");
    }

    #[test]
    fn revenuecat_non_renewing_purchase() {
        let mut v = rc_event("NON_RENEWING_PURCHASE");
        v["event"]["product_id"] = json!("credits_1000");
        v["event"]["expiration_at_ms"] = Value::Null;
        v["event"]["period_type"] = json!("NORMAL");
        let ev = parse(&bytes(&v)).unwrap();
        assert_eq!(
            ev.action,
            Action::Purchase {
                product: "credits_1000".into(),
                amount: None
            }
        );
        assert_eq!(ev.account.as_deref(), Some("acct_42"));
        assert_eq!(ev.subject.as_deref(), Some("2000000123456789"));
    }

    #[test]
    fn revenuecat_ignored_and_unknown() {
        for kind in [
            "TEST",
            "SUBSCRIBER_ALIAS",
            "TRANSFER",
            "SUBSCRIPTION_PAUSED",
        ] {
            let ev = parse(&bytes(&rc_event(kind))).unwrap();
            assert_eq!(ev.action, Action::Ignore, "{kind}");
            assert_eq!(ev.account.as_deref(), Some("acct_42"));
        }
        // RevenueCat's dashboard test event uses an anonymous id and no product.
        let v = json!({"api_version": "1.0", "event": {
            "id": "7F6E5D4C-0000-1111-2222-333344445555", "type": "TEST",
            "app_user_id": "$RCAnonymousID:8b3f0c1d", "event_timestamp_ms": 1_700_000_000_000_i64,
            "product_id": null, "expiration_at_ms": null}});
        let ev = parse(&bytes(&v)).unwrap();
        assert_eq!(
            (ev.action, ev.account, ev.subject),
            (Action::Ignore, None, None)
        );
        // TRANSFER carries no app_user_id.
        let v = json!({"event": {"id": "evt-t", "type": "TRANSFER", "event_timestamp_ms": 5,
            "transferred_from": ["a"], "transferred_to": ["b"]}});
        assert_eq!(parse(&bytes(&v)).unwrap().action, Action::Ignore);

        let ev = parse(&bytes(&rc_event("TEMPORARY_ENTITLEMENT_GRANT"))).unwrap();
        assert_eq!(ev.action, Action::Unknown);
        assert_eq!(ev.kind, "TEMPORARY_ENTITLEMENT_GRANT");
        assert_eq!(ev.provider.as_str(), "revenuecat");
    }
}
