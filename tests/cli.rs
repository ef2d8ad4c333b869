//! The `herald` binary as an operator runs it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_herald");

#[test]
fn invalid_configuration_stops_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .env("HERALD_LISTEN", "nonsense")
        .env("HERALD_AUTH_HS256_SECRET", "super-secret-value-1234567890")
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("listen"), "{err}");
    assert!(!err.contains("super-secret-value"));
}

#[test]
fn migrate_then_token_then_serve_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let migrate = Command::new(BIN)
        .current_dir(dir.path())
        .arg("migrate")
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    assert!(
        dir.path().join("herald.db").exists(),
        "the embedded default is herald.db in the working directory"
    );

    let token = Command::new(BIN)
        .current_dir(dir.path())
        .args([
            "token",
            "--sub",
            "alice",
            "--scope",
            "events:publish",
            "--ttl",
            "15m",
        ])
        .output()
        .unwrap();
    assert!(token.status.success());
    assert_eq!(
        String::from_utf8_lossy(&token.stdout)
            .trim()
            .split('.')
            .count(),
        3
    );

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .env("HERALD_LISTEN", format!("127.0.0.1:{port}"))
        .env("HERALD_LOG", "warn")
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.contains(&format!("127.0.0.1:{port}")) && line.contains("sqlite://herald.db"),
        "{line}"
    );
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "herald did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn demo_runs_the_whole_pattern_end_to_end() {
    let out = Command::new(BIN)
        .env("HERALD_LOG", "error")
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("POST /v1/jobs → 202"), "{stdout}");
    assert!(stdout.contains("fake APNs got alert"), "{stdout}");
    assert!(stdout.contains("\"job.completed\""), "{stdout}");
    assert!(
        stdout
            .trim_end()
            .ends_with("Run `herald serve` for the real thing."),
        "{stdout}"
    );
}
