//! `orders load`: posts orders to the API at a target rate, then waits until
//! the read model shows every one of them, and reports throughput and the
//! POST → read-model latency.
//!
//! Latency of an order is its read-model `projected_at` (set by the
//! projection when it applied `OrderCreated`) minus the moment its POST was
//! sent. Both clocks are this machine's when the service runs here.
//!
//! Given a [`TokenSigner`], each synthetic customer gets a bearer token of
//! its own (`sub` = its id, no scopes: the load only places and reads its
//! orders), minted once before the run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use uuid::Uuid;

use crate::api::auth::TokenSigner;
use crate::cli::LoadArgs;

/// How many synthetic customers place the orders.
const CUSTOMERS: usize = 100;

/// An order posted: its id, its customer (an index in the customers), and
/// when its POST was sent.
type Posted = (Uuid, usize, DateTime<Utc>);

/// One synthetic customer: its id and, with authentication, its token.
struct Customer {
    id: Uuid,
    authorization: Option<String>,
}

impl Customer {
    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.authorization {
            Some(value) => request.header(reqwest::header::AUTHORIZATION, value),
            None => request,
        }
    }
}

/// What a load run measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Orders created.
    pub orders: usize,
    /// First POST to the last order appearing in the read model.
    pub elapsed: Duration,
    /// Orders per second over `elapsed`.
    pub rate: f64,
    /// Latency percentiles in milliseconds.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// The order ids created.
    pub order_ids: Vec<Uuid>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} orders in {:.1} s: {:.0} orders/s, POST→read-model p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms",
            self.orders,
            self.elapsed.as_secs_f64(),
            self.rate,
            self.p50_ms,
            self.p95_ms,
            self.p99_ms
        )
    }
}

fn order_body(customer: Uuid) -> serde_json::Value {
    let mut rng = rand::thread_rng();
    let items: Vec<serde_json::Value> = (0..rng.gen_range(1..=3))
        .map(|i| {
            serde_json::json!({
                "sku": format!("SKU-{}", rng.gen_range(0..500) + i),
                "quantity": rng.gen_range(1..=5),
                "unit_price": format!("{}.{:02}", rng.gen_range(1..200), rng.gen_range(0..100)),
            })
        })
        .collect();
    serde_json::json!({
        "customer_id": customer,
        "currency": "EUR",
        "items": items,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs the load against `api` (e.g. `http://127.0.0.1:8080`), prints the
/// one-line summary and returns the figures. With `signer`, requests carry
/// the synthetic customers' tokens.
pub async fn run(
    api: &str,
    args: &LoadArgs,
    signer: Option<&TokenSigner>,
) -> anyhow::Result<LoadReport> {
    if args.orders == 0 || args.concurrency == 0 {
        bail!("--orders and --concurrency must be at least 1");
    }
    let api = api.trim_end_matches('/').to_owned();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    // Valid for the whole run however long it takes: a benchmark's tokens.
    let ttl = Duration::from_secs(24 * 3600 + args.timeout_secs);
    let customers: Arc<Vec<Customer>> = Arc::new(
        (0..CUSTOMERS)
            .map(|_| {
                let id = Uuid::new_v4();
                let authorization = signer
                    .map(|s| s.mint(id, &[], ttl).map(|t| format!("Bearer {t}")))
                    .transpose()?;
                anyhow::Ok(Customer { id, authorization })
            })
            .collect::<anyhow::Result<_>>()?,
    );
    let bar = ProgressBar::new(args.orders as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("posting");

    let started = Instant::now();
    let interval = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(args.rate)));
    let posted: Vec<anyhow::Result<Posted>> = futures::stream::iter(0..args.orders)
        .map(|i| {
            let (client, api, customers, bar) = (
                client.clone(),
                api.clone(),
                Arc::clone(&customers),
                bar.clone(),
            );
            async move {
                if let Some(interval) = interval {
                    // Open-loop pacing: order i is due at i × interval.
                    let due = started + interval.mul_f64(i as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let who = rand::thread_rng().gen_range(0..customers.len());
                let customer = &customers[who];
                let sent_at = Utc::now();
                let response = customer
                    .authorize(client.post(format!("{api}/orders")))
                    .header("Idempotency-Key", Uuid::new_v4().to_string())
                    .json(&order_body(customer.id))
                    .send()
                    .await
                    .context("POST /orders")?;
                let status = response.status();
                let body: serde_json::Value =
                    response.json().await.context("reading the POST answer")?;
                if status == reqwest::StatusCode::UNAUTHORIZED && customer.authorization.is_none() {
                    bail!(
                        "POST /orders answered {status}: the API wants bearer tokens; give \
                         ORDERS_JWT_SECRET (--jwt-secret) or --jwt-private-key to mint them: {body}"
                    );
                }
                if status != reqwest::StatusCode::CREATED {
                    bail!("POST /orders answered {status}: {body}");
                }
                let id = body["id"]
                    .as_str()
                    .and_then(|s| Uuid::parse_str(s).ok())
                    .context("the POST answer has no id")?;
                bar.inc(1);
                Ok((id, who, sent_at))
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let posted: Vec<Posted> = posted.into_iter().collect::<anyhow::Result<_>>()?;

    bar.set_position(0);
    bar.set_message("projected");
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut pending = posted.clone();
    let mut projected: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::with_capacity(posted.len());
    while !pending.is_empty() {
        if Instant::now() > deadline {
            bail!(
                "{} orders not in the read model after {} s",
                pending.len(),
                args.timeout_secs
            );
        }
        let checks: Vec<(Posted, Option<DateTime<Utc>>)> = futures::stream::iter(pending.clone())
            .map(|(id, who, sent_at)| {
                let (client, api, customers) =
                    (client.clone(), api.clone(), Arc::clone(&customers));
                async move {
                    let found = async {
                        let response = customers[who]
                            .authorize(client.get(format!("{api}/orders/{id}")))
                            .send()
                            .await
                            .ok()?;
                        if !response.status().is_success() {
                            return None;
                        }
                        let body: serde_json::Value = response.json().await.ok()?;
                        body["projected_at"].as_str()?.parse::<DateTime<Utc>>().ok()
                    }
                    .await;
                    ((id, who, sent_at), found)
                }
            })
            .buffer_unordered(args.concurrency)
            .collect()
            .await;
        pending.clear();
        for (order, found) in checks {
            match found {
                Some(at) => {
                    projected.push((order.2, at));
                    bar.inc(1);
                }
                None => pending.push(order),
            }
        }
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    bar.finish_and_clear();

    let first_sent = posted
        .iter()
        .map(|(_, _, t)| *t)
        .min()
        .unwrap_or_else(Utc::now);
    let last_projected = projected
        .iter()
        .map(|(_, t)| *t)
        .max()
        .unwrap_or(first_sent);
    let elapsed = (last_projected - first_sent)
        .to_std()
        .unwrap_or_default()
        .max(Duration::from_millis(1));
    let mut latencies: Vec<f64> = projected
        .iter()
        .map(|(sent, at)| (*at - *sent).num_microseconds().unwrap_or(0).max(0) as f64 / 1000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let report = LoadReport {
        orders: posted.len(),
        elapsed,
        rate: posted.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile(&latencies, 50.0),
        p95_ms: percentile(&latencies, 95.0),
        p99_ms: percentile(&latencies, 99.0),
        order_ids: posted.iter().map(|(id, _, _)| *id).collect(),
    };
    println!("{report}");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }
}
