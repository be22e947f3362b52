use clap::Parser;
use mcld::cli::{self, Cli, CliError};

fn main() {
    mcld::device::retain_freed_memory();
    let args = Cli::parse();
    if args.trains() {
        mcld::device::park_idle_workers();
    }
    match cli::run(args) {
        Ok(()) => {}
        Err(e @ CliError::Failed(_)) => {
            eprintln!("{}", e.report());
            std::process::exit(1);
        }
    }
}
