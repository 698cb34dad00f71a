//! What the process's libtorch is and can do.

use std::path::PathBuf;

/// The loaded libtorch and the devices it sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// File the dynamic loader mapped for `libtorch_cpu.so` (Linux only; `None` elsewhere or when linked statically).
    pub libtorch_path: Option<PathBuf>,
    pub cuda_devices: usize,
    pub threads: usize,
}

/// Probes libtorch. Touches a tensor first so the library is certainly loaded and initialised.
pub fn probe() -> RuntimeInfo {
    let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    debug_assert_eq!(t.size(), vec![3]);
    RuntimeInfo {
        libtorch_path: loaded_library("libtorch_cpu.so"),
        cuda_devices: if tch::Cuda::is_available() {
            tch::Cuda::device_count().max(0) as usize
        } else {
            0
        },
        threads: tch::get_num_threads().max(1) as usize,
    }
}

fn loaded_library(name: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.rsplit('/').next().is_some_and(|f| f.starts_with(name)))
        .map(PathBuf::from)
}

/// Memory in use on this process's current GPU and the GPU's total, from the driver (what nvidia-smi shows, so it
/// includes the caching allocator's reserve and other processes). `None` on CPUs or when the driver cannot say.
pub fn device_memory(device: tch::Device) -> Option<(u64, u64)> {
    if !matches!(device, tch::Device::Cuda(_)) {
        return None;
    }
    // cudarc panics rather than erroring when libcuda cannot be loaded; checking opens the library, so once.
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: only checks whether the library can be opened.
    if !*PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() }) {
        return None;
    }
    // libtorch made its primary context current on this (the training) thread.
    let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
    Some((total.saturating_sub(free) as u64, total as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_the_pip_libtorch_not_the_system_one() {
        let info = probe();
        let path = info.libtorch_path.expect("libtorch_cpu.so is mapped");
        let shown = path.display().to_string();
        assert!(shown.contains("site-packages/torch/lib"), "loaded {shown}");
        assert!(
            !shown.starts_with("/usr/lib"),
            "loaded the system libtorch {shown}"
        );
        let x = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let s: f32 = (&x * &x).sum(tch::Kind::Float).double_value(&[]) as f32;
        assert_eq!(s, 14.0);
    }
}
