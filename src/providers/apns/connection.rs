//! One long-lived, multiplexed HTTP/2 connection to a provider endpoint (APNs; FCM sends through
//! it too), created lazily and replaced when it closes, answers GOAWAY or is told to (503,
//! Shutdown).
//!
//! Failures are sorted by what they mean for the notification: never sent or refused by the
//! server (safe to resend), or lost in flight (may have been delivered: the dispatcher decides).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

/// APNs error bodies are tiny; anything bigger is not APNs talking.
const MAX_ANSWER_BODY: usize = 64 * 1024;

/// Connection tuning.
#[derive(Debug, Clone)]
pub struct ConnOptions {
    /// TCP connect plus TLS and HTTP/2 handshakes.
    pub connect_timeout: Duration,
    /// One request, from sending to the end of the answer.
    pub request_timeout: Duration,
    /// PING interval, also while idle, so Apple and middleboxes keep the connection.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is considered dead.
    pub keepalive_timeout: Duration,
}

/// Why a request got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// No connection could be made; nothing was sent.
    #[error("cannot connect to {0}")]
    Connect(String),
    /// The server did not process the request (GOAWAY above it, REFUSED_STREAM, or it never
    /// left the client): resending cannot duplicate it.
    #[error("not processed by APNs: {0}")]
    Unprocessed(String, ConnectionGone),
    /// The request may have reached APNs (connection lost mid-stream).
    #[error("connection lost: {0}")]
    Lost(String),
    /// No answer within the exchange's bound; the request may have been processed.
    #[error("connection lost: request timed out")]
    TimedOut,
}

/// Whether an unprocessed request's connection is going away (GOAWAY) or still usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionGone(pub bool);

/// An HTTP answer and the connection generation it came on.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: StatusCode,
    /// Response headers (`apns-id`, `retry-after`).
    pub headers: HeaderMap,
    /// Response body (JSON reason on errors).
    pub body: Bytes,
    /// Which connection answered, for [`Endpoint::invalidate`].
    pub generation: u64,
}

#[derive(Clone)]
struct Live {
    tx: SendRequest<Full<Bytes>>,
    generation: u64,
}

/// An APNs base URL and its current connection.
pub struct Endpoint {
    scheme: Scheme,
    authority: Authority,
    host: String,
    port: u16,
    tls: Option<TlsConnector>,
    opts: ConnOptions,
    live: Mutex<Option<Live>>,
    // Serialises connecting so a burst opens one connection, not one per request.
    connecting: tokio::sync::Mutex<()>,
    last_failure: Mutex<Option<(Instant, String)>>,
    generations: AtomicU64,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Endpoint({}://{})", self.scheme, self.authority)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values are plain data; a panic elsewhere cannot leave them half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Endpoint {
    /// Parses `url` (`https://host[:port]`, or `http://` on loopback only, for h2c test servers).
    pub fn new(
        url: &str,
        tls: Arc<rustls::ClientConfig>,
        opts: ConnOptions,
    ) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{e}"))?;
        let scheme = uri.scheme().cloned().ok_or("missing scheme")?;
        let authority = uri.authority().cloned().ok_or("missing host")?;
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err("must be a base URL without path or query".into());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let (tls, default_port) = match scheme.as_str() {
            "https" => (Some(TlsConnector::from(tls)), 443),
            "http" => {
                let loopback = host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if !loopback {
                    return Err(
                        "plain http:// (h2c) is only allowed for loopback test servers".into(),
                    );
                }
                (None, 80)
            }
            other => return Err(format!("unsupported scheme {other}")),
        };
        Ok(Self {
            port: authority.port_u16().unwrap_or(default_port),
            scheme,
            authority,
            host,
            tls,
            opts,
            live: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            last_failure: Mutex::new(None),
            generations: AtomicU64::new(0),
        })
    }

    /// The absolute URI for `path` on this endpoint.
    pub fn uri(&self, path: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
    }

    fn open(&self) -> Option<Live> {
        lock(&self.live)
            .as_ref()
            .filter(|l| !l.tx.is_closed())
            .cloned()
    }

    /// Stops using connection `generation` for new requests (its in-flight streams finish).
    pub fn invalidate(&self, generation: u64) {
        let mut live = lock(&self.live);
        if live.as_ref().is_some_and(|l| l.generation == generation) {
            tracing::debug!(endpoint = ?self, generation, "replacing HTTP/2 connection");
            *live = None;
        }
    }

