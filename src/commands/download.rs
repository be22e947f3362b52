//! `mcld download`: fetch, check and place the models the other commands read.

pub use crate::download::DownloadArgs;
use crate::Result;

pub fn run(a: &DownloadArgs) -> Result<()> {
    crate::download::run_cli(a)
}
