// OpenMP fork/join made visible to ThreadSanitizer, for the TSan build of qcs_ext._C
// (qcs_tools/sanitize.py links this file into that build only).
//
// at::parallel_for is an inline OpenMP template: our code calls libgomp's GOMP_parallel,
// and libgomp (torch's copy, not instrumented) hands the outlined body to its pool
// threads and joins them with futexes and atomics TSan cannot see. Without help every
// parallel_for would be reported as a race between the caller's writes before the region
// and the workers' reads in it. This file defines GOMP_parallel for this shared object
// only (hidden visibility: torch's own calls are untouched) and forwards to libgomp's,
// adding exactly the two orderings the OpenMP standard guarantees for a parallel region:
//   fork: everything the calling thread did before the region happens-before each member's
//         body (release on `fork` before, acquire in every member first);
//   join: each member's body happens-before the caller's return from the region (release
//         on `join` at the end of each body, acquire after the region).
// Members are NOT ordered with one another (each acquires only `fork`, which only the
// caller releases), so races between the threads of one region are still reported. The
// sync addresses live in a per-call frame, so concurrent regions from different callers do
// not order each other either. qcs_tools/sanitize.py checks that GOMP_parallel is the only
// libgomp synchronisation entry the build imports (barriers, critical sections, loops
// would need their own annotations).
//
// QCS_TSAN_OPENMP_ANNOTATIONS=0 turns the annotations off (plain forwarding): the negative
// control of tests/test_sanitizers.py, where TSan must then report the op's parallel_for.
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

using ParallelEntry = void (*)(void (*)(void*), void*, unsigned, unsigned);

struct Region {
  void (*body)(void*);
  void* data;
  char fork;  // addresses used as TSan sync objects; never read or written
  char join;
};

void run_member(void* arg) {
  auto* region = static_cast<Region*>(arg);
  __tsan_acquire(&region->fork);
  region->body(region->data);
  __tsan_release(&region->join);
}

ParallelEntry libgomp_parallel() {
  static const ParallelEntry entry = [] {
    void* sym = dlsym(RTLD_NEXT, "GOMP_parallel");
    if (sym == nullptr) {  // not in our lookup scope: take the already loaded libgomp's
      void* lib = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
      sym = lib ? dlsym(lib, "GOMP_parallel") : nullptr;
    }
    if (sym == nullptr) {
      std::fprintf(stderr, "tsan_openmp.cpp: libgomp's GOMP_parallel not found\n");
      std::abort();
    }
    return reinterpret_cast<ParallelEntry>(sym);
  }();
  return entry;
}

bool annotations_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("QCS_TSAN_OPENMP_ANNOTATIONS");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return enabled;
}

}  // namespace

extern "C" __attribute__((visibility("hidden"))) void GOMP_parallel(void (*body)(void*), void* data,
                                                                    unsigned num_threads, unsigned flags) {
  if (!annotations_enabled()) {
    libgomp_parallel()(body, data, num_threads, flags);
    return;
  }
  Region region{body, data, 0, 0};
  __tsan_release(&region.fork);
  libgomp_parallel()(run_member, &region, num_threads, flags);
  __tsan_acquire(&region.join);
}
