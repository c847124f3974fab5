// The emulator runtime: runs a CUDA kernel compiled for the host (see emu_shim.h)
// with the execution semantics the kernel relies on.
//
//  * Every CUDA thread is a fiber: its own stack (poisoned with 0xFF bytes, a
//    guard page below it), switched cooperatively on one OS thread.  A thread
//    runs until it reaches a synchronization point (__syncthreads, a warp
//    collective, __nanosleep) or exits; the scheduler then picks the next
//    runnable thread by the launch's schedule (round robin, reverse, greedy,
//    greedy reverse, seeded random).  Thread blocks run one after another.
//  * __syncthreads is a block barrier.  A thread that exits while others wait
//    at a barrier, or that reaches a barrier after another thread exited, is an
//    error; so is a block where no thread can run (a deadlock).
//  * Warp collectives (ldmatrix, mma.sync, __syncwarp, shuffles, votes)
//    rendezvous their lanes and are computed once all have arrived, with the
//    fragment layouts of the PTX ISA.  Lanes that disagree on the instruction,
//    or a lane that exited, are errors.
//  * cp.async copies are queued per thread, in commit groups counted per
//    thread, and land in shared memory only at the cp.async.wait_group that
//    covers their group; a missing wait leaves the poisoned (NaN) bytes there.
//  * Shared memory is the kernel module's thread-local storage block: every
//    __shared__ variable of the module, and its dynamic shared memory, lives
//    there (emu_shim.h maps __shared__ to thread_local), so a "shared address"
//    is an offset into that block.  It is poisoned at the start of each block.
//  * Operands of ldmatrix / cp.async are checked for alignment and state space
//    (shared vs global vs a thread's stack), and a segmentation fault inside a
//    kernel becomes an error naming the kernel, block and thread.
//
// PTX ISA references (section numbers of PTX ISA 8.5; the anchors are stable):
//   ldmatrix   9.7.14.5.15 "Warp-level matrix load instruction: ldmatrix"
//              (#warp-level-matrix-instructions-ldmatrix)
//   mma        9.7.14.5.14 "Multiply-and-Accumulate Instruction: mma"
//              (#warp-level-matrix-instructions-mma)
//   fragments  9.7.14.5.7  "Matrix Fragments for mma.m16n8k8" (#warp-level-matrix-fragment-mma-1688)
//              9.7.14.5.8  "Matrix Fragments for mma.m16n8k16 with floating point type"
//              (#warp-level-matrix-fragment-mma-16816-float)
//   cp.async   9.7.9.25.3.1-3 "cp.async", "cp.async.commit_group", "cp.async.wait_group / wait_all"
//   tf32       5.2.3 "Alternate Floating-Point Data Formats"; 9.7.9.21 "cvt" (.rna rounding)
#include "emu_api.h"

#include <dlfcn.h>
#include <link.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <random>
#include <string>
#include <vector>

#if defined(__x86_64__)
#define EMU_HAND_SWITCH 1
// Context switch: save the callee-saved registers, the SSE control word and the
// x87 control word on the current stack, store the stack pointer, load the other.
asm(R"(
  .text
  .globl sparsify_emu_switch
  .hidden sparsify_emu_switch
  .type sparsify_emu_switch,@function
sparsify_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size sparsify_emu_switch,.-sparsify_emu_switch

  .globl sparsify_emu_fiber_start
  .hidden sparsify_emu_fiber_start
  .type sparsify_emu_fiber_start,@function
sparsify_emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size sparsify_emu_fiber_start,.-sparsify_emu_fiber_start
)");
extern "C" void sparsify_emu_switch(void** save_sp, void* new_sp);
extern "C" void sparsify_emu_fiber_start();
#else
#include <ucontext.h>
#endif

