//! Start-up and shutdown of a Herald node: store, migrations, auth, HTTP server.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::auth::Authenticator;
use crate::config::{Config, Secret};
use crate::dispatch::Dispatcher;
use crate::jobs::Registry;
use crate::queue::wakeup::listen_postgres;
use crate::queue::{Backoff, Wakeup, Workers};
use crate::store::postgres::{JOBS_CHANNEL, UPDATES_CHANNEL};
use crate::store::{self, Engine, Store};
use crate::updates::{Retention, run_retention};

/// Why a node could not start; each message is one line an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Storage could not be opened or migrated.
    #[error("database: {0}")]
    Store(#[from] store::StoreError),
    /// Authentication is misconfigured.
    #[error("{0}")]
    Auth(String),
    /// An app's push credentials could not be loaded.
    #[error("{0}")]
    Providers(#[from] crate::providers::ProvidersError),
    /// The listener failed.
    #[error("listen: {0}")]
    Io(#[from] std::io::Error),
}

/// A running node.
pub struct Node {
    /// Where the API listens.
    pub addr: SocketAddr,
    /// The store, shared with background tasks.
    pub store: Arc<dyn Store>,
    /// Push senders per app.
    pub providers: crate::providers::Providers,
    /// The group commit `POST /v1/events` appends through (for benchmarks and embedders).
    pub events: store::EventIntake,
    shutdown: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    tasks: JoinSet<()>,
}

impl Node {
    /// Ask the node to stop (same as SIGTERM).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Wait for the HTTP server and the workers to drain, then close the store.
    pub async fn wait(mut self) -> std::io::Result<()> {
        let result = match self.server.await {
            Ok(result) => result,
            Err(join) => Err(std::io::Error::other(join)),
        };
        while self.tasks.join_next().await.is_some() {}
        self.store.close().await;
        result
    }
}

/// File holding the development HS256 secret used when no auth key is configured.
pub const DEV_SECRET_FILE: &str = "herald-dev.secret";

/// When no verification key is configured, fall back to a development secret kept in
/// `herald-dev.secret` (created once, mode 0600), so `serve` and `token` agree out of the box.
pub fn with_dev_secret(config: &mut Config, dir: &Path) -> Result<bool, StartError> {
    let auth = &config.auth;
    if !auth.hs256_secret.is_empty()
        || !auth.public_key_file.is_empty()
        || !auth.jwks_url.is_empty()
    {
        return Ok(false);
    }
    let path = dir.join(DEV_SECRET_FILE);
    let secret = match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => {
            use base64::Engine as _;
            let bytes: [u8; 32] = rand::random();
            let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            write_private(&path, &secret).map_err(|e| {
                StartError::Auth(format!("auth: cannot write {}: {e}", path.display()))
            })?;
            secret
        }
    };
    config.auth.hs256_secret = Secret::new(secret);
    Ok(true)
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(contents.as_bytes())
}

/// Open the store and apply migrations.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    let store = store::connect(&config.database).await?;
    store.migrate().await?;
    Ok(store)
}

/// Start a node on `listener`; it stops when `shutdown` is cancelled.
pub async fn start(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<Node, StartError> {
    let store = open_store(&config).await?;
    // Credentials are loaded (and checked) before the node accepts work; the dispatcher uses them.
    let providers = crate::providers::Providers::from_config(&config.apps)?;
    let auth = Authenticator::from_config(&config.auth)
        .await
        .map_err(|e| StartError::Auth(e.to_string()))?;
    let mut registry = Registry::new();
    for (name, kind) in &config.kinds {
        if let Some(handler) = Registry::builtin(&kind.handler) {
            registry.insert(name.clone(), handler);
        }
    }
    let wakeup = Arc::new(Wakeup::new(registry.kinds()));
    // The committer outlives the HTTP server's drain: it stops on its own token after it.
    let intake_stop = CancellationToken::new();
    let max_connections = config.database.max_connections;
    let (intake, intake_task) =
        store::job_intake(store.clone(), max_connections, intake_stop.clone());
    let dispatcher = Dispatcher::new(store.clone(), providers.clone(), config.dispatch.clone());
    // Published events hand their deliveries straight to this node's dispatcher.
    let handoffs: Arc<dyn store::HandoffSink> = dispatcher.handoffs();
    let (events, events_task) = store::event_intake(
        store.clone(),
        max_connections,
        Some(handoffs),
        intake_stop.clone(),
    );
    let backoff = Backoff::new(config.queue.backoff_base_ms, config.queue.backoff_max_ms);
    let state = AppState {
        store: store.clone(),
        auth,
        apps: config.apps.iter().map(|a| a.id.clone()).collect(),
        metrics: crate::telemetry::metrics_handle(),
        openapi: Arc::new(api::openapi_json()),
        kinds: Arc::new(config.kinds.clone()),
        allow_private_targets: config.webhooks.allow_private_targets,
        wakeup: wakeup.clone(),
        backoff,
        intake,
        events: events.clone(),
    };
    let mut tasks = JoinSet::new();
    tasks.spawn(crate::telemetry::run_metrics_upkeep(
        state.metrics.clone(),
        shutdown.clone(),
    ));
    if store.engine() == Engine::Postgres {
        // Other nodes announce new jobs and appended updates; relay them to this node's loops.
        let url = config.database.url.expose().to_string();
        let (jobs_wake, updates_wake) = (wakeup.clone(), store.appended());
        let wake = move |channel: &str, payload: &str| {
            if channel == JOBS_CHANNEL {
                // The payload names the job's kind ("" for any).
                jobs_wake.job_available(payload);
            } else {
                updates_wake.notify_one();
            }
        };
        tasks.spawn(listen_postgres(
            url,
            vec![JOBS_CHANNEL, UPDATES_CHANNEL],
            wake,
            shutdown.clone(),
        ));
    }
    tasks.spawn(dispatcher.run(shutdown.clone()));
    let owner = format!("node:{}", uuid::Uuid::now_v7());
    let workers = Workers::new(store.clone(), registry, config.queue.clone(), wakeup, owner);
    tasks.spawn(workers.run(shutdown.clone()));
    let retention = Retention {
        updates: config.updates.retention(),
        outcomes: config.dispatch.outcome_retention(),
        every: config.updates.purge_interval(),
    };
    tasks.spawn(run_retention(store.clone(), retention, shutdown.clone()));
    let app = api::router(
        state,
        config.http.body_limit,
        Duration::from_secs(config.http.request_timeout_secs),
    );
    let addr = listener.local_addr()?;
    let grace = Duration::from_secs(config.http.shutdown_grace_secs);
    let token = shutdown.clone();
    let server = tokio::spawn(async move {
        let serve =
            axum::serve(listener, app).with_graceful_shutdown(token.clone().cancelled_owned());
        // In-flight requests get the grace period; after that the node stops regardless.
        let result = tokio::select! {
            result = serve => result,
            _ = async { token.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!("shutdown grace period elapsed; dropping remaining connections");
                Ok(())
            }
        };
        intake_stop.cancel();
        let _ = intake_task.await;
        let _ = events_task.await;
        result
    });
    Ok(Node {
        addr,
        store,
        providers,
        events,
        shutdown,
        server,
        tasks,
    })
}

/// Install SIGTERM and Ctrl-C handlers now; the returned future resolves when either arrives.
/// Registering before the node announces itself means an early signal is not fatal.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(term) => {},
                _ = wait(int) => {},
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
