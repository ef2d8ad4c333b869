//! Wake-ups for workers: an in-process signal, fed by local submissions and by PostgreSQL
//! NOTIFY from other nodes.

use std::collections::HashSet;
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
    /// Kinds this node's workers run; others are for external workers.
    in_process: HashSet<String>,
}

impl Wakeup {
    /// Wake-ups for a node whose workers run `in_process` kinds.
    pub fn new(in_process: impl IntoIterator<Item = String>) -> Self {
        Self {
            in_process: in_process.into_iter().collect(),
            ..Self::default()
        }
    }

    /// A job of `kind` may be due (`""`: of any kind): wake whoever could take it. Only
    /// in-process kinds wake the worker loop, whose every wake-up costs a claim transaction.
    pub fn job_available(&self, kind: &str) {
        let any = kind.is_empty();
        let local = self.in_process.contains(kind);
        if any || local {
            self.internal.notify_one();
        }
        if any || !local {
            self.external.notify_waiters();
        }
    }
}

/// Relay NOTIFYs on `channels` to `wake(channel, payload)` until `shutdown`, reconnecting on
/// failure (and waking with an empty payload after a reconnect, since announcements may have
/// been missed meanwhile).
pub async fn listen_postgres(
    url: String,
    channels: Vec<&'static str>,
    wake: impl Fn(&str, &str) + Send + 'static,
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
                    Ok(notification) => wake(notification.channel(), notification.payload()),
                    Err(err) => {
                        tracing::warn!(error = %err, "LISTEN connection lost");
                        for channel in &channels {
                            wake(channel, "");
                        }
                        break;
                    }
                },
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::Wakeup;

    /// Whether a wake-up was delivered to `notified` (already registered).
    fn woke(notified: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        matches!(notified.poll(&mut cx), Poll::Ready(()))
    }

    #[test]
    fn only_the_side_that_runs_a_kind_is_woken() {
        let wakeup = Wakeup::new(["echo".to_string()]);
        let cases = [
            ("echo", true, false),
            ("report.external", false, true),
            ("", true, true),
        ];
        for (kind, internal, external) in cases {
            let mut inner = pin!(wakeup.internal.notified());
            let mut outer = pin!(wakeup.external.notified());
            inner.as_mut().enable();
            outer.as_mut().enable();
            wakeup.job_available(kind);
            assert_eq!(woke(inner.as_mut()), internal, "{kind:?} internal");
            assert_eq!(woke(outer.as_mut()), external, "{kind:?} external");
        }
    }
}
