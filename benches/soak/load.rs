//! The load generator: `POST /v1/events` over 256 HTTP/1.1 keep-alive connections, closed loop
//! (to measure the maximum) or open loop at a fixed rate (the soak).
//!
//! Open loop: events are scheduled at fixed intervals whatever the answers, queued until a
//! connection is free, and every latency is measured from the scheduled time, so a slow or
//! stalled Herald shows in the figures instead of silently slowing the generator down
//! (coordinated omission). Events scheduled but not yet sent are the backlog.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// What the load sends: to whom, with which credentials.
pub struct Target {
    /// `127.0.0.1:PORT` of `herald serve`.
    pub addr: String,
    /// `Bearer <JWT with events:publish>`.
    pub bearer: String,
    /// `userId`s, published to round-robin.
    pub users: Vec<String>,
}

/// Microseconds since the unix epoch.
pub fn unix_us(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The event body: `data.t` is when it was scheduled, which the fake APNs turns into the
/// publish → push lag.
fn event_body(user: &str, t_us: u64) -> Bytes {
    // Written by hand: the only variable parts are a plain id and a number.
    Bytes::from(format!(
        r#"{{"userId":"{user}","type":"soak.tick","data":{{"t":{t_us}}},"notification":{{"title":"Soak","body":"tick"}}}}"#
    ))
}

/// One keep-alive HTTP/1.1 connection to Herald, reopened after an error.
pub struct Conn {
    target: Arc<Target>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    pub async fn open(target: Arc<Target>) -> Result<Self, String> {
        let mut conn = Self {
            target,
            sender: None,
        };
        conn.connect().await?;
        Ok(conn)
    }

    async fn connect(&mut self) -> Result<(), String> {
        let tcp = tokio::net::TcpStream::connect(&self.target.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.target.addr))?;
        // Small requests one after another: do not wait to coalesce them.
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
        tokio::spawn(conn);
        self.sender = Some(sender);
        Ok(())
    }

    /// Publishes one event; the status, or `Err` when the connection failed (it is reopened
    /// for the next event).
    async fn publish(&mut self, user: &str, t_us: u64) -> Result<u16, String> {
        if self.sender.is_none() {
            self.connect().await?;
        }
        let answer = self.send(user, t_us).await;
        if answer.is_err() {
            self.sender = None;
        }
        answer
    }

    async fn send(&mut self, user: &str, t_us: u64) -> Result<u16, String> {
        let sender = self.sender.as_mut().ok_or("not connected")?;
        sender.ready().await.map_err(|e| e.to_string())?;
        let request = http::Request::post("/v1/events")
            .header(http::header::HOST, self.target.addr.as_str())
            .header(http::header::AUTHORIZATION, self.target.bearer.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(event_body(user, t_us)))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        // Read the body to its end, or the connection cannot carry the next request.
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(status)
    }
}

/// Opens `n` connections.
pub async fn connect_all(target: &Arc<Target>, n: usize) -> Result<Vec<Conn>, String> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(Conn::open(target.clone()).await?);
    }
    Ok(conns)
}

/// The answers of one stretch of time.
#[derive(Debug, Default, Clone)]
pub struct Acc {
    /// 202s.
    pub acks: u64,
    /// Latency of each 202 from its scheduled time, µs.
    pub latencies_us: Vec<u32>,
    /// Anything but 202, by status ("io" for a failed connection).
    pub errors: BTreeMap<String, u64>,
    /// 202s that took over 100 ms.
    pub over_100ms: u64,
}

impl Acc {
    fn ack(&mut self, latency: Duration) {
        self.acks += 1;
        self.latencies_us
            .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
        if latency > Duration::from_millis(100) {
            self.over_100ms += 1;
        }
    }

    fn error(&mut self, what: String) {
        *self.errors.entry(what).or_insert(0) += 1;
    }

    /// Latency quantiles in ms (p50, p99, max); sorts the samples.
    pub fn quantiles_ms(&mut self) -> Option<(f64, f64, f64)> {
        if self.latencies_us.is_empty() {
            return None;
        }
        self.latencies_us.sort_unstable();
        let v = &self.latencies_us;
        let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        let ms = |us: u32| f64::from(us) / 1e3;
        Some((ms(at(0.50)), ms(at(0.99)), ms(v[v.len() - 1])))
    }
}

