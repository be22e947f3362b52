//! One module per subcommand of `mcld`: its clap arguments and its `run`, which turns them into
//! the plain request types of the library modules below (pipeline, train, prepare, evaluate,
//! edit, ...). Flags keep the reference's spellings (`--save_path`, `--ckpt_dir`, ...) so its
//! README carries over; each also has a kebab-case alias. `args` holds the flag groups several
//! commands share.

pub mod args;
pub mod bench;
pub mod demo;
pub mod download;
pub mod edit;
pub mod evaluate;
pub mod infer;
pub mod prepare;
pub mod serve;
pub mod test;
pub mod train;
