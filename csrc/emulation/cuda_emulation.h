// A small host emulation of the CUDA execution model, so that the kernel sources in
// csrc/cuda/*.cuh compile with a plain C++20 compiler and run on the CPU.
//
// Model (what it guarantees, and what it checks through the sanitizers):
//   * QCS_EMULATION_CONCURRENT_BLOCKS blocks (default 2, at most 4) run at once, each on
//     its own host thread(s), so data races across blocks are real races (ThreadSanitizer);
//   * the threads of a block: in builds with ThreadSanitizer or AddressSanitizer (and where
//     QCS_EMULATION_HOST_THREADS=1), each a real host thread, so races between them are
//     real races too; otherwise (x86-64) fibers, all the block's threads on one host
//     thread, switched at barriers, shuffles and warp-matrix exchanges only: the same
//     semantics at a fraction of the cost (a barrier costs no system call), with the race
//     checkers below doing the within-block checking in both;
//   * __syncthreads() is a barrier over the block's threads; a thread that returns
//     from the kernel drops out of every barrier (arrive_and_drop), as on the GPU;
//   * a watchdog: a thread that waits at a barrier (__syncthreads, __syncwarp, a shuffle)
//     longer than QCS_EMULATION_WATCHDOG_S seconds (default 300) prints which kernel,
//     block and barrier, and how many threads arrived, and aborts: a deadlock becomes a
//     report instead of a hang (with fibers: at once when every thread of the block waits,
//     and after that time when one thread runs without reaching a barrier, a spin loop);
//   * shared arrays (QCS_SHARED_ARRAY) hold one copy per running block, poisoned (0xFF
//     bytes) when a block starts; a plain __shared__ does not compile here;
//   * dynamic shared memory (QCS_DYNAMIC_SMEM, read and written through QCS_SMEM_VIEW) is
//     a fresh buffer per block, filled with 0xFF bytes (NaN for floats) so that reading
//     what was never written shows up, and race-checked like the shared arrays (per 4-byte
//     word), with accesses past the launch's size reported;
//   * warp shuffles and ballots go through a per-warp exchange: every lane stores its
//     value, a warp barrier, every lane reads its source lane (two alternating buffers,
//     so one barrier per exchange is enough);
//   * atomics use std::atomic_ref; threadIdx/blockIdx/blockDim/gridDim are thread-local;
//   * the blocks of a grid run in a seeded random order (QCS_EMULATION_SEED, default 0,
//     mixed with a per-process launch counter), never in index order: a kernel that
//     assumes block 0 runs before block 1 gives different results under different seeds;
//   * warp collectives check their mask: it must name every lane of the warp (the
//     kernels use full-warp collectives only); another mask is reported and aborts;
//   * shared arrays declared with QCS_SHARED_ARRAY are race-checked: per element the
//     last writer and the readers since, each with the barrier interval it was in
//     (__syncthreads for the block, __syncwarp within a warp; a shuffle orders nothing).
//     Two accesses from different threads, one a write, in the same interval are a race:
//     reported with kernel, block, array, element and threads, then abort. Out-of-range
//     indices are reported the same way.
// Warps are lanes [32w, 32w+32) of the linearised thread index, as on the GPU; kernels
// must call warp collectives from all live lanes of a warp (full mask), as on Volta+.
//
// Every launch is validated before it runs, against the limits of every architecture
// the package ships for (LaunchError names the kernel and the limit): grid x in
// [1, 2^31 - 1], grid y and z in [1, 65535], block dimensions (1024, 1024, 64) and at
// most 1024 threads, dynamic shared memory within 48 KiB unless cudaFuncSetAttribute
// raised the kernel's limit (to at most 99 KiB, the smallest opt-in limit among the GPUs
// that run sm_80 code), and the static shared memory of a kernel's QCS_SHARED_ARRAYs
// within 48 KiB, with the dynamic within the kernel's limit. QCS_EMULATION_DRY_RUN=1 validates launches without running
// them (to check the launch geometry of problems too large to execute here).
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// Fibers (see the model above): x86-64, and not under a sanitizer (which would need
// annotations of every stack switch).
#if !defined(QCS_EMULATION_FIBERS)
#if defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define QCS_EMULATION_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define QCS_EMULATION_SANITIZED 1
#endif
#if defined(__x86_64__) && defined(__linux__) && !defined(QCS_EMULATION_SANITIZED)
#define QCS_EMULATION_FIBERS 1
#else
#define QCS_EMULATION_FIBERS 0
#endif
#endif
#if QCS_EMULATION_FIBERS
#include <sys/mman.h>
#endif

#define QCS_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
// Shared memory is declared with QCS_SHARED_ARRAY (per block, race-checked) or
// QCS_DYNAMIC_SMEM; a plain __shared__ would be one copy for concurrently running blocks.
#define __shared__ QCS_EMULATION_declare_shared_memory_with_QCS_SHARED_ARRAY

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