/// Where the soak's answers are counted: the current report interval, plus the first and the
/// last window of the run for the summary's comparison.
pub struct Recorder {
    start: Instant,
    window: Duration,
    total: Duration,
    interval: Mutex<Acc>,
    first: Mutex<Acc>,
    last: Mutex<Acc>,
    /// When the latest 202 completed, µs after `start`.
    last_ack_us: AtomicU64,
    /// The longest time without a 202 completing in the current interval, µs.
    stall_us: AtomicU64,
    /// Events handed to a connection, for the backlog.
    pub started: AtomicU64,
}

fn lock(m: &Mutex<Acc>) -> std::sync::MutexGuard<'_, Acc> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Recorder {
    pub fn new(start: Instant, total: Duration, window: Duration) -> Self {
        Self {
            start,
            window,
            total,
            interval: Mutex::default(),
            first: Mutex::default(),
            last: Mutex::default(),
            last_ack_us: AtomicU64::new(0),
            stall_us: AtomicU64::new(0),
            started: AtomicU64::new(0),
        }
    }

    fn since_start_us(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.start).as_micros()).unwrap_or(u64::MAX)
    }

    fn record(&self, scheduled: Instant, done: Instant, answer: Result<u16, String>) {
        let since = done.saturating_duration_since(self.start);
        let in_first = since < self.window;
        // Answers after the end (events still queued then) are in no window.
        let in_last = since < self.total && since + self.window >= self.total;
        let apply = |f: &dyn Fn(&mut Acc)| {
            f(&mut lock(&self.interval));
            if in_first {
                f(&mut lock(&self.first));
            }
            if in_last {
                f(&mut lock(&self.last));
            }
        };
        match answer {
            Ok(202) => {
                let now = self.since_start_us(done);
                let prev = self.last_ack_us.fetch_max(now, Ordering::Relaxed);
                self.stall_us
                    .fetch_max(now.saturating_sub(prev), Ordering::Relaxed);
                let latency = done.saturating_duration_since(scheduled);
                apply(&|acc| acc.ack(latency));
            }
            Ok(status) => apply(&|acc| acc.error(status.to_string())),
            Err(_) => apply(&|acc| acc.error("io".into())),
        }
    }

    /// The interval's answers and its longest stall (ms), both started afresh. A stall still
    /// going on counts up to `now`.
    pub fn take_interval(&self, now: Instant) -> (Acc, f64) {
        let acc = std::mem::take(&mut *lock(&self.interval));
        let open = self
            .since_start_us(now)
            .saturating_sub(self.last_ack_us.load(Ordering::Relaxed));
        let stall = self.stall_us.swap(0, Ordering::Relaxed).max(open);
        (acc, stall as f64 / 1e3)
    }

    /// The first and last windows' answers.
    pub fn windows(&self) -> (Acc, Acc) {
        (lock(&self.first).clone(), lock(&self.last).clone())
    }
}

/// An event due at `at` (its `data.t` is `t_us`) for user `user`.
struct Job {
    at: Instant,
    t_us: u64,
    user: usize,
}

/// The open-loop soak running in the background.
pub struct OpenLoop {
    scheduled: Arc<AtomicU64>,
    recorder: Arc<Recorder>,
    scheduler: Option<tokio::task::JoinHandle<()>>,
    workers: Vec<tokio::task::JoinHandle<Conn>>,
}

impl Drop for OpenLoop {
    /// A run abandoned (a child died) stops sending at once.
    fn drop(&mut self) {
        if let Some(s) = &self.scheduler {
            s.abort();
        }
        for w in &self.workers {
            w.abort();
        }
    }
}