namespace {

constexpr unsigned char kPoison = 0xFF;  // NaN in f32, f16 and bf16; -1 in every integer type
constexpr size_t kGuard = 4096;

struct Copy {
  uint32_t saddr;
  uint32_t bytes;
  unsigned char data[16];
};

enum class St : uint8_t { Runnable, Barrier, Warp, Done };

struct Fiber {
  void* sp = nullptr;
#ifndef EMU_HAND_SWITCH
  ucontext_t uc;
#endif
  unsigned char* stack_lo = nullptr;  // lowest usable byte (the guard page is below it)
  size_t poison_depth = 0;            // bytes below the top poisoned at block start
  size_t high_water = 0;              // deepest stack use seen
  sparsify_emu_thread_info info{};
  int linear = 0, warp = 0, lane = 0;
  St state = St::Runnable;
  const char* what = "";  // the last synchronization point reached
  const char* file = "";
  int line = 0;
  int coll = -1;  // index of the warp collective the thread waits at
  std::vector<Copy> open;              // cp.async issued since the last commit_group
  std::deque<std::vector<Copy>> groups;  // committed, not yet waited for
  // warp collective record: inputs, then outputs
  unsigned in_u32[8];
  float in_f32[4];
  unsigned long long in_u64;
  int in_i;
  unsigned out_u32[4];
  float out_f32[4];
  unsigned long long out_u64;
};

enum CollKind {
  kSyncwarp, kLdmatrix, kMma, kShfl, kVote, kReduce,
};
const char* kind_name(int k) {
  switch (k) {
    case kSyncwarp: return "__syncwarp";
    case kLdmatrix: return "ldmatrix";
    case kMma: return "mma.sync";
    case kShfl: return "__shfl_sync";
    case kVote: return "a warp vote (__ballot_sync / __any_sync / __all_sync)";
    case kReduce: return "__reduce_*_sync";
  }
  return "?";
}

struct Collective {
  bool used = false;
  int kind = 0;
  int p0 = 0, p1 = 0, p2 = 0;  // parameters every lane must agree on
  unsigned mask = 0, arrived = 0;
  const char* file = "";
  int line = 0;
};

struct WarpState {
  Collective coll[32];
  unsigned present = 0;  // lanes that exist in this warp
};

struct Launch {
  const sparsify_emu_module* mod = nullptr;
  const sparsify_emu_kernel* kern = nullptr;
  void* const* argv = nullptr;
  unsigned grid[3], block[3];
  int nthreads = 0, nwarps = 0;
  int schedule = 0;
  std::mt19937_64 rng;
  unsigned char* smem = nullptr;  // the module's TLS block: the shared-memory window
  size_t smem_size = 0;
  unsigned char* dyn = nullptr;   // dynamic shared memory (inside the window)
  size_t dyn_bytes = 0, dyn_capacity = 0;
  std::vector<Fiber>* fibers = nullptr;
  std::vector<WarpState> warps;
  std::vector<uint64_t> runnable;  // bitset over threads
  int last = -1;
  void* sched_sp = nullptr;
#ifndef EMU_HAND_SWITCH
  ucontext_t sched_uc;
#endif
  int bar_count = 0, bar_op_acc = 0, bar_result = 0, bar_op = -1;
  const char* bar_file = "";
  int bar_line = 0;
  int n_done = 0;
  int first_done = -1;
  bool failed = false;
  std::string error;
  sparsify_emu_stats stats{};
  unsigned cur_block[3] = {0, 0, 0};
};

thread_local Launch* g_launch = nullptr;
thread_local Fiber* g_cur = nullptr;
thread_local bool g_in_fiber = false;
thread_local sigjmp_buf g_fault_jmp;
thread_local volatile void* g_fault_addr = nullptr;
thread_local volatile int g_fault_sig = 0;

// Stacks live across launches (one pool per OS thread); only the used depth is re-poisoned.
struct StackPool {
  unsigned char* base = nullptr;
  size_t count = 0, stack_bytes = 0, stride = 0;
  std::vector<Fiber> fibers;
  ~StackPool() {
    if (base != nullptr) munmap(base, count * stride);
  }
};
thread_local StackPool g_pool;

// ------------------------------------------------------------------ messages
std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

const char* base_name(const char* path) {
  if (path == nullptr) return "?";
  const char* s = strrchr(path, '/');
  return s ? s + 1 : path;
}

std::string where(const char* file, int line) {
  if (file == nullptr || *file == '\0') return "";
  return fmt(" (%s:%d)", base_name(file), line);
}

std::string thread_name(const Launch& L, const Fiber& f) {
  return fmt("kernel %s, block (%u,%u,%u), thread (%u,%u,%u) [warp %d, lane %d]", L.kern->name, L.cur_block[0],
             L.cur_block[1], L.cur_block[2], f.info.thread_idx.x, f.info.thread_idx.y, f.info.thread_idx.z, f.warp,
             f.lane);
}

void set_runnable(Launch& L, int i, bool on) {
  uint64_t bit = uint64_t(1) << (i & 63);
  if (on) L.runnable[i >> 6] |= bit;
  else L.runnable[i >> 6] &= ~bit;
}

void to_scheduler(Fiber* f) {
  Launch& L = *g_launch;
#ifdef EMU_HAND_SWITCH
  sparsify_emu_switch(&f->sp, L.sched_sp);
#else
  swapcontext(&f->uc, &L.sched_uc);
#endif
}

// An error found by a thread: record it and never resume the thread.
// `who` is the thread the message names (the running one unless a warp
// collective found a bad operand of another lane).
[[noreturn]] void fail_as(Fiber* who, const std::string& msg, const char* file = nullptr, int line = 0) {
  Launch& L = *g_launch;
  if (!L.failed) {
    L.failed = true;
    L.error = (who ? thread_name(L, *who) + ": " : fmt("kernel %s: ", L.kern->name)) + msg + where(file, line);
  }
  to_scheduler(g_cur);
  __builtin_unreachable();
}
[[noreturn]] void fail(const std::string& msg, const char* file = nullptr, int line = 0) {
  fail_as(g_cur, msg, file, line);
}

Fiber* self_fiber() {
  if (g_cur == nullptr || g_launch == nullptr) {
    fprintf(stderr, "sparsify emulator: a CUDA built-in was called outside an emulated launch\n");
    abort();
  }
  return g_cur;
}

void note(Fiber* f, const char* what, const char* file, int line) {
  f->what = what;
  f->file = file;
  f->line = line;
}

void yield_now(Fiber* f) { to_scheduler(f); }

// ------------------------------------------------------------------ address checks
const char* space_of(const Launch& L, const void* p) {
  auto a = reinterpret_cast<uintptr_t>(p);
  auto s = reinterpret_cast<uintptr_t>(L.smem);
  if (a >= s && a < s + L.smem_size) return "shared";
  auto lo = reinterpret_cast<uintptr_t>(g_pool.base);
  if (a >= lo && a < lo + g_pool.count * g_pool.stride) return "local (a thread's stack)";
  return "global";
}

unsigned char* shared_at(unsigned saddr, unsigned bytes, const char* what, const char* file, int line) {
  Launch& L = *g_launch;
  if (uint64_t(saddr) + bytes > L.smem_size) {
    fail(fmt("%s: shared address 0x%x (+%u bytes) is outside the %zu bytes of shared memory", what, saddr, bytes,
             L.smem_size),
         file, line);
  }
  return L.smem + saddr;
}

// ------------------------------------------------------------------ conversions
float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h >> 15) << 31;
  const int exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400) == 0);
      bits = sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3ff) << 13;
    }
  } else {
    bits = sign | uint32_t(exp - 15 + 127) << 23 | mant << 13;
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}
float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}
// A .tf32 operand of mma: the format is implementation defined (PTX 5.2.3); the
// hardware reads the sign, exponent and the top 10 mantissa bits of the .b32
// register and ignores the low 13, which is what this does.
float tf32_to_float(uint32_t bits) {
  bits &= ~0x1fffu;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// ------------------------------------------------------------------ warp collectives
// A lane arrives at a collective; the last lane to arrive computes it for all.
void complete(Launch& L, int warp, Collective& c);

void arrive(Fiber* f, int kind, unsigned mask, int p0, int p1, int p2, const char* file, int line) {
  Launch& L = *g_launch;
  WarpState& w = L.warps[f->warp];
  const unsigned bit = 1u << f->lane;
  note(f, kind_name(kind), file, line);
  if ((mask & bit) == 0) {
    fail(fmt("%s with mask 0x%08x, which does not include the calling lane %d", kind_name(kind), mask, f->lane),
         file, line);
  }
  if ((mask & ~w.present) != 0) {
    fail(fmt("%s with mask 0x%08x names lanes that do not exist in this warp (present: 0x%08x)", kind_name(kind),
             mask, w.present),
         file, line);
  }
  int ci = -1;
  for (int i = 0; i < 32; ++i) {
    if (w.coll[i].used && (w.coll[i].mask & bit)) {
      ci = i;
      break;
    }
  }
  if (ci < 0) {
    for (int i = 0; i < 32; ++i) {
      if (w.coll[i].used && (w.coll[i].mask & mask)) {
        const Collective& o = w.coll[i];
        fail(fmt("%s with mask 0x%08x overlaps %s with mask 0x%08x that other lanes wait at%s: the lanes of a "
                 "warp disagree on the collective",
                 kind_name(kind), mask, kind_name(o.kind), o.mask, where(o.file, o.line).c_str()),
             file, line);
      }
    }
    for (int l = 0; l < 32; ++l) {
      if ((mask >> l & 1u) && (*L.fibers)[f->warp * 32 + l].state == St::Done) {
        fail(fmt("%s waits for lane %d, which has exited (undefined behavior in CUDA: every lane named by the "
                 "mask, or the whole warp for .aligned instructions, must execute it)",
                 kind_name(kind), l),
             file, line);
      }
    }
    for (int i = 0; i < 32; ++i) {
      if (!w.coll[i].used) {
        ci = i;
        break;
      }
    }
    Collective& c = w.coll[ci];
    c.used = true;
    c.kind = kind;
    c.p0 = p0;
    c.p1 = p1;
    c.p2 = p2;
    c.mask = mask;
    c.arrived = 0;
    c.file = file;
    c.line = line;
  } else {
    Collective& c = w.coll[ci];
    if (c.kind != kind || c.p0 != p0 || c.p1 != p1 || c.p2 != p2 || c.mask != mask) {
      fail(fmt("lanes of warp %d diverge at a warp collective: this lane executes %s (mask 0x%08x, params %d/%d/%d) "
               "while other lanes wait at %s (mask 0x%08x, params %d/%d/%d)%s",
               f->warp, kind_name(kind), mask, p0, p1, p2, kind_name(c.kind), c.mask, c.p0, c.p1, c.p2,
               where(c.file, c.line).c_str()),
           file, line);
    }
  }
  Collective& c = w.coll[ci];
  c.arrived |= bit;
  f->state = St::Warp;
  f->coll = ci;
  set_runnable(L, f->linear, false);
  if (c.arrived == c.mask) {
    L.stats.warp_collectives++;
    complete(L, f->warp, c);
    for (int l = 0; l < 32; ++l) {
      if (c.mask >> l & 1u) {
        Fiber& g = (*L.fibers)[f->warp * 32 + l];
        g.state = St::Runnable;
        g.coll = -1;
        set_runnable(L, g.linear, true);
      }
    }
    c.used = false;
  }
  yield_now(f);
}

Fiber& lane_fiber(Launch& L, int warp, int lane) { return (*L.fibers)[warp * 32 + lane]; }

// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared.b16 (PTX 9.7.14.5.15).
// Threads 0-7 give the row addresses of matrix 0, 8-15 of matrix 1, and so on;
// each row is 8 16-bit elements (16 bytes, 16-byte aligned).  In register i,
// lane L receives row L/4, columns 2*(L%4) and 2*(L%4)+1 of matrix i (lower
// column in the lower half); with .trans the matrix is read column-major, so
// lane L receives rows 2*(L%4) and 2*(L%4)+1 of column L/4.
void complete_ldmatrix(Launch& L, int warp, Collective& c) {
  const int num = c.p0, trans = c.p1;
  uint16_t m[4][8][8];
  for (int i = 0; i < num; ++i) {
    for (int r = 0; r < 8; ++r) {
      Fiber& src = lane_fiber(L, warp, i * 8 + r);
      const unsigned saddr = src.in_u32[0];
      if (saddr % 16 != 0) {
        fail_as(&src, fmt("ldmatrix: row address 0x%x (matrix %d, row %d, given by this lane) is not 16-byte aligned", saddr,
                 i, r),
             c.file, c.line);
      }
      const unsigned char* row = shared_at(saddr, 16, "ldmatrix", c.file, c.line);
      memcpy(m[i][r], row, 16);
    }
  }
  for (int l = 0; l < 32; ++l) {
    if (!(c.mask >> l & 1u)) continue;
    Fiber& f = lane_fiber(L, warp, l);
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < num; ++i) {
      uint16_t lo, hi;
      if (!trans) {
        lo = m[i][g][2 * t];
        hi = m[i][g][2 * t + 1];
      } else {
        lo = m[i][2 * t][g];
        hi = m[i][2 * t + 1][g];
      }
      f.out_u32[i] = uint32_t(lo) | uint32_t(hi) << 16;
    }
  }
}

