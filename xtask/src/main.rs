//! `cargo xtask`: project automation as a plain binary (matklad's cargo-xtask pattern).
//!
//! - `cargo xtask test`: make sure the tools the tests need are present, then run every test.
//! - `cargo xtask setup`: only install those tools (CI runs it before clippy).
//! - `cargo xtask fuzz TARGET --seconds N`: run one cargo-fuzz target for a bounded time.
//! - `cargo xtask loadtest ...`: build release, start kefu, run a load scenario, check targets.

mod fuzz;
mod loadtest;
mod tools;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(task) = args.next() else {
        print_usage();
        bail!("no task given");
    };
    let rest: Vec<String> = args.collect();
    match task.as_str() {
        "test" => test(&rest),
        "setup" => tools::ensure_test_tools(),
        "fuzz" => fuzz::run(&rest),
        "loadtest" => loadtest::run(&rest),
        "help" | "--help" | "-h" => {
            print_usage();
            Ok(())
        }
        other => {
            print_usage();
            bail!("unknown task `{other}`")
        }
    }
}

fn print_usage() {
    eprintln!(
        "usage: cargo xtask <task>\n\
         \n\
         tasks:\n\
         \x20 test [ARGS]                   install missing test tools, then `cargo test --workspace [ARGS]`\n\
         \x20 setup                         only install the tools the build and tests need (CI runs it first)\n\
         \x20 fuzz TARGET [--seconds N]     run a cargo-fuzz target for N seconds (default 60)\n\
         \x20 fuzz list                     list the fuzz targets\n\
         \x20 loadtest [OPTIONS]            run a load scenario against a fresh release kefu (see --help)"
    );
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    tools::ensure_test_tools()?;
    let mut cmd = cargo();
    cmd.current_dir(project_root())
        .args(["test", "--workspace"])
        .args(extra);
    tools::apply_test_env(&mut cmd)?;
    run(&mut cmd)
}

/// The workspace root: xtask lives one level below it.
pub fn project_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// The cargo that runs us, so `cargo +toolchain xtask` stays on that toolchain.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Run a command to completion; a non-zero exit is an error naming the command.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
