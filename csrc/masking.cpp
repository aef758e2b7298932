#include "masking.h"

#include <algorithm>

namespace instructpack {

void label_mask(const int64_t* starts, const int64_t* ends, const int64_t* tok_begin,
                const int64_t* span_starts, const int64_t* span_ends, const int64_t* span_begin,
                int64_t num_samples, uint8_t* mask, int64_t* trained) {
  for (int64_t s = 0; s < num_samples; ++s) {
    const int64_t* span_end_first = span_ends + span_begin[s];
    const int64_t* span_end_last = span_ends + span_begin[s + 1];
    int64_t count = 0;
    for (int64_t t = tok_begin[s]; t < tok_begin[s + 1]; ++t) {
      const int64_t lo = starts[t];
      const int64_t hi = std::max(ends[t], lo + 1);
      // Spans are disjoint and sorted, so their ends are sorted too: the first span that
      // ends after `lo` is the only candidate for an overlap.
      const int64_t* k = std::upper_bound(span_end_first, span_end_last, lo);
      const bool hit = k != span_end_last && span_starts[k - span_ends] < hi;
      mask[t] = hit ? 1 : 0;
      count += hit;
    }
    trained[s] = count;
  }
}

}  // namespace instructpack

namespace instructpack {

void token_byte_offsets(const uint32_t* ids, const int64_t* tok_begin, int64_t num_samples, const int32_t* byte_len,
                        int64_t vocab_size, int64_t* starts, int64_t* ends, int64_t* total_bytes) {
  for (int64_t s = 0; s < num_samples; ++s) {
    int64_t pos = 0;
    bool known = true;
    for (int64_t t = tok_begin[s]; t < tok_begin[s + 1]; ++t) {
      const int64_t id = ids[t];
      const int32_t n = id < vocab_size ? byte_len[id] : -1;
      known = known && n >= 0;
      starts[t] = pos;
      pos += n > 0 ? n : 0;
      ends[t] = pos;
    }
    total_bytes[s] = known ? pos : -1;
  }
}

}  // namespace instructpack