// mma.sync.aligned.{m16n8k16,m16n8k8}.row.col.f32.{f16,bf16,tf32}.f32 (PTX 9.7.14.5.14):
// D = A*B + C with the fragment layouts of 9.7.14.5.7 / 9.7.14.5.8, where
// groupID = lane >> 2 and threadID_in_group = lane % 4.  The products are exact
// and the sum is formed in double and rounded once to f32: the ISA leaves
// accumulation order and rounding unspecified ("at least single precision").
void complete_mma(Launch& L, int warp, Collective& c) {
  const int op = c.p0;
  const bool k16 = op == SPARSIFY_EMU_MMA_M16N8K16_F16 || op == SPARSIFY_EMU_MMA_M16N8K16_BF16;
  const int K = k16 ? 16 : 8;
  double A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    Fiber& f = lane_fiber(L, warp, l);
    const int g = l >> 2, t = l & 3;
    auto h16 = [&](int reg, int half) -> double {
      const uint16_t bits = uint16_t(f.in_u32[reg] >> (16 * half));
      const bool bf = op == SPARSIFY_EMU_MMA_M16N8K16_BF16 || op == SPARSIFY_EMU_MMA_M16N8K8_BF16;
      return bf ? double(bf16_to_float(bits)) : double(half_to_float(bits));
    };
    if (op == SPARSIFY_EMU_MMA_M16N8K8_TF32) {
      // 9.7.14.5.7, .tf32: A a0..a3 in 4 .b32 registers:
      //   row = g for a0, a2; g + 8 for a1, a3.  col = t for a0, a1; t + 4 for a2, a3.
      // B b0, b1 in 2 .b32: row = t for b0, t + 4 for b1; col = g.
      for (int i = 0; i < 4; ++i) {
        const int row = g + ((i & 1) ? 8 : 0), col = t + ((i & 2) ? 4 : 0);
        A[row][col] = tf32_to_float(f.in_u32[i]);
      }
      B[t][g] = tf32_to_float(f.in_u32[4]);
      B[t + 4][g] = tf32_to_float(f.in_u32[5]);
    } else if (k16) {
      // 9.7.14.5.8, .f16/.bf16: A a0..a7 in 4 .f16x2 registers (a0 the low half of reg 0):
      //   row = g for i in {0,1,4,5}, g + 8 otherwise;
      //   col = 2t + (i & 1) for i < 4, 2t + (i & 1) + 8 for i >= 4.
      // B b0..b3 in 2 .f16x2: row = 2t + (i & 1) for i < 2, 2t + (i & 1) + 8 for i >= 2; col = g.
      for (int i = 0; i < 8; ++i) {
        const int row = g + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0);
        const int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
        A[row][col] = h16(i / 2, i & 1);
      }
      for (int i = 0; i < 4; ++i) {
        const int row = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
        B[row][g] = h16(4 + i / 2, i & 1);
      }
    } else {
      // 9.7.14.5.7, .f16/.bf16: A a0..a3 in 2 .f16x2: row = g for a0, a1; g + 8 for a2, a3;
      //   col = 2t + (i & 1).  B b0, b1 in 1 .f16x2: row = 2t + i; col = g.
      for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        A[row][col] = h16(i / 2, i & 1);
      }
      for (int i = 0; i < 2; ++i) B[2 * t + i][g] = h16(4, i);
    }
    // C / D (.f32, both shapes): row = g for c0, c1; g + 8 for c2, c3; col = 2t + (i & 1).
    for (int i = 0; i < 4; ++i) C[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = f.in_f32[i];
  }
  float D[16][8];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 8; ++j) {
      double s = 0.0;
      for (int k = 0; k < K; ++k) s += A[i][k] * B[k][j];
      D[i][j] = float(s + C[i][j]);
    }
  }
  for (int l = 0; l < 32; ++l) {
    Fiber& f = lane_fiber(L, warp, l);
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) f.out_f32[i] = D[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)];
  }
}

