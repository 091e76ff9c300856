#pragma once
// Shared by the CUDA benchmarks: CUDA-event timing for Google Benchmark's UseManualTime().
#include <cuda_runtime.h>

#include <longmem/cuda/storage.hpp>

namespace longmem::bench {

/// Two CUDA events around the work of one iteration:
///   timer.start(stream); work(); state.SetIterationTime(timer.seconds(stream));
/// seconds() waits for the stop event. When the GPU is idle at start() (the previous iteration was
/// waited for), the interval also covers the host's time in the work, as wall time would.
class EventTimer {
 public:
  EventTimer() {
    detail::cuda_check(cudaEventCreate(&start_), "cudaEventCreate", 0);
    detail::cuda_check(cudaEventCreate(&stop_), "cudaEventCreate", 0);
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  ~EventTimer() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }
  void start(cudaStream_t stream) { detail::cuda_check(cudaEventRecord(start_, stream), "cudaEventRecord", 0); }
  double seconds(cudaStream_t stream) {
    detail::cuda_check(cudaEventRecord(stop_, stream), "cudaEventRecord", 0);
    detail::cuda_check(cudaEventSynchronize(stop_), "cudaEventSynchronize", 0);
    float ms = 0;
    detail::cuda_check(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime", 0);
    return ms * 1e-3;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

}  // namespace longmem::bench
