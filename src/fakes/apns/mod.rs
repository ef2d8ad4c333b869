//! Fake APNs provider API server: HTTP/2 over TLS (test CA) or h2c, verifying what Apple
//! verifies, answering per device token from a scriptable table, recording every request.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use tokio_util::sync::CancellationToken;

use crate::providers::apns::{Clock, ProviderClaims};

mod goaway;
mod server;
pub mod stats;
mod verify;

pub use stats::{LagHistogram, StatsLine};

/// Key id of the committed test key (`fixtures/test-apns-AuthKey_TEST000001.p8`).
pub const TEST_KEY_ID: &str = "TEST000001";
/// Team id the fake expects by default.
pub const TEST_TEAM_ID: &str = "TEAMTEST01";
/// The committed test-only .p8 signing key (public on purpose; never use it for anything real).
pub const TEST_KEY_P8: &[u8] = include_bytes!("../../../fixtures/test-apns-AuthKey_TEST000001.p8");
/// Its public key, which the fake verifies tokens with.
pub const TEST_PUBLIC_KEY_PEM: &[u8] =
    include_bytes!("../../../fixtures/test-apns-AuthKey_TEST000001.pub.pem");

/// How the fake is set up.
#[derive(Debug, Clone)]
pub struct FakeApnsOptions {
    /// TLS with the committed test certificate (else h2c, prior knowledge).
    pub tls: bool,
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// SETTINGS_MAX_CONCURRENT_STREAMS; none = h2's default.
    pub max_concurrent_streams: Option<u32>,
    /// Expected `kid`.
    pub key_id: String,
    /// Expected `iss`.
    pub team_id: String,
    /// PEM public key verifying the ES256 signature.
    pub public_key_pem: Vec<u8>,
    /// Topics this key may push to; empty = any.
    pub topics: Vec<String>,
    /// Clock for token ages (share it with the sender to test the 20/60-minute rules).
    pub clock: Clock,
    /// Most requests kept by [`FakeApnsHandle::requests`]; older ones are forgotten, so a
    /// long-running `herald fake-apns` does not grow without bound. 0 keeps none (the counts
    /// of [`FakeApnsHandle::take_stats`] are kept either way).
    pub max_recorded: usize,
    /// When set, the fake measures each push's publish → push lag (from `data.t`, see
    /// [`stats`]) for [`FakeApnsHandle::take_stats`], and [`run_cli`] prints a [`StatsLine`]
    /// this often.
    pub stats_interval: Option<Duration>,
}

impl Default for FakeApnsOptions {
    /// TLS, any port, the committed test key.
    fn default() -> Self {
        Self {
            tls: true,
            port: 0,
            max_concurrent_streams: None,
            key_id: TEST_KEY_ID.into(),
            team_id: TEST_TEAM_ID.into(),
            public_key_pem: TEST_PUBLIC_KEY_PEM.to_vec(),
            topics: Vec::new(),
            clock: Clock::system(),
            max_recorded: 100_000,
            stats_interval: None,
        }
    }
}

/// A scripted answer for one device token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// 200 with `apns-id`.
    Accept,
    /// An error answer `{"reason": ..., "timestamp": ...}`.
    Reject {
        /// HTTP status.
        status: u16,
        /// Apple's reason string.
        reason: String,
        /// 410 only: when the token became invalid (ms).
        timestamp_ms: Option<i64>,
        /// `Retry-After` header value.
        retry_after: Option<String>,
    },
    /// Wait, then answer as the inner behaviour.
    Delay(Duration, Box<Behaviour>),
    /// Do not process this request: GOAWAY with last-stream-id just below it.
    GoAway,
}

impl Behaviour {
    /// Any status and reason.
    pub fn reject(status: u16, reason: &str) -> Self {
        Self::Reject {
            status,
            reason: reason.into(),
            timestamp_ms: None,
            retry_after: None,
        }
    }
    /// 400 BadDeviceToken.
    pub fn bad_device_token() -> Self {
        Self::reject(400, "BadDeviceToken")
    }
    /// 410 Unregistered since `timestamp_ms`.
    pub fn unregistered(timestamp_ms: i64) -> Self {
        Self::Reject {
            status: 410,
            reason: "Unregistered".into(),
            timestamp_ms: Some(timestamp_ms),
            retry_after: None,
        }
    }
    /// 429 TooManyRequests, with `Retry-After: secs` when given.
    pub fn too_many_requests(retry_after_secs: Option<u64>) -> Self {
        Self::Reject {
            status: 429,
            reason: "TooManyRequests".into(),
            timestamp_ms: None,
            retry_after: retry_after_secs.map(|s| s.to_string()),
        }
    }
    /// 500 InternalServerError.
    pub fn internal_error() -> Self {
        Self::reject(500, "InternalServerError")
    }
    /// 503 ServiceUnavailable, with `Retry-After: secs` when given.
    pub fn unavailable(retry_after_secs: Option<u64>) -> Self {
        Self::Reject {
            status: 503,
            reason: "ServiceUnavailable".into(),
            timestamp_ms: None,
            retry_after: retry_after_secs.map(|s| s.to_string()),
        }
    }
    /// This behaviour after `delay`.
    pub fn after(self, delay: Duration) -> Self {
        Self::Delay(delay, Box::new(self))
    }
}

