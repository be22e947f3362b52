use clap::Parser;
use mcld::cli::{self, Cli, CliError};

fn main() {
    mcld::device::retain_freed_memory();
    let args = Cli::parse();
    match cli::run(args) {
        Ok(()) => {}
        Err(CliError::Failed(e)) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