namespace qcs_emu {

inline thread_local const char* tl_kernel = "?";
inline thread_local const void* tl_kernel_fn = nullptr;  // the running kernel's address
inline thread_local std::size_t tl_dynamic_smem = 0;     // and its launch's dynamic shared memory
// Counts the blocks run by this process (each block's serial number).
inline std::atomic<uint64_t>& block_serials() {
  static std::atomic<uint64_t> n{0};
  return n;
}

inline double watchdog_seconds() {
  static const double s = [] {
    const char* v = std::getenv("QCS_EMULATION_WATCHDOG_S");
    const double x = v != nullptr ? std::atof(v) : 0.0;
    return x > 0 ? x : 300.0;
  }();
  return s;
}

// A reusable barrier over `expected` threads (arrive_and_wait / arrive_and_drop, as
// std::barrier) whose waits are bounded by the watchdog.
#if QCS_EMULATION_FIBERS
class WatchedBarrier;
// The fibers of the running block (null on a host thread that plays one emulated thread).
struct FiberSlot;
inline thread_local FiberSlot* tl_fibers = nullptr;
// Parks the running fiber until `barrier` leaves `phase` (defined with the fibers below).
inline void fiber_wait(const WatchedBarrier* barrier, uint64_t phase);
#endif

class WatchedBarrier {
 public:
  WatchedBarrier(std::ptrdiff_t expected, const char* what) : expected_(expected), what_(what) {}
  void arrive_and_wait() {
#if QCS_EMULATION_FIBERS
    if (tl_fibers != nullptr) {  // the whole block runs on this host thread: no lock
      const uint64_t phase = phase_;
      if (++arrived_ == expected_) {
        arrived_ = 0;
        ++phase_;
      } else {
        fiber_wait(this, phase);
      }
      return;
    }
#endif
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t phase = phase_;
    if (++arrived_ == expected_) {
      complete();
      return;
    }
    const auto limit = std::chrono::duration<double>(watchdog_seconds());
    if (!cv_.wait_for(lock, limit, [&] { return phase_ != phase; })) report(lock);
  }
  void arrive_and_drop() {
#if QCS_EMULATION_FIBERS
    if (tl_fibers != nullptr) {
      if (--expected_ > 0 && arrived_ == expected_) {
        arrived_ = 0;
        ++phase_;
      }
      return;
    }
#endif
    std::lock_guard<std::mutex> lock(mutex_);
    --expected_;
    if (expected_ > 0 && arrived_ == expected_) complete();
  }
  // For the fiber scheduler and its deadlock reports.
  uint64_t phase() const { return phase_; }
  std::ptrdiff_t arrived() const { return arrived_; }
  std::ptrdiff_t expected() const { return expected_; }
  const char* what() const { return what_; }

 private:
  void complete() {
    arrived_ = 0;
    ++phase_;
    cv_.notify_all();
  }
  [[noreturn]] void report(std::unique_lock<std::mutex>& lock) {
    std::fprintf(stderr,
                 "qcs emulation watchdog: deadlock in kernel %s, block (%u, %u, %u): a thread waited %.0f s "
                 "at a %s with %td of %td threads arrived\n",
                 tl_kernel, blockIdx.x, blockIdx.y, blockIdx.z, watchdog_seconds(), what_, arrived_, expected_);
    std::fflush(stderr);
    lock.unlock();
    std::abort();
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  std::ptrdiff_t expected_, arrived_ = 0;
  uint64_t phase_ = 0;
  const char* what_;
};

// The race checker's record of one 4-byte word of dynamic shared memory.
struct SharedAccess {
  unsigned thread;
  uint32_t block_epoch, warp_epoch;
};
struct DynamicWord {
  bool written = false;
  SharedAccess last_write{};
  std::vector<SharedAccess> readers;
};

struct BlockState {
  using Barrier = WatchedBarrier;
  BlockState(unsigned nthreads, unsigned char* smem, std::size_t smem_bytes)
      : block(nthreads, "__syncthreads"), smem(smem), smem_bytes(smem_bytes), dynamic_words(smem_bytes / 4) {
    const unsigned nwarps = (nthreads + 31) / 32;
    exchange.resize(2 * nwarps * 32);
    parity.resize(nthreads, 0);
    tiles.resize(2 * nwarps * kTileExchange);
    tile_parity.resize(nthreads, 0);
    for (unsigned w = 0; w < nwarps; ++w) {
      const unsigned lanes = std::min(32u, nthreads - 32 * w);
      warp.emplace_back(
          std::make_unique<Barrier>(static_cast<std::ptrdiff_t>(lanes), "warp barrier (__syncwarp or a shuffle)"));
    }
  }
  Barrier block;
  std::vector<std::unique_ptr<Barrier>> warp;
  // Two 8-byte slots per thread, used alternately by successive warp exchanges: one
  // barrier per exchange suffices, since a lane can only overwrite a buffer after
  // every lane of its warp has arrived at the next exchange, i.e. finished reading it.
  std::vector<uint64_t> exchange;
  std::vector<unsigned char> parity;  // per thread: which buffer its next exchange uses
  // The same for the warp-matrix operations (wmma_emulation.h): a whole tile per warp.
  static constexpr unsigned kTileExchange = 16 * 16;
  std::vector<double> tiles;
  std::vector<unsigned char> tile_parity;
  unsigned char* smem;
  std::size_t smem_bytes;
  // Race-checker state of the dynamic shared memory (QCS_SMEM_VIEW), one per 4 bytes.
  std::mutex dynamic_mutex;
  std::vector<DynamicWord> dynamic_words;
  // Unique over the process: checked shared arrays (statics) start every block afresh.
  uint64_t serial = ++block_serials();
};

inline thread_local BlockState* tl_block = nullptr;
inline thread_local unsigned tl_linear = 0;
// Barrier intervals of this thread in its block: __syncthreads passed, __syncwarp passed.
inline thread_local uint32_t tl_block_epoch = 0, tl_warp_epoch = 0;
// Which of the launch's concurrently running blocks this thread plays (its slot): the
// index of the block's copy of every checked shared array.
constexpr unsigned kMaxConcurrentBlocks = 4;
inline thread_local unsigned tl_block_slot = 0;

inline unsigned lane() { return tl_linear % 32; }
inline unsigned warp_id() { return tl_linear / 32; }
inline unsigned warp_lanes() {
  const unsigned n = blockDim.x * blockDim.y * blockDim.z;
  return std::min(32u, n - 32 * warp_id());
}

// ---------------------------------------------------------------- launch validation
struct LaunchError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
constexpr unsigned long long kMaxGridX = 2147483647ull, kMaxGridYZ = 65535;
constexpr unsigned kMaxThreads = 1024, kMaxBlockXY = 1024, kMaxBlockZ = 64;
constexpr std::size_t kDefaultSmem = 48 * 1024, kMaxOptInSmem = 99 * 1024;

// Per kernel: the dynamic shared memory limit raised by cudaFuncSetAttribute.
inline std::map<const void*, std::size_t>& smem_opt_in() {
  static std::map<const void*, std::size_t> m;
  return m;
}
inline std::mutex& smem_opt_in_mutex() {
  static std::mutex m;
  return m;
}

// Per kernel: the static shared memory of its QCS_SHARED_ARRAYs, counted as each is
// constructed (on the kernel's first launch). Call with smem_opt_in_mutex() held.
inline std::map<const void*, std::size_t>& static_smem() {
  static std::map<const void*, std::size_t> m;
  return m;
}
constexpr std::size_t kMaxStaticSmem = 48 * 1024;
// The dynamic shared memory limit of a kernel: 48 KiB unless cudaFuncSetAttribute raised it.
// Call with smem_opt_in_mutex() held.
inline std::size_t dynamic_smem_limit(const void* fn) {
  const auto it = smem_opt_in().find(fn);
  return it != smem_opt_in().end() ? it->second : kDefaultSmem;
}

// A QCS_SHARED_ARRAY of `bytes` declared by the running kernel: static shared memory
// above 48 KiB, or static plus the launch's dynamic above the kernel's limit, fails on the
// GPU ("too many resources requested for launch"); here it is reported and aborts.
inline void note_static_shared(const char* array, std::size_t bytes) {
  std::size_t total, limit;
  {
    std::lock_guard<std::mutex> lock(smem_opt_in_mutex());
    total = static_smem()[tl_kernel_fn] += bytes;
    limit = dynamic_smem_limit(tl_kernel_fn);
  }
  if (total <= kMaxStaticSmem && total + tl_dynamic_smem <= std::max(limit, kDefaultSmem)) return;
  std::fprintf(stderr,
               "qcs emulation: kernel %s: shared %s brings its static shared memory to %zu B (with %zu B dynamic): "
               "above %s\n",
               tl_kernel, array, total, tl_dynamic_smem,
               total > kMaxStaticSmem ? "the 48 KiB limit of static shared memory"
                                      : "the kernel's shared memory limit (48 KiB without cudaFuncSetAttribute)");
  std::fflush(stderr);
  std::abort();
}

inline void validate_launch(const char* kernel, const void* fn, dim3 grid, dim3 block, std::size_t smem) {
  auto fail = [&](const std::string& what) {
    throw LaunchError(std::string("emulated launch of ") + kernel + ": " + what + " (grid " + std::to_string(grid.x) +
                      "x" + std::to_string(grid.y) + "x" + std::to_string(grid.z) + ", block " +
                      std::to_string(block.x) + "x" + std::to_string(block.y) + "x" + std::to_string(block.z) + ", " +
                      std::to_string(smem) + " B dynamic shared memory)");
  };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("empty grid");
  if (grid.x > kMaxGridX) fail("gridDim.x above 2^31 - 1");
  if (grid.y > kMaxGridYZ || grid.z > kMaxGridYZ) fail("gridDim.y or gridDim.z above 65535");
  if (block.x == 0 || block.y == 0 || block.z == 0) fail("empty block");
  if (block.x > kMaxBlockXY || block.y > kMaxBlockXY || block.z > kMaxBlockZ) fail("block dimension above its limit");
  if (static_cast<unsigned long long>(block.x) * block.y * block.z > kMaxThreads) fail("more than 1024 threads");
  std::size_t limit = kDefaultSmem, known_static = 0;
  {
    std::lock_guard<std::mutex> lock(smem_opt_in_mutex());
    limit = dynamic_smem_limit(fn);
    const auto it = static_smem().find(fn);
    if (it != static_smem().end()) known_static = it->second;  // from an earlier launch
  }
  if (smem > limit)
    fail(limit == kDefaultSmem ? "dynamic shared memory above 48 KiB without cudaFuncSetAttribute"
                               : "dynamic shared memory above the limit set by cudaFuncSetAttribute");
  if (known_static + smem > std::max(limit, kDefaultSmem))
    fail("static (" + std::to_string(known_static) + " B) plus dynamic shared memory above the kernel's limit");
}

inline bool dry_run() {
  const char* v = std::getenv("QCS_EMULATION_DRY_RUN");
  return v != nullptr && v[0] == '1';
}

// One launch at a time: the checked shared arrays are statics, one set of block copies.
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// The host threads that play a block's threads: created once, on demand, and kept for
// the life of the process (never destroyed: no join at exit, and ThreadSanitizer's
// thread creation, its slowest part, happens once). run(n, job) runs job(0..n-1) on the
// first n workers and returns when all have finished.
class WorkerPool {
 public:
  // tick (if given) runs on the calling thread about once a second while the job runs.
  void run(unsigned n, const std::function<void(unsigned)>& job, const std::function<void()>* tick = nullptr) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (workers_.size() < n) {
      const unsigned id = static_cast<unsigned>(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
    }
    job_ = &job;
    active_ = n;
    remaining_ = n;
    ++generation_;
    start_.notify_all();
    while (!done_.wait_for(lock, std::chrono::seconds(1), [this] { return remaining_ == 0; }))
      if (tick != nullptr) {
        lock.unlock();
        (*tick)();
        lock.lock();
      }
    job_ = nullptr;
  }

