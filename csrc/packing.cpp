#include "packing.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

namespace instructpack {
namespace {

// Sorts a step's samples by length, longest first, keeping equal lengths in the given
// order: an LSD radix sort on the length's bytes (stable, O(n) per byte that varies).
void longest_first(const int64_t* lengths, const int64_t* step, int64_t n, std::vector<int64_t>& ids,
                   std::vector<int64_t>& lens, std::vector<int64_t>& scratch) {
  ids.assign(step, step + n);
  lens.resize(n);
  int64_t longest = 0;
  for (int64_t i = 0; i < n; ++i) longest = std::max(longest, lens[i] = lengths[step[i]]);
  scratch.resize(2 * n);
  int64_t* tmp_ids = scratch.data();
  int64_t* tmp_lens = scratch.data() + n;
  for (int shift = 0; shift < 64 && (longest >> shift) > 0; shift += 8) {
    int64_t start[257] = {};
    for (int64_t i = 0; i < n; ++i) ++start[256 - ((lens[i] >> shift) & 0xFF)];  // descending digits
    for (int d = 1; d <= 256; ++d) start[d] += start[d - 1];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t at = start[255 - ((lens[i] >> shift) & 0xFF)]++;
      tmp_ids[at] = ids[i];
      tmp_lens[at] = lens[i];
    }
    std::copy(tmp_ids, tmp_ids + n, ids.begin());
    std::copy(tmp_lens, tmp_lens + n, lens.begin());
  }
}

struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n) without modulo bias: reject the lowest 2^64 mod n draws.
  uint64_t below(uint64_t n) {
    const uint64_t threshold = (0 - n) % n;
    for (;;) {
      const uint64_t r = next();
      if (r >= threshold) return r % n;
    }
  }
};

// One micro-batch of one rank while a step is being packed. `load` is what the budget
// counts: tokens, or for padded rows longest x count (the first sample placed is the
// longest, because samples arrive longest-first).
struct Bin {
  int64_t load = 0, count = 0, first = 0;
};

int64_t load_after(const Bin& b, int64_t length, bool padded) {
  if (!padded) return b.load + length;
  return (b.count == 0 ? length : b.first) * (b.count + 1);
}

void place(Bin& b, int64_t length, bool padded) {
  b.load = load_after(b, length, padded);
  if (b.count == 0) b.first = length;
  ++b.count;
}

// Worst fit: each sample goes to the least-loaded bin (ties: lowest index), which keeps all
// bins, and so all ranks and all micro-batch positions, level. A binary min-heap of bin
// indices keyed by (load, index); only the top ever changes, so one sift-down per sample.
bool worst_fit(const int64_t* lengths, int64_t n, int64_t num_bins, int64_t cap, bool padded, std::vector<Bin>& bins,
               std::vector<int64_t>& bin_of) {
  bins.assign(num_bins, Bin{});
  std::vector<int64_t> heap(num_bins);
  std::iota(heap.begin(), heap.end(), 0);  // all loads 0: index order is already a heap
  auto less = [&](int64_t a, int64_t b) { return bins[a].load < bins[b].load || (bins[a].load == bins[b].load && a < b); };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t top = heap[0];
    if (load_after(bins[top], lengths[i], padded) > cap) return false;
    place(bins[top], lengths[i], padded);
    bin_of[i] = top;
    for (int64_t at = 0;;) {  // sift the grown top down
      const int64_t l = 2 * at + 1, r = l + 1;
      int64_t smallest = at;
      if (l < num_bins && less(heap[l], heap[smallest])) smallest = l;
      if (r < num_bins && less(heap[r], heap[smallest])) smallest = r;
      if (smallest == at) break;
      std::swap(heap[at], heap[smallest]);
      at = smallest;
    }
  }
  return true;
}

// Best fit within ranks, for steps too full for worst fit: each sample goes to the
// least-loaded rank (ties: lowest rank) that has room, into that rank's fullest bin that
// still fits it (ties: lowest bin). Tight bins leave room for the long samples to come,
// while the rank choice keeps the ranks' totals level.
//
// Token budgets: a bin fits when load <= cap - length, so each rank keeps its bins sorted
// by (load descending, index) and the best fit is a binary search. Padded budgets are not
// monotone in the load (a bin's cost depends on its longest sample), so they scan.
bool best_fit_by_rank(const int64_t* lengths, int64_t n, int64_t world_size, int64_t m, int64_t cap, bool padded,
                      std::vector<Bin>& bins, std::vector<int64_t>& bin_of) {
  bins.assign(world_size * m, Bin{});
  std::vector<int64_t> rank_load(world_size, 0);
  std::vector<int64_t> sorted(world_size * m);  // per rank: its bins by (load desc, index)
  std::iota(sorted.begin(), sorted.end(), 0);
  auto fuller = [&](int64_t a, int64_t b) { return bins[a].load > bins[b].load || (bins[a].load == bins[b].load && a < b); };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t x = lengths[i];
    int64_t best_rank = -1, best_bin = -1, best_at = -1;
    for (int64_t r = 0; r < world_size; ++r) {
      if (best_rank >= 0 && rank_load[r] >= rank_load[best_rank]) continue;
      int64_t fit = -1, fit_at = -1;
      if (!padded) {
        const auto first = sorted.begin() + r * m, last = first + m;
        const auto at = std::partition_point(first, last, [&](int64_t b) { return bins[b].load > cap - x; });
        if (at != last) {
          fit = *at;
          fit_at = at - sorted.begin();
        }
      } else {
        int64_t fit_load = 0;
        for (int64_t b = r * m; b < (r + 1) * m; ++b) {
          const int64_t after = load_after(bins[b], x, padded);
          if (after <= cap && (fit < 0 || after > fit_load)) {
            fit = b;
            fit_load = after;
          }
        }
      }
      if (fit >= 0) {
        best_rank = r;
        best_bin = fit;
        best_at = fit_at;
      }
    }
    if (best_bin < 0) return false;
    rank_load[best_rank] += load_after(bins[best_bin], x, padded) - bins[best_bin].load;
    place(bins[best_bin], x, padded);
    bin_of[i] = best_bin;
    if (!padded)  // the bin grew: move it forward to keep its rank's order
      for (int64_t at = best_at; at > best_rank * m && fuller(sorted[at], sorted[at - 1]); --at)
        std::swap(sorted[at], sorted[at - 1]);
  }
  return true;
}

}  // namespace

