//! What the process's libtorch is and can do: which libtorch file is loaded, its version and whether it is a CUDA
//! build, the GPUs the driver shows, and the NCCL that collectives would use.

use std::path::{Path, PathBuf};

/// One GPU as the CUDA driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    pub memory_bytes: u64,
}

/// The loaded libtorch and the devices it sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// File the dynamic loader mapped for `libtorch_cpu.so` (Linux only; `None` elsewhere or when linked statically).
    pub libtorch_path: Option<PathBuf>,
    /// `torch.__version__` of the wheel the library came from (its `version.py`), e.g. `2.13.0+cu130`.
    pub torch_version: Option<String>,
    /// The CUDA version the libtorch was built for (`None`: a CPU-only build, or unknown).
    pub torch_cuda: Option<String>,
    /// `libtorch_cuda.so` is loaded: without it libtorch reports no GPU even on a GPU machine.
    pub libtorch_cuda_loaded: bool,
    pub cuda_devices: usize,
    /// The driver's view of the GPUs (empty without libcuda).
    pub gpus: Vec<Gpu>,
    /// The NCCL collectives would use, or why there is none.
    pub nccl: Result<String, String>,
    pub threads: usize,
}

/// `radit info`'s report.
impl std::fmt::Display for RuntimeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "libtorch: {} (torch {})",
            self.libtorch_path.as_ref().map_or_else(
                || "statically linked or unknown".into(),
                |p| p.display().to_string()
            ),
            self.torch_version.as_deref().unwrap_or("version unknown")
        )?;
        writeln!(
            f,
            "build: {}",
            match (&self.torch_cuda, self.libtorch_cuda_loaded) {
                (None, _) => "CPU only".to_string(),
                (Some(v), true) => format!("CUDA {v} (libtorch_cuda.so loaded)"),
                (Some(v), false) =>
                    format!("CUDA {v}, but libtorch_cuda.so is NOT loaded: GPUs will not be used"),
            }
        )?;
        writeln!(f, "CUDA devices (libtorch): {}", self.cuda_devices)?;
        for g in &self.gpus {
            writeln!(
                f,
                "  GPU {}: {} ({:.1} GiB)",
                g.ordinal,
                g.name,
                g.memory_bytes as f64 / (1u64 << 30) as f64
            )?;
        }
        match &self.nccl {
            Ok(n) => writeln!(f, "NCCL: {n}")?,
            Err(e) => writeln!(f, "NCCL: none ({e})")?,
        }
        write!(f, "CPU threads: {}", self.threads)
    }
}

/// Probes libtorch. Touches a tensor first so the library is certainly loaded and initialised.
pub fn probe() -> RuntimeInfo {
    let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    debug_assert_eq!(t.size(), vec![3]);
    let libtorch_path = crate::libraries::loaded_library("libtorch_cpu.so");
    let version = libtorch_path.as_deref().and_then(wheel_version);
    RuntimeInfo {
        torch_version: version.as_ref().map(|v| v.0.clone()),
        torch_cuda: version.and_then(|v| v.1),
        libtorch_path,
        libtorch_cuda_loaded: crate::libraries::loaded_library("libtorch_cuda.so").is_some(),
        cuda_devices: if tch::Cuda::is_available() {
            tch::Cuda::device_count().max(0) as usize
        } else {
            0
        },
        gpus: driver_gpus(),
        nccl: crate::collective::nccl_lib::nccl()
            .map(|l| format!("{l:?}"))
            .map_err(|e| e.to_string()),
        threads: tch::get_num_threads().max(1) as usize,
    }
}

impl RuntimeInfo {
    /// One line on why CUDA is or is not usable, for error messages.
    pub fn describe_cuda(&self) -> String {
        let build = match (&self.torch_cuda, self.libtorch_cuda_loaded) {
            (None, _) => "a CPU-only libtorch".to_string(),
            (Some(v), false) => format!("a CUDA {v} libtorch whose libtorch_cuda.so is not loaded"),
            (Some(v), true) => format!("a CUDA {v} libtorch"),
        };
        format!(
            "{build}; {} GPU(s) visible to libtorch, {} to the driver",
            self.cuda_devices,
            self.gpus.len()
        )
    }
}

