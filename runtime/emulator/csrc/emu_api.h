// The C interface between the emulator runtime (emu_runtime.cpp, one shared
// library per build of the runtime) and the kernel modules (one shared library
// per program: the kernel sources compiled for the host with emu_shim.h).
//
// Kernel code never calls these directly: emu_shim.h wraps them as the CUDA
// built-ins (__syncthreads, threadIdx, atomicAdd, __shfl_sync, ...) and as the
// host versions of PTX instructions (sparsify_emu::ldmatrix, mma, cp_async).
// Every hook that can fail takes the caller's file and line, so an error names
// the source line as well as the kernel, block and thread.
#pragma once

#include <stddef.h>
#include <stdint.h>

#define SPARSIFY_EMU_ABI 1

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sparsify_emu_dim3 {
  unsigned x, y, z;
} sparsify_emu_dim3;

// What a thread sees of itself; constant for the lifetime of the thread.
typedef struct sparsify_emu_thread_info {
  sparsify_emu_dim3 thread_idx, block_idx, block_dim, grid_dim;
} sparsify_emu_thread_info;

// Kernel parameter kinds (the launch ABI check in Python reads them).
enum {
  SPARSIFY_EMU_PARAM_PTR = 0,
  SPARSIFY_EMU_PARAM_INT = 1,
  SPARSIFY_EMU_PARAM_UINT = 2,
  SPARSIFY_EMU_PARAM_FLOAT = 3,
  SPARSIFY_EMU_PARAM_BYTES = 4
};

typedef struct sparsify_emu_param {
  int kind;
  int size;
  int const_pointee;  // pointer to const (an input), for documentation only
} sparsify_emu_param;

typedef void (*sparsify_emu_invoke_fn)(void* const* argv);

typedef struct sparsify_emu_kernel {
  const char* name;
  sparsify_emu_invoke_fn invoke;
  int nparams;
  const sparsify_emu_param* params;
  int max_threads;  // __launch_bounds__ maxThreadsPerBlock, 0 when the kernel has none
} sparsify_emu_kernel;

typedef struct sparsify_emu_module {
  int abi;
  int nkernels;
  const sparsify_emu_kernel* kernels;
  void* (*tls_probe)(void);  // an address inside the module's TLS block (its shared memory)
  size_t dyn_smem_capacity;  // bytes of dynamic (extern __shared__) shared memory
} sparsify_emu_module;

// Launch statistics, filled by sparsify_emu_launch.
typedef struct sparsify_emu_stats {
  uint64_t blocks, threads, switches, barriers, warp_collectives, cp_async_copies, float_atomics;
  uint64_t max_stack_bytes, smem_window_bytes;
} sparsify_emu_stats;

// Schedules: the order in which runnable threads (and blocks) are resumed.
enum {
  SPARSIFY_EMU_ROUND_ROBIN = 0,  // next runnable thread after the last one, ascending; blocks ascending
  SPARSIFY_EMU_REVERSE = 1,      // the same, descending; blocks descending
  SPARSIFY_EMU_GREEDY = 2,       // always the lowest runnable thread: a warp runs as far as it can
  SPARSIFY_EMU_RANDOM = 3,       // a seeded random runnable thread; blocks in a seeded random order
  SPARSIFY_EMU_GREEDY_REVERSE = 4  // always the highest runnable thread; blocks descending
};

// ------------------------------------------------------------------ the launch
int sparsify_emu_launch(const sparsify_emu_module* mod, int kernel, const unsigned grid[3],
                        const unsigned block[3], size_t dyn_smem, void* const* argv, int schedule,
                        uint64_t seed, size_t stack_bytes, sparsify_emu_stats* stats, char* err,
                        size_t err_len);

// ------------------------------------------------------------------ the hooks
const sparsify_emu_thread_info* sparsify_emu_self(void) __attribute__((const));
void sparsify_emu_syncthreads(const char* file, int line);
int sparsify_emu_syncthreads_op(int pred, int op, const char* file, int line);  // op: 0 count, 1 and, 2 or
void sparsify_emu_syncwarp(unsigned mask, const char* file, int line);
unsigned sparsify_emu_vote(unsigned mask, int pred, int op, const char* file, int line);  // 0 ballot, 1 any, 2 all
unsigned long long sparsify_emu_shfl(unsigned mask, unsigned long long value, int mode, int arg, int width,
                                     const char* file, int line);  // mode: 0 idx, 1 up, 2 down, 3 xor
unsigned sparsify_emu_reduce(unsigned mask, unsigned value, int op, const char* file, int line);
unsigned sparsify_emu_cvta_to_shared(const void* p, const char* file, int line);
void* sparsify_emu_shared_ptr(unsigned shared_addr, int bytes, const char* file, int line);
void sparsify_emu_cp_async(unsigned shared_addr, const void* src, int bytes, int src_bytes, int cg,
                           const char* file, int line);
void sparsify_emu_cp_async_commit(void);
void sparsify_emu_cp_async_wait(int n, const char* file, int line);
void sparsify_emu_ldmatrix(unsigned* r, int num, int trans, unsigned shared_addr, const char* file, int line);
void sparsify_emu_mma(int op, float* d, const unsigned* a, const unsigned* b, const float* c, const char* file,
                      int line);
unsigned sparsify_emu_cvt_rna_tf32(float v);
void sparsify_emu_note_float_atomic(void);
void sparsify_emu_yield(void);
long long sparsify_emu_clock(void);
void sparsify_emu_trap(const char* what, const char* file, int line) __attribute__((noreturn));

// mma opcodes for sparsify_emu_mma
enum {
  SPARSIFY_EMU_MMA_M16N8K16_F16 = 0,   // mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32
  SPARSIFY_EMU_MMA_M16N8K16_BF16 = 1,  // mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
  SPARSIFY_EMU_MMA_M16N8K8_TF32 = 2,   // mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32
  SPARSIFY_EMU_MMA_M16N8K8_F16 = 3,    // mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32
  SPARSIFY_EMU_MMA_M16N8K8_BF16 = 4    // mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32
};

#ifdef __cplusplus
}
#endif
