//! `kefu`: the gateway binary (`kefu` is `kefu serve`); see `kefu --help`.

use std::process::ExitCode;

use kefu_gateway::config::{self, Command, ConfigError};

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
    match run(&mut config, &flags) {
        Ok(()) => ExitCode::SUCCESS,
        // A config error found on the way (a file the config names): exit 2 like the others.
        Err(e) => match e.chain().find_map(|c| c.downcast_ref::<ConfigError>()) {
            Some(bad) => {
                eprintln!("kefu: bad config: {}", bad.to_string().replace('\n', " "));
                ExitCode::from(2)
            }
            None => {
                eprintln!("kefu: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(config: &mut config::Config, flags: &config::Flags) -> anyhow::Result<()> {
    let key = if flags.data_dir.is_some() {
        "--data-dir"
    } else {
        "server.data_dir"
    };
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        ConfigError::new(
            key,
            format!("cannot create {}: {e}", config.data_dir.display()),
        )
    })?;
    let demo_lines = kefu_gateway::demo::fill_demo_tokens(&config.data_dir, &mut config.tenants)?;
    config::check_files(config)?;
    kefu_gateway::server::run(config.clone(), demo_lines)
}
