//! The one error type of `pio-model`. Every variant that comes from a file names the file.

use std::path::PathBuf;

/// Errors from loading and running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS refused to open, read or map a file. (The I/O error is part of the message, not a
    /// `source`, so an error chain does not print it twice.)
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A file exists but its content is wrong: bad magic, truncated, a tensor missing or of the
    /// wrong shape, malformed JSON.
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    /// A config value the code does not handle, or an inconsistent config.
    #[error("unsupported model config: {0}")]
    Config(String),
    /// Tokenizer construction, encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The model has no usable tokenizer; the message says why (e.g. the missing file).
    #[error("{0}")]
    NoTokenizer(String),
    /// A chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// A forward batch that does not fit the model or the cache.
    #[error("invalid batch: {0}")]
    Batch(String),
    /// An image that cannot be decoded or processed: corrupt, truncated, an unsupported format,
    /// too large.
    #[error("image: {0}")]
    Image(String),
}

impl Error {
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File { path: path.into(), msg: msg.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), err: source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
