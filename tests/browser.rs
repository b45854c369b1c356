//! Real clients end to end: headless Chromium's `EventSource` (driven by playwright-core) and an
//! independent SSE client library (the npm `eventsource` package) against the real `ssehub`
//! binary and a `redis-server`, publishing with `redis-cli`. The scenarios live in
//! `tests/browser/run.mjs`; this test runs them and fails when any of them fails.
//!
//! Needs Node.js 18+, `npm ci --prefix tests/browser`, Chromium at `/usr/bin/chromium` (Debian
//! package `chromium`; another path via `CHROMIUM`), `redis-server` and `redis-cli`.
//! `SSEHUB_UPDATE_SCREENSHOT=1` rewrites `docs/demo.png`, the README's demo page screenshot.

mod support;

use std::error::Error;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::ScratchDir;

/// The script's own hard limit is 120 s; this one only catches a hung `node`.
const LIMIT: Duration = Duration::from_secs(180);
/// Scenarios in run.mjs (five browser cases, three `eventsource` cases, the demo page).
const SCENARIOS: usize = 9;

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Copies `stream` line by line to stderr (visible with `--nocapture`) and returns it all.
fn echo(stream: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            eprintln!("{line}");
            all.push_str(&line);
            all.push('\n');
        }
        all
    })
}

#[test]
fn browser_and_independent_client_scenarios_pass() -> Result<(), Box<dyn Error>> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let suite = repo.join("tests").join("browser");
    for package in ["playwright-core", "eventsource"] {
        if !suite.join("node_modules").join(package).is_dir() {
            return Err(format!(
                "tests/browser/node_modules/{package} is missing: run `npm ci --prefix tests/browser`"
            )
            .into());
        }
    }
    let chromium = chromium();
    if !chromium.exists() {
        return Err(format!(
            "{} is missing: install Chromium (`apt-get install -y chromium`) or set CHROMIUM",
            chromium.display()
        )
        .into());
    }

    let scratch = ScratchDir::create(&format!("ssehub-browser-test-{}", std::process::id()))?;
    let screenshot = if std::env::var("SSEHUB_UPDATE_SCREENSHOT").as_deref() == Ok("1") {
        repo.join("docs").join("demo.png")
    } else {
        scratch.0.join("demo.png")
    };

    let mut child = Command::new("node")
        .arg(suite.join("run.mjs"))
        .current_dir(repo)
        .env("SSEHUB_BIN", env!("CARGO_BIN_EXE_ssehub"))
        .env("SCREENSHOT", &screenshot)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `node` (install Node.js 18+): {e}"))?;
    let stdout = echo(child.stdout.take().ok_or("no stdout pipe")?);
    let stderr = echo(child.stderr.take().ok_or("no stderr pipe")?);

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > LIMIT {
            child.kill()?;
            child.wait()?;
            break None;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let output = stdout.join().map_err(|_| "stdout reader panicked")?;
    let errors = stderr.join().map_err(|_| "stderr reader panicked")?;

    let status = status.ok_or_else(|| format!("run.mjs still running after {LIMIT:?}: killed"))?;
    assert!(
        status.success(),
        "browser scenarios failed ({status}):\n{output}{errors}"
    );
    assert!(
        !output.contains("not ok"),
        "a scenario failed:\n{output}{errors}"
    );
    let passed = output.lines().filter(|l| l.starts_with("ok - ")).count();
    assert!(
        passed >= SCENARIOS,
        "only {passed} of {SCENARIOS} scenarios reported ok:\n{output}"
    );
    Ok(())
}
