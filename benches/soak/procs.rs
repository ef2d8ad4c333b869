//! The child processes: the fake APNs (`herald fake-apns --plaintext --stats-ms 1000`) and the
//! node under test (`herald serve --config FILE`). Each is killed when its guard drops, so a
//! failed or panicking run leaves none behind.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald::fakes::apns::StatsLine;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// The binary under test, as cargo built it for this bench.
const HERALD: &str = env!("CARGO_BIN_EXE_herald");

/// How long a child may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running child, killed (SIGKILL) when dropped.
pub struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn spawn(name: &'static str, command: &mut Command) -> Result<(Self, ChildStdout), String> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {name} ({HERALD}): {e}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| format!("{name}: no stdout"))?;
        // Its logs (warnings and errors only, by default) go to ours, shortened: a slow
        // statement warning carries the whole SQL text, which would bury the report.
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("[{name}] {}", shorten(&line, 400));
                }
            });
        }
        Ok((Self { name, child }, stdout))
    }

    /// The process id, for /proc.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its exit status if it has ended: a child that ends mid-run is a harness failure.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// `Err` naming the child when it has ended.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.exited() {
            Some(status) => Err(format!("{} exited mid-run: {status}", self.name)),
            None => Ok(()),
        }
    }

    /// Kill it and reap it.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }

    /// Its resident set size in MiB, from /proc/<pid>/status (VmRSS).
    pub fn rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    }
}

/// `line`, or its first and last `max / 2` characters when it is longer than `max`.
fn shorten(line: &str, max: usize) -> String {
    let n = line.chars().count();
    if n <= max {
        return line.to_string();
    }
    let head: String = line.chars().take(max / 2).collect();
    let tail: String = line.chars().skip(n - max / 2).collect();
    format!("{head} [...] {tail}")
}

/// The first line of `stdout` that `parse` accepts, within [`START_TIMEOUT`]; the reader is
/// handed back to keep draining (a child blocked on a full pipe would stall the run).
async fn wait_for_line<T>(
    name: &str,
    lines: &mut tokio::io::Lines<BufReader<ChildStdout>>,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<T, String> {
    let found = async {
        while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
            if let Some(v) = parse(&line) {
                return Ok(v);
            }
        }
        Err(format!("{name} closed its stdout before it was listening"))
    };
    tokio::time::timeout(START_TIMEOUT, found)
        .await
        .map_err(|_| format!("{name} did not start within {START_TIMEOUT:?}"))?
}

/// The stats lines of the fake so far, each with the instant it arrived here.
#[derive(Clone, Default)]
pub struct FakeStats(Arc<Mutex<Vec<(Instant, StatsLine)>>>);

impl FakeStats {
    fn push(&self, line: StatsLine) {
        self.lock().push((Instant::now(), line));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Instant, StatsLine)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pushes accepted by `at`, interpolated between the lines that arrived either side of
    /// it (a line a second: a count taken from the line before would be up to a second
    /// stale). None until a line after `at` has arrived.
    pub fn accepted_at(&self, at: Instant) -> Option<f64> {
        let lines = self.lock();
        let i = lines.partition_point(|(t, _)| *t <= at);
        let (t1, after) = lines.get(i)?;
        let Some((t0, before)) = i.checked_sub(1).map(|i| &lines[i]) else {
            // Before the first line: nothing was sent yet that it does not count.
            return Some(after.accepted as f64);
        };
        let span = t1.saturating_duration_since(*t0).as_secs_f64();
        let part = at.saturating_duration_since(*t0).as_secs_f64();
        let delta = after.accepted.saturating_sub(before.accepted) as f64;
        Some(
            before.accepted as f64
                + if span > 0.0 {
                    delta * part / span
                } else {
                    delta
                },
        )
    }

    /// Waits (up to 3 s) until a line after `at` has arrived, so `accepted_at(at)` answers.
    pub async fn wait_past(&self, at: Instant) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if self.lock().last().is_some_and(|(t, _)| *t > at) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The latest line.
    pub fn latest(&self) -> Option<StatsLine> {
        self.lock().last().map(|(_, l)| l.clone())
    }

    /// The lines that arrived in `(from, to]`.
    pub fn between(&self, from: Instant, to: Instant) -> Vec<StatsLine> {
        self.lock()
            .iter()
            .filter(|(t, _)| *t > from && *t <= to)
            .map(|(_, l)| l.clone())
            .collect()
    }
}

/// `herald fake-apns` in a process of its own, reporting what it received every second.
pub struct Fake {
    pub proc: Proc,
    /// `http://127.0.0.1:PORT` (h2c).
    pub url: String,
    pub stats: FakeStats,
}

impl Fake {
    pub async fn start() -> Result<Self, String> {
        let (proc, stdout) = Proc::spawn(
            "fake APNs",
            Command::new(HERALD).args([
                "fake-apns",
                "--port",
                "0",
                "--plaintext",
                "--stats-ms",
                "1000",
            ]),
        )?;
        let mut lines = BufReader::new(stdout).lines();
        let url = wait_for_line("fake APNs", &mut lines, |l| {
            l.strip_prefix("fake APNs listening on ")
                .map(|u| u.trim().to_string())
        })
        .await?;
        let stats = FakeStats::default();
        let sink = stats.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                // The other lines are the start-up banner.
                if line.starts_with('{') {
                    match serde_json::from_str::<StatsLine>(&line) {
                        Ok(stats) => sink.push(stats),
                        Err(e) => eprintln!("soak: unreadable fake APNs stats line ({e}): {line}"),
                    }
                }
            }
        });
        Ok(Self { proc, url, stats })
    }

    /// Pushes answered 200 so far, per the latest line (up to a second old).
    pub fn accepted(&self) -> u64 {
        self.stats.latest().map_or(0, |l| l.accepted)
    }
}

/// `herald serve` on 127.0.0.1, any free port.
pub struct Herald {
    pub proc: Proc,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Herald {
    /// Starts `herald serve --config config` on `database_url`, in `dir` (so any file it might
    /// create lands in the run's temporary directory). Other HERALD_* variables of this
    /// environment reach it too (e.g. HERALD_LOG, or tuning such as HERALD_DISPATCH_*).
    pub async fn start(config: &Path, database_url: &str, dir: &Path) -> Result<Self, String> {
        let (proc, stdout) = Proc::spawn(
            "herald serve",
            Command::new(HERALD)
                .arg("serve")
                .arg("--config")
                .arg(config)
                .current_dir(dir)
                .env_remove("HERALD_CONFIG")
                .env("HERALD_LISTEN", "127.0.0.1:0")
                .env("HERALD_DATABASE_URL", database_url),
        )?;
        let mut lines = BufReader::new(stdout).lines();
        // "herald listening on http://127.0.0.1:PORT using …"
        let addr = wait_for_line("herald serve", &mut lines, |l| {
            let rest = l.strip_prefix("herald listening on http://")?;
            rest.split_whitespace().next().map(str::to_string)
        })
        .await?;
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[herald serve] {}", shorten(&line, 400));
            }
        });
        Ok(Self { proc, addr })
    }
}
