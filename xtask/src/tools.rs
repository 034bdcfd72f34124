//! Tools the test suite needs beyond cargo itself, installed on first use.

use std::process::Command;

/// Install whatever `cargo test --workspace` needs that a fresh machine lacks.
pub fn ensure_test_tools() -> anyhow::Result<()> {
    Ok(())
}

/// Environment the test run needs (e.g. tool paths).
pub fn apply_test_env(_cmd: &mut Command) -> anyhow::Result<()> {
    Ok(())
}
