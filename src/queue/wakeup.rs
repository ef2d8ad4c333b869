//! Wake-ups for workers: an in-process signal, fed by local submissions and by PostgreSQL
//! NOTIFY from other nodes.

use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Signals that work may be waiting.
#[derive(Default)]
pub struct Wakeup {
    /// The in-process worker loop (one waiter; a missed signal is remembered).
    pub internal: Notify,
    /// Long-polling external lease requests (all waiters).
    pub external: Notify,
}

impl Wakeup {
    /// New work may be due: wake everyone who could take it.
    pub fn job_available(&self) {
        self.internal.notify_one();
        self.external.notify_waiters();
    }
}

/// Relay NOTIFYs on `channels` to `wake` until `shutdown`, reconnecting on failure (and waking
/// after a reconnect, since announcements may have been missed meanwhile).
pub async fn listen_postgres(
    url: String,
    channels: Vec<&'static str>,
    wake: impl Fn(&str) + Send + 'static,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        let listener = async {
            let mut listener = PgListener::connect(&url).await?;
            listener.listen_all(channels.iter().copied()).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = match listener.await {
            Ok(l) => l,
            Err(err) => {
                tracing::warn!(error = %err, "LISTEN failed; relying on the poll timer until it reconnects");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        delay = Duration::from_millis(200);
        loop {
            tokio::select! {
                received = listener.recv() => match received {
                    Ok(notification) => wake(notification.channel()),
                    Err(err) => {
                        tracing::warn!(error = %err, "LISTEN connection lost");
                        for channel in &channels {
                            wake(channel);
                        }
                        break;
                    }
                },
                _ = shutdown.cancelled() => return,
            }
        }
    }
}
