//! `connections` scenario (being written).

use crate::cli::Args;

pub fn run(_args: &Args) -> anyhow::Result<i32> {
    anyhow::bail!("the connections scenario is not written yet")
}

pub fn child(_args: &Args) -> anyhow::Result<i32> {
    anyhow::bail!("not written yet")
}
