//! Fake FCM HTTP v1 server with its OAuth2 token endpoint.
//!
//! Speaks the real protocol (PROTOCOLS.md, "What the fakes must do"): `POST /token` verifies the
//! service account's RS256 assertion and issues access tokens; `POST
//! /v1/projects/{id}/messages:send` checks the token, project and message, then answers from a
//! per-device-token script with google.rpc error bodies carrying FcmError details. HTTP/1.1 and
//! HTTP/2 (ALPN over TLS with the test CA, or h2c prior knowledge over plain http). Loopback only.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::providers::tls::{self, TlsError};

mod oauth;
mod send;

/// The committed test-only service account's public key (`fixtures/test-fcm-service-account.pub.pem`).
pub const TEST_SERVICE_ACCOUNT_PUBLIC_KEY_PEM: &[u8] =
    include_bytes!("../../../fixtures/test-fcm-service-account.pub.pem");
/// The committed test-only service account's project.
pub const TEST_PROJECT_ID: &str = "herald-test";
/// The committed test-only service account's `client_email`.
pub const TEST_CLIENT_EMAIL: &str = "herald-push@herald-test.iam.gserviceaccount.com";
/// Largest request body read; real requests are a few KiB.
const MAX_REQUEST: usize = 1024 * 1024;
/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How the fake is set up.
#[derive(Debug, Clone)]
pub struct FakeFcmOptions {
    /// Serve HTTPS with the committed test server certificate instead of plain http.
    pub tls: bool,
    /// The only project `messages:send` accepts.
    pub project_id: String,
    /// PEM public key (SPKI or PKCS#1) of the service account whose assertions are accepted.
    pub public_key_pem: Vec<u8>,
    /// When set, the assertion's `iss` must be this.
    pub client_email: Option<String>,
    /// `expires_in` of issued access tokens (Google: 3599 s).
    pub token_lifetime: Duration,
    /// Delay before the token endpoint answers.
    pub token_delay: Duration,
}

impl Default for FakeFcmOptions {
    /// Plain http, accepting the committed test service account.
    fn default() -> Self {
        Self {
            tls: false,
            project_id: TEST_PROJECT_ID.into(),
            public_key_pem: TEST_SERVICE_ACCOUNT_PUBLIC_KEY_PEM.to_vec(),
            client_email: Some(TEST_CLIENT_EMAIL.into()),
            token_lifetime: Duration::from_secs(3599),
            token_delay: Duration::ZERO,
        }
    }
}

/// How the fake answers a `messages:send` to one device token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// 200 with a message name.
    Success,
    /// 404 UNREGISTERED.
    Unregistered,
    /// 400 INVALID_ARGUMENT "The registration token is not a valid FCM registration token".
    InvalidToken,
    /// 403 SENDER_ID_MISMATCH.
    SenderIdMismatch,
    /// 429 QUOTA_EXCEEDED, with `Retry-After: <seconds>` when given.
    QuotaExceeded {
        /// Retry-After seconds.
        retry_after: Option<u64>,
    },
    /// 503 UNAVAILABLE, with `Retry-After: <seconds>` when given.
    Unavailable {
        /// Retry-After seconds.
        retry_after: Option<u64>,
    },
    /// 500 INTERNAL.
    Internal,
    /// 401 THIRD_PARTY_AUTH_ERROR (bad APNs credentials in Firebase).
    ThirdPartyAuthError,
    /// Wait, then answer as the inner behaviour.
    Delay(Duration, Box<Behaviour>),
    /// Any status and body, e.g. an error code Herald does not know yet.
    Raw {
        /// HTTP status.
        status: u16,
        /// Response body (sent as application/json).
        body: String,
        /// Retry-After header value.
        retry_after: Option<String>,
    },
}

/// A scripted failure of the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFailure {
    /// 400 `invalid_grant`.
    InvalidGrant,
    /// 503 with `Retry-After: 5`.
    Unavailable,
}