 private:
  void loop(unsigned id) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      start_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (id >= active_) continue;
      const std::function<void(unsigned)>* job = job_;
      lock.unlock();
      (*job)(id);
      lock.lock();
      if (--remaining_ == 0) done_.notify_one();
    }
  }
  std::mutex mutex_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(unsigned)>* job_ = nullptr;
  unsigned active_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
};

inline WorkerPool& worker_pool() {
  static WorkerPool* pool = new WorkerPool;  // intentionally never destroyed
  return *pool;
}

// How many blocks of a launch run at once (QCS_EMULATION_CONCURRENT_BLOCKS, default 2,
// 1 to kMaxConcurrentBlocks): blocks that share memory without synchronisation race for
// real, so ThreadSanitizer sees it.
inline unsigned concurrent_blocks() {
  static const unsigned n = [] {
    const char* v = std::getenv("QCS_EMULATION_CONCURRENT_BLOCKS");
    const long x = v != nullptr ? std::atol(v) : 2;
    return static_cast<unsigned>(std::clamp<long>(x, 1, kMaxConcurrentBlocks));
  }();
  return n;
}

// The order in which a launch runs its blocks: a permutation drawn from
// QCS_EMULATION_SEED (default 0) and the number of launches before this one.
inline std::vector<unsigned> block_order(unsigned nblocks) {
  static const uint64_t seed = [] {
    const char* v = std::getenv("QCS_EMULATION_SEED");
    return v != nullptr ? std::strtoull(v, nullptr, 10) : 0ull;
  }();
  static std::atomic<uint64_t> launches{0};
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + ++launches;
  auto next = [&x] {  // splitmix64: a few lines, the same on every platform
    uint64_t z = (x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  };
  std::vector<unsigned> order(nblocks);
  for (unsigned i = 0; i < nblocks; ++i) order[i] = i;
  for (unsigned i = nblocks; i > 1; --i) std::swap(order[i - 1], order[next() % i]);
  return order;
}

// Runs `body` as every thread of every block. The launch's blocks run
// concurrent_blocks() at a time, each in its own slot: a slot's pool threads take the
// blocks at positions slot, slot + slots, ... of the launch's order one after the other,
// meeting between two blocks at a barrier whose completion step installs the next
// block's fresh state (barriers, exchange, poisoned dynamic shared memory).
struct BlockSlot {
  unsigned nthreads, position, stride, nblocks;
  std::size_t words;          // dynamic shared memory, in max_align_t units
  std::size_t dynamic_bytes;  // as launched
  std::unique_ptr<std::max_align_t[]> smem;
  std::unique_ptr<BlockState> state;
  void fresh() {
    std::memset(smem.get(), 0xFF, words * sizeof(std::max_align_t));
    state = std::make_unique<BlockState>(nthreads, reinterpret_cast<unsigned char*>(smem.get()), dynamic_bytes);
  }
  void advance() noexcept {
    position += stride;
    if (position < nblocks) fresh();
  }
};
struct AdvanceSlot {
  BlockSlot* slot;
  void operator()() noexcept { slot->advance(); }
};

// ---------------------------------------------------------------- fibers
// A block's threads as fibers on its slot's host thread (QCS_EMULATION_FIBERS): each has
// its own stack; the scheduler resumes them in turn, and a fiber runs until it waits at a
// barrier (WatchedBarrier::arrive_and_wait parks it) or returns from the kernel. The
// per-thread state the kernels see (threadIdx, the lane, the barrier intervals) is
// swapped in and out at each switch; per-block state (blockIdx, tl_block) is the host
// thread's.
#if QCS_EMULATION_FIBERS
extern "C" void qcs_emu_fiber_switch(void** save_sp, void* load_sp);
extern "C" void qcs_emu_fiber_entry();
// qcs_emu_fiber_switch saves the callee-saved registers and the SSE/x87 control words on
// the current stack, stores the stack pointer in *save_sp and resumes the stack load_sp.
// qcs_emu_fiber_entry starts a new fiber: calls r13(r12) on an aligned stack. (COMDAT, as
// an inline function: every translation unit may carry it.)
__asm__(
    ".pushsection .text.qcs_emu_fiber_switch,\"axG\",@progbits,qcs_emu_fiber_switch,comdat\n"
    ".weak qcs_emu_fiber_switch\n"
    ".type qcs_emu_fiber_switch,@function\n"
    "qcs_emu_fiber_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size qcs_emu_fiber_switch, .-qcs_emu_fiber_switch\n"
    ".popsection\n"
    ".pushsection .text.qcs_emu_fiber_entry,\"axG\",@progbits,qcs_emu_fiber_entry,comdat\n"
    ".weak qcs_emu_fiber_entry\n"
    ".type qcs_emu_fiber_entry,@function\n"
    "qcs_emu_fiber_entry:\n"
    "  andq $-16, %rsp\n  movq %r12, %rdi\n  callq *%r13\n  ud2\n"
    ".size qcs_emu_fiber_entry, .-qcs_emu_fiber_entry\n"
    ".popsection\n");

struct Fiber {
  void* sp = nullptr;
  unsigned char* stack = nullptr;  // kFiberStack bytes, a guard page below
  dim3 thread_idx;
  unsigned linear = 0;
  uint32_t block_epoch = 0, warp_epoch = 0;
  const WatchedBarrier* waiting = nullptr;  // parked until it leaves waiting_phase
  uint64_t waiting_phase = 0;
  bool done = false;
};
constexpr std::size_t kFiberStack = 256 * 1024, kFiberGuard = 4096;

struct FiberSlot {
  std::vector<Fiber> fibers;  // reserved for 1024: never reallocated
  void* scheduler_sp = nullptr;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  // Read by the watchdog on another thread: progress, and what runs.
  std::atomic<uint64_t> switches{0};
  std::atomic<bool> busy{false};
  const char* kernel = "?";
  dim3 block_idx;
};
inline FiberSlot& fiber_slot(unsigned g) {
  static FiberSlot* slots = new FiberSlot[kMaxConcurrentBlocks];  // never destroyed, as the pool
  return slots[g];
}
inline bool use_fibers() {
  static const bool on = [] {
    const char* v = std::getenv("QCS_EMULATION_HOST_THREADS");
    return !(v != nullptr && v[0] == '1');
  }();
  return on;
}

inline void fiber_main(Fiber* f) {
  FiberSlot& s = *tl_fibers;
  try {
    (*s.body)();
  } catch (const std::exception& e) {  // an exception cannot unwind past a fiber's first frame
    std::fprintf(stderr, "qcs emulation: kernel %s, thread %u threw: %s\n", s.kernel, f->linear, e.what());
    std::fflush(stderr);
    std::abort();
  }
  // The thread has exited the block: it no longer takes part in any of its barriers.
  tl_block->warp[f->linear / 32]->arrive_and_drop();
  tl_block->block.arrive_and_drop();
  f->done = true;
  qcs_emu_fiber_switch(&f->sp, s.scheduler_sp);
  std::abort();  // a finished fiber is never resumed
}

// A fresh fiber for thread `linear` of a block of shape `block`: its stack holds the frame
// qcs_emu_fiber_switch pops, returning into qcs_emu_fiber_entry, which calls fiber_main(f).
inline void fiber_prepare(Fiber& f, unsigned linear, dim3 block) {
  if (f.stack == nullptr) {
    void* p = mmap(nullptr, kFiberStack + kFiberGuard, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED || mprotect(p, kFiberGuard, PROT_NONE) != 0)
      throw std::runtime_error("emulation: no fiber stack");
    f.stack = static_cast<unsigned char*>(p) + kFiberGuard;
  }
  uint32_t mxcsr, fpcw = 0;
  __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
  __asm__ volatile("fnstcw %0" : "=m"(fpcw));
  auto* frame = reinterpret_cast<uint64_t*>(f.stack + kFiberStack) - 9;
  frame[0] = mxcsr | (static_cast<uint64_t>(fpcw & 0xFFFF) << 32);
  frame[1] = frame[2] = 0;                                      // r15, r14
  frame[3] = reinterpret_cast<uint64_t>(&fiber_main);           // r13
  frame[4] = reinterpret_cast<uint64_t>(&f);                    // r12
  frame[5] = frame[6] = 0;                                      // rbx, rbp
  frame[7] = reinterpret_cast<uint64_t>(&qcs_emu_fiber_entry);  // return address
  frame[8] = 0;
  f.sp = frame;
  f.thread_idx = dim3(linear % block.x, (linear / block.x) % block.y, linear / (block.x * block.y));
  f.linear = linear;
  f.block_epoch = f.warp_epoch = 0;
  f.waiting = nullptr;
  f.done = false;
}

inline void fiber_wait(const WatchedBarrier* barrier, uint64_t phase) {
  FiberSlot& s = *tl_fibers;
  Fiber& f = *s.current;
  f.waiting = barrier;
  f.waiting_phase = phase;
  qcs_emu_fiber_switch(&f.sp, s.scheduler_sp);
}

inline void fiber_resume(FiberSlot& s, Fiber& f) {
  s.current = &f;
  threadIdx = f.thread_idx;
  tl_linear = f.linear;
  tl_block_epoch = f.block_epoch;
  tl_warp_epoch = f.warp_epoch;
  qcs_emu_fiber_switch(&s.scheduler_sp, f.sp);
  f.block_epoch = tl_block_epoch;
  f.warp_epoch = tl_warp_epoch;
  s.switches.fetch_add(1, std::memory_order_relaxed);
}

// The report of a block none of whose threads can go on: `why`, and the first barrier
// waited at. (Reads the fibers racily when called by the watchdog: it aborts right after.)
[[noreturn]] inline void fiber_deadlock(const FiberSlot& s, unsigned nthreads, const char* why) {
  const Fiber* w = nullptr;
  for (unsigned t = 0; t < nthreads && w == nullptr; ++t)
    if (!s.fibers[t].done && s.fibers[t].waiting != nullptr) w = &s.fibers[t];
  std::fprintf(stderr, "qcs emulation watchdog: deadlock in kernel %s, block (%u, %u, %u): %s", s.kernel, s.block_idx.x,
               s.block_idx.y, s.block_idx.z, why);
  if (w != nullptr)
    std::fprintf(stderr, "; thread %u waits at a %s with %td of %td threads arrived", w->linear, w->waiting->what(),
                 w->waiting->arrived(), w->waiting->expected());
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

// Runs the block installed in tl_block / blockIdx to the end: every fiber that can go on
// is resumed in turn (thread order) until all have returned.
inline void fiber_run_block(FiberSlot& s, unsigned nthreads, dim3 block) {
  if (s.fibers.capacity() < kMaxThreads) s.fibers.reserve(kMaxThreads);
  if (s.fibers.size() < nthreads) s.fibers.resize(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) fiber_prepare(s.fibers[t], t, block);
  unsigned live = nthreads;
  while (live > 0) {
    bool ran = false;
    for (unsigned t = 0; t < nthreads; ++t) {
      Fiber& f = s.fibers[t];
      if (f.done) continue;
      if (f.waiting != nullptr) {
        if (f.waiting->phase() == f.waiting_phase) continue;
        f.waiting = nullptr;
      }
      fiber_resume(s, f);
      ran = true;
      live -= f.done ? 1 : 0;
    }
    if (!ran) fiber_deadlock(s, nthreads, "every thread waits at a barrier");
  }
}

// The watchdog of a fiber launch (runs on the launching thread about once a second): a
// slot that switched no fiber for QCS_EMULATION_WATCHDOG_S seconds has a thread that runs
// without reaching a barrier, e.g. a spin loop waiting for a thread parked at one.
struct FiberWatchdog {
  unsigned nslots, nthreads;
  std::vector<uint64_t> seen = std::vector<uint64_t>(kMaxConcurrentBlocks, ~0ull);
  std::vector<std::chrono::steady_clock::time_point> since =
      std::vector<std::chrono::steady_clock::time_point>(kMaxConcurrentBlocks);
  void operator()() {
    const auto now = std::chrono::steady_clock::now();
    for (unsigned g = 0; g < nslots; ++g) {
      const FiberSlot& s = fiber_slot(g);
      const uint64_t n = s.switches.load(std::memory_order_relaxed);
      if (n != seen[g] || !s.busy.load()) {
        seen[g] = n;
        since[g] = now;
      } else if (std::chrono::duration<double>(now - since[g]).count() > watchdog_seconds()) {
        char why[160];
        std::snprintf(why, sizeof(why), "thread %u ran %.0f s without reaching a barrier (a spin loop?)",
                      s.current != nullptr ? s.current->linear : 0u, watchdog_seconds());
        fiber_deadlock(s, nthreads, why);
      }
    }
  }
};

// run_grid with each block's threads as fibers: a slot's host thread runs its blocks one
// after the other.
inline void run_grid_fibers(dim3 grid, dim3 block, const std::vector<unsigned>& order,
                            std::vector<std::unique_ptr<BlockSlot>>& slots, const std::function<void()>& body,
                            const char* kernel, const void* kernel_fn) {
  const unsigned nslots = static_cast<unsigned>(slots.size()), nblocks = grid.x * grid.y * grid.z;
  const unsigned nthreads = block.x * block.y * block.z;
  for (unsigned g = 0; g < nslots; ++g) {
    fiber_slot(g).switches = 0;
    fiber_slot(g).kernel = kernel;
  }
  const std::function<void()> tick = FiberWatchdog{nslots, nthreads};
  worker_pool().run(
      nslots,
      [&](unsigned g) {
        BlockSlot& slot = *slots[g];
        FiberSlot& s = fiber_slot(g);
        tl_block_slot = g;
        tl_kernel = kernel;
        tl_kernel_fn = kernel_fn;
        tl_dynamic_smem = slot.dynamic_bytes;
        blockDim = block;
        gridDim = grid;
        s.body = &body;
        tl_fibers = &s;
        s.busy = true;
        for (; slot.position < nblocks; slot.advance()) {
          const unsigned blk = order[slot.position];
          blockIdx = dim3(blk % grid.x, (blk / grid.x) % grid.y, blk / (grid.x * grid.y));
          s.block_idx = blockIdx;
          tl_block = slot.state.get();
          fiber_run_block(s, nthreads, block);
        }
        s.busy = false;
        tl_fibers = nullptr;
        tl_block = nullptr;
      },
      &tick);
}
#endif  // QCS_EMULATION_FIBERS

inline void run_grid(dim3 grid, dim3 block, std::size_t smem_bytes, const std::function<void()>& body,
                     const char* kernel = "?", const void* kernel_fn = nullptr) {
  std::lock_guard<std::mutex> guard(launch_mutex());
  const unsigned nthreads = block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024) throw std::runtime_error("emulated launch: bad block size");
  const unsigned nblocks = grid.x * grid.y * grid.z;
  if (nblocks == 0) return;
  const std::vector<unsigned> order = block_order(nblocks);
  const std::size_t words = (smem_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t);
  const unsigned nslots = std::min(concurrent_blocks(), nblocks);
  std::vector<std::unique_ptr<BlockSlot>> slots;
  for (unsigned g = 0; g < nslots; ++g) {
    slots.push_back(std::make_unique<BlockSlot>(
        BlockSlot{nthreads, g, nslots, nblocks, words, smem_bytes,
                  std::unique_ptr<std::max_align_t[]>(new std::max_align_t[words ? words : 1]), nullptr}));
    slots.back()->fresh();
  }
#if QCS_EMULATION_FIBERS
  if (use_fibers()) {
    run_grid_fibers(grid, block, order, slots, body, kernel, kernel_fn);
    return;
  }
#endif
  // Host threads: a slot's threads meet between two blocks (the barrier installs the next).
  std::vector<std::unique_ptr<std::barrier<AdvanceSlot>>> between_blocks;
  for (const auto& slot : slots)
    between_blocks.push_back(
        std::make_unique<std::barrier<AdvanceSlot>>(static_cast<std::ptrdiff_t>(nthreads), AdvanceSlot{slot.get()}));
  worker_pool().run(nslots * nthreads, [&](unsigned id) {
    const unsigned g = id / nthreads, t = id % nthreads;
    BlockSlot& slot = *slots[g];
    tl_linear = t;
    tl_block_slot = g;
    tl_kernel = kernel;
    tl_kernel_fn = kernel_fn;
    tl_dynamic_smem = smem_bytes;
    threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    blockDim = block;
    gridDim = grid;
    for (;;) {
      if (slot.position >= nblocks) break;  // published by the completion step of the barrier
      const unsigned blk = order[slot.position];
      BlockState* st = slot.state.get();
      tl_block = st;
      tl_block_epoch = tl_warp_epoch = 0;
      blockIdx = dim3(blk % grid.x, (blk / grid.x) % grid.y, blk / (grid.x * grid.y));
      body();
      // The thread has exited the block: it no longer takes part in any of its barriers.
      st->warp[t / 32]->arrive_and_drop();
      st->block.arrive_and_drop();
      tl_block = nullptr;
      between_blocks[g]->arrive_and_wait();
    }
  });
}

// The names of the kernels launched, in order (qcs_emulated::launch_log reads and clears
// it): the tests count the launches of an op.
inline std::mutex& launch_log_mutex() {
  static std::mutex m;
  return m;
}
inline std::vector<std::string>& launch_log() {
  static std::vector<std::string> log;
  return log;
}
inline void note_launch(const char* what) {
  std::lock_guard<std::mutex> lock(launch_log_mutex());
  if (launch_log().size() < 100000) launch_log().emplace_back(what);
}

template <typename Kernel>
struct Bound {
  dim3 grid, block;
  std::size_t smem;
  const char* name;
  Kernel* kernel;
  template <typename... Args>
  void operator()(Args... args) const {
    validate_launch(name, reinterpret_cast<const void*>(kernel), grid, block, smem);
    note_launch(name);
    if (dry_run()) return;
    Kernel* k = kernel;
    run_grid(grid, block, smem, [=] { k(args...); }, name, reinterpret_cast<const void*>(kernel));
  }
};

struct Launch {
  dim3 grid, block;
  std::size_t smem;
  const char* name;
  template <typename Kernel>
  Bound<Kernel> bind(Kernel* kernel) const {
    return {grid, block, smem, name, kernel};
  }
};

// Publishes this lane's 8-byte value to its warp and returns the slot array (32 values of
// the warp, indexed by lane) after the warp barrier. Valid until the lane's next exchange.
inline const uint64_t* warp_exchange(uint64_t value) {
  BlockState& st = *tl_block;
  unsigned char& par = st.parity[tl_linear];
  uint64_t* buf = st.exchange.data() + (2 * warp_id() + par) * 32;
  par ^= 1;
  buf[lane()] = value;
  st.warp[warp_id()]->arrive_and_wait();
  return buf;
}

template <typename T>
T shuffle_from(T value, int src_lane_in_warp, bool valid) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t slot = 0;
  std::memcpy(&slot, &value, sizeof(T));
  const uint64_t* buf = warp_exchange(slot);
  T out = value;
  if (valid && static_cast<unsigned>(src_lane_in_warp) < warp_lanes())
    std::memcpy(&out, &buf[src_lane_in_warp], sizeof(T));
  return out;
}

