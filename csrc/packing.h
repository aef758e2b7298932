// Multipack planner: one epoch of sample lengths -> optimizer steps -> ranks -> micro-batches.
//
// The epoch is a seeded permutation of all samples, cut into steps of exactly
// effective_batch_size samples (the last step keeps the remainder). Each step's samples are
// packed longest-first into world_size x m micro-batches ("bins") of at most max_batch_len
// tokens, with m the smallest count the heuristics reach starting from the lower bound
// ceil(step_tokens / (world_size * max_batch_len)). Every rank gets the same m, so no
// collective can hang; a bin may be empty when a step has fewer samples than bins.
//
// The plan is a pure function of its inputs: the permutation uses its own generator
// (splitmix64), and every choice breaks ties by index, so all ranks and all runs agree.
// kernels_ref.plan_epoch is a numba twin that must return identical arrays.
#pragma once
#include <cstdint>
#include <vector>

namespace instructpack {

struct PlanOptions {
  int64_t effective_batch_size = 0;  // samples per optimizer step, across all ranks
  int64_t max_batch_len = 0;         // most tokens per rank per micro-batch
  int64_t world_size = 1;
  uint64_t seed = 0;
  uint64_t epoch = 0;
  // Budget bins as padded rows (longest sample x number of samples) instead of tokens,
  // for models that cannot take packed rows.
  bool padded = false;
};

struct EpochPlan {
  std::vector<int64_t> sample_ids;      // every sample once, in bin order
  std::vector<int64_t> bin_begin;       // num_bins + 1 boundaries into sample_ids
  std::vector<int64_t> step_bin_begin;  // num_steps + 1: a step's bins, rank-major
                                        // (rank r's micro-batch j is bin begin + r*m + j)
  std::vector<int64_t> lower_bound;     // per step: ceil(step_tokens / (world_size * max_batch_len))
};

// Throws std::invalid_argument for settings that cannot be planned (no samples, a sample
// longer than max_batch_len, effective_batch_size < world_size, ...).
EpochPlan plan_epoch(const int64_t* lengths, int64_t num_samples, const PlanOptions& options);

// The epoch's sample order (Fisher-Yates over splitmix64), exposed for tests.
std::vector<int64_t> epoch_permutation(int64_t num_samples, uint64_t seed, uint64_t epoch);

}  // namespace instructpack
