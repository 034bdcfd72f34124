//! `kefu`: the gateway binary (`kefu` is `kefu serve`); see `kefu --help`.

use std::process::ExitCode;

use kefu_gateway::config::{self, Command};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let command = match config::parse_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kefu: {e}");
            return ExitCode::from(2);
        }
    };
    let flags = match command {
        Command::Help => {
            println!("{}", config::USAGE);
            println!("With no --config, kefu runs on its embedded default config (a demo tenant).");
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("kefu {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::PrintDefaultConfig => {
            print!("{}", config::default_config_text());
            return ExitCode::SUCCESS;
        }
        Command::Serve(flags) => flags,
    };
    let mut config = match config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kefu: bad config: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&mut config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kefu: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: &mut config::Config) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let demo_lines = kefu_gateway::demo::fill_demo_tokens(&config.data_dir, &mut config.tenants)?;
    kefu_gateway::server::run(config.clone(), demo_lines)
}