// Warp shuffles (CUDA Programming Guide, "Warp Shuffle Functions"): lanes are
// split into segments of `width`; idx reads lane srcLane % width of the segment,
// up/down read lane -/+ delta and keep their own value past the segment edge,
// xor reads lane ^ mask within the segment.  Reading a lane outside the mask is
// undefined in CUDA and an error here.
void complete_shfl(Launch& L, int warp, Collective& c) {
  const int mode = c.p0, width = c.p2;
  for (int l = 0; l < 32; ++l) {
    if (!(c.mask >> l & 1u)) continue;
    Fiber& f = lane_fiber(L, warp, l);
    const int arg = f.in_i;
    const int seg = l & ~(width - 1);
    int src = l;
    switch (mode) {
      case 0: src = seg + (arg & (width - 1)); break;
      case 1: src = (l - arg >= seg) ? l - arg : l; break;
      case 2: src = (l + arg < seg + width) ? l + arg : l; break;
      case 3: {
        const int x = l ^ arg;
        src = (x >= seg && x < seg + width) ? x : l;
        break;
      }
    }
    if (!(c.mask >> src & 1u)) {
      fail_as(&f, fmt("__shfl_sync reads lane %d, which is not in the mask 0x%08x (undefined in CUDA)", src, c.mask),
           c.file, c.line);
    }
    f.out_u64 = lane_fiber(L, warp, src).in_u64;
  }
}

void complete(Launch& L, int warp, Collective& c) {
  switch (c.kind) {
    case kSyncwarp: break;
    case kLdmatrix: complete_ldmatrix(L, warp, c); break;
    case kMma: complete_mma(L, warp, c); break;
    case kShfl: complete_shfl(L, warp, c); break;
    case kVote: {
      unsigned ballot = 0;
      for (int l = 0; l < 32; ++l)
        if ((c.mask >> l & 1u) && lane_fiber(L, warp, l).in_i) ballot |= 1u << l;
      unsigned r = c.p0 == 0 ? ballot : c.p0 == 1 ? unsigned(ballot != 0) : unsigned(ballot == c.mask);
      for (int l = 0; l < 32; ++l)
        if (c.mask >> l & 1u) lane_fiber(L, warp, l).out_u32[0] = r;
      break;
    }
    case kReduce: {  // redux.sync: 0 add, 1 min (unsigned), 2 max (unsigned), 3 min (signed), 4 max (signed)
      unsigned acc = 0;
      bool first = true;
      for (int l = 0; l < 32; ++l) {
        if (!(c.mask >> l & 1u)) continue;
        const unsigned v = lane_fiber(L, warp, l).in_u32[0];
        if (first) {
          acc = v;
          first = false;
          continue;
        }
        switch (c.p0) {
          case 0: acc += v; break;
          case 1: acc = std::min(acc, v); break;
          case 2: acc = std::max(acc, v); break;
          case 3: acc = unsigned(std::min(int(acc), int(v))); break;
          case 4: acc = unsigned(std::max(int(acc), int(v))); break;
        }
      }
      for (int l = 0; l < 32; ++l)
        if (c.mask >> l & 1u) lane_fiber(L, warp, l).out_u32[0] = acc;
      break;
    }
  }
}

// ------------------------------------------------------------------ threads
void release_barrier(Launch& L) {
  for (Fiber& f : *L.fibers) {
    if (f.state == St::Barrier) {
      f.state = St::Runnable;
      set_runnable(L, f.linear, true);
    }
  }
  L.bar_count = 0;
  L.stats.barriers++;
}

std::string ranges(const std::vector<int>& ids) {
  std::string s;
  size_t i = 0;
  int shown = 0;
  while (i < ids.size()) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!s.empty()) s += ",";
    if (++shown > 8) {
      s += "...";
      break;
    }
    s += (i == j) ? fmt("%d", ids[i]) : fmt("%d-%d", ids[i], ids[j]);
    i = j + 1;
  }
  return s;
}

// Where each thread of the block is, for deadlock and exit errors.
std::string block_state(const Launch& L) {
  std::vector<std::pair<std::string, std::vector<int>>> groups;
  for (const Fiber& f : *L.fibers) {
    std::string key;
    switch (f.state) {
      case St::Done: key = "exited"; break;
      case St::Runnable: key = "runnable"; break;
      case St::Barrier: key = std::string("wait at __syncthreads") + where(f.file, f.line); break;
      case St::Warp: key = std::string("wait at ") + f.what + where(f.file, f.line); break;
    }
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == key; });
    if (it == groups.end()) groups.push_back({key, {f.linear}});
    else it->second.push_back(f.linear);
  }
  std::string s;
  for (auto& g : groups) s += fmt("; threads %s %s", ranges(g.second).c_str(), g.first.c_str());
  return s;
}

void thread_exit(Fiber* f) {
  Launch& L = *g_launch;
  note(f, "exit", "", 0);
  if (L.bar_count > 0) {
    fail(fmt("the thread exits while %d thread(s) wait at __syncthreads%s; in CUDA every thread of the block must "
             "reach the barrier (undefined behavior)%s",
             L.bar_count, where(L.bar_file, L.bar_line).c_str(), block_state(L).c_str()));
  }
  const WarpState& w = L.warps[f->warp];
  for (const Collective& c : w.coll) {
    if (c.used && (c.mask >> f->lane & 1u) && !(c.arrived >> f->lane & 1u)) {
      fail(fmt("the thread exits while lanes 0x%08x of its warp wait for it at %s%s", c.arrived, kind_name(c.kind),
               where(c.file, c.line).c_str()));
    }
  }
  f->state = St::Done;
  L.n_done++;
  if (L.first_done < 0) L.first_done = f->linear;
  set_runnable(L, f->linear, false);
  f->open.clear();  // copies never waited for: nothing can observe them any more
  f->groups.clear();
  to_scheduler(f);
  __builtin_unreachable();
}

