//! libtorch's allocation failures as errors, wherever they happen. tch's infallible methods (what model code
//! calls, as PyTorch code does) panic with libtorch's message when an allocation fails; a training step, a job's
//! unit or a benchmark runs inside [`guard`], which turns exactly those panics into [`AllocationFailed`] and lets
//! every other panic go on unwinding. [`quiet_panic_hook`] keeps the panic hook from printing them as crashes.
//!
//! ```
//! use radit_engine::out_of_memory::guard;
//! use radit_models::tch::{Kind, Tensor};
//! let failed = guard(|| Tensor::empty([1i64 << 50], (Kind::Float, radit_models::tch::Device::Cpu)));
//! assert!(failed.unwrap_err().message.contains("can't allocate memory"));
//! ```

use std::any::Any;
use std::panic::AssertUnwindSafe;

/// An allocator said no: the CPU's ("can't allocate memory") or CUDA's caching allocator ("out of memory").
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct AllocationFailed {
    /// The allocator's own words (the first line of libtorch's message).
    pub message: String,
}

/// The report every job gives when it runs out of memory: where, on which device, what was running and what to
/// change; the allocator's own words follow as its source (shown once by `{:#}`). A restart would fail the same
/// way, so it is never retryable (exit 2) and a supervisor does not relaunch it.
#[derive(Debug, thiserror::Error)]
#[error(
    "out of memory in {during} on {device}: {setting}. A restart would fail the same way: {advice}"
)]
pub struct OutOfMemory {
    /// `step 7`, `shard 3 of the encode`, `the benchmark's steps`.
    pub during: String,
    pub device: String,
    /// The model, batch and precision, and the device's memory.
    pub setting: String,
    /// What to change.
    pub advice: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl OutOfMemory {
    /// The report for `source` (an allocation failure, or an error whose chain holds one); `setting` gets the
    /// device's memory appended.
    pub fn new(
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
        during: impl Into<String>,
        device: tch::Device,
        setting: impl Into<String>,
        advice: impl Into<String>,
    ) -> Self {
        OutOfMemory {
            during: during.into(),
            device: match device {
                tch::Device::Cuda(i) => format!("cuda:{i}"),
                _ => "cpu".into(),
            },
            setting: format!("{}; {}", setting.into(), memory_line(device)),
            advice: advice.into(),
            source: source.into(),
        }
    }
}

/// `12.0 of 80.0 GiB in use` for a GPU (the driver's view) or the host (`/proc/meminfo`).
pub fn memory_line(device: tch::Device) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let used_total = match device {
        tch::Device::Cuda(_) => crate::runtime::device_memory(device),
        _ => meminfo("MemTotal:")
            .zip(meminfo("MemAvailable:"))
            .map(|(total, available)| (total.saturating_sub(available), total)),
    };
    used_total.map_or_else(
        || "device memory unknown".to_string(),
        |(used, total)| format!("{:.1} of {:.1} GiB in use", gib(used), gib(total)),
    )
}

/// The host's memory a process can still fill before the OOM killer acts (`MemAvailable` plus free swap), where
/// Linux says.
pub fn host_available_bytes() -> Option<u64> {
    Some(meminfo("MemAvailable:")? + meminfo("SwapFree:").unwrap_or(0))
}

fn meminfo(field: &str) -> Option<u64> {
    crate::runtime::proc_kib_field("/proc/meminfo", field)
}

/// Whether libtorch's message is an allocation failure.
pub fn is_allocation_failure(text: &str) -> bool {
    text.contains("out of memory")
        || text.contains("OutOfMemoryError")
        || text.contains("can't allocate memory")
}

/// Whether an error (or any error it wraps) is an allocation failure.
pub fn in_chain(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<AllocationFailed>() || is_allocation_failure(&err.to_string()) {
            return true;
        }
        cur = err.source();
    }
    false
}

