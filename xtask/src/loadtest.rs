//! `cargo xtask loadtest`: build release, start kefu, run a scenario, check targets.

pub fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("the load tester has not landed yet (see the load-tester issue)")
}
