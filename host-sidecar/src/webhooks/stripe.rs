//! Stripe events (<https://docs.stripe.com/api/events/object>) as typed payloads.
//!
//! An event is read twice from the same verified body: first its envelope ([`Event`] with a
//! loose [`Loose`] object, enough to record any event), then, for the types we act on, its
//! `data.object` as the object that type carries ([`Subscription`], [`CheckoutSession`],
//! [`Charge`]). Every field the provider may omit is optional (`#[serde(default)]`, lenient
//! [`Got`] fields); an event we act on that lacks what it needs is `Invalid("<field>: <reason>")`.

use super::{
    check_id, invalid, parse_root, secs_to_ms, Action, BillingEvent, Count, First, Flag, Got, Int,
    Obj, Provider, SubStatus, Text, WebhookError,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// The event envelope: `{id, type, created, livemode, data: {object}}`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, bound = "O: Deserialize<'de> + Default")]
struct Event<O> {
    id: Text,
    #[serde(rename = "type")]
    kind: Text,
    /// Unix seconds.
    created: Int,
    /// `false` for events of Stripe's test mode.
    livemode: Flag,
    data: Obj<Data<O>>,
}

/// Only the event's object (the envelope was read already).
#[derive(Debug, Default, Deserialize)]
#[serde(default, bound = "O: Deserialize<'de> + Default")]
struct Payload<O> {
    data: Obj<Data<O>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, bound = "O: Deserialize<'de> + Default")]
struct Data<O> {
    object: Obj<O>,
}

/// What every object has that we read from events we only record.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Loose {
    id: Text,
    metadata: Obj<Metadata>,
}

/// The metadata keys Tollgate sets on the objects it creates (values are strings at Stripe).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Metadata {
    /// Our account id.
    tollgate_account: Text,
    /// Checkout: the credit pack bought (a key of `billing.stripe.packs`).
    tollgate_pack: Text,
    /// Checkout: an explicit number of credits.
    tollgate_credits: Count,
    /// Charge: the grant a refund revokes.
    tollgate_grant: Text,
}

/// `customer.subscription.*`: a subscription object.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Subscription {
    id: Text,
    status: Text,
    /// Unix seconds; newer API versions have them on the items only.
    current_period_start: Int,
    current_period_end: Int,
    metadata: Obj<Metadata>,
    items: Obj<List<Item>>,
}

/// A Stripe list object: `{object: "list", data: [...]}`; we read its first element.
#[derive(Debug, Default, Deserialize)]
#[serde(default, bound = "T: Deserialize<'de> + Default")]
struct List<T> {
    data: First<Obj<T>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Item {
    current_period_start: Int,
    current_period_end: Int,
    price: Obj<Price>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Price {
    id: Text,
    lookup_key: Text,
}

/// `checkout.session.completed`: a checkout session.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CheckoutSession {
    id: Text,
    payment_status: Text,
    metadata: Obj<Metadata>,
}

/// `charge.refunded`: a charge.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Charge {
    id: Text,
    metadata: Obj<Metadata>,
}

/// (subject, account, action) of an event.
type Parts = (Option<String>, Option<String>, Action);

/// Parses a Stripe event body into a [`BillingEvent`]. The body should be verified first.
pub fn parse(payload: &[u8]) -> Result<BillingEvent, WebhookError> {
    let event: Event<Loose> = parse_root(payload)?;
    let id = event.id.id("id")?;
    let kind = event.kind.id("type")?;
    let at_ms = secs_to_ms("created", *event.created.req("created")?)?;
    let test = event.livemode.opt("livemode")? == Some(&false);

    let (subject, account, action) = match kind.as_str() {
        "customer.subscription.created" | "customer.subscription.updated" => {
            subscription(&object(payload)?, false)?
        }
        "customer.subscription.deleted" => subscription(&object(payload)?, true)?,
        "checkout.session.completed" => checkout(&object(payload)?)?,
        "charge.refunded" => refund(&object(payload)?)?,
        "invoice.paid"
        | "invoice.payment_failed"
        | "customer.created"
        | "payment_intent.succeeded" => loose(&event, Action::Ignore),
        _ => loose(&event, Action::Unknown),
    };

    Ok(BillingEvent {
        provider: Provider::Stripe,
        id,
        kind,
        at_ms,
        account,
        subject,
        test,
        action,
    })
}