std::vector<int64_t> epoch_permutation(int64_t num_samples, uint64_t seed, uint64_t epoch) {
  std::vector<int64_t> order(num_samples);
  std::iota(order.begin(), order.end(), 0);
  SplitMix64 rng{seed};
  rng.state = rng.next() ^ (epoch * 0xD1B54A32D192ED03ULL);  // one stream per (seed, epoch)
  for (int64_t i = num_samples - 1; i > 0; --i) std::swap(order[i], order[rng.below(static_cast<uint64_t>(i) + 1)]);
  return order;
}

EpochPlan plan_epoch(const int64_t* lengths, int64_t num_samples, const PlanOptions& o) {
  if (num_samples <= 0) throw std::invalid_argument("cannot plan an empty dataset");
  if (o.world_size < 1) throw std::invalid_argument("world_size must be at least 1");
  if (o.effective_batch_size < o.world_size)
    throw std::invalid_argument("effective_batch_size must be at least world_size");
  if (o.max_batch_len < 1) throw std::invalid_argument("max_batch_len must be at least 1");
  for (int64_t i = 0; i < num_samples; ++i)
    if (lengths[i] < 0 || lengths[i] > o.max_batch_len)
      throw std::invalid_argument("sample " + std::to_string(i) + " has " + std::to_string(lengths[i]) +
                                  " tokens, more than max_batch_len " + std::to_string(o.max_batch_len));

  const std::vector<int64_t> order = epoch_permutation(num_samples, o.seed, o.epoch);
  const int64_t W = o.world_size, cap = o.max_batch_len;
  EpochPlan plan;
  plan.sample_ids.reserve(num_samples);
  plan.bin_begin.push_back(0);
  plan.step_bin_begin.push_back(0);

  std::vector<int64_t> ids, lens, bin_of, fill, bin_order, scratch;
  std::vector<Bin> bins;
  for (int64_t first = 0; first < num_samples; first += o.effective_batch_size) {
    const int64_t n = std::min(o.effective_batch_size, num_samples - first);
    // Longest first, equal lengths in permutation order.
    longest_first(lengths, order.data() + first, n, ids, lens, scratch);
    int64_t tokens = 0;
    for (int64_t i = 0; i < n; ++i) tokens += lens[i];
    const int64_t lower = std::max<int64_t>(1, (tokens + W * cap - 1) / (W * cap));

    bin_of.resize(n);
    int64_t m = lower;  // terminates: with m*W >= n every sample gets an empty bin
    while (!worst_fit(lens.data(), n, W * m, cap, o.padded, bins, bin_of) &&
           !best_fit_by_rank(lens.data(), n, W, m, cap, o.padded, bins, bin_of))
      ++m;

    // Each rank runs its fullest micro-batches first, so position j is level across ranks.
    bin_order.resize(W * m);
    std::iota(bin_order.begin(), bin_order.end(), 0);
    for (int64_t r = 0; r < W; ++r)
      std::stable_sort(bin_order.begin() + r * m, bin_order.begin() + (r + 1) * m,
                       [&](int64_t a, int64_t b) { return bins[a].load > bins[b].load; });
    // Lay the samples out bin by bin, each bin keeping the longest-first order.
    std::vector<int64_t> slot_of_bin(W * m);
    for (int64_t s = 0; s < W * m; ++s) slot_of_bin[bin_order[s]] = s;
    const size_t base = plan.sample_ids.size();
    fill.assign(W * m + 1, 0);
    for (int64_t s = 0; s < W * m; ++s) fill[s + 1] = fill[s] + bins[bin_order[s]].count;
    for (int64_t s = 0; s < W * m; ++s) plan.bin_begin.push_back(static_cast<int64_t>(base) + fill[s + 1]);
    plan.sample_ids.resize(base + n);
    for (int64_t i = 0; i < n; ++i) plan.sample_ids[base + fill[slot_of_bin[bin_of[i]]]++] = ids[i];
    plan.step_bin_begin.push_back(plan.step_bin_begin.back() + W * m);
    plan.lower_bound.push_back(lower);
  }
  return plan;
}

}  // namespace instructpack