extern "C" void sparsify_emu_fiber_main(Fiber* f) {
  Launch& L = *g_launch;
  L.kern->invoke(L.argv);
  thread_exit(f);
}

#ifndef EMU_HAND_SWITCH
void ucontext_entry(unsigned lo, unsigned hi) {
  sparsify_emu_fiber_main(reinterpret_cast<Fiber*>(uintptr_t(hi) << 32 | lo));
}
#endif

// ------------------------------------------------------------------ stacks
bool ensure_stacks(size_t n, size_t stack_bytes, std::string& err) {
  StackPool& P = g_pool;
  stack_bytes = (stack_bytes + 4095) & ~size_t(4095);
  if (P.base != nullptr && P.count >= n && P.stack_bytes == stack_bytes) return true;
  if (P.base != nullptr) munmap(P.base, P.count * P.stride);
  P.base = nullptr;
  P.fibers.clear();
  const size_t stride = stack_bytes + kGuard;
  void* mem = mmap(nullptr, n * stride, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) {
    err = fmt("cannot map %zu thread stacks of %zu bytes", n, stack_bytes);
    return false;
  }
  P.base = static_cast<unsigned char*>(mem);
  P.count = n;
  P.stack_bytes = stack_bytes;
  P.stride = stride;
  P.fibers.resize(n);
  for (size_t i = 0; i < n; ++i) {
    unsigned char* lo = P.base + i * stride;
    mprotect(lo, kGuard, PROT_NONE);  // a stack overflow faults instead of corrupting the next stack
    P.fibers[i].stack_lo = lo + kGuard;
    P.fibers[i].poison_depth = stack_bytes;  // fresh: poison it all once
    P.fibers[i].high_water = 0;
  }
  return true;
}

// Poison the part of the stack a thread can have used, and measure the last use.
void measure_stack(Fiber& f) {
  const size_t size = g_pool.stack_bytes;
  unsigned char* top = f.stack_lo + size;
  unsigned char* p = top - f.poison_depth;
  // The byte below the deepest use seen so far (plus a margin) was written: the
  // thread went deeper this time, so measure from the bottom of the stack.
  if (*p != kPoison) p = f.stack_lo;
  while (p < top && *p == kPoison) ++p;
  const size_t used = size_t(top - p);
  f.high_water = std::max(f.high_water, used);
}

void init_fiber(Launch& L, Fiber& f) {
  const size_t size = g_pool.stack_bytes;
  unsigned char* top = f.stack_lo + size;
  memset(top - f.poison_depth, kPoison, f.poison_depth);
#ifdef EMU_HAND_SWITCH
  // Initial frame, read by sparsify_emu_switch: [mxcsr, x87 cw][r15][r14][r13][r12][rbx][rbp][ret]
  auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
  sp -= 8;
  const uint32_t csr[2] = {0x1F80u, 0x037Fu};
  memcpy(&sp[0], csr, 8);
  sp[1] = 0;                                                  // r15
  sp[2] = 0;                                                  // r14
  sp[3] = reinterpret_cast<uint64_t>(&sparsify_emu_fiber_main);  // r13: entry
  sp[4] = reinterpret_cast<uint64_t>(&f);                     // r12: argument
  sp[5] = 0;                                                  // rbx
  sp[6] = 0;                                                  // rbp
  sp[7] = reinterpret_cast<uint64_t>(&sparsify_emu_fiber_start);
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack_lo;
  f.uc.uc_stack.ss_size = size;
  f.uc.uc_link = nullptr;
  const uintptr_t fp = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.uc, reinterpret_cast<void (*)()>(ucontext_entry), 2, unsigned(fp), unsigned(fp >> 32));
#endif
  f.state = St::Runnable;
  f.coll = -1;
  f.open.clear();
  f.groups.clear();
  note(&f, "start", "", 0);
  (void)L;
}

// ------------------------------------------------------------------ scheduling
int pick(Launch& L) {
  const int n = L.nthreads;
  const int words = (n + 63) / 64;
  auto first_from = [&](int start) -> int {  // lowest set bit >= start, or -1
    for (int w = start >> 6; w < words; ++w) {
      uint64_t bits = L.runnable[w];
      if (w == (start >> 6)) bits &= ~uint64_t(0) << (start & 63);
      if (bits) return w * 64 + __builtin_ctzll(bits);
    }
    return -1;
  };
  auto last_below = [&](int end) -> int {  // highest set bit < end, or -1
    for (int w = (end - 1) >> 6; w >= 0; --w) {
      uint64_t bits = L.runnable[w];
      const int hi = end - w * 64;
      if (hi < 64) bits &= (uint64_t(1) << hi) - 1;
      if (bits) return w * 64 + 63 - __builtin_clzll(bits);
    }
    return -1;
  };
  switch (L.schedule) {
    case SPARSIFY_EMU_GREEDY: return first_from(0);
    case SPARSIFY_EMU_GREEDY_REVERSE: return last_below(n);
    case SPARSIFY_EMU_REVERSE: {
      int i = L.last > 0 ? last_below(L.last) : -1;
      if (i < 0) i = last_below(n);
      return i;
    }
    case SPARSIFY_EMU_RANDOM: {
      int count = 0;
      for (int w = 0; w < words; ++w) count += __builtin_popcountll(L.runnable[w]);
      if (count == 0) return -1;
      int k = int(L.rng() % uint64_t(count));
      for (int w = 0; w < words; ++w) {
        uint64_t bits = L.runnable[w];
        const int c = __builtin_popcountll(bits);
        if (k >= c) {
          k -= c;
          continue;
        }
        while (k-- > 0) bits &= bits - 1;
        return w * 64 + __builtin_ctzll(bits);
      }
      return -1;
    }
    default: {
      int i = (L.last + 1 < n) ? first_from(L.last + 1) : -1;
      if (i < 0) i = first_from(0);
      return i;
    }
  }
}

