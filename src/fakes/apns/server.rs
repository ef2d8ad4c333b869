//! Accept loop, one task per HTTP/2 connection, one per stream.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::goaway::{GoAwayIo, GoAwaySwitch};
use super::verify::{Checked, ConnAuth};
use super::{Behaviour, RecordedRequest, Shared, lock};
use crate::providers::apns::MAX_VOIP_PAYLOAD;

/// Bodies beyond this are not read further: the answer is 413 either way.
const READ_LIMIT: usize = MAX_VOIP_PAYLOAD + 1;

pub(super) async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "fake APNs accept failed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let id = shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(%peer, connection = id, "fake APNs connection");
        let cancel = lock(&shared.conn_cancel).clone();
        let (tls, shared) = (tls.clone(), shared.clone());
        tokio::spawn(async move {
            let served = match tls {
                None => serve(tcp, id, shared, cancel).await,
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => serve(stream, id, shared, cancel).await,
                    Err(e) => Err(format!("TLS: {e}")),
                },
            };
            if let Err(e) = served {
                tracing::debug!(connection = id, error = %e, "fake APNs connection ended");
            }
        });
    }
}

async fn serve<T>(
    io: T,
    conn_id: u64,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) -> Result<(), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let switch = Arc::new(GoAwaySwitch::default());
    let mut builder = h2::server::Builder::new();
    if let Some(max) = shared.max_concurrent_streams {
        builder.max_concurrent_streams(max);
    }
    let mut conn = builder
        .handshake::<_, Bytes>(GoAwayIo::new(io, switch.clone()))
        .await
        .map_err(|e| e.to_string())?;
    let auth = Arc::new(ConnAuth::default());
    // Streams above this were announced as unprocessed and must stay so.
    let mut last_stream: Option<u32> = None;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            accepted = conn.accept() => accepted,
        };
        let (req, mut respond) = match accepted {
            None => return Ok(()),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(pair)) => pair,
        };
        let stream_id: u32 = respond.stream_id().into();
        if last_stream.is_some_and(|last| stream_id > last) {
            refuse(&shared, &mut respond);
            continue;
        }
        let token = req
            .uri()
            .path()
            .strip_prefix("/3/device/")
            .unwrap_or_default()
            .to_owned();
        let behaviour = shared.next_behaviour(&token);
        if behaviour == Behaviour::GoAway {
            let last = stream_id.saturating_sub(2);
            switch.send(last);
            last_stream = Some(last);
            refuse(&shared, &mut respond);
            continue;
        }
        if shared.goaway_due() {
            switch.send(stream_id);
            last_stream = Some(stream_id);
        }
        let ctx = Stream {
            shared: shared.clone(),
            auth: auth.clone(),
            cancel: cancel.clone(),
            conn_id,
            stream_id,
        };
        tokio::spawn(ctx.handle(req, respond, behaviour));
    }
}

fn refuse(shared: &Shared, respond: &mut SendResponse<Bytes>) {
    shared.refused.fetch_add(1, Ordering::Relaxed);
    respond.send_reset(h2::Reason::REFUSED_STREAM);
}

struct Stream {
    shared: Arc<Shared>,
    auth: Arc<ConnAuth>,
    // The connection's: a stream dying with its connection is neither answered nor recorded.
    cancel: CancellationToken,
    conn_id: u64,
    stream_id: u32,
}

impl Stream {
    async fn handle(
        self,
        req: Request<RecvStream>,
        respond: SendResponse<Bytes>,
        behaviour: Behaviour,
    ) {
        let shared = self.shared.clone();
        let now = shared.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        shared.peak_in_flight.fetch_max(now, Ordering::Relaxed);
        let cancel = self.cancel.clone();
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = self.answer(req, respond, behaviour) => {}
        }
        shared.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    async fn answer(
        self,
        req: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        behaviour: Behaviour,
    ) {
        let received_at = std::time::Instant::now();
        let shared = &self.shared;
        let (parts, body) = req.into_parts();
        let body = read_body(body).await;
        // Read as soon as the body is in, before any scripted delay: the push has arrived.
        let lag_us = shared
            .lags
            .as_ref()
            .and_then(|_| super::stats::lag_us(&body));
        let mut checked = Checked::default();
        let verdict = shared
            .verifier
            .request(&parts, &self.auth, &mut checked)
            .and_then(|push_type| shared.verifier.payload(push_type, body.len()));
        let mut answer = match verdict {
            Ok(()) => behaviour,
            Err((status, reason)) => Behaviour::reject(status, reason),
        };
        while let Behaviour::Delay(delay, inner) = answer {
            tokio::time::sleep(delay).await;
            answer = *inner;
        }
        let apns_id = checked
            .apns_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let (status, reason, payload, retry_after) = match &answer {
            Behaviour::Reject {
                status,
                reason,
                timestamp_ms,
                retry_after,
            } => {
                let mut json = serde_json::json!({ "reason": reason });
                if let Some(ts) = timestamp_ms {
                    json["timestamp"] = (*ts).into();
                }
                (
                    *status,
                    Some(reason.clone()),
                    Bytes::from(json.to_string()),
                    retry_after.clone(),
                )
            }
            // Accept (GoAway and Delay were resolved before handing the stream over).
            _ => (200, None, Bytes::new(), None),
        };
        shared.count(status, lag_us);
        shared.record(RecordedRequest {
            connection: self.conn_id,
            stream_id: self.stream_id,
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            device_token: checked.device_token,
            headers: parts.headers,
            body,
            claims: checked.claims,
            kid: checked.kid,
            status,
            reason,
            apns_id: apns_id.clone(),
            received_at,
        });
        let mut builder = Response::builder()
            .status(status)
            .header("apns-id", apns_id.as_str());
        if let Some(ra) = &retry_after {
            builder = builder.header("retry-after", ra.as_str());
        }
        if !payload.is_empty() {
            builder = builder.header("content-type", "application/json");
        }
        // The answer is built from validated parts; a failure here only loses this answer.
        if let Ok(resp) = builder.body(()) {
            let end = payload.is_empty();
            if let Ok(mut stream) = respond.send_response(resp, end)
                && !end
            {
                let _ = stream.send_data(payload, true);
            }
        }
    }
}

async fn read_body(mut body: RecvStream) -> Bytes {
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { break };
        // Give the window back, or large bodies stall the connection.
        let _ = body.flow_control().release_capacity(chunk.len());
        if buf.len() < READ_LIMIT {
            buf.extend_from_slice(&chunk);
        }
    }
    buf.freeze()
}