/// The event's `data.object` as `O`.
fn object<O: DeserializeOwned + Default>(payload: &[u8]) -> Result<O, WebhookError> {
    let p: Payload<O> = parse_root(payload)?;
    p.data.into_at("data")?.object.into_at("data.object")
}

/// Best effort for events we do not act on: the object's id and account, when valid.
fn loose(event: &Event<Loose>, action: Action) -> Parts {
    let obj = event.data.loose().object.loose();
    (
        obj.id.loose_id(),
        obj.metadata.loose().tollgate_account.loose_id(),
        action,
    )
}

fn stripe_status(s: &str) -> Option<SubStatus> {
    Some(match s {
        "active" => SubStatus::Active,
        "trialing" => SubStatus::Trialing,
        "past_due" | "unpaid" | "incomplete" => SubStatus::PastDue,
        "canceled" | "paused" => SubStatus::Canceled,
        "incomplete_expired" => SubStatus::Expired,
        _ => return None,
    })
}

const ITEM: &str = "data.object.items.data[0]";

fn subscription(s: &Subscription, deleted: bool) -> Result<Parts, WebhookError> {
    let subject = s.id.id("data.object.id")?;
    let account = s
        .metadata
        .at("data.object.metadata")?
        .tollgate_account
        .opt_id("data.object.metadata.tollgate_account")?;
    let status = if deleted {
        SubStatus::Canceled
    } else {
        let path = "data.object.status";
        stripe_status(s.status.req(path)?)
            .ok_or_else(|| invalid(path, "unknown subscription status"))?
    };
    // The first item, read only when the event needs it.
    let item = || -> Result<&Item, WebhookError> {
        s.items
            .at("data.object.items")?
            .data
            .at("data.object.items.data")?
            .at(ITEM)
    };
    // A period bound: on the subscription, else on its first item (newer API versions).
    let period = |top: &Int, field: &str, of_item: fn(&Item) -> &Int| {
        let top_path = format!("data.object.{field}");
        let secs = match top.opt(&top_path)? {
            Some(v) => *v,
            None => *of_item(item()?).req(&format!("{ITEM}.{field}"))?,
        };
        secs_to_ms(&top_path, secs)
    };
    let period_start_ms = period(&s.current_period_start, "current_period_start", |i| {
        &i.current_period_start
    })?;
    let period_end_ms = period(&s.current_period_end, "current_period_end", |i| {
        &i.current_period_end
    })?;

    // The price's lookup key when it has one, else its id.
    let price = item()?.price.at(&format!("{ITEM}.price"))?;
    let product = match &price.lookup_key {
        Got::Value(key) if !key.is_empty() => check_id(&format!("{ITEM}.price.lookup_key"), key)?,
        _ => price.id.id(&format!("{ITEM}.price.id"))?,
    };

    Ok((
        Some(subject),
        account,
        Action::Subscription {
            product,
            status,
            period_start_ms,
            period_end_ms,
        },
    ))
}

fn checkout(c: &CheckoutSession) -> Result<Parts, WebhookError> {
    let subject = c.id.id("data.object.id")?;
    let meta = c.metadata.at("data.object.metadata")?;
    let account = meta
        .tollgate_account
        .opt_id("data.object.metadata.tollgate_account")?;
    let paid = c
        .payment_status
        .opt("data.object.payment_status")?
        .is_some_and(|s| s == "paid");
    let pack = meta
        .tollgate_pack
        .opt_id("data.object.metadata.tollgate_pack")?;
    let action = match pack {
        Some(product) if paid => Action::Purchase {
            product,
            amount: meta
                .tollgate_credits
                .opt("data.object.metadata.tollgate_credits")?
                .copied(),
        },
        _ => Action::Ignore,
    };
    Ok((Some(subject), account, action))
}

