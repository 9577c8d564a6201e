//! `orders outbox status|retry|discard|history`: the outbox's backlog and
//! relay checkpoints, and what a person decides about events the broker
//! refused (see `herald_postgres::refusals`).

use anyhow::Context;
use herald_postgres::refusals::{self, Resolution};

use crate::app::Config;
use crate::cli::{OutboxCommand, ResolveArgs};

/// Runs one `orders outbox` command.
pub async fn run(config: &Config, command: OutboxCommand) -> anyhow::Result<()> {
    let pool = config.pool().await?;
    match command {
        OutboxCommand::Status => {
            let status = herald_postgres::outbox::status(&pool).await?;
            println!("backlog: {}", status.backlog);
            println!(
                "oldest unpublished: {}",
                status
                    .oldest_unpublished_at
                    .map_or("-".to_owned(), |t| format!(
                        "{t} ({:.1} s ago)",
                        status.oldest_unpublished_age().as_secs_f64()
                    ))
            );
            println!("published rows retained: {}", status.published_retained);
            println!("relay delivery: {}", config.delivery);
            let checkpoints = herald_postgres::slots::checkpoints(&pool).await?;
            if checkpoints.is_empty() {
                println!("relay checkpoints: none (no exactly-once batch committed yet)");
            } else {
                println!("relay checkpoints (slot: last sequence, stored at):");
                for c in checkpoints {
                    println!("  {:>2}: {} at {}", c.slot, c.sequence, c.at);
                }
            }
            let refused = refusals::list(&pool).await?;
            let parked = refused.iter().filter(|r| r.parked_at.is_some()).count();
            println!(
                "refused by the broker: {} ({parked} parked, their aggregates waiting)",
                refused.len()
            );
            for r in refused {
                let state = r
                    .parked_at
                    .map_or("retrying".to_owned(), |at| format!("PARKED since {at}"));
                println!(
                    "  {} {}/{} to {}: {state}, {} refusals, last: {}",
                    r.event_id, r.aggregate_type, r.aggregate_id, r.topic, r.attempts, r.last_error
                );
            }
        }
        OutboxCommand::Retry(args) => resolve(&pool, Resolution::Retry, args).await?,
        OutboxCommand::Discard(args) => resolve(&pool, Resolution::Discard, args).await?,
        OutboxCommand::History { limit } => {
            for entry in refusals::audit(&pool, limit).await? {
                println!(
                    "{} {} {} by {}: {} (last refusal: {})",
                    entry.at,
                    entry.action,
                    entry.event_id,
                    entry.actor,
                    entry.reason,
                    entry.last_error
                );
            }
        }
    }
    Ok(())
}

async fn resolve(
    pool: &sqlx::PgPool,
    resolution: Resolution,
    args: ResolveArgs,
) -> anyhow::Result<()> {
    let actor = args.actor.unwrap_or_else(os_user);
    let mut missing = Vec::new();
    for event_id in &args.event_ids {
        let done = refusals::resolve(pool, *event_id, resolution, &actor, &args.reason)
            .await
            .with_context(|| format!("resolving parked event {event_id}"))?;
        if done {
            println!("{event_id}: {resolution:?} recorded");
        } else {
            missing.push(event_id.to_string());
        }
    }
    if !missing.is_empty() {
        anyhow::bail!(
            "not parked (see `orders outbox status`): {}",
            missing.join(", ")
        );
    }
    Ok(())
}

/// The OS user running the command, for the audit trail.
fn os_user() -> String {
    ["USER", "LOGNAME"]
        .into_iter()
        .find_map(|name| std::env::var(name).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned())
}
