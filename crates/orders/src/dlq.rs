//! `orders dlq list|replay|discard|history`: dead letters, the keys parked
//! behind them, and an audited, ordered redrive (see `herald_kafka::parking`).

use std::time::Duration;

use anyhow::Context;
use herald_kafka::dlq::{headers, latest_per_origin, read_dead_letters, DeadLetter, LetterFilter};
use herald_kafka::parking::{read_parked, ParkedKey, RedriveAction, DEFAULT_PARKED_TOPIC};
use serde_json::json;

use crate::app::Config;
use crate::cli::{DlqActionArgs, DlqCommand, DlqFilterArgs};

async fn read(config: &Config, topic: &str, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let client = config.kafka_client_config();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_dead_letters(&client, &topic, limit))
        .await
        .context("the DLQ reader panicked")?
        .context("reading the dead-letter topic")
}

/// The parked keys (of `group` when given).
async fn parked(config: &Config, group: Option<&str>) -> anyhow::Result<Vec<ParkedKey>> {
    let client = config.kafka_client_config();
    let group = group.map(str::to_owned);
    let read = tokio::task::spawn_blocking(move || {
        read_parked(
            &client,
            DEFAULT_PARKED_TOPIC,
            group.as_deref(),
            Duration::from_secs(30),
        )
    })
    .await
    .context("the parked-key reader panicked")?;
    match read {
        // No table yet: no consumer has parked a key on this cluster (the
        // consumers create it at start), so none is parked.
        Err(herald_kafka::ClientError::Setting {
            setting: "parked_topic",
            ..
        }) => Ok(Vec::new()),
        other => other.context("reading the parked-key table"),
    }
}

/// One line per dead letter.
pub fn describe(letter: &DeadLetter) -> String {
    let h = |name| letter.header(name).unwrap_or_else(|| "-".to_owned());
    format!(
        "{}/{}  group={}  key={}  event_id={}  type={}  class={}  attempts={}  redrives={}  from={}/{}/{}  error={}",
        letter.partition,
        letter.offset,
        h(headers::CONSUMER_GROUP),
        letter.key_text().unwrap_or_else(|| "-".into()),
        h(herald::headers::EVENT_ID),
        h(herald::headers::EVENT_TYPE),
        h(headers::ERROR_CLASS),
        h(headers::ATTEMPTS),
        letter.redrives(),
        h(headers::ORIGINAL_TOPIC),
        h(headers::ORIGINAL_PARTITION),
        h(headers::ORIGINAL_OFFSET),
        h(headers::ERROR),
    )
}

fn letter_json(letter: &DeadLetter) -> serde_json::Value {
    let h = |name| letter.header(name);
    json!({
        "dlq_partition": letter.partition,
        "dlq_offset": letter.offset,
        "group": letter.group(),
        "key": letter.key_text(),
        "event_id": letter.event_id(),
        "event_type": h(herald::headers::EVENT_TYPE),
        "error_class": h(headers::ERROR_CLASS),
        "error": h(headers::ERROR),
        "attempts": h(headers::ATTEMPTS).and_then(|a| a.parse::<u32>().ok()),
        "redrives": letter.redrives(),
        "original_topic": h(headers::ORIGINAL_TOPIC),
        "original_partition": h(headers::ORIGINAL_PARTITION).and_then(|p| p.parse::<i32>().ok()),
        "original_offset": h(headers::ORIGINAL_OFFSET).and_then(|o| o.parse::<i64>().ok()),
        "last_failed_at": h(headers::LAST_FAILED_AT),
    })
}

fn filter_of(args: &DlqFilterArgs, event_ids: &[uuid::Uuid]) -> LetterFilter {
    LetterFilter {
        group: args.group.clone(),
        key: args.key.clone(),
        event_type: args.event_type.clone(),
        error_class: args.class.clone(),
        since: args.since,
        until: args.until,
        event_ids: event_ids.to_vec(),
    }
}

/// The parked list `letter`'s record belongs to, if its key is parked.
fn parked_list_of<'a>(parked: &'a [ParkedKey], letter: &DeadLetter) -> Option<&'a ParkedKey> {
    let (topic, partition, _) = letter.origin()?;
    let group = letter.group()?;
    let key = letter.key.clone().unwrap_or_default();
    parked.iter().find(|p| {
        p.group == group && p.topic == topic && p.partition == partition && p.key_bytes() == key
    })
}

