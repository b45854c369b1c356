//! Start-up errors say where the bad value came from and what is wrong with it, once.

mod support;

use std::process::Output;

/// Runs started so far, naming each run's directory.
static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Runs the binary with an empty configuration file, `args` and `env` only. Each run has a
/// directory of its own: the tests of this file run in parallel.
fn run(args: &[&str], env: &[(&str, &str)]) -> support::TestResult<Output> {
    let scratch = support::ScratchDir::create(&format!(
        "ssehub-startup-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ))?;
    let config = scratch.0.join("config.toml");
    std::fs::write(&config, "")?;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ssehub"));
    command.arg("--config").arg(&config).args(args).env_clear();
    for (key, value) in env {
        command.env(key, value);
    }
    Ok(command.output()?)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn errors_name_the_variable_the_value_and_the_problem() -> support::TestResult {
    let cases: [(&str, &str, &[&str]); 4] = [
        (
            "SSEHUB__SERVER__LISEN",
            "1",
            &["SSEHUB__SERVER__LISEN", "lisen"],
        ),
        (
            "SSEHUB__SERVER__LISTEN",
            "nowhere",
            &["SSEHUB__SERVER__LISTEN", "`nowhere`"],
        ),
        (
            "SSEHUB__REDIS__URL",
            "ftp://x",
            &["redis.url", "scheme `ftp://`"],
        ),
        (
            "SSEHUB__REDIS__URL",
            "redis://:hunter2@h:port",
            &["redis.url", "port `port`"],
        ),
    ];
    for (variable, value, expected) in cases {
        let output = run(&[], &[(variable, value)])?;
        assert_eq!(output.status.code(), Some(2), "{variable}={value}");
        let stderr = stderr(&output);
        for words in expected {
            assert!(stderr.contains(words), "{variable}={value}: {stderr}");
        }
        assert!(!stderr.contains("InvalidClientConfig"), "{stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
    Ok(())
}

/// Runs the binary with its public port already taken, so start-up ends right after the
/// configuration was checked and logged; returns the exit code, the address and everything
/// it printed.
fn run_on_a_taken_port(env: &[(&str, &str)]) -> support::TestResult<(Option<i32>, String, String)> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let mut full_env = vec![
        ("SSEHUB__SERVER__LISTEN", addr.as_str()),
        ("SSEHUB__ADMIN__LISTEN", "127.0.0.1:0"),
    ];
    full_env.extend_from_slice(env);
    let output = run(&[], &full_env)?;
    let everything = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        stderr(&output)
    );
    Ok((output.status.code(), addr, everything))
}

#[test]
fn a_port_in_use_is_reported_once() -> support::TestResult {
    let (code, addr, everything) = run_on_a_taken_port(&[])?;
    assert_eq!(code, Some(1));
    assert_eq!(
        everything.matches("Address already in use").count(),
        1,
        "{everything}"
    );
    assert!(everything.contains(&addr) && everything.contains("server.listen"));
    Ok(())
}

#[test]
fn the_token_command_says_how_to_set_a_secret() -> support::TestResult {
    let output = run(&["token", "--channel", "a"], &[])?;
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("SSEHUB__AUTH__JWT_SECRET"),
        "{}",
        stderr(&output)
    );
    Ok(())
}

#[test]
fn cors_origins_a_browser_never_sends_stop_start_up_naming_the_key() -> support::TestResult {
    for origin in [
        "https://app.example.com/",
        "https://app.example.com/app",
        "https://App.Example.com",
    ] {
        let output = run(&[], &[("SSEHUB__SERVER__CORS_ORIGINS", origin)])?;
        assert_eq!(output.status.code(), Some(2), "{origin}");
        let stderr = stderr(&output);
        assert!(stderr.contains("server.cors_origins"), "{origin}: {stderr}");
        assert!(
            stderr.contains(&format!("`{origin}`")),
            "{origin}: {stderr}"
        );
    }
    Ok(())
}

#[test]
fn risky_settings_are_warned_about_once() -> support::TestResult {
    let (_, _, everything) = run_on_a_taken_port(&[
        ("SSEHUB__AUTH__JWT_SECRET", "short-secret"),
        ("SSEHUB__CHANNELS__PUBLIC", "*"),
    ])?;
    for warning in [
        "auth.jwt_secret: the HS256 secret is 12 bytes",
        "channels.public contains \"*\"",
    ] {
        assert_eq!(
            everything.matches(warning).count(),
            1,
            "{warning}: {everything}"
        );
    }
    assert!(!everything.contains("admin.listen:"), "{everything}");
    Ok(())
}
