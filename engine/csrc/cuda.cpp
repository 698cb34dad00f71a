// What libtorch's CUDA side offers and tch does not bind: the caching allocator's own counters (what
// torch.cuda.max_memory_allocated reads), for the engine benchmark's peak memory, and the TF32 switches (what
// torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32 set), so that an fp32 check on a GPU
// compares fp32 with fp32. Exceptions never cross into Rust: every entry point returns 0 on success, 1 on any
// error (no GPU, bad index).
#include <ATen/Context.h>
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

extern "C" int radit_cuda_set_tf32(int allow) {
  try {
    at::globalContext().setAllowTF32CuDNN(allow != 0);
    at::globalContext().setAllowTF32CuBLAS(allow != 0);
    return 0;
  } catch (...) {
    return 1;
  }
}
