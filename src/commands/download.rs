//! `mcld download`: fetch, check and place the models the other commands read.

use std::path::PathBuf;

use clap::Args;

use crate::download::DownloadRequest;
use crate::Result;

#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// Comma-separated groups (inference, train, prepare, evaluate) or source ids from --list;
    /// default: every group (optional sources only when named).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Where the base and preprocessing models go (the other commands' --pretrained_dir).
    #[arg(
        long,
        visible_aliases = ["pretrained_dir", "pretrained-dir"],
        default_value = "./pretrained_weights"
    )]
    pub dir: PathBuf,
    /// Where the MCLD checkpoints go (the other commands' --ckpt_dir).
    #[arg(
        long = "ckpt_dir",
        visible_alias = "ckpt-dir",
        default_value = "./checkpoints"
    )]
    pub ckpt_dir: PathBuf,
    /// Print the table of sources (repo or URL, files, destination, size, check) and exit.
    #[arg(long)]
    pub list: bool,
    /// Fetch every non-Hub https://HOST/PATH from MIRROR/HOST/PATH instead (default: the
    /// MCLD_DOWNLOAD_MIRROR environment variable). The Hub follows HF_ENDPOINT.
    #[arg(long)]
    pub mirror: Option<String>,
}
pub fn run(a: &DownloadArgs) -> Result<()> {
    crate::download::run_request(&DownloadRequest {
        only: a.only.clone(),
        dir: a.dir.clone(),
        ckpt_dir: a.ckpt_dir.clone(),
        list: a.list,
        mirror: a.mirror.clone(),
    })
}
