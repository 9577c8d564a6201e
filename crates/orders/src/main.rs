//! `orders`: the herald reference service binary. Parses the command line,
//! installs logging, and runs the chosen part of the pipeline until SIGINT or
//! SIGTERM.

use anyhow::Context;
use clap::Parser;
use orders::app::{Application, Components, Config};
use orders::cli::{Cli, Command, WorkerKind};
use tokio_util::sync::CancellationToken;

/// Cancels the token on SIGINT or SIGTERM.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
        tracing::info!("shutdown signal received");
        trigger.cancel();
    });
    token
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Before the runtime: the OTLP exporter's HTTP client is a blocking one.
    let telemetry = orders::telemetry::init(cli.settings.log_format)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = runtime.block_on(run(cli));
    drop(runtime);
    telemetry.shutdown();
    result
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let command = cli.command.unwrap_or(Command::Run);
    let components = match &command {
        Command::Run => Some(Components::ALL),
        Command::Api => Some(Components {
            api: true,
            ..Components::NONE
        }),
        Command::Relay => Some(Components {
            relay: true,
            ..Components::NONE
        }),
        Command::Processor => Some(Components {
            processor: true,
            ..Components::NONE
        }),
        Command::Worker { only } => Some(Components {
            projection: only.is_none_or(|k| k == WorkerKind::Projection),
            notifications: only.is_none_or(|k| k == WorkerKind::Notifications),
            ..Components::NONE
        }),
        _ => None,
    };
    if let Some(components) = components {
        let config = Config::from_args(&cli.settings)?;
        tracing::info!(?config, ?components, "starting");
        let app = Application::build(config, components).await?;
        tracing::info!(port = app.port(), "listening");
        return app.run_until_stopped(shutdown_on_signals()).await;
    }
    match command {
        Command::Migrate => {
            let config = Config::from_args(&cli.settings)?;
            let pool = config.pool().await?;
            orders::store::postgres::migrate(&pool)
                .await
                .context("applying migrations")?;
            println!("migrations applied");
        }
        Command::Outbox { command } => {
            let config = Config::from_args(&cli.settings)?;
            orders::outbox::run(&config, command).await?;
        }
        Command::Dlq { command } => {
            let config = Config::from_args(&cli.settings)?;
            orders::dlq::run(&config, command).await?;
        }
        Command::Load(args) => {
            let api = args
                .api
                .clone()
                .unwrap_or_else(|| format!("http://{}", cli.settings.http_addr));
            let signer =
                orders::api::auth::signer_of(&cli.settings.auth, args.jwt_private_key.as_deref())?;
            orders::load::run(&api, &args, signer.as_ref()).await?;
        }
        Command::Token(args) => {
            const NO_KEY: &str = "orders token signs with ORDERS_JWT_SECRET (--jwt-secret) \
                                  or ORDERS_JWT_PRIVATE_KEY (--jwt-private-key): set one";
            let signer =
                orders::api::auth::signer_of(&cli.settings.auth, args.jwt_private_key.as_deref())?
                    .context(NO_KEY)?;
            let scopes: Vec<&str> = args.scopes.iter().map(String::as_str).collect();
            let ttl = std::time::Duration::from_secs(args.ttl_secs);
            println!("{}", signer.mint(args.customer, &scopes, ttl)?);
        }
        Command::Run
        | Command::Api
        | Command::Relay
        | Command::Processor
        | Command::Worker { .. } => unreachable!("handled above"),
    }
    Ok(())
}