/// `(version, cuda)` from the `version.py` of the torch wheel a libtorch file belongs to (`torch/lib/..`).
fn wheel_version(lib: &Path) -> Option<(String, Option<String>)> {
    let text = std::fs::read_to_string(lib.parent()?.parent()?.join("version.py")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                let k = k.split(':').next()?.trim();
                (k == name).then(|| v.trim().trim_matches(['\'', '"']).to_string())
            })
            .filter(|v| v != "None")
    };
    Some((field("__version__")?, field("cuda")))
}

/// The GPUs the CUDA driver shows (what `CUDA_VISIBLE_DEVICES` leaves), with names and memory.
fn driver_gpus() -> Vec<Gpu> {
    use cudarc::driver::result::device;
    if !crate::libraries::cuda_driver_present() || cudarc::driver::result::init().is_err() {
        return Vec::new();
    }
    let count = device::get_count().unwrap_or(0).max(0);
    (0..count)
        .filter_map(|i| {
            let dev = device::get(i).ok()?;
            Some(Gpu {
                ordinal: i as usize,
                name: device::get_name(dev).unwrap_or_else(|_| "unknown".into()),
                // SAFETY: `dev` is a valid device handle from cuDeviceGet.
                memory_bytes: unsafe { device::total_mem(dev) }.unwrap_or(0) as u64,
            })
        })
        .collect()
}

/// A `kB` field of a `/proc` file (`/proc/meminfo`'s `MemAvailable:`, `/proc/self/status`'s `VmHWM:`) in bytes.
pub fn proc_kib_field(file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

/// The CUDA caching allocator's counters for one GPU (what `torch.cuda.memory_stats` reports), in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AllocatorStats {
    pub allocated: u64,
    pub allocated_peak: u64,
    pub reserved: u64,
    pub reserved_peak: u64,
}

#[cfg(radit_cuda)]
unsafe extern "C" {
    fn radit_cuda_allocator_stats(device: std::ffi::c_int, out: *mut i64) -> std::ffi::c_int;
    fn radit_cuda_allocator_reset_peak(device: std::ffi::c_int) -> std::ffi::c_int;
    fn radit_cuda_set_tf32(allow: std::ffi::c_int) -> std::ffi::c_int;
}

/// Allows or forbids TF32 in cuDNN convolutions and cuBLAS matmuls on GPUs (libtorch allows it in convolutions by
/// default); `false` where this build cannot set it.
pub fn set_tf32(allow: bool) -> bool {
    #[cfg(radit_cuda)]
    {
        // SAFETY: it catches every C++ exception.
        unsafe { radit_cuda_set_tf32(std::ffi::c_int::from(allow)) == 0 }
    }
    #[cfg(not(radit_cuda))]
    {
        let _ = allow;
        false
    }
}

/// Whether this build can read the caching allocator's counters (a CUDA libtorch and CUDA's headers at build
/// time); without them [`allocator_stats`] is always `None`.
pub fn allocator_stats_built() -> bool {
    cfg!(radit_cuda)
}

/// The caching allocator's counters for `device` (`None` on CPUs, without a GPU, or in a build without them).
pub fn allocator_stats(device: tch::Device) -> Option<AllocatorStats> {
    let tch::Device::Cuda(_i) = device else {
        return None;
    };
    #[cfg(radit_cuda)]
    {
        let mut out = [0i64; 4];
        // SAFETY: `out` has room for the four counters the function writes; it catches every C++ exception.
        let code = unsafe { radit_cuda_allocator_stats(_i as std::ffi::c_int, out.as_mut_ptr()) };
        let b = |v: i64| v.max(0) as u64;
        (code == 0).then(|| AllocatorStats {
            allocated: b(out[0]),
            allocated_peak: b(out[1]),
            reserved: b(out[2]),
            reserved_peak: b(out[3]),
        })
    }
    #[cfg(not(radit_cuda))]
    None
}

