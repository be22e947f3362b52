use clap::Parser;
use mcld::cli::{self, Cli, CliError};

fn main() {
    mcld::device::retain_freed_memory();
    let args = Cli::parse();
    match cli::run(args) {
        Ok(()) => {}
        Err(CliError::NotBuilt(what)) => {
            eprintln!(
                "mcld {what}: not built yet in this version; see README.md for what works today"
            );
            std::process::exit(cli::EXIT_NOT_BUILT);
        }
        Err(CliError::Failed(e)) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