    async fn live(&self) -> Result<Live, SendError> {
        if let Some(live) = self.open() {
            return Ok(live);
        }
        let waited_from = Instant::now();
        let _guard = self.connecting.lock().await;
        if let Some(live) = self.open() {
            return Ok(live);
        }
        // If the attempt we queued behind failed, share its verdict rather than hammering.
        if let Some((at, why)) = lock(&self.last_failure).as_ref()
            && *at >= waited_from
        {
            return Err(SendError::Connect(why.clone()));
        }
        // Boxed: the connect (TCP, TLS and HTTP/2 handshakes) is by far the largest state of
        // every send's future, which a sender builds and moves for each push; inline, it made
        // a lane's per-push future 9.5 KB (2 KB without).
        match tokio::time::timeout(self.opts.connect_timeout, Box::pin(self.connect())).await {
            Ok(Ok(tx)) => {
                let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
                let live = Live { tx, generation };
                *lock(&self.live) = Some(live.clone());
                Ok(live)
            }
            Ok(Err(why)) => Err(self.failed(why)),
            Err(_) => Err(self.failed("connect timed out".into())),
        }
    }

    fn failed(&self, why: String) -> SendError {
        let why = format!("{}:{}: {why}", self.host, self.port);
        tracing::warn!(error = %why, "HTTP/2 connection failed");
        *lock(&self.last_failure) = Some((Instant::now(), why.clone()));
        SendError::Connect(why)
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| e.to_string())?;
        // Without this, Nagle plus delayed ACKs stall each small request ~40 ms.
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        match &self.tls {
            None => self.handshake(tcp).await,
            Some(connector) => {
                let name = ServerName::try_from(self.host.clone()).map_err(|e| e.to_string())?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err("server did not negotiate HTTP/2 (ALPN h2)".into());
                }
                self.handshake(tls).await
            }
        }
    }

    async fn handshake<T>(&self, io: T) -> Result<SendRequest<Full<Bytes>>, String>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(self.opts.keepalive_interval)
            .keep_alive_timeout(self.opts.keepalive_timeout)
            .keep_alive_while_idle(true)
            // Assume one stream until the server's SETTINGS say more: Apple allows only one
            // before the first token is accepted, and extra streams would be refused.
            .initial_max_send_streams(1)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let name = format!("{}:{}", self.host, self.port);
        tokio::spawn(async move {
            match conn.await {
                Ok(()) => tracing::debug!(endpoint = %name, "HTTP/2 connection closed"),
                Err(e) => tracing::info!(endpoint = %name, error = %e, "HTTP/2 connection ended"),
            }
        });
        tracing::debug!(endpoint = ?self, "HTTP/2 connection established");
        Ok(tx)
    }

    /// Sends one request on the current connection (connecting first if needed).
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Answer, SendError> {
        self.send_within(req, self.opts.request_timeout).await
    }

    /// [`Self::send`] with its own bound on the exchange instead of the endpoint's: one timer
    /// per request for a caller whose bound differs (FCM's, which a sender may change).
    pub async fn send_within(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<Answer, SendError> {
        let Live { mut tx, generation } = self.live().await?;
        let exchange = async {
            let resp = match tx.try_send_request(req).await {
                Ok(resp) => resp,
                Err(e) => {
                    let why = error_chain(e.error());
                    return Err(match (e.message().is_some(), never_processed(e.error())) {
                        (true, _) | (_, Unprocessed::GoAway) => {
                            SendError::Unprocessed(why, ConnectionGone(true))
                        }
                        (_, Unprocessed::Refused) => {
                            SendError::Unprocessed(why, ConnectionGone(false))
                        }
                        (_, Unprocessed::No) => SendError::Lost(why),
                    });
                }
            };
            let (parts, body) = resp.into_parts();
            // The status is the answer; a body cut short only loses the reason text.
            let body = match Limited::new(body, MAX_ANSWER_BODY).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(_) => Bytes::new(),
            };
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
                generation,
            })
        };
        let result = match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(SendError::TimedOut),
        };
        if let Err(e) = &result {
            // GOAWAY or a dead connection: later requests go to a new one.
            if matches!(e, SendError::Unprocessed(_, ConnectionGone(true))) || tx.is_closed() {
                self.invalidate(generation);
            }
        }
        result
    }
}

enum Unprocessed {
    No,
    GoAway,
    Refused,
}

/// Whether HTTP/2 guarantees the server did not act on the stream: it was above a GOAWAY's
/// last-stream-id (or opened after it), or refused with REFUSED_STREAM.
fn never_processed(err: &hyper::Error) -> Unprocessed {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if h2.is_go_away() && h2.is_remote() {
                return Unprocessed::GoAway;
            }
            if h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return Unprocessed::Refused;
            }
            return Unprocessed::No;
        }
        source = e.source();
    }
    Unprocessed::No
}

fn error_chain(err: &hyper::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