/// One request the fake received, as it saw it.
#[derive(Debug, Clone)]
pub struct FakeFcmRequest {
    /// Request path.
    pub path: String,
    /// HTTP version used.
    pub version: http::Version,
    /// Whether it carried a valid, unexpired access token.
    pub authorized: bool,
    /// `message.token`, if any.
    pub device_token: Option<String>,
    /// The request's `validate_only`.
    pub validate_only: bool,
    /// The JSON body (`Null` if it was not JSON).
    pub body: serde_json::Value,
    /// The status the fake answered.
    pub status: u16,
    /// When the fake recorded it (on arrival, before any scripted delay).
    pub received_at: Instant,
}

/// Why the fake could not start.
#[derive(Debug, thiserror::Error)]
pub enum FakeFcmError {
    /// It only binds 127.0.0.1.
    #[error("fake FCM binds only 127.0.0.1, not {0}")]
    NotLoopback(SocketAddr),
    /// Socket or signal error.
    #[error("fake FCM: {0}")]
    Io(#[from] std::io::Error),
    /// TLS material unusable.
    #[error("fake FCM: {0}")]
    Tls(#[from] TlsError),
    /// The public key is not an RSA PEM key.
    #[error("fake FCM: public key is not an RSA public key in PEM form")]
    PublicKey,
}

/// State shared by the server tasks and the handle.
pub(crate) struct Shared {
    project_id: String,
    client_email: Option<String>,
    public_key: jsonwebtoken::DecodingKey,
    /// Accepted assertion audiences: the token URI under each loopback name.
    audiences: Vec<String>,
    state: Mutex<State>,
}

struct State {
    /// Issued access token → expiry.
    issued: HashMap<String, Instant>,
    scripts: HashMap<String, VecDeque<Behaviour>>,
    default: Behaviour,
    requests: Vec<FakeFcmRequest>,
    token_requests: usize,
    tokens_issued: usize,
    token_failure: Option<TokenFailure>,
    token_delay: Duration,
    token_lifetime: Duration,
    next_message: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not wedge the server.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type Answer = Response<Full<Bytes>>;

/// Starts fake FCM servers.
pub struct FakeFcm;

impl FakeFcm {
    /// Start on 127.0.0.1 with an ephemeral port.
    pub async fn start(options: FakeFcmOptions) -> Result<FakeFcmHandle, FakeFcmError> {
        Self::start_on(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0), options).await
    }

    /// Start on `addr`, which must be 127.0.0.1 (any port).
    pub async fn start_on(
        addr: SocketAddr,
        options: FakeFcmOptions,
    ) -> Result<FakeFcmHandle, FakeFcmError> {
        if addr.ip() != IpAddr::V4(Ipv4Addr::LOCALHOST) {
            return Err(FakeFcmError::NotLoopback(addr));
        }
        let public_key = jsonwebtoken::DecodingKey::from_rsa_pem(&options.public_key_pem)
            .map_err(|_| FakeFcmError::PublicKey)?;
        let acceptor = if options.tls {
            let config = tls::server_config(
                tls::TEST_SERVER_CERT_PEM,
                tls::TEST_SERVER_KEY_PEM,
                &[b"h2", b"http/1.1"],
            )?;
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
        } else {
            None
        };
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let scheme = if options.tls { "https" } else { "http" };
        let base_url = format!("{scheme}://{addr}");
        let audiences = vec![
            format!("{base_url}/token"),
            format!("{scheme}://localhost:{}/token", addr.port()),
        ];
        let shared = Arc::new(Shared {
            project_id: options.project_id,
            client_email: options.client_email,
            public_key,
            audiences,
            state: Mutex::new(State {
                issued: HashMap::new(),
                scripts: HashMap::new(),
                default: Behaviour::Success,
                requests: Vec::new(),
                token_requests: 0,
                tokens_issued: 0,
                token_failure: None,
                token_delay: options.token_delay,
                token_lifetime: options.token_lifetime,
                next_message: 1,
            }),
        });
        let task = tokio::spawn(accept_loop(listener, acceptor, shared.clone()));
        Ok(FakeFcmHandle {
            shared,
            base_url,
            task,
        })
    }
}

/// A running fake; stops when dropped.
pub struct FakeFcmHandle {
    shared: Arc<Shared>,
    base_url: String,
    task: tokio::task::JoinHandle<()>,
}

impl FakeFcmHandle {
    /// `http(s)://127.0.0.1:<port>`: the FCM base URL.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// The OAuth2 token endpoint (`<base>/token`).
    pub fn token_uri(&self) -> String {
        format!("{}/token", self.base_url)
    }

    /// The project it accepts.
    pub fn project_id(&self) -> String {
        self.shared.project_id.clone()
    }

    /// Always answer `behaviour` for `device_token`.
    pub fn script(&self, device_token: &str, behaviour: Behaviour) {
        self.script_sequence(device_token, vec![behaviour]);
    }

    /// Answer these in order for `device_token`; the last one then repeats.
    pub fn script_sequence(&self, device_token: &str, behaviours: Vec<Behaviour>) {
        let mut s = self.shared.lock();
        if behaviours.is_empty() {
            s.scripts.remove(device_token);
        } else {
            s.scripts.insert(device_token.to_owned(), behaviours.into());
        }
    }

    /// The answer for tokens without a script (initially [`Behaviour::Success`]).
    pub fn set_default(&self, behaviour: Behaviour) {
        self.shared.lock().default = behaviour;
    }

    /// Every request received so far (token endpoint excluded), in arrival order.
    pub fn requests(&self) -> Vec<FakeFcmRequest> {
        self.shared.lock().requests.clone()
    }

    /// How many requests were received so far, without copying them.
    pub fn request_count(&self) -> usize {
        self.shared.lock().requests.len()
    }

    /// How many times `POST /token` was called (successful or not).
    pub fn token_requests(&self) -> usize {
        self.shared.lock().token_requests
    }

    /// How many access tokens were issued.
    pub fn tokens_issued(&self) -> usize {
        self.shared.lock().tokens_issued
    }

    /// Invalidate every issued access token: the next send with one gets 401.
    pub fn revoke_tokens(&self) {
        self.shared.lock().issued.clear();
    }

    /// Make `POST /token` fail this way (`None`: work again).
    pub fn fail_token_requests(&self, failure: Option<TokenFailure>) {
        self.shared.lock().token_failure = failure;
    }

    /// Delay every later `POST /token` answer.
    pub fn set_token_delay(&self, delay: Duration) {
        self.shared.lock().token_delay = delay;
    }

    /// `expires_in` for tokens issued from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.shared.lock().token_lifetime = lifetime;
    }

    /// Stop serving and wait for the server task to end.
    pub async fn shutdown(self) {
        let mut this = self;
        this.task.abort();
        // Aborted or finished: either way it is gone; the error is the expected cancellation.
        let _ = (&mut this.task).await;
    }
}

impl Drop for FakeFcmHandle {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

/// `herald fake-fcm`: serve on `addr` (127.0.0.1 only), print the URLs, run until Ctrl-C.
pub async fn run_cli(addr: SocketAddr, options: FakeFcmOptions) -> Result<(), FakeFcmError> {
    let handle = FakeFcm::start_on(addr, options).await?;
    println!("fake FCM listening (test credentials only)");
    println!("  base_url  = {}", handle.base_url());
    println!("  token_uri = {}", handle.token_uri());
    println!("  project   = {}", handle.project_id());
    tokio::signal::ctrl_c().await?;
    handle.shutdown().await;
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, acceptor.clone(), shared.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "fake fcm: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
) {
    // Same reason as the client: no Nagle stalls on small HTTP/2 frames.
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(route(&shared, req).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let result = match acceptor {
        Some(acceptor) => {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => builder.serve_connection(TokioIo::new(tls), service).await,
                _ => return,
            }
        }
        None => {
            builder
                .serve_connection(TokioIo::new(stream), service)
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "fake fcm: connection ended");
    }
}

async fn route(shared: &Shared, req: Request<Incoming>) -> Answer {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_REQUEST).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return json(StatusCode::PAYLOAD_TOO_LARGE, &serde_json::json!({})),
    };
    let path = parts.uri.path();
    if parts.method == Method::POST && path == "/token" {
        return oauth::token(shared, &parts, &body).await;
    }
    if parts.method == Method::POST && path.starts_with("/v1/projects/") {
        return send::send(shared, &parts, &body).await;
    }
    let answer = send::rpc_error(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "The requested URL was not found on this server.",
        None,
        &[],
    );
    send::record(shared, &parts, &body, None, answer.status());
    answer
}

/// A JSON response.
fn json(status: StatusCode, value: &serde_json::Value) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    response
}