fn payload_text(payload: &(dyn Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
}

/// libtorch's first line out of a tch panic (`called Result::unwrap() on an Err value: Torch("...\n...")`).
fn first_line(text: &str) -> String {
    let inner = text.split_once("Torch(\"").map_or(text, |(_, rest)| rest);
    inner
        .split('\n')
        .next()
        .unwrap_or_default()
        .split("\\n")
        .next()
        .unwrap_or_default()
        .trim_end_matches("\")")
        .trim()
        .to_string()
}

/// Runs `f`; an allocation failure inside it (a panic of tch's infallible methods, or a C++ exception turned
/// into one) comes back as `Err`. Any other panic is not this function's business and keeps unwinding.
pub fn guard<T>(f: impl FnOnce() -> T) -> Result<T, AllocationFailed> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => Ok(v),
        Err(payload) => match payload_text(payload.as_ref()) {
            Some(text) if is_allocation_failure(text) => Err(AllocationFailed {
                message: first_line(text),
            }),
            _ => std::panic::resume_unwind(payload),
        },
    }
}

/// Installs (once) a panic hook that stays silent for allocation failures, which [`guard`] reports as errors,
/// and prints every other panic as before.
pub fn quiet_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if payload_text(info.payload()).is_some_and(is_allocation_failure) {
                tracing::debug!(panic = %info, "an allocation failed (reported as an error)");
            } else {
                before(info);
            }
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn a_real_allocation_failure_is_an_error_with_the_allocator_s_words() {
        quiet_panic_hook();
        // 4 PiB: more than any machine has, so the CPU allocator refuses it at once.
        let e = guard(|| Tensor::zeros([1i64 << 50], (Kind::Float, Device::Cpu))).unwrap_err();
        assert!(e.message.contains("can't allocate memory"), "{e}");
        assert!(!e.message.contains("Exception raised"), "one line: {e}");
        assert!(in_chain(&e));
        // Work that fits passes through.
        assert_eq!(guard(|| 2 + 2).unwrap(), 4);
    }

    /// The model's forward pass on a batch no machine holds (2^26 images, as a view of one that costs nothing):
    /// its first activations (64 GiB and more) are what libtorch cannot allocate, inside RadiT's own (infallible)
    /// calls. (The input checks still read every element of the views, so the batch is kept just large enough.)
    #[test]
    fn the_model_s_forward_pass_failing_to_allocate_is_an_error_not_a_panic() {
        quiet_panic_hook();
        let cfg = radit_models::model::RadiTConfig::preset("tiny").unwrap();
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let model = radit_models::model::RadiT::new(&vs.root(), &cfg).unwrap();
        let (n, s) = (1i64 << 26, cfg.input_size);
        let f = tch::kind::FLOAT_CPU;
        let x =
            Tensor::zeros([1, cfg.in_channels, s, s], f).expand([n, cfg.in_channels, s, s], false);
        let t = Tensor::zeros([1], f).expand([n], false);
        let labels = Tensor::zeros([1, cfg.classes.len() as i64], (Kind::Int64, Device::Cpu))
            .expand([n, cfg.classes.len() as i64], false);
        let age = Tensor::zeros([1], f).expand([n], false);
        let failed = match guard(|| model.forward(&x, &t, &labels, &age)) {
            Err(e) => e.to_string(),
            Ok(Err(e)) => {
                assert!(in_chain(&e), "{e}");
                e.to_string()
            }
            Ok(Ok(_)) => panic!("a forward over 2^26 images allocated"),
        };
        assert!(failed.contains("can't allocate memory"), "{failed}");
    }

    #[test]
    fn other_panics_keep_unwinding() {
        let other = std::panic::catch_unwind(|| guard(|| panic!("index out of range")));
        assert!(other.is_err());
    }

    #[test]
    fn the_first_line_is_taken_out_of_tch_s_panic_text() {
        let text = "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to \
                    allocate 2.00 GiB\\nException raised from malloc\")";
        assert_eq!(
            first_line(text),
            "CUDA out of memory. Tried to allocate 2.00 GiB"
        );
    }
}