fn refund(c: &Charge) -> Result<Parts, WebhookError> {
    let subject = c.id.id("data.object.id")?;
    let meta = c.metadata.at("data.object.metadata")?;
    let account = meta
        .tollgate_account
        .opt_id("data.object.metadata.tollgate_account")?;
    let action = match meta
        .tollgate_grant
        .opt_id("data.object.metadata.tollgate_grant")?
    {
        Some(reference) => Action::Refund { reference },
        None => Action::Ignore,
    };
    Ok((Some(subject), account, action))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::webhooks::testing::{bytes, invalid_at};
    use serde_json::{json, Value};

    // ----- Stripe parsing ----------------------------------------------------

    pub(crate) fn stripe_sub_event(kind: &str, status: &str) -> Value {
        json!({
            "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy",
            "object": "event",
            "api_version": "2023-10-16",
            "created": 1_700_000_100,
            "livemode": true,
            "pending_webhooks": 1,
            "type": kind,
            "data": {
                "object": {
                    "id": "sub_1MowQVLkdIwHu7ixeRlqHVzs",
                    "object": "subscription",
                    "customer": "cus_Na6dX7aXxi11N4",
                    "status": status,
                    "current_period_start": 1_700_000_000,
                    "current_period_end": 1_702_592_000,
                    "cancel_at_period_end": false,
                    "metadata": { "tollgate_account": "acct_42" },
                    "items": {
                        "object": "list",
                        "data": [{
                            "id": "si_NaE5xZ3Tp2wz8J",
                            "object": "subscription_item",
                            "price": {
                                "id": "price_1MowQULkdIwHu7ixraBm864M",
                                "object": "price",
                                "lookup_key": "pro_monthly",
                                "unit_amount": 1000,
                                "currency": "usd"
                            },
                            "quantity": 1
                        }]
                    }
                }
            }
        })
    }

    #[test]
    fn stripe_subscription_updated() {
        let ev = parse(&bytes(&stripe_sub_event(
            "customer.subscription.updated",
            "active",
        )))
        .unwrap();
        assert_eq!(
            ev,
            BillingEvent {
                provider: Provider::Stripe,
                id: "evt_1NG8Du2eZvKYlo2CUI79vXWy".into(),
                kind: "customer.subscription.updated".into(),
                at_ms: 1_700_000_100_000,
                account: Some("acct_42".into()),
                subject: Some("sub_1MowQVLkdIwHu7ixeRlqHVzs".into()),
                test: false,
                action: Action::Subscription {
                    product: "pro_monthly".into(),
                    status: SubStatus::Active,
                    period_start_ms: 1_700_000_000_000,
                    period_end_ms: 1_702_592_000_000,
                },
            }
        );
    }

    #[test]
    fn stripe_test_mode_events_are_marked() {
        let mut v = stripe_sub_event("customer.subscription.updated", "active");
        assert!(!parse(&bytes(&v)).unwrap().test);
        v["livemode"] = json!(false);
        assert!(parse(&bytes(&v)).unwrap().test);
        // Absent (or null): a live event, as Stripe always says which.
        v.as_object_mut().unwrap().remove("livemode");
        assert!(!parse(&bytes(&v)).unwrap().test);
        v["livemode"] = Value::Null;
        assert!(!parse(&bytes(&v)).unwrap().test);
        v["livemode"] = json!("false");
        invalid_at(parse(&bytes(&v)), "livemode: expected boolean");
        // Whatever the type: an event we only record is marked too.
        let v = json!({"id": "evt_t", "type": "invoice.paid", "created": 1, "livemode": false});
        assert!(parse(&bytes(&v)).unwrap().test);
    }

    #[test]
    fn stripe_fields_are_typed_but_only_checked_when_needed() {
        // Fields the event does not need may be anything.
        let mut v = stripe_sub_event("customer.subscription.updated", "active");
        v["data"]["object"]["customer"] = json!(5);
        v["data"]["object"]["metadata"]["tollgate_pack"] = json!(["x"]);
        v["data"]["object"]["items"]["data"][0]["quantity"] = json!("one");
        v["data"]["object"]["description"] = json!("x".repeat(70_000));
        assert!(parse(&bytes(&v)).is_ok());
        // Only the first item is read.
        v["data"]["object"]["items"]["data"]
            .as_array_mut()
            .unwrap()
            .push(json!("not an item"));
        assert!(parse(&bytes(&v)).is_ok());
        // A list that is not one.
        let mut v = stripe_sub_event("customer.subscription.updated", "active");
        v["data"]["object"]["items"]["data"] = json!({"0": {"price": {"id": "p"}}});
        invalid_at(parse(&bytes(&v)), "data.object.items.data: expected array");
        v["data"]["object"]["items"]["data"] = json!(["p"]);
        invalid_at(
            parse(&bytes(&v)),
            "data.object.items.data[0]: expected object",
        );
        v["data"]["object"]["items"] = json!(7);
        invalid_at(parse(&bytes(&v)), "data.object.items: expected object");
        // The same object for an event we only record: acknowledged.
        v["type"] = json!("customer.subscription.paused");
        assert_eq!(parse(&bytes(&v)).unwrap().action, Action::Unknown);
    }

    #[test]
    fn stripe_subscription_status_mapping() {
        for (s, want) in [
            ("active", SubStatus::Active),
            ("trialing", SubStatus::Trialing),
            ("past_due", SubStatus::PastDue),
            ("canceled", SubStatus::Canceled),
            ("unpaid", SubStatus::PastDue),
            ("incomplete", SubStatus::PastDue),
            ("incomplete_expired", SubStatus::Expired),
            ("paused", SubStatus::Canceled),
        ] {
            let ev = parse(&bytes(&stripe_sub_event(
                "customer.subscription.created",
                s,
            )))
            .unwrap();
            match ev.action {
                Action::Subscription { status, .. } => assert_eq!(status, want, "{s}"),
                other => panic!("{other:?}"),
            }
        }
        invalid_at(
            parse(&bytes(&stripe_sub_event(
                "customer.subscription.updated",
                "exploded",
            ))),
            "data.object.status:",
        );
        let mut v = stripe_sub_event("customer.subscription.updated", "active");
        v["data"]["object"]["status"] = json!(3);
        invalid_at(parse(&bytes(&v)), "data.object.status: expected string");
    }

    #[test]
    fn stripe_subscription_deleted_is_canceled() {
        let mut v = stripe_sub_event("customer.subscription.deleted", "incomplete_expired");
        let ev = parse(&bytes(&v)).unwrap();
        assert!(matches!(
            ev.action,
            Action::Subscription {
                status: SubStatus::Canceled,
                ..
            }
        ));
        // Status is not consulted for deletions.
        v["data"]["object"]["status"] = json!("whatever");
        assert!(parse(&bytes(&v)).is_ok());
    }

    #[test]
    fn stripe_subscription_periods_in_items() {
        // Newer API versions move the period to the subscription item.
        let mut v = stripe_sub_event("customer.subscription.created", "trialing");
        let obj = v["data"]["object"].as_object_mut().unwrap();
        obj.remove("current_period_start");
        obj.remove("current_period_end");
        obj.remove("metadata");
        v["data"]["object"]["items"]["data"][0]["current_period_start"] = json!(1_710_000_000);
        v["data"]["object"]["items"]["data"][0]["current_period_end"] = json!(1_711_000_000);
        v["data"]["object"]["items"]["data"][0]["price"]["lookup_key"] = Value::Null;
        let ev = parse(&bytes(&v)).unwrap();
        assert_eq!(ev.account, None);
        assert_eq!(
            ev.action,
            Action::Subscription {
                product: "price_1MowQULkdIwHu7ixraBm864M".into(),
                status: SubStatus::Trialing,
                period_start_ms: 1_710_000_000_000,
                period_end_ms: 1_711_000_000_000,
            }
        );
        // Empty lookup key also falls back to the price id.
        v["data"]["object"]["items"]["data"][0]["price"]["lookup_key"] = json!("");
        let ev = parse(&bytes(&v)).unwrap();
        assert!(
            matches!(ev.action, Action::Subscription { ref product, .. } if product == "price_1MowQULkdIwHu7ixraBm864M")
        );
        // Neither location: invalid.
        v["data"]["object"]["items"]["data"][0]
            .as_object_mut()
            .unwrap()
            .remove("current_period_end");
        invalid_at(
            parse(&bytes(&v)),
            "data.object.items.data[0].current_period_end: missing",
        );
    }

    #[test]
    fn stripe_subscription_invalid_fields() {
        let base = stripe_sub_event("customer.subscription.updated", "active");
        let mut v = base.clone();
        v["data"]["object"]["items"]["data"] = json!([]);
        invalid_at(
            parse(&bytes(&v)),
            "data.object.items.data[0].price.id: missing",
        );
        let mut v = base.clone();
        v["data"]["object"]["items"]["data"][0]["price"]["lookup_key"] = json!("pro monthly");
        invalid_at(
            parse(&bytes(&v)),
            "data.object.items.data[0].price.lookup_key:",
        );
        let mut v = base.clone();
        v["data"]["object"]["metadata"]["tollgate_account"] = json!("acct/42");
        invalid_at(parse(&bytes(&v)), "data.object.metadata.tollgate_account:");
        let mut v = base.clone();
        v["data"]["object"]["metadata"]["tollgate_account"] = json!(42);
        invalid_at(
            parse(&bytes(&v)),
            "data.object.metadata.tollgate_account: expected string",
        );
        let mut v = base.clone();
        v["data"]["object"]["current_period_end"] = json!("1702592000");
        invalid_at(
            parse(&bytes(&v)),
            "data.object.current_period_end: expected integer",
        );
        let mut v = base.clone();
        v["data"]["object"]["current_period_end"] = json!(i64::MAX);
        invalid_at(
            parse(&bytes(&v)),
            "data.object.current_period_end: timestamp",
        );
        let mut v = base.clone();
        v["data"]["object"].as_object_mut().unwrap().remove("id");
        invalid_at(parse(&bytes(&v)), "data.object.id: missing");
        let mut v = base.clone();
        v["data"] = json!("nope");
        invalid_at(parse(&bytes(&v)), "data: expected object");
        let mut v = base;
        v["data"]["object"]["metadata"] = json!([1, 2]);
        invalid_at(parse(&bytes(&v)), "data.object.metadata: expected object");
    }

    pub(crate) fn checkout_event(payment_status: &str, metadata: Value) -> Value {
        json!({
            "id": "evt_1OtvRS2eZvKYlo2CjQhqA6Cb",
            "object": "event",
            "created": 1_700_000_200,
            "type": "checkout.session.completed",
            "data": { "object": {
                "id": "cs_test_a1B2c3D4e5F6",
                "object": "checkout.session",
                "mode": "payment",
                "amount_total": 500,
                "currency": "usd",
                "customer": "cus_Na6dX7aXxi11N4",
                "payment_status": payment_status,
                "status": "complete",
                "metadata": metadata
            }}
        })
    }

    #[test]
    fn stripe_checkout_paid() {
        let v = checkout_event(
            "paid",
            json!({"tollgate_account": "acct_42", "tollgate_pack": "credits_1000", "tollgate_credits": "1000"}),
        );
        let ev = parse(&bytes(&v)).unwrap();
        assert_eq!(ev.at_ms, 1_700_000_200_000);
        assert_eq!(ev.account.as_deref(), Some("acct_42"));
        assert_eq!(ev.subject.as_deref(), Some("cs_test_a1B2c3D4e5F6"));
        assert_eq!(
            ev.action,
            Action::Purchase {
                product: "credits_1000".into(),
                amount: Some(1000)
            }
        );

        let v = checkout_event(
            "paid",
            json!({"tollgate_account": "acct_42", "tollgate_pack": "credits_1000", "tollgate_credits": 250}),
        );
        assert_eq!(
            parse(&bytes(&v)).unwrap().action,
            Action::Purchase {
                product: "credits_1000".into(),
                amount: Some(250)
            }
        );

        let v = checkout_event(
            "paid",
            json!({"tollgate_account": "acct_42", "tollgate_pack": "credits_1000"}),
        );
        assert_eq!(
            parse(&bytes(&v)).unwrap().action,
            Action::Purchase {
                product: "credits_1000".into(),
                amount: None
            }
        );
    }

    #[test]
    fn stripe_checkout_ignored_or_invalid() {
        // Not paid yet (e.g. delayed payment methods).
        let v = checkout_event(
            "unpaid",
            json!({"tollgate_account": "acct_42", "tollgate_pack": "credits_1000"}),
        );
        let ev = parse(&bytes(&v)).unwrap();
        assert_eq!(ev.action, Action::Ignore);
        assert_eq!(ev.account.as_deref(), Some("acct_42"));
        // No pack: a checkout we did not create for credits.
        let v = checkout_event("paid", json!({"tollgate_account": "acct_42"}));
        assert_eq!(parse(&bytes(&v)).unwrap().action, Action::Ignore);
        let v = checkout_event("paid", json!({}));
        assert_eq!(parse(&bytes(&v)).unwrap().action, Action::Ignore);
        // Bad credit amounts.
        for credits in [
            json!("-5"),
            json!("1.5"),
            json!(""),
            json!(" 5"),
            json!(-5),
            json!(1.5),
            json!(true),
            json!("99999999999999999999999"),
        ] {
            let v = checkout_event(
                "paid",
                json!({"tollgate_pack": "credits_1000", "tollgate_credits": credits}),
            );
            invalid_at(parse(&bytes(&v)), "data.object.metadata.tollgate_credits:");
        }
        let v = checkout_event("paid", json!({"tollgate_pack": "credits 1000"}));
        invalid_at(parse(&bytes(&v)), "data.object.metadata.tollgate_pack:");
    }

    pub(crate) fn charge_refunded(metadata: Value) -> Value {
        json!({
            "id": "evt_3MqR5o2eZvKYlo2C0Vj3Sx9h",
            "object": "event",
            "created": 1_700_000_300,
            "type": "charge.refunded",
            "data": { "object": {
                "id": "ch_3MqR5o2eZvKYlo2C0bm3cQpZ",
                "object": "charge",
                "amount": 500,
                "amount_refunded": 500,
                "refunded": true,
                "currency": "usd",
                "metadata": metadata
            }}
        })
    }

    #[test]
    fn stripe_charge_refunded() {
        let ev = parse(&bytes(&charge_refunded(
            json!({"tollgate_account": "acct_42", "tollgate_grant": "grant_01HV3K"}),
        )))
        .unwrap();
        assert_eq!(ev.subject.as_deref(), Some("ch_3MqR5o2eZvKYlo2C0bm3cQpZ"));
        assert_eq!(ev.account.as_deref(), Some("acct_42"));
        assert_eq!(
            ev.action,
            Action::Refund {
                reference: "grant_01HV3K".into()
            }
        );

        let ev = parse(&bytes(&charge_refunded(
            json!({"tollgate_account": "acct_42"}),
        )))
        .unwrap();
        assert_eq!(ev.action, Action::Ignore);

        invalid_at(
            parse(&bytes(&charge_refunded(json!({"tollgate_grant": ""})))),
            "data.object.metadata.tollgate_grant:",
        );
    }

    #[test]
    fn stripe_known_ignored_and_unknown() {
        for kind in [
            "invoice.paid",
            "invoice.payment_failed",
            "customer.created",
            "payment_intent.succeeded",
        ] {
            let v = json!({"id": "evt_9", "type": kind, "created": 1_700_000_000,
                "data": {"object": {"id": "in_1", "metadata": {"tollgate_account": "acct_7"}}}});
            let ev = parse(&bytes(&v)).unwrap();
            assert_eq!(ev.action, Action::Ignore, "{kind}");
            assert_eq!(ev.subject.as_deref(), Some("in_1"));
            assert_eq!(ev.account.as_deref(), Some("acct_7"));
        }
        let v = json!({"id": "evt_10", "type": "radar.early_fraud_warning.created", "created": 1_700_000_000});
        let ev = parse(&bytes(&v)).unwrap();
        assert_eq!(ev.action, Action::Unknown);
        assert_eq!(ev.kind, "radar.early_fraud_warning.created");
        assert_eq!((ev.subject, ev.account), (None, None));
        // Unknown events with odd objects are still acknowledged.
        let v = json!({"id": "evt_11", "type": "x.y", "created": 1, "data": {"object": {"id": "bad id!", "metadata": 5}}});
        let ev = parse(&bytes(&v)).unwrap();
        assert_eq!(
            (ev.action, ev.subject, ev.account),
            (Action::Unknown, None, None)
        );
    }

    #[test]
    fn stripe_envelope_required() {
        invalid_at(parse(br#"{"type":"x","created":1}"#), "id: missing");
        invalid_at(parse(br#"{"id":"evt_1","created":1}"#), "type: missing");
        invalid_at(parse(br#"{"id":"evt_1","type":"x"}"#), "created: missing");
        invalid_at(
            parse(br#"{"id":"evt_1","type":"x","created":"1"}"#),
            "created: expected integer",
        );
        invalid_at(
            parse(br#"{"id":"evt_1","type":"x","created":1.5}"#),
            "created: expected integer",
        );
        invalid_at(
            parse(br#"{"id":"evt_1","type":"x","created":9223372036854775807}"#),
            "created: timestamp",
        );
        invalid_at(
            parse(br#"{"id":"evt_1","type":"x","created":18446744073709551615}"#),
            "created: expected integer",
        );
        invalid_at(
            parse(br#"{"id":7,"type":"x","created":1}"#),
            "id: expected string",
        );
        invalid_at(
            parse(br#"{"id":null,"type":"x","created":1}"#),
            "id: missing",
        );
        invalid_at(parse(b"[]"), "(root): expected object");
        invalid_at(parse(b"\"evt\""), "(root): expected object");
        invalid_at(parse(b""), "(root):");
        invalid_at(parse(b"{\"id\":"), "(root):");
        invalid_at(parse(b"\xff\xfe"), "(root):");
    }
}
