// A CPU stand-in for the parts of the CUDA execution model csrc/cuda's kernels use, so a host
// compiler can run them without a GPU (check_kernels.cpp; tests/test_kernels.py builds it with
// AddressSanitizer and with ThreadSanitizer).
//
// One block runs at a time: each of its threads is an OS thread, __syncthreads() is a
// std::barrier, and __shared__ arrays are function statics (shared by the block's threads).
// Kernels without __syncthreads() run their threads one after another (launch's `syncs`).
// Dynamic shared memory and every buffer the checks allocate start as NaN, so a read of
// anything never written shows up in the results; an out-of-bounds read is AddressSanitizer's.
// Not emulated: warps, the memory model beyond the barrier, grid-wide concurrency.
#pragma once

#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define GRASS_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem
#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct int2 {
  int x, y;
};
inline int2 make_int2(int x, int y) { return {x, y}; }
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

namespace emu {

inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline unsigned char* dynamic_smem = nullptr;

// Run kernel(args...) on a grid of blocks of `threads` threads with `smem` bytes of dynamic
// shared memory (refilled with 0xFF, NaN for float and double, before every block). A kernel
// that calls __syncthreads() (`syncs`) gets one OS thread per block thread, reused from block
// to block; such kernels must not return early (ours do not), as on a GPU.
template <typename Kernel, typename... Args>
void launch(dim3 grid, unsigned threads, size_t smem, bool syncs, Kernel kernel, Args... args) {
  grid_dim = grid;
  block_dim = {threads, 1, 1};
  void* buffer = std::aligned_alloc(16, (smem + 15) / 16 * 16 + 16);
  dynamic_smem = static_cast<unsigned char*>(buffer);
  std::vector<dim3> blocks;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) blocks.push_back({bx, by, bz});
  if (!syncs) {
    for (const dim3& block : blocks) {
      std::memset(dynamic_smem, 0xFF, smem);
      for (unsigned t = 0; t < threads; ++t) {
        thread_idx = {t, 0, 0};
        block_idx = block;
        kernel(args...);
      }
    }
  } else {
    std::barrier<> bar(threads);
    block_barrier = &bar;
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        thread_idx = {t, 0, 0};
        for (const dim3& block : blocks) {
          if (t == 0) std::memset(dynamic_smem, 0xFF, smem);
          bar.arrive_and_wait();  // the block starts when its shared memory is reset
          block_idx = block;
          kernel(args...);
          bar.arrive_and_wait();  // and ends when every thread has finished it
        }
      });
    }
    for (auto& th : pool) th.join();
  }
  std::free(buffer);
}

}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