/// Runs a `dlq` subcommand.
pub async fn run(config: &Config, command: DlqCommand) -> anyhow::Result<()> {
    let default_topic = format!("{}.dlq", config.topics.events);
    match command {
        DlqCommand::List {
            filter,
            limit,
            json,
        } => {
            let topic = filter.topic.clone().unwrap_or(default_topic);
            let letters = read(config, &topic, usize::MAX).await?;
            let wanted = filter_of(&filter, &[]);
            let selected: Vec<&DeadLetter> = latest_per_origin(&letters)
                .into_iter()
                .filter(|l| wanted.matches(l))
                .take(limit)
                .collect();
            let parked: Vec<ParkedKey> = parked(config, filter.group.as_deref())
                .await?
                .into_iter()
                .filter(|p| filter.key.as_ref().is_none_or(|k| &p.key == k))
                .collect();
            if json {
                let doc = json!({
                    "topic": topic,
                    "letters": selected.iter().map(|l| letter_json(l)).collect::<Vec<_>>(),
                    "parked_keys": parked,
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(());
            }
            for letter in &selected {
                println!("{}", describe(letter));
            }
            println!("{} dead letter(s) in {topic}", selected.len());
            for key in &parked {
                println!(
                    "parked: group={} key={} {}/{} since={} records(original offsets)={:?}",
                    key.group, key.key, key.topic, key.partition, key.since, key.offsets
                );
            }
            println!("{} parked key(s)", parked.len());
        }
        DlqCommand::Replay(args) => {
            act(config, &default_topic, RedriveAction::Replay, args).await?
        }
        DlqCommand::Discard(args) => {
            act(config, &default_topic, RedriveAction::Discard, args).await?
        }
        DlqCommand::History { limit, json } => {
            let pool = config.pool().await?;
            let rows = history(&pool, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for row in &rows {
                    println!(
                        "{}  {}  by={}  group={}  key={}  event_id={}  from={}/{}/{}  outcome={}  reason={}",
                        row["at"].as_str().unwrap_or("-"),
                        row["action"].as_str().unwrap_or("-"),
                        row["actor"].as_str().unwrap_or("-"),
                        row["group"].as_str().unwrap_or("-"),
                        row["key"].as_str().unwrap_or("-"),
                        row["event_id"].as_str().unwrap_or("-"),
                        row["original_topic"].as_str().unwrap_or("-"),
                        row["original_partition"],
                        row["original_offset"],
                        row["outcome"].as_str().unwrap_or("-"),
                        row["reason"].as_str().unwrap_or(""),
                    );
                }
                println!("{} entr(ies)", rows.len());
            }
        }
    }
    Ok(())
}

/// Replays or discards the selected letters, in order, and records each.
async fn act(
    config: &Config,
    default_topic: &str,
    action: RedriveAction,
    args: DlqActionArgs,
) -> anyhow::Result<()> {
    let topic = args
        .filter
        .topic
        .clone()
        .unwrap_or_else(|| default_topic.to_owned());
    let pool = config.pool().await?;
    let publisher = config.publisher()?;
    let letters = read(config, &topic, usize::MAX).await?;
    let parked = parked(config, args.filter.group.as_deref()).await?;
    let plan = select(&pool, &topic, &letters, &parked, &args, action).await?;
    let verb = action.as_str();
    let pace = args
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let mut sent = 0;
    for (letter, decision) in &plan {
        match decision {
            Decision::Send if args.dry_run => println!("would {verb}: {}", describe(letter)),
            Decision::Send => {
                let delivered = herald_kafka::dlq::redrive(&publisher, &topic, letter, action)
                    .await
                    .with_context(|| format!("{verb}ing {}/{}", letter.partition, letter.offset))?;
                let outcome = if delivered.is_some() {
                    "published"
                } else {
                    "no origin headers"
                };
                record(&pool, &topic, letter, action, &args, outcome).await?;
                println!("{verb}: {}", describe(letter));
                sent += 1;
                if let Some(pace) = pace {
                    tokio::time::sleep(pace).await;
                }
            }
            Decision::Skip(why) => println!("skipped ({why}): {}", describe(letter)),
        }
    }
    let done = if args.dry_run { "would send" } else { "sent" };
    println!(
        "{done} {} of {} selected dead letter(s) from {topic} ({verb})",
        if args.dry_run {
            plan.iter()
                .filter(|(_, d)| matches!(d, Decision::Send))
                .count()
        } else {
            sent
        },
        plan.len()
    );
    Ok(())
}

/// What `act` does with one selected letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send it.
    Send,
    /// Leave it, for this reason.
    Skip(&'static str),
}

/// The letters a replay or discard takes, in redrive order (per original
/// partition, by original offset: a parked key's dead letter first), each
/// with what to do with it.
pub async fn select<'a>(
    pool: &sqlx::PgPool,
    dlq_topic: &str,
    letters: &'a [DeadLetter],
    parked: &[ParkedKey],
    args: &DlqActionArgs,
    action: RedriveAction,
) -> anyhow::Result<Vec<(&'a DeadLetter, Decision)>> {
    let wanted = filter_of(&args.filter, &args.event_ids);
    let named = |letter: &DeadLetter| {
        letter
            .event_id()
            .is_some_and(|id| args.event_ids.contains(&id))
    };
    let mut plan = Vec::new();
    // A parked key whose head is held back by the loop guard: its later
    // records are held back too (they would only wait behind it).
    let mut guarded_keys: Vec<(String, String, i32, Vec<u8>)> = Vec::new();
    for letter in latest_per_origin(letters) {
        if !wanted.matches(letter) {
            continue;
        }
        let list = parked_list_of(parked, letter);
        let decision = match list {
            Some(list) => {
                let (_, _, offset) = letter.origin().unwrap_or_default();
                let id = (
                    list.group.clone(),
                    list.topic.clone(),
                    list.partition,
                    list.key_bytes(),
                );
                if !list.offsets.contains(&offset) {
                    Decision::Skip("handled already: no longer parked")
                } else if guarded_keys.contains(&id) {
                    Decision::Skip("its key's first record is held back by the loop guard")
                } else if action == RedriveAction::Replay
                    && letter.redrives() >= args.max_redrives
                    && !named(letter)
                {
                    guarded_keys.push(id);
                    Decision::Skip(
                        "failed again after --max-redrives redrives: name it with --event-id",
                    )
                } else {
                    Decision::Send
                }
            }
            None if letter.is_parked() => Decision::Skip("handled already: no longer parked"),
            None if replayed_before(pool, dlq_topic, letter).await? => {
                Decision::Skip("replayed or discarded before")
            }
            None if action == RedriveAction::Replay
                && letter.redrives() >= args.max_redrives
                && !named(letter) =>
            {
                Decision::Skip(
                    "failed again after --max-redrives redrives: name it with --event-id",
                )
            }
            // Discarding a letter whose key is not parked only records it.
            None => Decision::Send,
        };
        plan.push((letter, decision));
    }
    Ok(plan)
}

async fn replayed_before(
    pool: &sqlx::PgPool,
    dlq_topic: &str,
    letter: &DeadLetter,
) -> anyhow::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM dlq_replays
                        WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3)",
    )
    .bind(dlq_topic)
    .bind(letter.partition)
    .bind(letter.offset)
    .fetch_one(pool)
    .await
    .context("reading the replay log")
}

