//! Embeds the git commit into the binary for `ssehub_build_info{commit}`.

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    // An explicit SSEHUB_COMMIT (e.g. a Docker build without .git) wins.
    println!("cargo:rerun-if-env-changed=SSEHUB_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    if std::env::var_os("SSEHUB_COMMIT").is_none() {
        println!(
            "cargo:rustc-env=SSEHUB_COMMIT={}",
            commit.as_deref().unwrap_or("unknown")
        );
    }
}