// The mask of a warp collective must name every lane of the calling warp: the kernels
// use full-warp collectives only, and the exchange above assumes it.
inline void check_mask(unsigned mask, const char* what) {
  const unsigned lanes = warp_lanes();
  const unsigned full = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
  if (mask == full) return;
  std::fprintf(stderr,
               "qcs emulation: kernel %s, block (%u, %u, %u), thread %u: %s with mask 0x%08x, but the warp's "
               "lanes are 0x%08x (a collective's mask must name every lane that calls it; the emulation "
               "supports full-warp collectives only)\n",
               tl_kernel, blockIdx.x, blockIdx.y, blockIdx.z, tl_linear, what, mask, full);
  std::fflush(stderr);
  std::abort();
}

// One access to a checked shared element (SharedAccess): which thread, in which barrier
// intervals.
inline SharedAccess this_access() { return {tl_linear, tl_block_epoch, tl_warp_epoch}; }
// Whether `before` happens before the current thread's access `now`: a __syncthreads
// between them, or a __syncwarp within one warp, or the same thread.
inline bool ordered(const SharedAccess& before, const SharedAccess& now) {
  if (before.thread == now.thread || before.block_epoch < now.block_epoch) return true;
  return before.thread / 32 == now.thread / 32 && before.warp_epoch < now.warp_epoch;
}

