//! Embeds the git commit into the binary for `ssehub_build_info{commit}`, and has cargo run this
//! script again only when that commit can have changed.
//!
//! The files to watch are found with `git rev-parse`: in a git worktree `.git` is a file that
//! points elsewhere, and a path that does not exist would make cargo run this script, and
//! rebuild ssehub, on every build. Without git or a repository (a Docker build context) only
//! `SSEHUB_COMMIT` is watched.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=SSEHUB_COMMIT");
    for path in files_naming_the_commit() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    // An explicit SSEHUB_COMMIT (e.g. a Docker build without .git) wins.
    if std::env::var_os("SSEHUB_COMMIT").is_none() {
        let commit = git(&["rev-parse", "--short=12", "HEAD"]);
        println!(
            "cargo:rustc-env=SSEHUB_COMMIT={}",
            commit.as_deref().unwrap_or("unknown")
        );
    }
}

/// The output of a successful `git` command, trimmed; `None` when git is missing, fails (no
/// repository) or prints nothing.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    Some(text.trim().to_string()).filter(|text| !text.is_empty())
}

/// What git writes when HEAD's commit changes, those that exist: the worktree's own `HEAD` (a
/// checkout, a commit on a detached HEAD), the branch's ref (a commit), and `packed-refs`.
fn files_naming_the_commit() -> Vec<PathBuf> {
    // Relative paths from git are relative to the current directory, the package's.
    let Some(git_dir) = git(&["rev-parse", "--git-dir"]).map(PathBuf::from) else {
        return Vec::new();
    };
    // Branch refs live in the repository's common directory, which worktrees share.
    let common_dir =
        git(&["rev-parse", "--git-common-dir"]).map_or_else(|| git_dir.clone(), PathBuf::from);
    let mut files = vec![git_dir.join("HEAD"), common_dir.join("packed-refs")];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        files.extend(loose_ref_or_its_folder(&common_dir, &branch));
    }
    files.retain(|file| file.exists());
    files
}

/// The branch's loose ref file (`refs/heads/<name>`), or, while the branch is only in
/// `packed-refs` or has no commit yet, the nearest folder of it that exists under `refs/`: the
/// next commit creates the file there.
fn loose_ref_or_its_folder(common_dir: &Path, branch: &str) -> Option<PathBuf> {
    let refs = common_dir.join("refs");
    common_dir
        .join(branch)
        .ancestors()
        .take_while(|path| path.starts_with(&refs))
        .find(|path| path.exists())
        .map(Path::to_path_buf)
}