/// One request the fake answered.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// Connection number (1-based, in accept order).
    pub connection: u64,
    /// HTTP/2 stream id.
    pub stream_id: u32,
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Device token from the path, when there was one.
    pub device_token: Option<String>,
    /// Request headers.
    pub headers: HeaderMap,
    /// Request body.
    pub body: Bytes,
    /// Provider-token claims, when the token decoded and verified.
    pub claims: Option<ProviderClaims>,
    /// Provider-token `kid`, when verified.
    pub kid: Option<String>,
    /// Status answered.
    pub status: u16,
    /// Reason answered (errors only).
    pub reason: Option<String>,
    /// `apns-id` answered (the client's or a generated one).
    pub apns_id: String,
    /// When the fake took the request up (before reading its body).
    pub received_at: Instant,
}

impl RecordedRequest {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Why the fake could not start.
#[derive(Debug, thiserror::Error)]
pub enum FakeApnsError {
    /// Binding or TLS setup failed.
    #[error("fake APNs: {0}")]
    Setup(String),
}

#[derive(Default)]
struct Script {
    queue: VecDeque<Behaviour>,
    standing: Option<Behaviour>,
}

/// State shared by the accept loop, connections and the handle.
struct Shared {
    verifier: verify::Verifier,
    max_concurrent_streams: Option<u32>,
    scripts: Mutex<HashMap<String, Script>>,
    goaway_countdown: Mutex<Option<usize>>,
    // Cancelled by `drop_connections`, then replaced for the connections that come after.
    conn_cancel: Mutex<CancellationToken>,
    requests: Mutex<VecDeque<RecordedRequest>>,
    max_recorded: usize,
    // Answered requests, and those answered 200, since start (kept even when none are recorded).
    answered: AtomicU64,
    accepted: AtomicU64,
    // The lag of the pushes since the last `take_stats`; None when not measured.
    lags: Option<Mutex<LagHistogram>>,
    started: Instant,
    refused: AtomicUsize,
    connections: AtomicU64,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn record(&self, request: RecordedRequest) {
        if self.max_recorded == 0 {
            return;
        }
        let mut requests = lock(&self.requests);
        if requests.len() >= self.max_recorded {
            requests.pop_front();
        }
        requests.push_back(request);
    }

    /// Counts an answer; `lag_us` is the push's lag when measured and it carried a marker.
    fn count(&self, status: u16, lag_us: Option<u64>) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        if status != 200 {
            return;
        }
        self.accepted.fetch_add(1, Ordering::Relaxed);
        if let (Some(lags), Some(us)) = (&self.lags, lag_us) {
            lock(lags).record(us);
        }
    }

    fn next_behaviour(&self, token: &str) -> Behaviour {
        let mut scripts = lock(&self.scripts);
        match scripts.get_mut(token) {
            Some(s) => s
                .queue
                .pop_front()
                .or_else(|| s.standing.clone())
                .unwrap_or(Behaviour::Accept),
            None => Behaviour::Accept,
        }
    }

    /// True when this processed request is the one `goaway_after` asked for.
    fn goaway_due(&self) -> bool {
        let mut countdown = lock(&self.goaway_countdown);
        match countdown.as_mut() {
            Some(0) | None => false,
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    *countdown = None;
                    return true;
                }
                false
            }
        }
    }
}

/// Starts fake APNs servers.
pub struct FakeApns;

impl FakeApns {
    /// Binds 127.0.0.1 and serves until the handle is dropped or shut down.
    pub async fn start(opts: FakeApnsOptions) -> Result<FakeApnsHandle, FakeApnsError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, opts.port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| FakeApnsError::Setup(format!("bind {addr}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| FakeApnsError::Setup(e.to_string()))?;
        let key = jsonwebtoken::DecodingKey::from_ec_pem(&opts.public_key_pem)
            .map_err(|e| FakeApnsError::Setup(format!("public key: {e}")))?;
        let cancel = CancellationToken::new();
        let acceptor = if opts.tls {
            let cfg = crate::providers::tls::server_config(
                crate::providers::tls::TEST_SERVER_CERT_PEM,
                crate::providers::tls::TEST_SERVER_KEY_PEM,
                &[b"h2"],
            )
            .map_err(|e| FakeApnsError::Setup(e.to_string()))?;
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
        } else {
            None
        };
        let shared = Arc::new(Shared {
            verifier: verify::Verifier::new(
                opts.key_id,
                opts.team_id,
                key,
                opts.topics,
                opts.clock,
            ),
            max_concurrent_streams: opts.max_concurrent_streams,
            scripts: Mutex::default(),
            goaway_countdown: Mutex::default(),
            conn_cancel: Mutex::new(cancel.child_token()),
            requests: Mutex::default(),
            max_recorded: opts.max_recorded,
            answered: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            lags: opts
                .stats_interval
                .map(|_| Mutex::new(LagHistogram::default())),
            started: Instant::now(),
            refused: AtomicUsize::new(0),
            connections: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
        });
        tokio::spawn(server::accept_loop(
            listener,
            acceptor,
            shared.clone(),
            cancel.clone(),
        ));
        Ok(FakeApnsHandle {
            shared,
            addr,
            tls: opts.tls,
            cancel,
        })
    }
}

/// A running fake; dropping it stops the server and closes its connections.
pub struct FakeApnsHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tls: bool,
    cancel: CancellationToken,
}

