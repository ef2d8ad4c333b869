//! The `JobHandler` trait and the built-in kinds `echo` and `report.generate`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

/// Why a handler did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Try again later (with backoff), up to the kind's `max_attempts`.
    #[error("{code}: {message}")]
    Retryable {
        /// Machine-readable code.
        code: String,
        /// Explanation.
        message: String,
    },
    /// Retrying cannot help: the job fails now.
    #[error("{code}: {message}")]
    Permanent {
        /// Machine-readable code.
        code: String,
        /// Explanation.
        message: String,
    },
}

impl HandlerError {
    /// A retryable error.
    pub fn retryable(code: &str, message: impl Into<String>) -> Self {
        Self::Retryable {
            code: code.into(),
            message: message.into(),
        }
    }
    /// A permanent error.
    pub fn permanent(code: &str, message: impl Into<String>) -> Self {
        Self::Permanent {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// One progress report from a running handler.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Percent, 0–100.
    pub percent: i32,
    /// Optional detail for the update.
    pub data: Option<Value>,
}

/// What a handler sees of its job.
pub struct JobContext {
    /// The job's input.
    pub input: Value,
    /// This attempt (1-based).
    pub attempt: i32,
    progress: mpsc::Sender<Progress>,
}

impl JobContext {
    /// A context whose progress reports go to `progress`.
    pub fn new(input: Value, attempt: i32, progress: mpsc::Sender<Progress>) -> Self {
        Self {
            input,
            attempt,
            progress,
        }
    }

    /// Report progress; it becomes a `job.processing` update. Never blocks the handler for long:
    /// reports are dropped when the recorder lags, since a later one supersedes them.
    pub fn progress(&self, percent: i32, data: Option<Value>) {
        let _ = self.progress.try_send(Progress {
            percent: percent.clamp(0, 100),
            data,
        });
    }
}

/// Runs one kind of job. Processing is at least once: a handler may see the same job again.
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    /// Produce the job's result.
    async fn run(&self, ctx: &JobContext) -> Result<Value, HandlerError>;
}

/// Kind name → handler, for the kinds this node runs in-process.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn JobHandler>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `handler` for `kind`.
    pub fn insert(&mut self, kind: impl Into<String>, handler: Arc<dyn JobHandler>) {
        self.handlers.insert(kind.into(), handler);
    }

    /// The handler for `kind`.
    pub fn get(&self, kind: &str) -> Option<Arc<dyn JobHandler>> {
        self.handlers.get(kind).cloned()
    }

    /// Kinds with an in-process handler.
    pub fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.handlers.keys().cloned().collect();
        kinds.sort();
        kinds
    }

    /// The built-in handler named `name` (`echo`, `report.generate`).
    pub fn builtin(name: &str) -> Option<Arc<dyn JobHandler>> {
        match name {
            "echo" => Some(Arc::new(Echo)),
            "report.generate" => Some(Arc::new(ReportGenerate)),
            _ => None,
        }
    }
}

/// `echo`: returns its input, after an optional `delayMs`, failing retryably on the first
/// `failTimes` attempts.
pub struct Echo;

#[async_trait]
impl JobHandler for Echo {
    async fn run(&self, ctx: &JobContext) -> Result<Value, HandlerError> {
        let delay = ctx
            .input
            .get("delayMs")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if delay > 0 {
            // Capped so a careless input cannot hold a worker slot for hours.
            tokio::time::sleep(Duration::from_millis(delay.min(600_000))).await;
        }
        let fail_times = ctx
            .input
            .get("failTimes")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if i64::from(ctx.attempt) <= fail_times {
            return Err(HandlerError::retryable(
                "echo_fail",
                format!(
                    "failing attempt {} of the first {fail_times} on purpose",
                    ctx.attempt
                ),
            ));
        }
        Ok(ctx.input.clone())
    }
}

