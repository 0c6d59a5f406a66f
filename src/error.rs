//! The one error type of the library. Every message says what was wrong and what to do.

use thiserror::Error;

/// Everything a diffwgpu operation can fail with.
#[derive(Debug, Error)]
pub enum Error {
    /// wgpu found no adapter to run on.
    #[error(
        "no GPU adapter found ({0}); install a Vulkan, Metal or DX12 driver \
         (on Debian/Ubuntu `apt-get install mesa-vulkan-drivers libvulkan1` gives the lavapipe \
         software driver), or run on the CPU backend"
    )]
    NoAdapter(String),

    /// The adapter refused to give us a device, or the device was lost.
    #[error("GPU device error: {0}")]
    Device(String),

    /// A tensor's shape does not fit the op.
    #[error("{op}: shape mismatch: expected {expected}, got {got}")]
    Shape {
        op: &'static str,
        expected: String,
        got: String,
    },

    /// An argument other than a shape is out of range (a group count, a step count, ...).
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },

    /// A tensor was handed to a backend other than the one that holds its data.
    #[error(
        "{op}: a tensor on the {found} backend was passed to the {expected} backend; \
         move it first (read it with `to_vec` and `upload` it to the other backend)"
    )]
    WrongBackend {
        op: &'static str,
        expected: &'static str,
        found: &'static str,
    },

    /// A GPU dispatch or pipeline failed, or wgpu reported an error asynchronously (buffers
    /// that cannot be created are [`Error::OutOfMemory`]).
    #[error("GPU error in {op}: {msg}")]
    Gpu { op: &'static str, msg: String },

    /// A GPU buffer of `bytes` could not be created: it exceeds the adapter's `limit` on one
    /// buffer, or (`limit: None`) the device has no memory left for it. The device stays usable;
    /// callers that know what the bytes were for (a batch size, a model) add it to `msg`.
    #[error(
        "{op}: out of GPU memory: {bytes} bytes ({}) requested{}: {msg}; \
         use a smaller batch size (or model or image size)",
        mib(*.bytes),
        .limit.map(|l| format!(", over the limit of {l} bytes ({}) per buffer", mib(l)))
            .unwrap_or_default()
    )]
    OutOfMemory {
        op: &'static str,
        bytes: u64,
        limit: Option<u64>,
        msg: String,
    },

    /// A model configuration that diffwgpu cannot build (bad numbers, or keys it does not
    /// support); the message names the key and what to change.
    #[error("model config: {0}")]
    Config(String),

    /// A checkpoint or pipeline folder that is missing, corrupt or does not fit the model.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },

    /// A dataset that cannot be read or used (missing, empty or unreadable images).
    #[error("dataset {path}: {msg}")]
    Data { path: String, msg: String },

    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A shape error, formatting the expected and received shapes.
    pub fn shape(op: &'static str, expected: impl Into<String>, got: &[usize]) -> Self {
        Error::Shape {
            op,
            expected: expected.into(),
            got: format!("{got:?}"),
        }
    }

    /// An invalid-argument error.
    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Invalid {
            op,
            msg: msg.into(),
        }
    }
}

/// `bytes` in MiB, for messages.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}
