//! The `ssehub` binary: parse arguments, load configuration, set up logging, run until a signal.

// Stricter than the workspace's `deny` (which bench/ loosens at one audited call).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use clap::{Parser, Subcommand};
use ssehub::config::{LogFormat, Settings};

/// Redis pub/sub to Server-Sent Events gateway.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML). Every key can be overridden with SSEHUB__<SECTION>__<KEY>.
    #[arg(long, value_name = "PATH", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Print an HS256 token signed with auth.jwt_secret (for development and tests).
    Token {
        /// Channel patterns the token grants (repeatable).
        #[arg(long = "channel", value_name = "PATTERN")]
        channels: Vec<String>,
        /// Channel patterns the token may publish to with POST /publish (repeatable).
        #[arg(long = "publish", value_name = "PATTERN")]
        publish: Vec<String>,
        /// Subject (`sub`), for auth.user_channel.
        #[arg(long)]
        sub: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Exit 0 when the admin listener answers /healthz (for container health checks).
    Healthcheck,
}

const DEFAULT_CONFIG_PATH: &str = "./config.toml";

/// jemalloc with background threads instead of glibc's malloc: after a burst of channels is
/// freed (a flood of fresh names, see `channels.max_total`), glibc kept the memory (RSS stayed
/// at the peak), while jemalloc's background threads return idle pages to the system within
/// seconds (`bench/channel-flood`, README "Channel amplification").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    match args.command.unwrap_or(Command::Run) {
        Command::Run => run(settings),
        Command::Token {
            channels,
            publish,
            sub,
            ttl,
        } => print_token(&settings, &channels, &publish, sub, ttl),
        Command::Healthcheck => healthcheck(&settings),
    }
}

fn print_token(
    settings: &Settings,
    channels: &[String],
    publish: &[String],
    sub: Option<String>,
    ttl: u64,
) -> ExitCode {
    let minted = settings
        .auth
        .secret()
        .map_err(|e| e.to_string())
        .and_then(|secret| {
            secret.ok_or_else(|| {
                "no secret to sign with: set SSEHUB__AUTH__JWT_SECRET=<secret>, or auth.jwt_secret \
                 or auth.jwt_secret_file in the configuration file (--config)"
                    .to_string()
            })
        })
        .and_then(|secret| {
            let ttl = Duration::from_secs(ttl);
            ssehub::auth::mint_token(&secret, channels, publish, sub.as_deref(), ttl)
        });
    match minted {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ssehub token: {e}");
            ExitCode::FAILURE
        }
    }
}

fn healthcheck(settings: &Settings) -> ExitCode {
    match ssehub::probe_health(settings.admin.listen, Duration::from_secs(2)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ssehub healthcheck: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The multi-threaded runtime, with `worker_threads` workers (`0`: one per core this process
/// may use). Not the single-threaded runtime even on one core: measured in a reconnect storm
/// (10,000 clients at once, `bench/` W6), it accepted so much more slowly that clients waited
/// for SYN retransmissions (all resumed after 7.5 s instead of 1.3 s), for no measurable CPU
/// saving in steady fan-out.
fn runtime_builder(worker_threads: usize) -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    builder
}

fn run(settings: Settings) -> ExitCode {
    init_logging(&settings);
    // Once, before anything can fail on a socket, so the operator always sees them.
    for warning in settings.warnings() {
        tracing::warn!("risky configuration: {warning}");
    }
    // Every stream is a descriptor: take the whole hard limit the process was given (the soft
    // limit is often 1,024). The public listener's connection cap is derived from the result.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    let runtime = match runtime_builder(settings.server.worker_threads)
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
        // Register the handlers before anything else, so a signal during start-up is not lost.
        let shutdown = match ShutdownSignals::install() {
            Ok(signals) => signals,
            Err(e) => {
                eprintln!("ssehub: cannot install signal handlers: {e}");
                return Ok(ExitCode::FAILURE);
            }
        };
        let listeners = ssehub::Listeners::bind(&settings)
            .await
            .map_err(ssehub::RunError::Start)?;
        ssehub::run(settings, listeners, shutdown.received()).await?;
        Ok(ExitCode::SUCCESS)
    });
    result.unwrap_or_else(|e: ssehub::RunError| {
        // Said once: a task failure was already logged with its cause while draining; a
        // start-up error goes to stderr, where the operator who started the process looks.
        if let ssehub::RunError::Start(_) = e {
            eprintln!("ssehub: {e}");
        }
        match e {
            // Configuration problems exit like those found while loading: 2.
            ssehub::RunError::Start(ssehub::StartError::Config(_)) => ExitCode::from(2),
            // A failed task: non-zero, so the orchestrator restarts the process.
            ssehub::RunError::Start(_) | ssehub::RunError::TaskFailed { .. } => ExitCode::FAILURE,
        }
    })
}

fn init_logging(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a terminal: in files and log collectors they are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match settings.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// SIGTERM and SIGINT handlers, registered up front.
struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> std::io::Result<ShutdownSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(ShutdownSignals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the first SIGTERM or SIGINT.
    async fn received(mut self) {
        tokio::select! {
            _ = self.terminate.recv() => tracing::info!("SIGTERM received"),
            _ = self.interrupt.recv() => tracing::info!("SIGINT received"),
        }
    }
}
