//! One error type for the library; the binary converts it with anyhow at the edge.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A config file that is missing, malformed, or has a bad key.
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },

    /// A weight file that cannot be read or does not match what a model asks for.
    #[error("weights {path}: {msg}")]
    Weights { path: PathBuf, msg: String },

    /// A pickle that asks for something the restricted reader refuses to do.
    #[error("refused pickle in {path}: {msg}")]
    UnsafePickle { path: PathBuf, msg: String },

    /// A bad input file (image, IUV, texture, face embedding, ...).
    #[error("input {path}: {msg}")]
    Input { path: PathBuf, msg: String },

    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn input(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Input {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn weights(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Weights {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
