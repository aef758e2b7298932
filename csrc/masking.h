// Label masks from token character offsets and trained character spans.
#pragma once
#include <cstdint>

namespace instructpack {

// For every sample s, tokens [tok_begin[s], tok_begin[s+1]) carry character offsets
// (starts[t], ends[t]) into the rendered text, and spans [span_begin[s], span_begin[s+1])
// are the trained character ranges [span_starts[k], span_ends[k]), sorted and disjoint.
// A token is trained when its range overlaps a trained span. A token whose offsets are
// empty (start == end, as byte-level tokenizers report for trimmed whitespace) counts as
// covering the character at `start`, so it follows the text it sits in.
// Writes mask[t] in {0, 1} and trained[s] = number of trained tokens of sample s.
void label_mask(const int64_t* starts, const int64_t* ends, const int64_t* tok_begin,
                const int64_t* span_starts, const int64_t* span_ends, const int64_t* span_begin,
                int64_t num_samples, uint8_t* mask, int64_t* trained);

}  // namespace instructpack

namespace instructpack {

// Byte offsets of tokens computed from their ids, for byte-level BPE tokenizers where the
// text's UTF-8 bytes are exactly the concatenation of the tokens' bytes. byte_len[id] is
// the number of bytes token `id` stands for, or -1 when unknown. Offsets restart at 0 for
// each sample; total_bytes[s] is the sample's byte count, or -1 if any token was unknown,
// so the caller can check it against the text and fall back to the tokenizer's offsets.
void token_byte_offsets(const uint32_t* ids, const int64_t* tok_begin, int64_t num_samples, const int32_t* byte_len,
                        int64_t vocab_size, int64_t* starts, int64_t* ends, int64_t* total_bytes);

}  // namespace instructpack
