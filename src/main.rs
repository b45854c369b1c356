//! The `ssehub` binary: parse arguments, load configuration, set up logging, run until a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ssehub::config::{LogFormat, Settings};

/// Redis pub/sub to Server-Sent Events gateway.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML). Every key can be overridden with SSEHUB__<SECTION>__<KEY>.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

const DEFAULT_CONFIG_PATH: &str = "./config.toml";

fn main() -> ExitCode {
    let args = Args::parse();
    // The default path is optional (defaults apply); a path given explicitly must exist.
    let (path, required) = match args.config {
        Some(path) => (path, true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let settings = match Settings::load(&path, required) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("ssehub: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&settings);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ssehub: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listeners = ssehub::Listeners::bind(&settings).await?;
        ssehub::run(settings, listeners, shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("ssehub: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match settings.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
