// Controls for tsan_openmp.cpp (run by tests/test_sanitizers.py), built with
// -fopenmp -fsanitize=thread against the system's uninstrumented libgomp:
//
//   ./control         a correctly synchronised program in the shape of at::parallel_for:
//                     the caller writes, the members of a parallel region read it and write
//                     disjoint slices, the caller reads their results after the region.
//                     With tsan_openmp.cpp linked in: no report. Without it: TSan reports
//                     races (libgomp's fork/join is invisible to it), which is why the shim
//                     exists.
//   ./control race    the same, plus one word every member writes unsynchronised: TSan must
//                     report it even with the shim (members are not ordered by it).
#include <omp.h>

#include <cstdio>
#include <cstring>
#include <vector>

int main(int argc, char** argv) {
  const bool race = argc > 1 && std::strcmp(argv[1], "race") == 0;
  omp_set_dynamic(0);
  omp_set_num_threads(4);
  std::vector<double> data(4096);
  long counter = 0;
  double checksum = 0;
  for (int round = 0; round < 3; ++round) {
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = round + static_cast<double>(i);
    std::vector<double> partial(4, 0.0);
#pragma omp parallel
    {
      const int t = omp_get_thread_num(), n = omp_get_num_threads();
      double acc = 0;
      for (std::size_t i = static_cast<std::size_t>(t); i < data.size(); i += static_cast<std::size_t>(n)) {
        acc += data[i];
        data[i] *= 2;
      }
      partial[static_cast<std::size_t>(t)] = acc;
      if (race) counter += 1;
    }
    for (double p : partial) checksum += p;
    for (double d : data) checksum -= d / 2;
  }
  std::printf("checksum %g counter %ld\n", checksum, counter);
  return checksum == 0 ? 0 : 1;
}
