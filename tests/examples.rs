//! The publishing examples of README.md ("Running several instances") run as written against a
//! real gateway with the history in Redis: each one's event reaches a subscriber, and the id it
//! prints is the one the subscriber sees. An example whose language is not installed here is
//! skipped with a message (Go is documented but not run when `go` is absent).

mod support;

use std::process::Stdio;
use std::time::Duration;

use ssehub::config::HistoryBackend;
use ssehub::Settings;
use support::*;
use tokio::process::Command;

const SECRET: &str = "examples-secret-with-enough-entropy-0123456789";
/// The README section the examples are taken from.
const SECTION: &str = "## Running several instances";

/// The fenced code blocks tagged `language` in the README section.
fn readme_examples(language: &str) -> TestResult<Vec<String>> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))?;
    let start = readme.find(SECTION).ok_or("README has no fleet section")?;
    let section = &readme[start + SECTION.len()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let fence = format!("```{language}\n");
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some(open) = rest.find(&fence) {
        let body = &rest[open + fence.len()..];
        let close = body.find("\n```").ok_or("unclosed code block")?;
        blocks.push(body[..close + 1].to_string());
        rest = &body[close..];
    }
    Ok(blocks)
}

/// Whether `program --version` runs here.
async fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|status| status.success())
}

fn fleet_settings(redis: &TestRedis) -> Settings {
    let mut settings = redis_backend_settings(redis);
    settings.history.backend = HistoryBackend::Redis;
    settings.auth.jwt_secret = serde_json::from_value(serde_json::json!(SECRET)).ok();
    settings
}

/// Runs one README example with `program args...` (the code on stdin), against `gateway`, and
/// checks its event reaches a subscriber of `orders` with the id it printed.
async fn run_example(
    gateway: &TestGateway,
    program: &str,
    args: &[&str],
    code: &str,
) -> TestResult {
    let reader_token = ssehub::auth::mint_token(
        SECRET,
        &["orders".to_string()],
        &[],
        None,
        Duration::from_secs(600),
    )?;
    let publisher_token = ssehub::auth::mint_token(
        SECRET,
        &[],
        &["orders".to_string()],
        None,
        Duration::from_secs(600),
    )?;
    let bearer = format!("Bearer {reader_token}");
    let mut client = gateway
        .subscribe_with("channel=orders", &[("Authorization", bearer.as_str())])
        .await?;
    client.next_block().await?;

    let mut child = Command::new(program)
        .args(args)
        .env("SSEHUB_URL", format!("http://{}", gateway.addr))
        .env("SSEHUB_TOKEN", publisher_token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        tokio::io::AsyncWriteExt::write_all(&mut stdin, code.as_bytes()).await?;
    }
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{program} example failed: {}{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed_id = stdout.trim();
    let event = client.next_event().await?;
    assert!(event.data().contains("OrderPlaced"), "{}", event.data());
    assert_eq!(client.last_event_id.as_deref(), Some(printed_id));
    Ok(())
}

#[tokio::test]
async fn the_readme_publishing_examples_run_and_their_events_arrive() -> TestResult {
    let python = readme_examples("python")?;
    let node = readme_examples("js")?;
    assert_eq!(
        (python.len(), node.len()),
        (1, 1),
        "one example per language"
    );
    assert_eq!(readme_examples("go")?.len(), 1);

    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(fleet_settings(&redis)).await?;
    let mut ran = 0;
    if installed("python3").await {
        run_example(&gateway, "python3", &["-"], &python[0]).await?;
        ran += 1;
    } else {
        println!("python3 is not installed: the Python example was not run");
    }
    if installed("node").await {
        run_example(&gateway, "node", &["--input-type=module", "-"], &node[0]).await?;
        ran += 1;
    } else {
        println!("node is not installed: the Node example was not run");
    }
    println!("{ran} README example(s) run");
    gateway.stop().await
}
