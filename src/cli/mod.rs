//! The `niso` command line: one module per command group.
//!
//! Exit codes never change: 0 success; 1 the command ran but the answer is
//! no (`verify` found problems); 2 error (bad arguments, unreadable input,
//! refused archive). Errors go to stderr prefixed `niso:`.

mod package;
mod registry;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// niso: build, serve, verify and mirror a package registry that any static
/// host can serve.
#[derive(Debug, Parser)]
#[command(name = "niso", version, propagate_version = true)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a RUST_LOG-style filter).
    /// Defaults to info for `registry serve` (one line per request), warn
    /// otherwise.
    #[arg(long, global = true, env = "NISO_LOG")]
    log_level: Option<String>,

    /// Write logs as JSON lines (for log collectors) instead of text.
    #[arg(long, global = true, env = "NISO_LOG_JSON")]
    log_json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a .niso archive from a package directory.
    Package(package::PackageArgs),
    /// Create, build, verify and publish into a registry.
    #[command(subcommand)]
    Registry(registry::RegistryCommand),
}

/// What a command concluded when it did not fail.
pub enum Outcome {
    Success,
    /// Ran, and the answer is no (exit 1).
    No,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match &cli.command {
        Command::Registry(registry::RegistryCommand::Serve(_)) => "info",
        _ => "warn",
    };
    init_logging(
        cli.log_level.as_deref().unwrap_or(default_level),
        cli.log_json,
    );
    let result = match cli.command {
        Command::Package(args) => args.run(),
        Command::Registry(cmd) => cmd.run(),
    };
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::No) => ExitCode::from(1),
        Err(e) => {
            eprintln!("niso: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs a future to completion on a new multi-threaded runtime (the
/// publisher signs on the runtime's blocking threads).
pub(crate) fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    Ok(rt.block_on(f))
}

fn init_logging(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
