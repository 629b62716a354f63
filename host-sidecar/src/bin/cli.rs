//! `tollgate`: the operator's command line. It speaks to a running sidecar's admin API (the same
//! routes as docs/openapi.json), so it works the same against every store and ledger.
//!
//!   tollgate --url http://127.0.0.1:8700 --token $TOLLGATE_ADMIN_TOKEN accounts show acme
//!
//! Output is JSON (CSV for `export --format csv`). Exit status: 0 done, 1 the API refused (its
//! error is printed), 2 reconciliation found differences, 3 the sidecar was unreachable.

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::io::Write;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Operate a Tollgate sidecar through its admin API"
)]
struct Cli {
    /// The sidecar's base URL.
    #[arg(long, env = "TOLLGATE_URL", default_value = "http://127.0.0.1:8700")]
    url: String,
    /// The admin token (server.admin_token).
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    #[command(subcommand)]
    Plans(PlanCmd),
    #[command(subcommand)]
    Accounts(AccountCmd),
    #[command(subcommand)]
    Subscription(SubscriptionCmd),
    #[command(subcommand)]
    Keys(KeyCmd),
    #[command(subcommand)]
    Grants(GrantCmd),
    /// Spendable credit now and the grants behind it.
    Balance { account: String },
    /// Every limit's current window for an account (or one of its keys).
    Usage {
        account: String,
        #[arg(long)]
        key: Option<String>,
    },
    /// Threshold alerts raised for an account.
    Alerts { account: String },
    /// The ledger, oldest first, every page: JSON lines or CSV.
    Export {
        #[arg(long)]
        account: Option<String>,
        #[arg(long, default_value = "json")]
        format: String,
        /// Start after this ledger sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
    /// The accounts that used the most of a meter in a window.
    Top {
        #[arg(long)]
        meter: String,
        /// minute | hour | day | week | month | lifetime (current period, UTC)
        #[arg(long)]
        window: Option<String>,
        /// A stored period id, e.g. d:2026-12-01 (instead of --window).
        #[arg(long)]
        period: Option<String>,
        #[arg(long, default_value_t = 10)]
        limit: i64,
    },
    /// Compare Redis with the ledger (after draining the outbox); exit 2 on any difference.
    Reconcile {
        #[arg(long)]
        account: Option<String>,
    },
    #[command(subcommand)]
    Pools(PoolCmd),
    /// Billing-provider events received (newest first).
    Events {
        #[arg(long)]
        account: Option<String>,
    },
    /// Run the scheduler's jobs now: included credits, credit expiry, alert delivery.
    Jobs,
}

#[derive(Subcommand)]
enum PlanCmd {
    /// Every plan (configured, and written through the API).
    List,
    Show {
        name: String,
    },
    /// Delete a plan written through the API (refused while accounts are on it, unless the
    /// configuration has a plan of that name to fall back to).
    Delete {
        name: String,
    },
    /// Create or replace a plan; accounts on it get its limits on their next request.
    Set {
        name: String,
        /// A limit as meter:window:max[:mode], e.g. requests:day:1000,
        /// requests:concurrent:10 or tokens:day:50000:soft (repeat for more).
        #[arg(long = "limit")]
        limits: Vec<String>,
        #[arg(long, default_value_t = 0)]
        included_credits: u64,
        /// day | week | month
        #[arg(long, default_value = "month")]
        credits_period: String,
        /// Included credits never expire (by default they expire at the end of their period).
        #[arg(long)]
        credits_keep: bool,
        #[arg(long, default_value_t = 10)]
        credits_priority: u32,
    },
}

#[derive(Subcommand)]
enum AccountCmd {
    Create {
        id: String,
        #[arg(long)]
        plan: String,
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// The account above it (a team, an organization); fixed once created.
        #[arg(long)]
        parent: Option<String>,
        /// Spend the parent's credit once its own is spent.
        #[arg(long)]
        draw_from_parents: bool,
    },
    Show {
        id: String,
    },
    /// Move an account to another plan (takes effect on its next request).
    SetPlan {
        id: String,
        plan: String,
    },
    Disable {
        id: String,
    },
    Enable {
        id: String,
    },
}

#[derive(Subcommand)]
enum SubscriptionCmd {
    Show {
        account: String,
    },
    Set {
        account: String,
        #[arg(long)]
        plan: String,
        /// active | trialing | past_due | canceled | expired
        #[arg(long, default_value = "active")]
        status: String,
        #[arg(long)]
        period_end_ms: Option<i64>,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Create a key; its plaintext is printed once.
    Create {
        account: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    List {
        account: String,
    },
    Disable {
        key_id: String,
    },
}

#[derive(Subcommand)]
enum GrantCmd {
    /// Add credit (the grant id makes it idempotent).
    Add {
        account: String,
        #[arg(long)]
        id: String,
        #[arg(long)]
        amount: u64,
        #[arg(long, default_value_t = 100)]
        priority: u32,
        #[arg(long)]
        expires_at_ms: Option<u64>,
        /// purchase | promotion | refund | plan | adjustment
        #[arg(long, default_value = "adjustment")]
        source: String,
    },
    List {
        account: String,
    },
}

#[derive(Subcommand)]
enum PoolCmd {
    Create {
        id: String,
        #[arg(long)]
        stock: u64,
        #[arg(long, default_value = "")]
        description: String,
    },
    Show {
        id: String,
    },
    List,
    /// Claim one unit for an account (once per account).
    Claim {
        id: String,
        #[arg(long)]
        account: String,
    },
}

struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

enum Failure {
    Refused(u16, String),
    Unreachable(String),
}

impl Api {
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, String), Failure> {
        let url = format!("{}{}", self.base.trim_end_matches('/'), path);
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut req = self.http.request(m, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Failure::Unreachable(format!("{url}: {e}")))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| Failure::Unreachable(format!("{url}: {e}")))?;
        if status >= 400 {
            return Err(Failure::Refused(status, text));
        }
        Ok((status, text))
    }

