//! The Docker image is closed by default: the configuration it bakes in, `deploy/config.toml`,
//! parses, makes no channel public and serves no demo page, also with the environment the
//! Dockerfile sets; and the Dockerfile copies that file (not the quick-start `config.toml`) to
//! the path its entrypoint reads.
//!
//! Whether the Dockerfile builds at all is checked by `scripts/check-docker-context` (CI).

use std::net::SocketAddr;
use std::path::Path;

use ssehub::Settings;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const DEPLOY_CONFIG: &str = "deploy/config.toml";
/// Where the image keeps its configuration (ENTRYPOINT `--config`).
const IMAGE_CONFIG_PATH: &str = "/etc/ssehub/config.toml";

fn dockerfile() -> Result<String, std::io::Error> {
    std::fs::read_to_string(Path::new(REPO).join("Dockerfile"))
}

/// The words of every `COPY` instruction, flags included (one line each in our Dockerfile).
fn copy_instructions(dockerfile: &str) -> Vec<Vec<&str>> {
    dockerfile
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("COPY "))
        .map(|line| line.split_whitespace().skip(1).collect())
        .collect()
}

/// The `KEY=VALUE` pairs of the Dockerfile's `ENV SSEHUB__...` instructions.
fn image_environment(dockerfile: &str) -> Vec<(String, String)> {
    dockerfile
        .lines()
        .filter_map(|line| line.trim().strip_prefix("ENV "))
        .flat_map(str::split_whitespace)
        .filter_map(|pair| pair.split_once('='))
        .filter(|(key, _)| key.starts_with("SSEHUB__"))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

#[test]
fn deploy_config_has_no_public_channel_and_no_demo_page() -> TestResult {
    let settings = Settings::load(&Path::new(REPO).join(DEPLOY_CONFIG), true)?;
    assert!(
        settings.channels.public.is_empty(),
        "{DEPLOY_CONFIG} must not make channels public, found {:?}",
        settings.channels.public
    );
    assert!(
        !settings.server.demo_page,
        "{DEPLOY_CONFIG} must not serve the demo page"
    );
    Ok(())
}

#[test]
fn image_environment_keeps_it_closed_with_admin_reachable() -> TestResult {
    let env = image_environment(&dockerfile()?);
    let settings = Settings::load_with_env(&Path::new(REPO).join(DEPLOY_CONFIG), true, env)?;
    assert!(settings.channels.public.is_empty());
    assert!(!settings.server.demo_page);
    let reachable: SocketAddr = "0.0.0.0:9090".parse()?;
    assert_eq!(settings.admin.listen, reachable);
    Ok(())
}

#[test]
fn dockerfile_bakes_in_the_deploy_config() -> TestResult {
    let dockerfile = dockerfile()?;
    let copies = copy_instructions(&dockerfile);
    assert!(
        copies.contains(&vec![DEPLOY_CONFIG, IMAGE_CONFIG_PATH]),
        "the Dockerfile must COPY {DEPLOY_CONFIG} {IMAGE_CONFIG_PATH}; its COPYs: {copies:?}"
    );
    assert!(
        !copies.iter().any(|words| words.contains(&"config.toml")),
        "the quick-start config.toml (every channel public) must not be in the image: {copies:?}"
    );
    assert!(
        dockerfile
            .lines()
            .any(|line| line.starts_with("ENTRYPOINT") && line.contains(IMAGE_CONFIG_PATH)),
        "the ENTRYPOINT must read {IMAGE_CONFIG_PATH}"
    );
    Ok(())
}
