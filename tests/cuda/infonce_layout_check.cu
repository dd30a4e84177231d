// Host-side check of csrc/kernels/infonce_mma.cuh's index math (CuTe layouts and partitions are
// host-callable, so no GPU is needed): built and run by tests/test_infonce_layouts.py.
//   * the swizzled shared-memory layouts are bijections, and every 16-byte group the loaders
//     write (8 consecutive k of a K-major chunk, 8 consecutive d of the N-major slab) is 8
//     consecutive, 8-aligned offsets: one cp.async / uint4 store;
//   * X's slot s starts s chunks in (resident X indexes slots by chunk);
//   * the TiledMMAs' C partitions (what the epilogues use to place each accumulator) cover the
//     64×64 S tile and the 64×256 H·Y slab exactly once over the 256 threads;
//   * the resident-X threshold and X's slot count agree, and the forward's shared memory fits.
#include "infonce_mma.cuh"

#include <cstdio>
#include <vector>

using namespace lk::infonce_detail;
using namespace lk::infonce_detail::mma16;

static int fails = 0;
#define CHECK(c, ...)                              \
  do {                                             \
    if (!(c) && fails++ < 20) std::printf(__VA_ARGS__); \
  } while (0)

// contiguous_first: the 16-byte groups run along the first coordinate (the slab's d), else the second (k).
template <class L>
void groups(const char* name, int R, int C, bool contiguous_first) {
  L lay{};
  std::vector<int> hit(R * C, 0);
  for (int a = 0; a < R; ++a)
    for (int b = 0; b < C; ++b) {
      const int o = lay(a, b);
      CHECK(o >= 0 && o < R * C, "%s: offset out of range\n", name);
      if (o >= 0 && o < R * C) hit[o]++;
    }
  for (int i = 0; i < R * C; ++i) CHECK(hit[i] == 1, "%s: offset %d hit %d times\n", name, i, hit[i]);
  for (int a = 0; a < R; ++a)
    for (int b = 0; b < C; ++b) {
      if ((contiguous_first ? a : b) % 8 != 0) continue;
      const int o0 = lay(a, b);
      CHECK(o0 % 8 == 0, "%s: group (%d, %d) starts at %d\n", name, a, b, o0);
      for (int v = 1; v < 8; ++v)
        CHECK((contiguous_first ? lay(a + v, b) : lay(a, b + v)) == o0 + v, "%s: group (%d, %d) split\n", name, a, b);
    }
  std::printf("%s: bijection, 16-byte groups contiguous\n", name);
}

template <class M, int R, int C>
void cover(const char* name, int per_thread) {
  M mma{};
  std::vector<int> hit(R * C, 0);
  for (int t = 0; t < 256; ++t) {
    auto coord = mma.get_slice(t).partition_C(make_identity_tensor(Shape<Int<R>, Int<C>>{}));
    CHECK(int(size(coord)) == per_thread, "%s: thread %d holds %d accumulators\n", name, t, int(size(coord)));
    for (int e = 0; e < size(coord); ++e) hit[int(get<0>(coord(e))) * C + int(get<1>(coord(e)))]++;
  }
  for (int i = 0; i < R * C; ++i) CHECK(hit[i] == 1, "%s: entry %d owned %d times\n", name, i, hit[i]);
  std::printf("%s: %d accumulators a thread, the C partition covers %dx%d once\n", name, per_thread, R, C);
}

int main() {
  groups<KChunk>("KChunk (row, k)", 64, 64, false);
  groups<SlabLayout<256>>("SlabLayout<256> (d, k)", 256, 64, true);
  groups<SlabLayout<512>>("SlabLayout<512> (d, k)", 512, 64, true);
  for (int s = 0; s < kResidentChunks; ++s)
    for (int r = 0; r < 64; ++r)
      for (int k = 0; k < 64; ++k)
        CHECK(KChunks<kResidentChunks>{}(r, k, s) == s * kChunk * kChunk + KChunk{}(r, k), "slot %d\n", s);
  cover<SMma<__half>, 64, 64>("SMma", 16);
  cover<HYMma<__half, 256>, 64, 256>("HYMma<256>", 64);
  cover<HYMma<__half, 512>, 64, 512>("HYMma<512>", 128);
  cover<SMma<__nv_bfloat16>, 64, 64>("SMma bf16", 16);
  for (int64_t D = 0; D <= 1100; ++D) {
    const int64_t nk = (D + kChunk - 1) / kChunk, slots = x_slots(D);
    const bool res = D <= kResidentD;
    CHECK(res ? slots >= nk && slots <= kResidentChunks : slots == 2, "D=%ld: %ld X slots\n", long(D), long(slots));
    CHECK(slots * kChunkBytes + kYBytes + 2 * 2048 <= 113 * 1024, "D=%ld: forward shared memory\n", long(D));
  }
  std::printf("x_slots / kResidentD = %ld consistent for D <= 1100\n", long(kResidentD));
  std::printf(fails ? "FAILED: %d\n" : "all checks passed\n", fails);
  return fails != 0;
}
