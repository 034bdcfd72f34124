//! `reconnect` scenario (being written).

use crate::cli::Args;

pub fn run(_args: &Args) -> anyhow::Result<i32> {
    anyhow::bail!("the reconnect scenario is not written yet")
}