/// Records one replay or discard in the audit trail.
async fn record(
    pool: &sqlx::PgPool,
    dlq_topic: &str,
    letter: &DeadLetter,
    action: RedriveAction,
    args: &DlqActionArgs,
    outcome: &str,
) -> anyhow::Result<()> {
    let origin = letter.origin();
    sqlx::query(
        "INSERT INTO dlq_replays (dlq_topic, dlq_partition, dlq_offset, original_topic, event_id,
                                  error_class, action, actor, reason, consumer_group, record_key,
                                  original_partition, original_offset, outcome)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(dlq_topic)
    .bind(letter.partition)
    .bind(letter.offset)
    .bind(origin.as_ref().map(|o| o.0.clone()).unwrap_or_default())
    .bind(letter.event_id().map(|id| id.to_string()))
    .bind(letter.header(headers::ERROR_CLASS))
    .bind(action.as_str())
    .bind(&args.actor)
    .bind(&args.reason)
    .bind(letter.group())
    .bind(letter.key_text())
    .bind(origin.as_ref().map(|o| o.1))
    .bind(origin.as_ref().map(|o| o.2))
    .bind(outcome)
    .execute(pool)
    .await
    .context("recording the redrive")?;
    Ok(())
}

/// The audit trail, newest first.
pub async fn history(pool: &sqlx::PgPool, limit: i64) -> anyhow::Result<Vec<serde_json::Value>> {
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT replayed_at, action, actor, reason, consumer_group, record_key, event_id,
                original_topic, original_partition, original_offset, outcome
         FROM dlq_replays ORDER BY id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("reading the dead-letter audit trail")?;
    Ok(rows
        .iter()
        .map(|row| {
            json!({
                "at": row.get::<chrono::DateTime<chrono::Utc>, _>("replayed_at").to_rfc3339(),
                "action": row.get::<String, _>("action"),
                "actor": row.get::<Option<String>, _>("actor"),
                "reason": row.get::<Option<String>, _>("reason"),
                "group": row.get::<Option<String>, _>("consumer_group"),
                "key": row.get::<Option<String>, _>("record_key"),
                "event_id": row.get::<Option<String>, _>("event_id"),
                "original_topic": row.get::<String, _>("original_topic"),
                "original_partition": row.get::<Option<i32>, _>("original_partition"),
                "original_offset": row.get::<Option<i64>, _>("original_offset"),
                "outcome": row.get::<String, _>("outcome"),
            })
        })
        .collect())
}