// `__shared__ T name[N]` with a race checker (see the model at the top): one copy per
// concurrently running block.
template <typename T, unsigned N>
class SharedArray {
 public:
  explicit SharedArray(const char* name) : name_(name) { note_static_shared(name, sizeof(T) * N); }
  class Ref {
   public:
    Ref(SharedArray* a, unsigned i) : a_(a), i_(i) {}
    operator T() const { return a_->read(i_); }
    Ref& operator=(T v) {
      a_->write(i_, v);
      return *this;
    }
    Ref& operator=(const Ref& other) { return *this = static_cast<T>(other); }

   private:
    SharedArray* a_;
    unsigned i_;
  };
  Ref operator[](long long i) { return Ref(this, index(i)); }
  // `name + offset`: a pointer into the array (what a __shared__ array decays to on the
  // GPU), for code that passes a shared tile to a function (e.g. wmma::load_matrix_sync).
  class Ptr {
   public:
    using element_type = T;
    Ptr(SharedArray* a, long long off) : a_(a), off_(off) {}
    Ref operator[](long long i) const { return (*a_)[off_ + i]; }
    Ptr operator+(long long k) const { return Ptr(a_, off_ + k); }
    // The byte offset from the array's start (whose alignment is alignof(*this) = 32).
    long long byte_offset() const { return off_ * static_cast<long long>(sizeof(T)); }

