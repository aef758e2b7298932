// Token shards: one file holds a header, the token ids, a per-token trained mask and a
// per-sample index. Layout (little-endian, every section 8-byte aligned):
//
//   [0, 64)            header: magic "IPKSHRD\0", u32 version, u32 token_bytes (2|4),
//                      u64 num_samples, u64 num_tokens, u64 tokens_offset (= 64),
//                      u64 mask_offset, u64 index_offset, u64 checksum
//   tokens_offset      num_tokens x u16|u32 token ids
//   mask_offset        num_tokens x u8, 1 where the token is trained
//   index_offset       u64 offsets[n], u32 lengths[n], u32 trained[n], u64 source_lines[n]
//
// The checksum covers every byte after the header, so corruption anywhere is detectable
// by verify(); opening checks only the header and sizes, which is O(1).
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace instructpack {

constexpr char kShardMagic[8] = {'I', 'P', 'K', 'S', 'H', 'R', 'D', '\0'};
constexpr uint32_t kShardVersion = 1;
constexpr uint64_t kHeaderBytes = 64;

struct ShardError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct ShardLayout {
  uint32_t token_bytes = 0;
  uint64_t num_samples = 0, num_tokens = 0;
  uint64_t tokens_offset = 0, mask_offset = 0, index_offset = 0, file_size = 0;
};

// The one place that decides where each section lives.
ShardLayout shard_layout(uint32_t token_bytes, uint64_t num_samples, uint64_t num_tokens);

// 64-bit checksum: h = (h ^ word) * prime over little-endian 8-byte words (the tail is
// zero-padded), then mixed with the length. Each step is a bijection of h, so changing any
// single word always changes the result. Streaming: update() takes pieces of any size.
class Checksum64 {
 public:
  void update(const uint8_t* data, uint64_t size);
  uint64_t finish() const;

 private:
  uint64_t h_ = 0xcbf29ce484222325ULL;
  uint64_t size_ = 0;
  uint8_t carry_[8] = {};
  uint32_t carried_ = 0;
};
uint64_t checksum64(const uint8_t* data, uint64_t size);

// Streams one shard to disk in O(1) memory: tokens go straight to the file, the mask and
// index to side files that close() appends, then the header is written last. A shard
// whose close() never ran has no valid header, so it can never be read as complete.
class ShardWriter {
 public:
  ShardWriter(const std::string& path, uint32_t token_bytes);
  ~ShardWriter();
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  void append(const void* tokens, const uint8_t* mask, uint64_t num_tokens, const uint32_t* lengths,
              const uint32_t* trained, const uint64_t* source_lines, uint64_t num_samples);
  // Finishes the file (fsync'd) and returns its checksum.
  uint64_t close();
  uint64_t num_samples() const { return num_samples_; }
  uint64_t num_tokens() const { return num_tokens_; }
  uint32_t token_bytes() const { return token_bytes_; }

 private:
  std::string path_;
  uint32_t token_bytes_;
  int fd_ = -1, mask_fd_ = -1, index_fd_ = -1;
  uint64_t num_samples_ = 0, num_tokens_ = 0;
  Checksum64 sum_;
  bool closed_ = false;
};

// A read-only memory map of one shard, validated in O(1) on open.
class Shard {
 public:
  explicit Shard(const std::string& path);
  ~Shard();
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;
  Shard(Shard&& other) noexcept;

  const std::string& path() const { return path_; }
  const ShardLayout& layout() const { return layout_; }
  const uint8_t* base() const { return base_; }
  const uint8_t* mask() const { return base_ + layout_.mask_offset; }
  const uint64_t* offsets() const;
  const uint32_t* lengths() const;
  const uint32_t* trained() const;
  const uint64_t* source_lines() const;
  uint64_t stored_checksum() const;
  uint32_t token(uint64_t i) const;

  // O(size): the checksum and the index (contiguous offsets, trained <= length).
  void verify() const;
  // Bounds of sample i inside the token section, checked against a corrupt index.
  void sample_range(uint64_t i, uint64_t* offset, uint64_t* length) const;

 private:
  std::string path_;
  ShardLayout layout_;
  uint8_t* base_ = nullptr;
  size_t mapped_ = 0;
};

// Where one sample's tokens lie: its shard and its range there (bounds-checked).
struct SampleSpan {
  const Shard* shard = nullptr;
  uint64_t offset = 0, length = 0;
};

// Several shards seen as one dataset with global sample numbers.
class ShardSet {
 public:
  explicit ShardSet(const std::vector<std::string>& paths);
  uint64_t num_samples() const { return sample_begin_.back(); }
  const std::vector<Shard>& shards() const { return shards_; }
  SampleSpan span(int64_t id) const;
  // Total tokens of the given samples (for sizing output buffers).
  uint64_t count_tokens(const int64_t* ids, uint64_t n) const;
  // Concatenates samples into caller-provided buffers of count_tokens() tokens:
  // input ids, labels (the id where trained, -100 elsewhere), positions restarting at 0
  // per sample, and cu_seqlens (n + 1 boundaries). With shift_labels, labels[j] is the
  // target of position j (token j + 1 of the same sample, -100 at each sample's end).
  void gather(const int64_t* ids, uint64_t n, bool shift_labels, int64_t* input_ids, int64_t* labels,
              int64_t* position_ids, int32_t* cu_seqlens) const;

 private:
  void locate(int64_t id, const Shard** shard, uint64_t* local) const;
  std::vector<Shard> shards_;
  std::vector<uint64_t> sample_begin_;  // global number of each shard's first sample, + total
};

}  // namespace instructpack
