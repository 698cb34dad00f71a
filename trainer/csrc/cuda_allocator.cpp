// The CUDA caching allocator's own counters (what torch.cuda.max_memory_allocated reads), for the engine
// benchmark's peak memory: libtorch has no C API for them and tch does not bind them. Exceptions never cross
// into Rust: every entry point returns 0 on success, 1 on any error (no GPU, bad index).
#include <c10/cuda/CUDACachingAllocator.h>

#include <cstdint>

extern "C" int radit_cuda_allocator_stats(int device, int64_t* out) {
  try {
    const auto stats =
        c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = stats.allocated_bytes[all].current;
    out[1] = stats.allocated_bytes[all].peak;
    out[2] = stats.reserved_bytes[all].current;
    out[3] = stats.reserved_bytes[all].peak;
    return 0;
  } catch (...) {
    return 1;
  }
}

extern "C" int radit_cuda_allocator_reset_peak(int device) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return 1;
  }
}