impl FakeApnsHandle {
    /// Base URL, e.g. `https://127.0.0.1:4431` (the test certificate covers 127.0.0.1).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answer every request for `token` with `behaviour` (after any queued ones).
    pub fn script(&self, token: &str, behaviour: Behaviour) {
        lock(&self.shared.scripts)
            .entry(token.to_owned())
            .or_default()
            .standing = Some(behaviour);
    }

    /// Answer the next requests for `token` with these, in order, then as [`Self::script`] says.
    /// Entries are taken in stream order when a request arrives, before it is verified.
    pub fn script_seq(&self, token: &str, behaviours: impl IntoIterator<Item = Behaviour>) {
        lock(&self.shared.scripts)
            .entry(token.to_owned())
            .or_default()
            .queue
            .extend(behaviours);
    }

    /// After `n` more requests have been taken for processing, send GOAWAY on the connection of
    /// the n-th with its stream as last-stream-id; later streams there are refused unprocessed.
    pub fn goaway_after(&self, n: usize) {
        *lock(&self.shared.goaway_countdown) = Some(n.max(1));
    }

    /// Every request answered so far, in answer order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).iter().cloned().collect()
    }

    /// How many requests are recorded (at most `max_recorded`), without copying them.
    pub fn request_count(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// Forget recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Counts since start and the lag histogram of the pushes since the previous call (empty
    /// unless `stats_interval` was set), which this call starts afresh.
    pub fn take_stats(&self) -> StatsLine {
        let lags = self
            .shared
            .lags
            .as_ref()
            .map(|l| std::mem::take(&mut *lock(l)))
            .unwrap_or_default();
        StatsLine::new(
            u64::try_from(self.shared.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            self.shared.answered.load(Ordering::Relaxed),
            self.shared.accepted.load(Ordering::Relaxed),
            &lags,
        )
    }

    /// Streams refused without processing (above a GOAWAY's last-stream-id).
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Most requests ever in processing at once.
    pub fn peak_in_flight(&self) -> usize {
        self.shared.peak_in_flight.load(Ordering::Relaxed)
    }

    /// Closes every open connection abruptly (in-flight requests are lost); keeps listening.
    pub fn drop_connections(&self) {
        let mut current = lock(&self.shared.conn_cancel);
        current.cancel();
        *current = self.cancel.child_token();
    }

    /// Stops accepting and closes every connection.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

impl Drop for FakeApnsHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// `herald fake-apns`: serve on `addr` (127.0.0.1 only) until Ctrl-C, printing the URL first
/// and then, with `stats_interval` set, one [`StatsLine`] (JSON) per interval.
pub async fn run_cli(addr: SocketAddr, mut options: FakeApnsOptions) -> Result<(), FakeApnsError> {
    if addr.ip() != Ipv4Addr::LOCALHOST {
        return Err(FakeApnsError::Setup(format!(
            "refusing to bind {addr}: the fake APNs listens on 127.0.0.1 only"
        )));
    }
    options.port = addr.port();
    let stats_every = options.stats_interval;
    let (kid, iss) = (options.key_id.clone(), options.team_id.clone());
    let handle = FakeApns::start(options).await?;
    println!("fake APNs listening on {}", handle.url());
    println!("  expects provider tokens with kid {kid}, iss {iss}");
    if handle.tls {
        println!("  TLS: test CA fixtures/test-ca.pem (test-only)");
    }
    // A zero interval would make tokio's interval panic: no lines then.
    match stats_every.filter(|every| !every.is_zero()) {
        Some(every) => {
            let mut ticks = tokio::time::interval(every);
            // The first tick is immediate: skip it, so every line covers a whole interval.
            ticks.tick().await;
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = ticks.tick() => {
                        let line = serde_json::to_string(&handle.take_stats())
                            .map_err(|e| FakeApnsError::Setup(format!("stats line: {e}")))?;
                        // Rust's stdout flushes at each newline, even into a pipe.
                        println!("{line}");
                    }
                }
            }
        }
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    handle.shutdown();
    Ok(())
}
