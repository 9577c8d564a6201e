//! The `orders` command line. Every flag is also an environment variable, and
//! a bad value fails at start-up naming the setting.

use clap::{Parser, Subcommand};

/// The order pipeline of the herald reference service.
#[derive(Debug, Parser)]
#[command(name = "orders", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The `orders` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply herald's and the service's database migrations.
    Migrate(DatabaseArgs),
}

/// Where the database is.
#[derive(Debug, clap::Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://herald:herald@127.0.0.1:5432/herald.
    #[arg(long = "database-url", env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrate_takes_the_database_url_flag() {
        let cli = Cli::try_parse_from(["orders", "migrate", "--database-url", "postgres://x/y"])
            .expect("parses");
        let Command::Migrate(args) = cli.command;
        assert_eq!(args.database_url, "postgres://x/y");
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
