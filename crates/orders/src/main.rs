//! `orders`: the herald reference service binary.

use anyhow::Context;
use clap::Parser;
use orders::cli::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Migrate(args) => {
            let pool = sqlx::PgPool::connect(&args.database_url)
                .await
                .context("connecting to DATABASE_URL")?;
            herald_postgres::migrate(&pool)
                .await
                .context("applying migrations")?;
            tracing::info!("migrations applied");
        }
    }
    Ok(())
}
