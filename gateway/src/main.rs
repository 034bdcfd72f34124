//! `kefu`: the gateway binary.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    anyhow::bail!("the kefu gateway has not landed yet (see the gateway-core issue)")
}
