//! `cargo xtask fuzz TARGET --seconds N`: run a cargo-fuzz target of the protocol crate for a bounded time.

use anyhow::{Context, bail};

use crate::{cargo, project_root, run as run_cmd};

const SECONDS_DEFAULT: u64 = 60;
/// A fuzz run is bounded: a day at most, so a typo cannot run forever.
const SECONDS_MAX: u64 = 24 * 60 * 60;

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut target = None;
    let mut seconds = SECONDS_DEFAULT;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = it.next().context("--seconds needs a value")?;
                seconds = value
                    .parse()
                    .with_context(|| format!("--seconds: `{value}` is not a whole number"))?;
            }
            other if other.starts_with('-') => bail!("unknown fuzz option `{other}`"),
            other if target.is_none() => target = Some(other.to_string()),
            other => bail!("unexpected argument `{other}`"),
        }
    }
    if seconds == 0 || seconds > SECONDS_MAX {
        bail!("--seconds must be between 1 and {SECONDS_MAX}");
    }
    let fuzz_dir = project_root().join("protocol").join("fuzz");
    let targets = list_targets(&fuzz_dir)?;
    let Some(target) = target else {
        bail!("which target? one of: {}", targets.join(", "));
    };
    if target == "list" {
        for t in &targets {
            println!("{t}");
        }
        return Ok(());
    }
    if !targets.contains(&target) {
        bail!(
            "unknown fuzz target `{target}`; targets: {}",
            targets.join(", ")
        );
    }
    ensure_cargo_fuzz()?;
    // cargo-fuzz passes -Z flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
    let mut cmd = cargo();
    cmd.current_dir(project_root().join("protocol"))
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", "run", &target, "--"])
        .arg(format!("-max_total_time={seconds}"))
        .arg("-rss_limit_mb=2048");
    run_cmd(&mut cmd)
}

fn list_targets(fuzz_dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let dir = fuzz_dir.join("fuzz_targets");
    let mut targets = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".rs") {
            targets.push(stem.to_string());
        }
    }
    targets.sort();
    Ok(targets)
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let installed = cargo()
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !installed {
        eprintln!("xtask: installing cargo-fuzz");
        run_cmd(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}