/// Starts the allocator's peaks afresh from what is allocated now; `false` where there are none to reset.
pub fn reset_allocator_peak(device: tch::Device) -> bool {
    let tch::Device::Cuda(_i) = device else {
        return false;
    };
    #[cfg(radit_cuda)]
    {
        // SAFETY: it catches every C++ exception.
        unsafe { radit_cuda_allocator_reset_peak(_i as std::ffi::c_int) == 0 }
    }
    #[cfg(not(radit_cuda))]
    false
}

/// Memory in use on this process's current GPU and the GPU's total, from the driver (what nvidia-smi shows, so it
/// includes the caching allocator's reserve and other processes). `None` on CPUs or when the driver cannot say.
pub fn device_memory(device: tch::Device) -> Option<(u64, u64)> {
    if !matches!(device, tch::Device::Cuda(_)) {
        return None;
    }
    if !crate::libraries::cuda_driver_present() {
        return None;
    }
    // libtorch made its primary context current on this (the training) thread.
    let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
    Some((total.saturating_sub(free) as u64, total as u64))
}

/// Keeps freed CPU buffers of up to 1 GiB in the process heap for the next allocation of that size, instead of
/// unmapping them: the engine allocates each block's gathered weights and flat gradients afresh, and glibc maps
/// every buffer over 32 MiB anew, so each one paid page faults and zeroing (about 2 s of a b-latent step at world 2).
/// Process-wide; the CPU engine and the plain model benchmark both call it, so they are compared alike. Returns
/// whether glibc took the setting (elsewhere it does nothing).
pub fn retain_large_cpu_buffers() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const LIMIT: libc::c_int = 1 << 30;
        // SAFETY: mallopt only sets allocator parameters; any thread may call it at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, LIMIT) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, LIMIT) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// glibc takes the 1 GiB thresholds, so freed buffers of a block's size are reused.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_keeps_large_freed_buffers() {
        assert!(retain_large_cpu_buffers());
    }

    #[test]
    fn loads_the_pip_libtorch_not_the_system_one() {
        let info = probe();
        let path = info
            .libtorch_path
            .clone()
            .expect("libtorch_cpu.so is mapped");
        let shown = path.display().to_string();
        assert!(shown.contains("site-packages/torch/lib"), "loaded {shown}");
        assert!(
            !shown.starts_with("/usr/lib"),
            "loaded the system libtorch {shown}"
        );
        // The wheel's version file is found beside it, and says what the build is.
        assert_eq!(
            info.torch_version.as_deref().map(|v| &v[..6]),
            Some("2.13.0")
        );
        if info.torch_cuda.is_some() {
            assert!(
                info.libtorch_cuda_loaded,
                "a CUDA libtorch must have libtorch_cuda.so loaded: {}",
                info.describe_cuda()
            );
        }
        // The CUDA wheel and its headers are installed by setup.sh, so the allocator shim is built here; with no
        // GPU it answers None instead of failing.
        if info.torch_cuda.is_some() {
            assert!(
                allocator_stats_built(),
                "the caching-allocator shim was not compiled"
            );
            // libtorch's global switches, set without a GPU too.
            assert!(set_tf32(false) && set_tf32(true));
        }
        if !tch::Cuda::is_available() {
            assert_eq!(allocator_stats(tch::Device::Cuda(0)), None);
            assert!(!reset_allocator_peak(tch::Device::Cuda(0)));
        }
        assert_eq!(allocator_stats(tch::Device::Cpu), None);
        let x = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let s: f32 = (&x * &x).sum(tch::Kind::Float).double_value(&[]) as f32;
        assert_eq!(s, 14.0);
    }
}