impl OpenLoop {
    /// Starts sending `rate` events/s from `start` for `duration` over `conns`.
    pub fn start(
        target: &Arc<Target>,
        conns: Vec<Conn>,
        rate: f64,
        start: Instant,
        duration: Duration,
        recorder: Arc<Recorder>,
    ) -> Self {
        let (tx, rx) = flume::unbounded::<Job>();
        let scheduled = Arc::new(AtomicU64::new(0));
        let users = target.users.len();
        let counter = scheduled.clone();
        // The unix time matching `start`, so `data.t` and the Instant schedule agree.
        let start_unix_us = unix_us(SystemTime::now()).saturating_sub(
            u64::try_from(Instant::now().saturating_duration_since(start).as_micros()).unwrap_or(0),
        );
        let scheduler = tokio::spawn(async move {
            let total = (duration.as_secs_f64() * rate).floor() as u64;
            let mut next = 0u64;
            while next < total {
                // Everything due by now, each with its own scheduled time: the timer's 1 ms
                // granularity does not bunch the latencies, only the sends.
                let due = ((start.elapsed().as_secs_f64() * rate).floor() as u64 + 1).min(total);
                while next < due {
                    let offset = Duration::from_secs_f64(next as f64 / rate);
                    let job = Job {
                        at: start + offset,
                        t_us: start_unix_us + u64::try_from(offset.as_micros()).unwrap_or(0),
                        user: (next % users as u64) as usize,
                    };
                    if tx.send(job).is_err() {
                        return;
                    }
                    next += 1;
                }
                counter.store(next, Ordering::Relaxed);
                let at = start + Duration::from_secs_f64(next as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
            }
        });
        let workers = conns
            .into_iter()
            .map(|mut conn| {
                let (rx, recorder, target) = (rx.clone(), recorder.clone(), target.clone());
                tokio::spawn(async move {
                    while let Ok(job) = rx.recv_async().await {
                        recorder.started.fetch_add(1, Ordering::Relaxed);
                        let answer = conn.publish(&target.users[job.user], job.t_us).await;
                        recorder.record(job.at, Instant::now(), answer);
                    }
                    conn
                })
            })
            .collect();
        Self {
            scheduled,
            recorder,
            scheduler: Some(scheduler),
            workers,
        }
    }

    /// Events scheduled so far but not yet handed to a connection.
    pub fn backlog(&self) -> u64 {
        self.scheduled
            .load(Ordering::Relaxed)
            .saturating_sub(self.recorder.started.load(Ordering::Relaxed))
    }

    /// Waits for the schedule to end and every queued event to be answered; the connections
    /// come back for reuse.
    pub async fn finish(mut self) -> Vec<Conn> {
        if let Some(s) = self.scheduler.take() {
            let _ = s.await;
        }
        let mut conns = Vec::with_capacity(self.workers.len());
        for w in std::mem::take(&mut self.workers) {
            if let Ok(conn) = w.await {
                conns.push(conn);
            }
        }
        conns
    }
}

/// What a closed-loop burst achieved.
pub struct Burst {
    pub acks: u64,
    pub errors: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

/// Every connection sends back to back for `duration`: the most Herald acknowledges.
pub async fn closed_loop(
    target: &Arc<Target>,
    conns: Vec<Conn>,
    duration: Duration,
) -> (Burst, Vec<Conn>) {
    let start = Instant::now();
    let deadline = start + duration;
    let next_user = Arc::new(AtomicU64::new(0));
    let users = target.users.len() as u64;
    let workers: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (target, next_user) = (target.clone(), next_user.clone());
            tokio::spawn(async move {
                let mut acc = Acc::default();
                while Instant::now() < deadline {
                    let user = (next_user.fetch_add(1, Ordering::Relaxed) % users) as usize;
                    match conn
                        .publish(&target.users[user], unix_us(SystemTime::now()))
                        .await
                    {
                        Ok(202) => acc.acks += 1,
                        Ok(status) => acc.error(status.to_string()),
                        Err(_) => acc.error("io".into()),
                    }
                }
                (acc, conn)
            })
        })
        .collect();
    let mut burst = Burst {
        acks: 0,
        errors: BTreeMap::new(),
        elapsed: Duration::ZERO,
    };
    let mut back = Vec::new();
    for w in workers {
        if let Ok((acc, conn)) = w.await {
            burst.acks += acc.acks;
            for (k, v) in acc.errors {
                *burst.errors.entry(k).or_insert(0) += v;
            }
            back.push(conn);
        }
    }
    burst.elapsed = start.elapsed();
    (burst, back)
}