/// `report.generate`: aggregates `records` (`group`, `amount`) into count, total and per-group
/// totals, reporting progress as it goes.
pub struct ReportGenerate;

/// Records per progress report.
const REPORT_CHUNK: usize = 1000;

#[async_trait]
impl JobHandler for ReportGenerate {
    async fn run(&self, ctx: &JobContext) -> Result<Value, HandlerError> {
        let records = ctx
            .input
            .get("records")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                HandlerError::permanent(
                    "invalid_input",
                    "input.records must be an array of records",
                )
            })?;
        let mut total = 0.0_f64;
        let mut by_group: BTreeMap<String, f64> = BTreeMap::new();
        for (i, record) in records.iter().enumerate() {
            let (group, amount) = parse_record(record).map_err(|why| {
                HandlerError::permanent("invalid_record", format!("records[{i}]: {why}"))
            })?;
            total += amount;
            *by_group.entry(group.to_string()).or_insert(0.0) += amount;
            if (i + 1) % REPORT_CHUNK == 0 {
                let percent = ((i + 1) * 100 / records.len()) as i32;
                ctx.progress(
                    percent,
                    Some(json!({"processed": i + 1, "of": records.len()})),
                );
                tokio::task::yield_now().await;
            }
        }
        let by_group: Map<String, Value> =
            by_group.into_iter().map(|(g, v)| (g, json!(v))).collect();
        Ok(json!({"count": records.len(), "total": total, "byGroup": by_group}))
    }
}

fn parse_record(record: &Value) -> Result<(&str, f64), &'static str> {
    let obj = record.as_object().ok_or("must be an object")?;
    let group = obj
        .get("group")
        .and_then(Value::as_str)
        .filter(|g| !g.is_empty())
        .ok_or("group must be a non-empty string")?;
    let amount = obj
        .get("amount")
        .and_then(Value::as_f64)
        .filter(|a| a.is_finite())
        .ok_or("amount must be a number")?;
    Ok((group, amount))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(input: Value, attempt: i32) -> (JobContext, mpsc::Receiver<Progress>) {
        let (tx, rx) = mpsc::channel(16);
        (JobContext::new(input, attempt, tx), rx)
    }

    #[tokio::test]
    async fn echo_fails_first_then_echoes() {
        let input = json!({"failTimes": 2, "x": 1});
        assert!(matches!(
            Echo.run(&ctx(input.clone(), 1).0).await,
            Err(HandlerError::Retryable { .. })
        ));
        assert!(Echo.run(&ctx(input.clone(), 2).0).await.is_err());
        assert_eq!(Echo.run(&ctx(input.clone(), 3).0).await.unwrap(), input);
    }

    #[tokio::test]
    async fn report_aggregates_and_reports_progress() {
        let mut records = Vec::new();
        for i in 0..2500 {
            records.push(json!({"group": if i % 2 == 0 { "eu" } else { "us" }, "amount": 1.5}));
        }
        let (c, mut rx) = ctx(json!({ "records": records }), 1);
        let result = ReportGenerate.run(&c).await.unwrap();
        assert_eq!(result["count"], 2500);
        assert_eq!(result["total"], 3750.0);
        assert_eq!(result["byGroup"]["eu"], 1875.0);
        assert_eq!(rx.recv().await.unwrap().percent, 40);
        assert_eq!(rx.recv().await.unwrap().percent, 80);
    }

    #[tokio::test]
    async fn report_rejects_bad_records_permanently() {
        let bad =
            json!({"records": [{"group": "eu", "amount": 1}, {"group": "eu", "amount": "x"}]});
        let err = ReportGenerate.run(&ctx(bad, 1).0).await.unwrap_err();
        assert_eq!(
            err,
            HandlerError::permanent("invalid_record", "records[1]: amount must be a number")
        );
        let missing = ReportGenerate.run(&ctx(json!({}), 1).0).await.unwrap_err();
        assert!(matches!(missing, HandlerError::Permanent { .. }));
    }
}