bool run_block(Launch& L) {
  for (;;) {
    const int next = pick(L);
    if (next < 0) {
      if (L.n_done == L.nthreads) return true;
      L.failed = true;
      L.error = fmt("kernel %s, block (%u,%u,%u): deadlock: no thread can run%s", L.kern->name, L.cur_block[0],
                    L.cur_block[1], L.cur_block[2], block_state(L).c_str());
      return false;
    }
    Fiber& f = (*L.fibers)[next];
    L.last = next;
    g_cur = &f;
    g_in_fiber = true;
#ifdef EMU_HAND_SWITCH
    sparsify_emu_switch(&L.sched_sp, f.sp);
#else
    swapcontext(&L.sched_uc, &f.uc);
#endif
    g_in_fiber = false;
    L.stats.switches++;
    if (L.failed) return false;
  }
}

// ------------------------------------------------------------------ the shared-memory window
struct TlsQuery {
  uintptr_t code;
  void* data;
  size_t size;
  bool found;
};

int tls_callback(struct dl_phdr_info* info, size_t, void* arg) {
  auto* q = static_cast<TlsQuery*>(arg);
  bool mine = false;
  size_t tls_size = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_LOAD) {
      const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
      if (q->code >= lo && q->code < lo + ph.p_memsz) mine = true;
    } else if (ph.p_type == PT_TLS) {
      tls_size = ph.p_memsz;
    }
  }
  if (!mine) return 0;
  q->data = info->dlpi_tls_data;
  q->size = tls_size;
  q->found = true;
  return 1;
}

bool find_window(Launch& L, std::string& err) {
  unsigned char* probe = static_cast<unsigned char*>(L.mod->tls_probe());  // also allocates the block
  TlsQuery q{reinterpret_cast<uintptr_t>(L.mod->tls_probe), nullptr, 0, false};
  dl_iterate_phdr(tls_callback, &q);
  if (!q.found || q.data == nullptr || q.size == 0) {
    err = "cannot find the kernel module's thread-local storage block (its shared memory)";
    return false;
  }
  L.smem = static_cast<unsigned char*>(q.data);
  L.smem_size = q.size;
  if (probe < L.smem || probe + L.mod->dyn_smem_capacity > L.smem + L.smem_size) {
    err = "the kernel module's dynamic shared memory is not inside its TLS block";
    return false;
  }
  L.dyn = probe;
  L.dyn_capacity = L.mod->dyn_smem_capacity;
  return true;
}

// ------------------------------------------------------------------ faults
struct sigaction g_old_segv, g_old_bus;

void fault_handler(int sig, siginfo_t* info, void*) {
  if (g_in_fiber && g_launch != nullptr) {
    g_fault_sig = sig;
    g_fault_addr = info->si_addr;
    siglongjmp(g_fault_jmp, 1);
  }
  // Not ours: give the signal to whoever had it before.
  sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);
  raise(sig);
}

thread_local unsigned char* g_altstack = nullptr;

int run_launch(Launch& L, size_t stack_bytes) {
  std::string err;
  if (!find_window(L, err)) {
    L.error = err;
    return 1;
  }
  if (L.dyn_bytes > L.dyn_capacity) {
    L.error = fmt("kernel %s: %zu bytes of dynamic shared memory requested; this build has %zu (build with a larger "
                  "max_dynamic_shared_bytes)",
                  L.kern->name, L.dyn_bytes, L.dyn_capacity);
    return 1;
  }
  if (!ensure_stacks(size_t(L.nthreads), stack_bytes, err)) {
    L.error = err;
    return 1;
  }
  L.fibers = &g_pool.fibers;
  L.nwarps = (L.nthreads + 31) / 32;
  L.warps.assign(size_t(L.nwarps), WarpState{});
  for (int w = 0; w < L.nwarps; ++w) {
    const int lanes = std::min(32, L.nthreads - 32 * w);
    L.warps[w].present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
  }
  L.runnable.assign(size_t((L.nthreads + 63) / 64), 0);
  std::vector<Fiber>& F = g_pool.fibers;
  for (int i = 0; i < L.nthreads; ++i) {
    Fiber& f = F[i];
    f.linear = i;
    f.warp = i / 32;
    f.lane = i % 32;
    f.info.thread_idx = {unsigned(i) % L.block[0], (unsigned(i) / L.block[0]) % L.block[1],
                         unsigned(i) / (L.block[0] * L.block[1])};
    f.info.block_dim = {L.block[0], L.block[1], L.block[2]};
    f.info.grid_dim = {L.grid[0], L.grid[1], L.grid[2]};
  }
  const uint64_t nblocks = uint64_t(L.grid[0]) * L.grid[1] * L.grid[2];
  std::vector<uint64_t> order(nblocks);
  for (uint64_t b = 0; b < nblocks; ++b) order[b] = b;
  if (L.schedule == SPARSIFY_EMU_REVERSE || L.schedule == SPARSIFY_EMU_GREEDY_REVERSE) {
    std::reverse(order.begin(), order.end());
  }
  if (L.schedule == SPARSIFY_EMU_RANDOM) std::shuffle(order.begin(), order.end(), L.rng);
  L.stats.smem_window_bytes = L.smem_size;
  for (uint64_t b : order) {
    L.cur_block[0] = unsigned(b % L.grid[0]);
    L.cur_block[1] = unsigned((b / L.grid[0]) % L.grid[1]);
    L.cur_block[2] = unsigned(b / (uint64_t(L.grid[0]) * L.grid[1]));
    // Shared memory starts poisoned: static __shared__ variables and the requested dynamic bytes.
    memset(L.smem, kPoison, L.smem_size);
    for (int i = 0; i < L.nthreads; ++i) {
      Fiber& f = F[i];
      f.info.block_idx = {L.cur_block[0], L.cur_block[1], L.cur_block[2]};
      init_fiber(L, f);
      set_runnable(L, i, true);
    }
    L.bar_count = 0;
    L.n_done = 0;
    L.first_done = -1;
    L.last = -1;
    for (WarpState& w : L.warps)
      for (Collective& c : w.coll) c.used = false;
    const bool ok = run_block(L);
    for (int i = 0; i < L.nthreads; ++i) {
      Fiber& f = F[i];
      measure_stack(f);
      f.poison_depth = std::min(g_pool.stack_bytes, f.high_water + 4096);
      L.stats.max_stack_bytes = std::max<uint64_t>(L.stats.max_stack_bytes, f.high_water);
    }
    L.stats.blocks++;
    L.stats.threads += uint64_t(L.nthreads);
    if (!ok) return 2;
  }
  return 0;
}

}  // namespace

