//! `orders dlq list` and `orders dlq replay`.

use anyhow::Context;
use herald_kafka::dlq::{headers, read_dead_letters, DeadLetter};
use rdkafka::ClientConfig;

use crate::app::Config;
use crate::cli::DlqCommand;

fn client_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    for (k, v) in &config.kafka_settings {
        client.set(k, v);
    }
    client
}

async fn read(config: &Config, topic: &str, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let client = client_config(config);
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_dead_letters(&client, &topic, limit))
        .await
        .context("the DLQ reader panicked")?
        .context("reading the dead-letter topic")
}

/// One line per dead letter.
pub fn describe(letter: &DeadLetter) -> String {
    let h = |name| letter.header(name).unwrap_or_else(|| "-".to_owned());
    format!(
        "{}/{}  key={}  event_id={}  type={}  class={}  attempts={}  from={}/{}/{}  error={}",
        letter.partition,
        letter.offset,
        letter
            .key
            .as_deref()
            .map_or("-".into(), |k| String::from_utf8_lossy(k).into_owned()),
        h(herald::headers::EVENT_ID),
        h(herald::headers::EVENT_TYPE),
        h(headers::ERROR_CLASS),
        h(headers::ATTEMPTS),
        h(headers::ORIGINAL_TOPIC),
        h(headers::ORIGINAL_PARTITION),
        h(headers::ORIGINAL_OFFSET),
        h(headers::ERROR),
    )
}

/// Runs a `dlq` subcommand.
pub async fn run(config: &Config, command: DlqCommand) -> anyhow::Result<()> {
    let default_topic = format!("{}.dlq", config.topics.events);
    match command {
        DlqCommand::List { topic, limit } => {
            let topic = topic.unwrap_or(default_topic);
            let letters = read(config, &topic, limit).await?;
            for letter in &letters {
                println!("{}", describe(letter));
            }
            println!("{} dead letter(s) in {topic}", letters.len());
        }
        DlqCommand::Replay {
            topic,
            event_ids,
            all,
        } => {
            let topic = topic.unwrap_or(default_topic);
            let pool = config.pool().await?;
            let publisher = config.publisher()?;
            let letters = read(config, &topic, usize::MAX).await?;
            let selected: Vec<&DeadLetter> = letters
                .iter()
                .filter(|l| all || l.event_id().is_some_and(|id| event_ids.contains(&id)))
                .collect();
            let replayed = replay(&pool, &publisher, &topic, &selected).await?;
            println!(
                "replayed {replayed} of {} selected dead letter(s) from {topic}",
                selected.len()
            );
        }
    }
    Ok(())
}

/// Re-publishes letters not replayed before and records each replay; returns
/// how many were replayed now.
pub async fn replay(
    pool: &sqlx::PgPool,
    publisher: &herald_kafka::Publisher,
    dlq_topic: &str,
    letters: &[&DeadLetter],
) -> anyhow::Result<usize> {
    let mut replayed = 0;
    for letter in letters {
        let done: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM dlq_replays WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3)",
        )
        .bind(dlq_topic)
        .bind(letter.partition)
        .bind(letter.offset)
        .fetch_one(pool)
        .await
        .context("reading the replay log")?;
        if done {
            println!("already replayed: {}", describe(letter));
            continue;
        }
        let Some(record) = letter.replay_record(dlq_topic) else {
            println!(
                "skipped (no {} header): {}",
                headers::ORIGINAL_TOPIC,
                describe(letter)
            );
            continue;
        };
        publisher
            .publish_record(&record)
            .await
            .with_context(|| format!("re-publishing {}/{}", letter.partition, letter.offset))?;
        sqlx::query(
            "INSERT INTO dlq_replays (dlq_topic, dlq_partition, dlq_offset, original_topic, event_id, error_class)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(dlq_topic)
        .bind(letter.partition)
        .bind(letter.offset)
        .bind(&record.topic)
        .bind(letter.event_id().map(|id| id.to_string()))
        .bind(letter.header(headers::ERROR_CLASS))
        .execute(pool)
        .await
        .context("recording the replay")?;
        println!("replayed: {}", describe(letter));
        replayed += 1;
    }
    Ok(replayed)
}
