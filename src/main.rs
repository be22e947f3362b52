use clap::Parser;
use mcld::cli::{self, Cli, CliError};

fn main() {
    mcld::device::retain_freed_memory();
    mcld::device::park_idle_workers();
    let args = Cli::parse();
    match cli::run(args) {
        Ok(()) => {}
        Err(e @ CliError::Failed(_)) => {
            eprintln!("{}", e.report());
            std::process::exit(1);
        }
    }
}