// ------------------------------------------------------------------ entry point
extern "C" int sparsify_emu_launch(const sparsify_emu_module* mod, int kernel, const unsigned grid[3],
                                   const unsigned block[3], size_t dyn_smem, void* const* argv, int schedule,
                                   uint64_t seed, size_t stack_bytes, sparsify_emu_stats* stats, char* err,
                                   size_t err_len) {
  auto report = [&](const std::string& msg) {
    if (err != nullptr && err_len > 0) {
      snprintf(err, err_len, "%s", msg.c_str());
    }
  };
  if (mod == nullptr || mod->abi != SPARSIFY_EMU_ABI || kernel < 0 || kernel >= mod->nkernels) {
    report("sparsify emulator: bad module or kernel index (a module built for another runtime version?)");
    return 1;
  }
  if (g_launch != nullptr) {
    report("sparsify emulator: a kernel launched another kernel (dynamic parallelism is not supported)");
    return 1;
  }
  Launch L;
  L.mod = mod;
  L.kern = &mod->kernels[kernel];
  L.argv = argv;
  for (int i = 0; i < 3; ++i) {
    L.grid[i] = grid[i];
    L.block[i] = block[i];
  }
  L.nthreads = int(block[0] * block[1] * block[2]);
  L.schedule = schedule;
  L.rng.seed(seed);
  L.dyn_bytes = dyn_smem;

  // Faults inside a kernel (a wild pointer, a stack overflow) come back as errors.
  if (g_altstack == nullptr) g_altstack = static_cast<unsigned char*>(malloc(1 << 16));
  stack_t ss{}, old_ss{};
  ss.ss_sp = g_altstack;
  ss.ss_size = 1 << 16;
  sigaltstack(&ss, &old_ss);
  struct sigaction sa {};
  sa.sa_sigaction = fault_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);

  g_launch = &L;
  int rc;
  if (sigsetjmp(g_fault_jmp, 1) == 0) {
    rc = run_launch(L, stack_bytes);
  } else {
    rc = 3;
    const Fiber* f = g_cur;
    const uintptr_t a = reinterpret_cast<uintptr_t>(g_fault_addr);
    std::string what = "invalid memory access";
    if (f != nullptr) {
      const uintptr_t lo = reinterpret_cast<uintptr_t>(f->stack_lo);
      if (a >= lo - (uintptr_t(1) << 20) && a < lo) {
        what = fmt("stack overflow (the thread stack is %zu bytes; Program.launch(stack_bytes=...) sets it)",
                   g_pool.stack_bytes);
      }
    }
    L.error = (f ? thread_name(L, *f) : fmt("kernel %s", L.kern->name)) +
              fmt(": %s at address %p (signal %d)%s", what.c_str(), reinterpret_cast<void*>(a), int(g_fault_sig),
                  f ? fmt("; last synchronization point: %s%s", f->what, where(f->file, f->line).c_str()).c_str()
                    : "");
    // The fibers' stacks may be in any state: poison them all again next time.
    for (Fiber& fb : g_pool.fibers) fb.poison_depth = g_pool.stack_bytes;
  }
  g_launch = nullptr;
  g_cur = nullptr;
  g_in_fiber = false;
  sigaction(SIGSEGV, &g_old_segv, nullptr);
  sigaction(SIGBUS, &g_old_bus, nullptr);
  sigaltstack(old_ss.ss_flags & SS_DISABLE ? nullptr : &old_ss, nullptr);
  if (old_ss.ss_flags & SS_DISABLE) {
    stack_t off{};
    off.ss_flags = SS_DISABLE;
    sigaltstack(&off, nullptr);
  }
  if (stats != nullptr) *stats = L.stats;
  if (rc != 0) report(L.error.empty() ? std::string("sparsify emulator: launch failed") : L.error);
  return rc;
}

// ------------------------------------------------------------------ hooks
extern "C" const sparsify_emu_thread_info* sparsify_emu_self(void) { return &self_fiber()->info; }

extern "C" void sparsify_emu_syncthreads(const char* file, int line) { sparsify_emu_syncthreads_op(0, -1, file, line); }

extern "C" int sparsify_emu_syncthreads_op(int pred, int op, const char* file, int line) {
  Fiber* f = self_fiber();
  Launch& L = *g_launch;
  note(f, "__syncthreads", file, line);
  if (L.n_done > 0) {
    fail(fmt("the thread reaches __syncthreads after thread %d of the block exited; in CUDA every thread of the "
             "block must reach the barrier (undefined behavior)%s",
             L.first_done, block_state(L).c_str()),
         file, line);
  }
  if (L.bar_count == 0) {
    L.bar_op = op;
    L.bar_op_acc = op == 1 ? 1 : 0;
    L.bar_file = file;
    L.bar_line = line;
  } else if (L.bar_op != op) {
    fail("threads of the block wait at different kinds of __syncthreads (plain / _count / _and / _or)", file, line);
  }
  if (op == 0) L.bar_op_acc += pred != 0;
  if (op == 1) L.bar_op_acc &= pred != 0;
  if (op == 2) L.bar_op_acc |= pred != 0;
  f->state = St::Barrier;
  set_runnable(L, f->linear, false);
  if (++L.bar_count == L.nthreads) {
    L.bar_result = L.bar_op_acc;
    release_barrier(L);
  }
  yield_now(f);
  return L.bar_result;
}

extern "C" void sparsify_emu_syncwarp(unsigned mask, const char* file, int line) {
  arrive(self_fiber(), kSyncwarp, mask, 0, 0, 0, file, line);
}

extern "C" unsigned sparsify_emu_vote(unsigned mask, int pred, int op, const char* file, int line) {
  Fiber* f = self_fiber();
  f->in_i = pred != 0;
  arrive(f, kVote, mask, op, 0, 0, file, line);
  return f->out_u32[0];
}

extern "C" unsigned long long sparsify_emu_shfl(unsigned mask, unsigned long long value, int mode, int arg, int width,
                                                const char* file, int line) {
  Fiber* f = self_fiber();
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail(fmt("__shfl_sync width %d is not a power of two in [1, 32]", width), file, line);
  }
  f->in_u64 = value;
  f->in_i = arg;
  arrive(f, kShfl, mask, mode, 0, width, file, line);
  return f->out_u64;
}

extern "C" unsigned sparsify_emu_reduce(unsigned mask, unsigned value, int op, const char* file, int line) {
  Fiber* f = self_fiber();
  f->in_u32[0] = value;
  arrive(f, kReduce, mask, op, 0, 0, file, line);
  return f->out_u32[0];
}

extern "C" unsigned sparsify_emu_cvta_to_shared(const void* p, const char* file, int line) {
  Fiber* f = self_fiber();
  Launch& L = *g_launch;
  const char* space = space_of(L, p);
  if (strcmp(space, "shared") != 0) {
    note(f, "__cvta_generic_to_shared", file, line);
    fail(fmt("__cvta_generic_to_shared(%p): the address is in %s memory, not shared memory (cvta.to.shared of such "
             "an address is undefined)",
             p, space),
         file, line);
  }
  return unsigned(static_cast<const unsigned char*>(p) - L.smem);
}