   private:
    SharedArray* a_;
    long long off_;
  };
  Ptr operator+(long long off) { return Ptr(this, off); }

 private:
  struct Copy {
    std::mutex mutex;
    uint64_t serial = 0;
    T data[N];
    bool written[N] = {};
    SharedAccess last_write[N] = {};
    std::vector<SharedAccess> readers[N];
  };
  unsigned index(long long i) {
    if (i >= 0 && i < static_cast<long long>(N)) return static_cast<unsigned>(i);
    std::fprintf(stderr,
                 "qcs emulation: kernel %s, block (%u, %u, %u), thread %u: shared %s[%lld] out of range [0, %u)\n",
                 tl_kernel, blockIdx.x, blockIdx.y, blockIdx.z, tl_linear, name_, i, N);
    std::fflush(stderr);
    std::abort();
  }
  // The running block's copy; a new block starts with no history and poisoned contents
  // (0xFF bytes). Call with the copy's mutex held.
  Copy& mine() {
    Copy& c = copies_[tl_block_slot];
    if (c.serial == tl_block->serial) return c;
    c.serial = tl_block->serial;
    std::memset(static_cast<void*>(c.data), 0xFF, sizeof(c.data));
    for (unsigned i = 0; i < N; ++i) {
      c.written[i] = false;
      c.readers[i].clear();
    }
    return c;
  }
  [[noreturn]] void race(const Copy& c, unsigned i, const char* first, unsigned other, const char* second) {
    std::fprintf(stderr,
                 "qcs emulation race: kernel %s, block (%u, %u, %u), shared %s[%u] at %p: thread %u %s it and "
                 "thread %u %s it with no __syncthreads (or __syncwarp within a warp) between\n",
                 tl_kernel, blockIdx.x, blockIdx.y, blockIdx.z, name_, i, static_cast<const void*>(&c.data[i]), other,
                 first, tl_linear, second);
    std::fflush(stderr);
    std::abort();
  }
  T read(unsigned i) {
    std::lock_guard<std::mutex> lock(copies_[tl_block_slot].mutex);
    Copy& c = mine();
    const SharedAccess now = this_access();
    if (c.written[i] && !ordered(c.last_write[i], now)) race(c, i, "wrote", c.last_write[i].thread, "read");
    c.readers[i].push_back(now);
    return c.data[i];
  }
  void write(unsigned i, T v) {
    std::lock_guard<std::mutex> lock(copies_[tl_block_slot].mutex);
    Copy& c = mine();
    const SharedAccess now = this_access();
    if (c.written[i] && !ordered(c.last_write[i], now)) race(c, i, "wrote", c.last_write[i].thread, "wrote");
    for (const SharedAccess& r : c.readers[i])
      if (!ordered(r, now)) race(c, i, "read", r.thread, "wrote");
    c.readers[i].clear();
    c.written[i] = true;
    c.last_write[i] = now;
    c.data[i] = v;
  }
  const char* name_;
  Copy copies_[kMaxConcurrentBlocks];
};

