//! Wake-ups for workers: an in-process signal, fed by local submissions and by PostgreSQL
//! NOTIFY from other nodes.

use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::postgres::JOBS_CHANNEL;

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

/// Relay NOTIFYs on the jobs channel into `wakeup` until `shutdown`, reconnecting on failure.
pub async fn listen_postgres(
    url: String,
    wakeup: std::sync::Arc<Wakeup>,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        let listener = async {
            let mut listener = PgListener::connect(&url).await?;
            listener.listen(JOBS_CHANNEL).await?;
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
                    Ok(_) => wakeup.job_available(),
                    Err(err) => {
                        tracing::warn!(error = %err, "LISTEN connection lost");
                        // Work may have been announced while we were away.
                        wakeup.job_available();
                        break;
                    }
                },
                _ = shutdown.cancelled() => return,
            }
        }
    }
}