    async fn json(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Failure> {
        let (_, text) = self.call(method, path, body).await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

/// A path segment or query value, percent-encoded.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn print(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn run(api: &Api, cmd: Cmd) -> Result<ExitCode, Failure> {
    let out = match cmd {
        Cmd::Plans(c) => match c {
            PlanCmd::List => api.json("GET", "/admin/plans", None).await?,
            PlanCmd::Show { name } => {
                api.json("GET", &format!("/admin/plans/{}", enc(&name)), None)
                    .await?
            }
            PlanCmd::Delete { name } => {
                api.json("DELETE", &format!("/admin/plans/{}", enc(&name)), None)
                    .await?
            }
            PlanCmd::Set {
                name,
                limits,
                included_credits,
                credits_period,
                credits_keep,
                credits_priority,
            } => {
                let mut parsed = Vec::new();
                for l in &limits {
                    let parts: Vec<&str> = l.split(':').collect();
                    let (meter, window, max, mode) = match parts[..] {
                        [meter, window, max] => (meter, window, max, "enforce"),
                        [meter, window, max, mode] => (meter, window, max, mode),
                        _ => {
                            return Err(Failure::Refused(
                                400,
                                format!("--limit {l:?}: expected meter:window:max[:mode]"),
                            ))
                        }
                    };
                    let max: u64 = max.parse().map_err(|_| {
                        Failure::Refused(400, format!("--limit {l:?}: max is not a number"))
                    })?;
                    parsed
                        .push(json!({"meter": meter, "window": window, "max": max, "mode": mode}));
                }
                let body = json!({"limits": parsed, "included_credits": included_credits,
                    "credits_period": credits_period, "credits_expire": !credits_keep,
                    "credits_priority": credits_priority});
                api.json("PUT", &format!("/admin/plans/{}", enc(&name)), Some(body))
                    .await?
            }
        },
        Cmd::Accounts(c) => match c {
            AccountCmd::Create {
                id,
                plan,
                timezone,
                parent,
                draw_from_parents,
            } => {
                let mut body = json!({"id": id, "plan": plan, "timezone": timezone});
                if let Some(p) = parent {
                    body["parent"] = json!(p);
                }
                if draw_from_parents {
                    body["draw_from_parents"] = json!(true);
                }
                api.json("POST", "/admin/accounts", Some(body)).await?
            }
            AccountCmd::Show { id } => {
                api.json("GET", &format!("/admin/accounts/{}", enc(&id)), None)
                    .await?
            }
            AccountCmd::SetPlan { id, plan } => {
                api.json(
                    "PATCH",
                    &format!("/admin/accounts/{}", enc(&id)),
                    Some(json!({"plan": plan})),
                )
                .await?
            }
            AccountCmd::Disable { id } => {
                api.json(
                    "PATCH",
                    &format!("/admin/accounts/{}", enc(&id)),
                    Some(json!({"disabled": true})),
                )
                .await?
            }
            AccountCmd::Enable { id } => {
                api.json(
                    "PATCH",
                    &format!("/admin/accounts/{}", enc(&id)),
                    Some(json!({"disabled": false})),
                )
                .await?
            }
        },
        Cmd::Subscription(c) => match c {
            SubscriptionCmd::Show { account } => {
                api.json(
                    "GET",
                    &format!("/admin/accounts/{}/subscription", enc(&account)),
                    None,
                )
                .await?
            }
            SubscriptionCmd::Set {
                account,
                plan,
                status,
                period_end_ms,
            } => {
                let mut b = json!({"plan": plan, "status": status});
                if let Some(e) = period_end_ms {
                    b["period_end_ms"] = json!(e);
                }
                api.json(
                    "PUT",
                    &format!("/admin/accounts/{}/subscription", enc(&account)),
                    Some(b),
                )
                .await?
            }
        },
        Cmd::Keys(c) => match c {
            KeyCmd::Create { account, name } => {
                api.json(
                    "POST",
                    &format!("/admin/accounts/{}/keys", enc(&account)),
                    Some(json!({"name": name})),
                )
                .await?
            }
            KeyCmd::List { account } => {
                api.json(
                    "GET",
                    &format!("/admin/accounts/{}/keys", enc(&account)),
                    None,
                )
                .await?
            }
            KeyCmd::Disable { key_id } => {
                api.json(
                    "POST",
                    &format!("/admin/keys/{}/disable", enc(&key_id)),
                    None,
                )
                .await?
            }
        },
        Cmd::Grants(c) => match c {
            GrantCmd::Add {
                account,
                id,
                amount,
                priority,
                expires_at_ms,
                source,
            } => {
                let mut b = json!({"grant_id": id, "amount": amount, "priority": priority, "source": source});
                if let Some(e) = expires_at_ms {
                    b["expires_at_ms"] = json!(e);
                }
                api.json(
                    "POST",
                    &format!("/admin/accounts/{}/grants", enc(&account)),
                    Some(b),
                )
                .await?
            }
            GrantCmd::List { account } => {
                api.json(
                    "GET",
                    &format!("/admin/accounts/{}/grants", enc(&account)),
                    None,
                )
                .await?
            }
        },
        Cmd::Balance { account } => {
            api.json(
                "GET",
                &format!("/v1/accounts/{}/balance", enc(&account)),
                None,
            )
            .await?
        }
        Cmd::Usage { account, key } => {
            let path = match key {
                Some(k) => format!("/v1/accounts/{}/keys/{}/usage", enc(&account), enc(&k)),
                None => format!("/v1/accounts/{}/usage", enc(&account)),
            };
            api.json("GET", &path, None).await?
        }
        Cmd::Alerts { account } => {
            api.json(
                "GET",
                &format!("/admin/accounts/{}/alerts", enc(&account)),
                None,
            )
            .await?
        }
        Cmd::Export {
            account,
            format,
            after,
        } => {
            return export(api, account, &format, after).await;
        }
        Cmd::Top {
            meter,
            window,
            period,
            limit,
        } => {
            let mut q = format!("/admin/top?meter={}&limit={limit}", enc(&meter));
            if let Some(w) = window {
                q.push_str(&format!("&window={}", enc(&w)));
            }
            if let Some(p) = period {
                q.push_str(&format!("&period={}", enc(&p)));
            }
            api.json("GET", &q, None).await?
        }
        Cmd::Reconcile { account } => {
            let q = match account {
                Some(a) => format!("/admin/reconcile?account={}", enc(&a)),
                None => "/admin/reconcile".into(),
            };
            let v = api.json("GET", &q, None).await?;
            print(&v);
            let n = v["differences"].as_array().map_or(0, Vec::len);
            eprintln!(
                "reconciliation: {} accounts compared, {} values, {n} differences",
                v["accounts_compared"], v["values_compared"]
            );
            return Ok(if n == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            });
        }
        Cmd::Pools(c) => match c {
            PoolCmd::Create {
                id,
                stock,
                description,
            } => {
                api.json(
                    "POST",
                    "/admin/pools",
                    Some(json!({"id": id, "stock": stock, "description": description})),
                )
                .await?
            }
            PoolCmd::Show { id } => {
                api.json("GET", &format!("/admin/pools/{}", enc(&id)), None)
                    .await?
            }
            PoolCmd::List => api.json("GET", "/admin/pools", None).await?,
            PoolCmd::Claim { id, account } => {
                api.json(
                    "POST",
                    &format!("/admin/pools/{}/claims", enc(&id)),
                    Some(json!({"account": account})),
                )
                .await?
            }
        },
        Cmd::Events { account } => {
            let path = match account {
                Some(a) => format!("/admin/accounts/{}/billing-events", enc(&a)),
                None => "/admin/billing-events".into(),
            };
            api.json("GET", &path, None).await?
        }
        Cmd::Jobs => api.json("POST", "/admin/jobs/run", None).await?,
    };
    print(&out);
    Ok(ExitCode::SUCCESS)
}

/// Every page of the ledger: CSV (one header) or JSON lines.
async fn export(
    api: &Api,
    account: Option<String>,
    format: &str,
    mut after: i64,
) -> Result<ExitCode, Failure> {
    if format != "csv" && format != "json" {
        return Err(Failure::Refused(
            400,
            format!("--format must be csv or json, not {format:?}"),
        ));
    }
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    let mut first = true;
    loop {
        let mut q = format!("/admin/export?format={format}&after={after}&limit=1000");
        if let Some(a) = &account {
            q.push_str(&format!("&account={}", enc(a)));
        }
        let (_, text) = api.call("GET", &q, None).await?;
        let next = if format == "csv" {
            let mut lines = text.lines();
            let header = lines.next().unwrap_or_default();
            if first {
                let _ = writeln!(w, "{header}");
            }
            let mut last = None;
            for l in lines {
                let _ = writeln!(w, "{l}");
                last = l.split(',').next().and_then(|s| s.parse::<i64>().ok());
            }
            // A full page means there may be more.
            let rows = text.lines().count().saturating_sub(1);
            if rows == 1000 {
                last
            } else {
                None
            }
        } else {
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            for e in v["entries"].as_array().into_iter().flatten() {
                let _ = writeln!(w, "{e}");
            }
            v["next"].as_i64()
        };
        first = false;
        match next {
            Some(n) => after = n,
            None => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let api = Api {
        base: cli.url,
        token: cli.token,
        http: reqwest::Client::new(),
    };
    match run(&api, cli.cmd).await {
        Ok(code) => code,
        Err(Failure::Refused(status, body)) => {
            eprintln!("tollgate: refused ({status}): {body}");
            ExitCode::from(1)
        }
        Err(Failure::Unreachable(e)) => {
            eprintln!("tollgate: sidecar unreachable: {e}");
            ExitCode::from(3)
        }
    }
}
