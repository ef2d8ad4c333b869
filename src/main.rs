//! The `herald` command: serve, migrate, mint development tokens.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use herald::config::Config;
use herald::server;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "herald", version, about = "Self-hosted mobile push backend")]
struct Cli {
    /// Configuration file (TOML); HERALD_* environment variables override it.
    #[arg(long, global = true, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API, workers and dispatcher.
    Serve,
    /// Everything embedded (SQLite, fake APNs and FCM, a scripted app): the whole pattern in
    /// one command, on loopback only.
    Demo,
    /// Apply database migrations and exit.
    Migrate,
    /// Mint a development token signed with the configured HS256 secret.
    Token {
        /// The user (`sub` claim).
        #[arg(long)]
        sub: String,
        /// Space-separated scopes, e.g. "events:publish jobs:work".
        #[arg(long)]
        scope: Option<String>,
        /// Lifetime: 30s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = herald::auth::parse_ttl)]
        ttl: std::time::Duration,
    },
    /// Print the default configuration file.
    DefaultConfig,
    /// Run a fake APNs on 127.0.0.1, trusting the test-only key in fixtures/.
    FakeApns {
        /// Port on 127.0.0.1 (0 = any free port).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Serve h2c (cleartext HTTP/2) instead of TLS with the test-only certificate.
        #[arg(long)]
        plaintext: bool,
        /// Every this many milliseconds, print one JSON line to stdout: requests answered and
        /// answered 200 so far, and the publish → push lag (p50/p99/max and a histogram) of
        /// the pushes since the previous line, read from a unix-microsecond timestamp at
        /// `data.t` of the event. For load generators in another process (benches/soak).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        stats_ms: Option<u64>,
    },
    /// Run a fake FCM (with its OAuth token endpoint) on 127.0.0.1, trusting the test-only
    /// service account in fixtures/.
    FakeFcm {
        /// Port on 127.0.0.1 (0 = any free port).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Serve HTTPS with the test-only certificate (fixtures/test-server.pem).
        #[arg(long)]
        tls: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("herald: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("herald: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("herald: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, mut config: Config) -> Result<(), String> {
    match command {
        Command::FakeApns {
            port,
            plaintext,
            stats_ms,
        } => {
            let options = herald::fakes::apns::FakeApnsOptions {
                tls: !plaintext,
                // Nothing in this process reads the records, and at thousands of pushes a
                // second, kept ones would be hundreds of MB over a long run.
                max_recorded: 0,
                stats_interval: stats_ms.map(std::time::Duration::from_millis),
                ..Default::default()
            };
            herald::fakes::apns::run_cli(
                std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                options,
            )
            .await
            .map_err(|e| format!("fake-apns: {e}"))
        }
        Command::FakeFcm { port, tls } => {
            let options = herald::fakes::fcm::FakeFcmOptions {
                tls,
                ..Default::default()
            };
            herald::fakes::fcm::run_cli(std::net::SocketAddr::from(([127, 0, 0, 1], port)), options)
                .await
                .map_err(|e| format!("fake-fcm: {e}"))
        }
        Command::Demo => herald::demo::run().await,
        Command::DefaultConfig => {
            print!("{}", herald::config::DEFAULT_TOML);
            Ok(())
        }
        Command::Token { sub, scope, ttl } => {
            server::with_dev_secret(&mut config, &Config::base_dir()).map_err(|e| e.to_string())?;
            if config.auth.hs256_secret.is_empty() {
                return Err(
                    "token: auth.hs256_secret is not set (HERALD_AUTH_HS256_SECRET); \
                            tokens for RS256/ES256/JWKS set-ups come from your identity provider"
                        .into(),
                );
            }
            let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
            let token = herald::auth::mint_hs256(
                &config.auth.hs256_secret,
                &sub,
                scope.as_deref(),
                ttl,
                non_empty(&config.auth.issuer).as_deref(),
                non_empty(&config.auth.audience).as_deref(),
            )
            .map_err(|e| format!("token: {e}"))?;
            println!("{token}");
            Ok(())
        }
        Command::Migrate => {
            herald::telemetry::init_tracing(&config.log, config.log_format);
            server::open_store(&config)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "migrations applied to {}",
                herald::store::describe_url(config.database.url.expose())
            );
            Ok(())
        }
        Command::Serve => {
            herald::telemetry::init_tracing(&config.log, config.log_format);
            if server::with_dev_secret(&mut config, &Config::base_dir())
                .map_err(|e| e.to_string())?
            {
                tracing::warn!(
                    file = server::DEV_SECRET_FILE,
                    "no auth key configured: using a development HS256 secret; mint tokens with `herald token`"
                );
            }
            let signal = server::shutdown_signal();
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|e| format!("listen: cannot bind {}: {e}", config.listen))?;
            let database = herald::store::describe_url(config.database.url.expose());
            let shutdown = CancellationToken::new();
            let node = server::start(config, listener, shutdown.clone())
                .await
                .map_err(|e| e.to_string())?;
            println!("herald listening on http://{} using {database}", node.addr);
            tracing::info!(addr = %node.addr, %database, "herald started");
            signal.await;
            tracing::info!("shutting down");
            node.shutdown();
            node.wait().await.map_err(|e| e.to_string())?;
            tracing::info!("stopped");
            Ok(())
        }
    }
}
