//! Binaries a benchmark runs beside its sides, built with cargo on demand:
//! the `orders` service and the peers under `peers/` (crates outside the
//! workspace, so that the workspace's build and CI do not pay for them).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{ensure, Context};
use tokio::process::Command;

use super::progress;

/// The repository's root (this crate is `crates/herald-bench`).
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the workspace package `package` into this binary's target
/// directory and profile; returns its binary's path.
pub async fn workspace_binary(package: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the herald-bench binary")?;
    let profile_dir = exe.parent().context("the binary has no directory")?;
    let target_dir = profile_dir
        .parent()
        .context("the binary's directory has no parent")?;
    let release = profile_dir.file_name().is_some_and(|n| n != "debug");
    let mut args = vec!["build", "-p", package];
    if release {
        args.push("--release");
    }
    cargo(&args, Some(target_dir)).await?;
    Ok(profile_dir.join(package))
}

/// Builds the peer crate `peers/<name>` (release, its own lock file and
/// target directory); returns its binary's path.
pub async fn peer_binary(name: &str) -> anyhow::Result<PathBuf> {
    let crate_dir = repository().join("peers").join(name);
    let manifest = crate_dir.join("Cargo.toml");
    ensure!(
        manifest.is_file(),
        "no peer crate at {}",
        crate_dir.display()
    );
    let manifest = manifest.display().to_string();
    cargo(
        &[
            "build",
            "--release",
            "--locked",
            "--manifest-path",
            &manifest,
        ],
        None,
    )
    .await?;
    Ok(crate_dir.join("target/release").join(name))
}

/// Runs `cargo <args>` from the repository's root, its output on our stderr.
async fn cargo(args: &[&str], target_dir: Option<&Path>) -> anyhow::Result<()> {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(repository()).args(args);
    if let Some(dir) = target_dir {
        command.env("CARGO_TARGET_DIR", dir);
    }
    progress(format!("building: cargo {}", args.join(" ")));
    let status = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .await
        .context("running cargo")?;
    ensure!(
        status.success(),
        "cargo {} failed ({status})",
        args.join(" ")
    );
    Ok(())
}
