//! The `niso` command line: one module per command group.
//!
//! Exit codes never change: 0 success; 1 the command ran but the answer is
//! no (`verify` found problems); 2 error (bad arguments, unreadable input,
//! refused archive). Errors go to stderr prefixed `niso:`.

mod gc;
mod keys;
mod mirror;
mod output;
mod package;
mod pull;
mod push;
mod registries;
mod registry;
mod search;
mod serve;
mod tags;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use output::Ctx;

/// niso: push, pull and search packages; build, serve, verify and mirror a
/// package registry that any static host can serve.
///
/// Exit status: 0 success; 1 the command ran but the answer is no (`verify`
/// found problems, `search` found nothing); 2 error. Errors go to stderr,
/// prefixed `niso:`.
#[derive(Debug, Parser)]
#[command(
    name = "niso",
    version,
    propagate_version = true,
    after_long_help = "\
Examples:
  $ niso registry add private https://registry.example.com --key niso_k1_abc123 --default
  $ niso push my-api-1.0.0-x86_64.niso
  $ niso pull my-api:1.0.0
  $ niso search postgres

Environment: NISO_REGISTRY (like --registry), NISO_KEY (the API key, over a
stored one), NISO_LOG (like --log-level), XDG_CONFIG_HOME (the config
file: $XDG_CONFIG_HOME/niso/config.toml), XDG_DATA_HOME (pulled packages),
XDG_STATE_HOME (freshness generations seen)."
)]
pub struct Cli {
    /// The registry to talk to: the name of a configured registry (see
    /// `niso registry list`) or its URL. Default: the default registry.
    #[arg(long, global = true, env = "NISO_REGISTRY", value_name = "NAME")]
    registry: Option<String>,

    /// Write results as JSON Lines on stdout, one object per line with a
    /// "type" field (each command's --help lists its types), instead of
    /// text. Messages for people still go to stderr.
    #[arg(long, global = true)]
    json: bool,

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
    /// Upload a .niso archive or a Hex tarball to a registry.
    Push(push::PushArgs),
    /// Download a package, verified, into the local package store.
    Pull(pull::PullArgs),
    /// Search a registry's packages.
    Search(search::SearchArgs),
    /// Point a tag at a published version.
    Tag(tags::TagArgs),
    /// Store an API key for a registry.
    Login(registries::LoginArgs),
    /// Make a .niso archive from a package directory.
    Package(package::PackageArgs),
    /// Configure registries, manage keys and tags; create, build, serve,
    /// verify and publish into a registry.
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
    let ctx = Ctx {
        registry: cli.registry.filter(|r| !r.is_empty()),
        json: cli.json,
    };
    let result = match cli.command {
        Command::Push(args) => args.run(&ctx),
        Command::Pull(args) => args.run(&ctx),
        Command::Search(args) => args.run(&ctx),
        Command::Tag(args) => args.run(&ctx),
        Command::Login(args) => args.run(&ctx),
        Command::Package(args) => args.run(&ctx),
        Command::Registry(cmd) => cmd.run(&ctx),
    };
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::No) => ExitCode::from(1),
        Err(e) => {
            eprintln!("niso: {}", error_text(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes, each once. Many error types print their
/// source in their own message *and* return it as `source()`; printing the
/// chain blindly would say "No such file or directory (os error 2): No such
/// file or directory (os error 2)".
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// A multi-threaded runtime (the publisher signs on its blocking threads).
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

/// Runs a future to completion on a new [`runtime`].
pub(crate) fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    Ok(runtime()?.block_on(f))
}

fn init_logging(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colour only on a terminal: a redirected log must not hold escape codes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
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

    #[test]
    fn every_command_has_examples_in_its_long_help() {
        fn walk(cmd: &clap::Command, path: &str) {
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.has_subcommands() {
                    walk(sub, &name);
                } else {
                    let help = sub
                        .get_after_long_help()
                        .map(ToString::to_string)
                        .unwrap_or_default();
                    assert!(help.contains("$ niso"), "{name} --help has no example");
                }
            }
        }
        walk(&Cli::command(), "niso");
    }

    #[test]
    fn an_error_prints_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = io.to_string();
        #[derive(Debug, thiserror::Error)]
        #[error("failed to read x: {source}")]
        struct Read {
            source: std::io::Error,
        }
        let e = anyhow::Error::from(Read { source: io }).context("cannot package d");
        assert_eq!(
            error_text(&e),
            format!("cannot package d: failed to read x: {text}")
        );
    }
}