extern "C" void* sparsify_emu_shared_ptr(unsigned shared_addr, int bytes, const char* file, int line) {
  self_fiber();
  return shared_at(shared_addr, unsigned(bytes), "shared access", file, line);
}

// cp.async.{ca,cg}.shared.global [dst], [src], cp-size{, src-size} (PTX 9.7.9.25.3.1):
// cp-size is 4, 8 or 16 (16 only for .cg); both addresses aligned to cp-size;
// bytes past src-size are zero-filled.  The source is read now; the bytes land
// in shared memory at the cp.async.wait_group covering this copy's group.
extern "C" void sparsify_emu_cp_async(unsigned shared_addr, const void* src, int bytes, int src_bytes, int cg,
                                      const char* file, int line) {
  Fiber* f = self_fiber();
  Launch& L = *g_launch;
  note(f, "cp.async", file, line);
  if (!(bytes == 4 || bytes == 8 || bytes == 16) || (cg && bytes != 16)) {
    fail(fmt("cp.async.%s with cp-size %d (must be %s)", cg ? "cg" : "ca", bytes, cg ? "16" : "4, 8 or 16"), file,
         line);
  }
  if (src_bytes < 0 || src_bytes > bytes) fail(fmt("cp.async src-size %d exceeds cp-size %d", src_bytes, bytes), file, line);
  if (shared_addr % unsigned(bytes) != 0) {
    fail(fmt("cp.async destination (shared address 0x%x) is not aligned to its cp-size %d", shared_addr, bytes), file,
         line);
  }
  shared_at(shared_addr, unsigned(bytes), "cp.async destination", file, line);
  if (src_bytes > 0) {
    if (reinterpret_cast<uintptr_t>(src) % uintptr_t(bytes) != 0) {
      fail(fmt("cp.async source %p is not aligned to its cp-size %d", src, bytes), file, line);
    }
    const char* space = space_of(L, src);
    if (strcmp(space, "global") != 0) {
      fail(fmt("cp.async source %p is in %s memory; cp.async.shared.global reads global memory", src, space), file,
           line);
    }
  }
  Copy c;
  c.saddr = shared_addr;
  c.bytes = unsigned(bytes);
  memset(c.data, 0, sizeof c.data);
  if (src_bytes > 0) memcpy(c.data, src, size_t(src_bytes));
  f->open.push_back(c);
  L.stats.cp_async_copies++;
}

extern "C" void sparsify_emu_cp_async_commit(void) {
  Fiber* f = self_fiber();
  f->groups.push_back(std::move(f->open));
  f->open.clear();
}

// cp.async.wait_group N (PTX 9.7.9.25.3.3): wait until at most N of the most
// recent groups of this thread are pending; their copies land now, in order.
extern "C" void sparsify_emu_cp_async_wait(int n, const char* file, int line) {
  Fiber* f = self_fiber();
  Launch& L = *g_launch;
  note(f, "cp.async.wait_group", file, line);
  if (n < 0) fail(fmt("cp.async.wait_group %d: N must be a non-negative constant", n), file, line);
  while (f->groups.size() > size_t(n)) {
    for (const Copy& c : f->groups.front()) memcpy(L.smem + c.saddr, c.data, c.bytes);
    f->groups.pop_front();
  }
}

extern "C" void sparsify_emu_ldmatrix(unsigned* r, int num, int trans, unsigned shared_addr, const char* file,
                                      int line) {
  Fiber* f = self_fiber();
  if (!(num == 1 || num == 2 || num == 4)) fail(fmt("ldmatrix .x%d (must be .x1, .x2 or .x4)", num), file, line);
  f->in_u32[0] = shared_addr;
  const unsigned full = g_launch->warps[f->warp].present;
  arrive(f, kLdmatrix, full, num, trans, 0, file, line);
  for (int i = 0; i < num; ++i) r[i] = f->out_u32[i];
}

extern "C" void sparsify_emu_mma(int op, float* d, const unsigned* a, const unsigned* b, const float* c,
                                 const char* file, int line) {
  Fiber* f = self_fiber();
  const bool k16 = op == SPARSIFY_EMU_MMA_M16N8K16_F16 || op == SPARSIFY_EMU_MMA_M16N8K16_BF16;
  const int na = (op == SPARSIFY_EMU_MMA_M16N8K8_F16 || op == SPARSIFY_EMU_MMA_M16N8K8_BF16) ? 2 : 4;
  const int nb = (k16 || op == SPARSIFY_EMU_MMA_M16N8K8_TF32) ? 2 : 1;
  if (op < 0 || op > SPARSIFY_EMU_MMA_M16N8K8_BF16) fail(fmt("unknown mma opcode %d", op), file, line);
  for (int i = 0; i < 4; ++i) f->in_u32[i] = i < na ? a[i] : 0;
  f->in_u32[4] = b[0];
  f->in_u32[5] = nb > 1 ? b[1] : 0;
  for (int i = 0; i < 4; ++i) f->in_f32[i] = c[i];
  const unsigned full = g_launch->warps[f->warp].present;
  if (full != 0xffffffffu) fail("mma.sync in a warp that has fewer than 32 threads", file, line);
  arrive(f, kMma, full, op, 0, 0, file, line);
  for (int i = 0; i < 4; ++i) d[i] = f->out_f32[i];
}

// cvt.rna.tf32.f32: round the f32 to 10 mantissa bits, to nearest with ties
// away from zero; the result is a .b32 whose low 13 bits are zero.
extern "C" unsigned sparsify_emu_cvt_rna_tf32(float v) {
  uint32_t x;
  memcpy(&x, &v, 4);
  if ((x & 0x7f800000u) == 0x7f800000u) {  // inf or NaN: keep, NaN stays NaN
    if (x & 0x7fffffu) return (x & ~0x1fffu) | 0x400000u;
    return x;
  }
  x += 0x1000u;  // half an ulp of the 10-bit mantissa, on the magnitude: ties go away from zero
  return x & ~0x1fffu;
}

extern "C" void sparsify_emu_note_float_atomic(void) {
  self_fiber();
  g_launch->stats.float_atomics++;
}

extern "C" void sparsify_emu_yield(void) {
  Fiber* f = self_fiber();
  note(f, "__nanosleep", "", 0);
  yield_now(f);
}

extern "C" long long sparsify_emu_clock(void) {
  self_fiber();
  return static_cast<long long>(g_launch->stats.switches);
}

extern "C" void sparsify_emu_trap(const char* what, const char* file, int line) {
  Fiber* f = self_fiber();
  note(f, "trap", file, line);
  fail(what, file, line);
}