// Dynamic shared memory seen through QCS_SMEM_VIEW(T, raw): a pointer-like view whose
// element accesses go through the race checker, with the same rules as SharedArray, per
// 4-byte word of the running block's dynamic shared memory (views of different types may
// overlap). Accesses past the launch's dynamic shared memory are reported too.
template <typename T>
class DynamicPtr {
 public:
  explicit DynamicPtr(long long byte_offset) : off_(byte_offset) {}
  class Ref {
   public:
    explicit Ref(long long off) : off_(off) {}
    operator T() const {
      T v;
      access(off_, false, &v);
      return v;
    }
    Ref& operator=(T v) {
      access(off_, true, &v);
      return *this;
    }
    Ref& operator=(const Ref& other) { return *this = static_cast<T>(other); }

   private:
    long long off_;
  };
  Ref operator[](long long i) const { return Ref(off_ + i * static_cast<long long>(sizeof(T))); }
  Ref operator*() const { return Ref(off_); }
  DynamicPtr operator+(long long k) const { return DynamicPtr(off_ + k * static_cast<long long>(sizeof(T))); }
  DynamicPtr& operator+=(long long k) {
    off_ += k * static_cast<long long>(sizeof(T));
    return *this;
  }
  long long byte_offset() const { return off_; }

 private:
  [[noreturn]] static void report(long long off, const char* what) {
    std::fprintf(stderr,
                 "qcs emulation%s: kernel %s, block (%u, %u, %u), thread %u: dynamic shared memory at byte %lld: %s\n",
                 std::strstr(what, "race") != nullptr ? " race" : "", tl_kernel, blockIdx.x, blockIdx.y, blockIdx.z,
                 tl_linear, off, what);
    std::fflush(stderr);
    std::abort();
  }
  // Reads (write false) or writes one T at byte `off`, checking every word it covers.
  static void access(long long off, bool write, T* value) {
    BlockState& st = *tl_block;
    if (off < 0 || static_cast<std::size_t>(off) + sizeof(T) > st.smem_bytes)
      report(off, "out of range of the launch's dynamic shared memory");
    const SharedAccess now = this_access();
    char what[160];
    std::lock_guard<std::mutex> lock(st.dynamic_mutex);
    for (std::size_t w = static_cast<std::size_t>(off) / 4; w <= (static_cast<std::size_t>(off) + sizeof(T) - 1) / 4;
         ++w) {
      DynamicWord& word = st.dynamic_words[w];
      if (word.written && !ordered(word.last_write, now)) {
        std::snprintf(what, sizeof(what), "race: thread %u wrote it and thread %u %s it with no barrier between",
                      word.last_write.thread, tl_linear, write ? "wrote" : "read");
        report(off, what);
      }
      if (write) {
        for (const SharedAccess& r : word.readers)
          if (!ordered(r, now)) {
            std::snprintf(what, sizeof(what), "race: thread %u read it and thread %u wrote it with no barrier between",
                          r.thread, tl_linear);
            report(off, what);
          }
        word.readers.clear();
        word.written = true;
        word.last_write = now;
      } else {
        word.readers.push_back(now);
      }
    }
    if (write) std::memcpy(st.smem + off, value, sizeof(T));
    else std::memcpy(value, st.smem + off, sizeof(T));
  }
  long long off_;
};

// The handle QCS_DYNAMIC_SMEM declares: views of the running block's dynamic shared memory.
struct DynamicSmem {
  template <typename T>
  DynamicPtr<T> view() const {
    return DynamicPtr<T>(0);
  }
};

}  // namespace qcs_emu

// Raises a kernel's dynamic shared memory limit, as the CUDA runtime call does.
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<std::size_t>(value) > qcs_emu::kMaxOptInSmem)
    return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(qcs_emu::smem_opt_in_mutex());
  qcs_emu::smem_opt_in()[reinterpret_cast<const void*>(kernel)] = static_cast<std::size_t>(value);
  return cudaSuccess;
}

inline int __ffs(int x) { return __builtin_ffs(x); }

inline void __syncthreads() {
  qcs_emu::tl_block->block.arrive_and_wait();
  ++qcs_emu::tl_block_epoch;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  qcs_emu::check_mask(mask, "__syncwarp");
  qcs_emu::tl_block->warp[qcs_emu::warp_id()]->arrive_and_wait();
  ++qcs_emu::tl_warp_epoch;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_sync(unsigned member_mask, T v, int src, int width = 32) {
  qcs_emu::check_mask(member_mask, "__shfl_sync");
  const int l = static_cast<int>(qcs_emu::lane());
  return qcs_emu::shuffle_from(v, (l / width) * width + (src % width), true);
}
template <typename T>
T __shfl_down_sync(unsigned member_mask, T v, unsigned delta, int width = 32) {
  qcs_emu::check_mask(member_mask, "__shfl_down_sync");
  const int l = static_cast<int>(qcs_emu::lane());
  const int src = l + static_cast<int>(delta);
  return qcs_emu::shuffle_from(v, src, src / width == l / width);
}
template <typename T>
T __shfl_up_sync(unsigned member_mask, T v, unsigned delta, int width = 32) {
  qcs_emu::check_mask(member_mask, "__shfl_up_sync");
  const int l = static_cast<int>(qcs_emu::lane());
  const int src = l - static_cast<int>(delta);
  return qcs_emu::shuffle_from(v, src, src >= 0 && src / width == l / width);
}
template <typename T>
T __shfl_xor_sync(unsigned member_mask, T v, int mask, int width = 32) {
  qcs_emu::check_mask(member_mask, "__shfl_xor_sync");
  const int l = static_cast<int>(qcs_emu::lane());
  const int src = l ^ mask;
  return qcs_emu::shuffle_from(v, src, src / width == l / width);
}
inline unsigned __ballot_sync(unsigned member_mask, int predicate) {
  qcs_emu::check_mask(member_mask, "__ballot_sync");
  const uint64_t* buf = qcs_emu::warp_exchange(predicate ? 1u : 0u);
  unsigned bits = 0;
  for (unsigned l = 0; l < qcs_emu::warp_lanes(); ++l) bits |= (buf[l] ? 1u : 0u) << l;
  return bits;
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
T atomicMax(T* address, T value) {  // integers only, as on the GPU
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old > value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;
}

// `QCS_LAUNCH(grid, block, smem, stream, kernel)(args...)`: kernel<<<grid, block, smem, stream>>>.
#define QCS_LAUNCH(grid, block, smem, stream, ...) \
  ::qcs_emu::Launch{dim3(grid), dim3(block), static_cast<std::size_t>(smem), #__VA_ARGS__}.bind(&__VA_ARGS__)
// Dynamic shared memory of the running block (extern __shared__ on the GPU), used through
// race-checked views: QCS_SMEM_VIEW(T, name) is `(T*)name` on the GPU.
#define QCS_DYNAMIC_SMEM(name) \
  const ::qcs_emu::DynamicSmem name {}
#define QCS_SMEM_VIEW(T, raw) (raw).template view<T>()
// A race-checked shared array (`__shared__ T name[N]` on the GPU).
#define QCS_SHARED_ARRAY(T, name, N) static ::qcs_emu::SharedArray<T, (N)> name(#name)

// The warp-level matrix API (nvcuda::wmma), emulated with the hardware's input rounding.
#include "wmma_emulation.h"
