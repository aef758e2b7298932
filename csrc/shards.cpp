#include "shards.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>

namespace instructpack {
namespace {

constexpr uint64_t kPrime = 0x100000001b3ULL;
// Far above any real shard, small enough that section arithmetic cannot overflow.
constexpr uint64_t kMaxCount = uint64_t{1} << 40;

uint64_t align8(uint64_t x) { return (x + 7) & ~uint64_t{7}; }

template <typename T>
T read_at(const uint8_t* base, uint64_t offset) {
  T value;
  std::memcpy(&value, base + offset, sizeof(T));
  return value;
}

std::string errno_text() { return std::strerror(errno); }

class File {  // closes on every exit path, so errors never leak descriptors
 public:
  File(const std::string& path, int flags, int mode = 0) : fd_(::open(path.c_str(), flags, mode)) {}
  ~File() {
    if (fd_ >= 0) ::close(fd_);
  }
  int fd() const { return fd_; }

 private:
  int fd_;
};

void write_all(int fd, const void* data, uint64_t size, const std::string& path) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd, p, static_cast<size_t>(std::min<uint64_t>(size, 1u << 30)));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw ShardError(path + ": write failed: " + errno_text());
    }
    p += n;
    size -= static_cast<uint64_t>(n);
  }
}

}  // namespace

ShardLayout shard_layout(uint32_t token_bytes, uint64_t num_samples, uint64_t num_tokens) {
  ShardLayout l;
  l.token_bytes = token_bytes;
  l.num_samples = num_samples;
  l.num_tokens = num_tokens;
  l.tokens_offset = kHeaderBytes;
  l.mask_offset = align8(l.tokens_offset + num_tokens * token_bytes);
  l.index_offset = align8(l.mask_offset + num_tokens);
  l.file_size = l.index_offset + num_samples * 24;
  return l;
}

void Checksum64::update(const uint8_t* data, uint64_t size) {
  size_ += size;
  if (carried_ > 0) {  // complete the word left over from the previous piece
    const uint64_t take = std::min<uint64_t>(8 - carried_, size);
    std::memcpy(carry_ + carried_, data, take);
    carried_ += static_cast<uint32_t>(take);
    data += take;
    size -= take;
    if (carried_ < 8) return;
    h_ = (h_ ^ read_at<uint64_t>(carry_, 0)) * kPrime;
    carried_ = 0;
  }
  uint64_t i = 0;
  for (; i + 8 <= size; i += 8) h_ = (h_ ^ read_at<uint64_t>(data, i)) * kPrime;
  carried_ = static_cast<uint32_t>(size - i);
  std::memcpy(carry_, data + i, carried_);
}

uint64_t Checksum64::finish() const {
  uint64_t h = h_;
  if (carried_ > 0) {
    uint64_t tail = 0;
    std::memcpy(&tail, carry_, carried_);
    h = (h ^ tail) * kPrime;
  }
  return (h ^ size_) * kPrime;
}

uint64_t checksum64(const uint8_t* data, uint64_t size) {
  Checksum64 sum;
  sum.update(data, size);
  return sum.finish();
}

namespace {

int open_or_throw(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags | O_CLOEXEC, 0644);
  if (fd < 0) throw ShardError(path + ": cannot create: " + errno_text());
  return fd;
}

// Appends the side file `from` to `to`, feeding the checksum, then zero-pads to 8 bytes.
void append_file(int from, const std::string& from_path, int to, const std::string& to_path, Checksum64& sum) {
  if (::lseek(from, 0, SEEK_SET) < 0) throw ShardError(from_path + ": seek failed: " + errno_text());
  std::vector<uint8_t> buf(1 << 20);
  uint64_t total = 0;
  for (;;) {
    const ssize_t n = ::read(from, buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      throw ShardError(from_path + ": read failed: " + errno_text());
    }
    if (n == 0) break;
    write_all(to, buf.data(), static_cast<uint64_t>(n), to_path);
    sum.update(buf.data(), static_cast<uint64_t>(n));
    total += static_cast<uint64_t>(n);
  }
  const uint8_t zeros[8] = {};
  const uint64_t pad = align8(total) - total;
  write_all(to, zeros, pad, to_path);
  sum.update(zeros, pad);
}

}  // namespace

ShardWriter::ShardWriter(const std::string& path, uint32_t token_bytes) : path_(path), token_bytes_(token_bytes) {
  if (token_bytes != 2 && token_bytes != 4) throw ShardError(path + ": token_bytes must be 2 or 4");
  fd_ = open_or_throw(path, O_RDWR | O_CREAT | O_TRUNC);
  mask_fd_ = open_or_throw(path + ".mask", O_RDWR | O_CREAT | O_TRUNC);
  index_fd_ = open_or_throw(path + ".index", O_RDWR | O_CREAT | O_TRUNC);
  // Placeholder header: all zeros has no magic, so an unfinished file never opens.
  const uint8_t zeros[kHeaderBytes] = {};
  write_all(fd_, zeros, kHeaderBytes, path_);
}

ShardWriter::~ShardWriter() {
  for (int fd : {fd_, mask_fd_, index_fd_})
    if (fd >= 0) ::close(fd);
  if (!closed_) {
    ::unlink((path_ + ".mask").c_str());
    ::unlink((path_ + ".index").c_str());
  }
}

void ShardWriter::append(const void* tokens, const uint8_t* mask, uint64_t num_tokens, const uint32_t* lengths,
                         const uint32_t* trained, const uint64_t* source_lines, uint64_t num_samples) {
  if (closed_) throw ShardError(path_ + ": append after close");
  uint64_t total = 0;
  for (uint64_t i = 0; i < num_samples; ++i) {
    if (trained[i] > lengths[i]) throw ShardError(path_ + ": trained count above sample length");
    total += lengths[i];
  }
  if (total != num_tokens) throw ShardError(path_ + ": sample lengths do not add up to the tokens");
  if (num_tokens_ + num_tokens > kMaxCount || num_samples_ + num_samples > kMaxCount)
    throw ShardError(path_ + ": shard too large");
  write_all(fd_, tokens, num_tokens * token_bytes_, path_);
  sum_.update(static_cast<const uint8_t*>(tokens), num_tokens * token_bytes_);
  write_all(mask_fd_, mask, num_tokens, path_ + ".mask");
  // Index rows go to the side file as (offset, length, trained, line) records; close()
  // transposes them into the column layout of the file.
  std::vector<uint64_t> rows(num_samples * 3);
  uint64_t offset = num_tokens_;
  for (uint64_t i = 0; i < num_samples; ++i) {
    rows[3 * i] = offset;
    rows[3 * i + 1] = (uint64_t{lengths[i]} << 32) | trained[i];
    rows[3 * i + 2] = source_lines[i];
    offset += lengths[i];
  }
  write_all(index_fd_, rows.data(), rows.size() * 8, path_ + ".index");
  num_tokens_ += num_tokens;
  num_samples_ += num_samples;
}

uint64_t ShardWriter::close() {
  if (closed_) throw ShardError(path_ + ": closed twice");
  const ShardLayout l = shard_layout(token_bytes_, num_samples_, num_tokens_);
  const uint8_t zeros[8] = {};
  const uint64_t token_end = l.tokens_offset + num_tokens_ * token_bytes_;
  write_all(fd_, zeros, l.mask_offset - token_end, path_);
  sum_.update(zeros, l.mask_offset - token_end);
  append_file(mask_fd_, path_ + ".mask", fd_, path_, sum_);

  // The index: read the row records back and write each column in turn.
  const uint64_t n = num_samples_;
  std::vector<uint64_t> rows(n * 3);
  if (::pread(index_fd_, rows.data(), rows.size() * 8, 0) != static_cast<ssize_t>(rows.size() * 8))
    throw ShardError(path_ + ".index: read failed");
  std::vector<uint8_t> index(24 * n);
  for (uint64_t i = 0; i < n; ++i) {
    const uint32_t length = static_cast<uint32_t>(rows[3 * i + 1] >> 32);
    const uint32_t trained = static_cast<uint32_t>(rows[3 * i + 1]);
    std::memcpy(index.data() + 8 * i, &rows[3 * i], 8);
    std::memcpy(index.data() + 8 * n + 4 * i, &length, 4);
    std::memcpy(index.data() + 12 * n + 4 * i, &trained, 4);
    std::memcpy(index.data() + 16 * n + 8 * i, &rows[3 * i + 2], 8);
  }
  write_all(fd_, index.data(), index.size(), path_);
  sum_.update(index.data(), index.size());
  const uint64_t checksum = sum_.finish();

  uint8_t header[kHeaderBytes] = {};
  std::memcpy(header, kShardMagic, 8);
  std::memcpy(header + 8, &kShardVersion, 4);
  std::memcpy(header + 12, &token_bytes_, 4);
  const uint64_t fields[6] = {l.num_samples, l.num_tokens, l.tokens_offset, l.mask_offset, l.index_offset, checksum};
  std::memcpy(header + 16, fields, sizeof(fields));
  if (::pwrite(fd_, header, kHeaderBytes, 0) != static_cast<ssize_t>(kHeaderBytes))
    throw ShardError(path_ + ": header write failed: " + errno_text());
  if (::fsync(fd_) != 0) throw ShardError(path_ + ": fsync failed: " + errno_text());
  closed_ = true;
  ::unlink((path_ + ".mask").c_str());
  ::unlink((path_ + ".index").c_str());
  return checksum;
}

Shard::Shard(const std::string& path) : path_(path) {
  File f(path, O_RDONLY | O_CLOEXEC);
  if (f.fd() < 0) throw ShardError(path + ": cannot open: " + errno_text());
  struct stat st;
  if (::fstat(f.fd(), &st) != 0) throw ShardError(path + ": cannot stat: " + errno_text());
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < kHeaderBytes)
    throw ShardError(path + ": truncated shard (" + std::to_string(size) + " bytes, smaller than the header)");
  void* m = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, f.fd(), 0);
  if (m == MAP_FAILED) throw ShardError(path + ": mmap failed: " + errno_text());
  base_ = static_cast<uint8_t*>(m);
  mapped_ = size;
  try {
    if (std::memcmp(base_, kShardMagic, 8) != 0) throw ShardError(path + ": not an instructpack shard (bad magic)");
    const auto version = read_at<uint32_t>(base_, 8);
    if (version != kShardVersion)
      throw ShardError(path + ": shard format version " + std::to_string(version) + ", this build reads " +
                       std::to_string(kShardVersion) + "; re-run preprocessing");
    const auto token_bytes = read_at<uint32_t>(base_, 12);
    const auto num_samples = read_at<uint64_t>(base_, 16);
    const auto num_tokens = read_at<uint64_t>(base_, 24);
    if ((token_bytes != 2 && token_bytes != 4) || num_samples > kMaxCount || num_tokens > kMaxCount)
      throw ShardError(path + ": corrupt shard header");
    layout_ = shard_layout(token_bytes, num_samples, num_tokens);
    if (read_at<uint64_t>(base_, 32) != layout_.tokens_offset || read_at<uint64_t>(base_, 40) != layout_.mask_offset ||
        read_at<uint64_t>(base_, 48) != layout_.index_offset)
      throw ShardError(path + ": corrupt shard header (section offsets)");
    if (size != layout_.file_size)
      throw ShardError(path + ": " + (size < layout_.file_size ? "truncated" : "oversized") + " shard: " +
                       std::to_string(size) + " bytes, header says " + std::to_string(layout_.file_size));
  } catch (...) {
    ::munmap(base_, mapped_);
    base_ = nullptr;
    throw;
  }
}

Shard::~Shard() {
  if (base_ != nullptr) ::munmap(base_, mapped_);
}

Shard::Shard(Shard&& other) noexcept
    : path_(std::move(other.path_)), layout_(other.layout_), base_(other.base_), mapped_(other.mapped_) {
  other.base_ = nullptr;
  other.mapped_ = 0;
}

const uint64_t* Shard::offsets() const {
  return reinterpret_cast<const uint64_t*>(base_ + layout_.index_offset);
}
const uint32_t* Shard::lengths() const {
  return reinterpret_cast<const uint32_t*>(base_ + layout_.index_offset + 8 * layout_.num_samples);
}
const uint32_t* Shard::trained() const {
  return reinterpret_cast<const uint32_t*>(base_ + layout_.index_offset + 12 * layout_.num_samples);
}
const uint64_t* Shard::source_lines() const {
  return reinterpret_cast<const uint64_t*>(base_ + layout_.index_offset + 16 * layout_.num_samples);
}
uint64_t Shard::stored_checksum() const { return read_at<uint64_t>(base_, 56); }

uint32_t Shard::token(uint64_t i) const {
  return layout_.token_bytes == 2 ? read_at<uint16_t>(base_, layout_.tokens_offset + 2 * i)
                                  : read_at<uint32_t>(base_, layout_.tokens_offset + 4 * i);
}

void Shard::verify() const {
  if (checksum64(base_ + kHeaderBytes, layout_.file_size - kHeaderBytes) != stored_checksum())
    throw ShardError(path_ + ": corrupt shard (checksum mismatch)");
  uint64_t expected = 0;
  for (uint64_t i = 0; i < layout_.num_samples; ++i) {
    if (offsets()[i] != expected || trained()[i] > lengths()[i])
      throw ShardError(path_ + ": corrupt shard index at sample " + std::to_string(i));
    expected += lengths()[i];
  }
  if (expected != layout_.num_tokens) throw ShardError(path_ + ": corrupt shard index (lengths)");
}

void Shard::sample_range(uint64_t i, uint64_t* offset, uint64_t* length) const {
  *offset = offsets()[i];
  *length = lengths()[i];
  if (*offset > layout_.num_tokens || *length > layout_.num_tokens - *offset)
    throw ShardError(path_ + ": corrupt shard index at sample " + std::to_string(i));
}

ShardSet::ShardSet(const std::vector<std::string>& paths) {
  shards_.reserve(paths.size());
  sample_begin_.push_back(0);
  for (const auto& p : paths) {
    shards_.emplace_back(p);
    sample_begin_.push_back(sample_begin_.back() + shards_.back().layout().num_samples);
  }
}

void ShardSet::locate(int64_t id, const Shard** shard, uint64_t* local) const {
  if (id < 0 || static_cast<uint64_t>(id) >= num_samples())
    throw std::out_of_range("sample id " + std::to_string(id) + " out of range [0, " +
                            std::to_string(num_samples()) + ")");
  const auto it = std::upper_bound(sample_begin_.begin(), sample_begin_.end(), static_cast<uint64_t>(id));
  const size_t s = static_cast<size_t>(it - sample_begin_.begin()) - 1;
  *shard = &shards_[s];
  *local = static_cast<uint64_t>(id) - sample_begin_[s];
}

SampleSpan ShardSet::span(int64_t id) const {
  const Shard* shard;
  uint64_t local;
  SampleSpan out;
  locate(id, &shard, &local);
  shard->sample_range(local, &out.offset, &out.length);
  out.shard = shard;
  return out;
}

uint64_t ShardSet::count_tokens(const int64_t* ids, uint64_t n) const {
  uint64_t total = 0;
  for (uint64_t i = 0; i < n; ++i) total += span(ids[i]).length;
  if (total > static_cast<uint64_t>(std::numeric_limits<int32_t>::max()))
    throw std::length_error("batch of " + std::to_string(total) + " tokens exceeds int32 cu_seqlens");
  return total;
}

// Separate simple loops over non-aliasing pointers, so that each one vectorizes.
template <typename T>
static void copy_sample(const uint8_t* tokens, const uint8_t* mask, uint64_t offset, uint64_t length,
                        bool shift_labels, int64_t* __restrict input_ids, int64_t* __restrict labels,
                        int64_t* __restrict position_ids) {
  const T* __restrict src = reinterpret_cast<const T*>(tokens) + offset;
  const uint8_t* __restrict m = mask + offset;
  for (uint64_t j = 0; j < length; ++j) input_ids[j] = static_cast<int64_t>(src[j]);
  for (uint64_t j = 0; j < length; ++j) position_ids[j] = static_cast<int64_t>(j);
  if (length == 0) return;
  // Shifted: position j is scored on token j + 1; a sample's last token has no target
  // inside the sample, so it never predicts the next sample of a packed row.
  const uint64_t shift = shift_labels ? 1 : 0;
  const T* __restrict next = src + shift;
  const uint8_t* __restrict next_mask = m + shift;
  for (uint64_t j = 0; j + shift < length; ++j) {  // branch-free select: masks alternate often
    const int64_t keep = -static_cast<int64_t>(next_mask[j] != 0);
    labels[j] = (static_cast<int64_t>(next[j]) & keep) | (int64_t{-100} & ~keep);
  }
  if (shift_labels) labels[length - 1] = -100;
}

void ShardSet::gather(const int64_t* ids, uint64_t n, bool shift_labels, int64_t* input_ids, int64_t* labels,
                      int64_t* position_ids, int32_t* cu_seqlens) const {
  uint64_t pos = 0;
  cu_seqlens[0] = 0;
  SampleSpan next = n > 0 ? span(ids[0]) : SampleSpan{};
  for (uint64_t i = 0; i < n; ++i) {
    const SampleSpan sample = next;
    if (i + 1 < n) {
      // Samples sit at random places in the maps: fetching the next one's first lines
      // while this one is copied hides most of the memory latency. (Written inline: GCC
      // drops calls to a function that does nothing but prefetch.)
      next = span(ids[i + 1]);
      const Shard& s = *next.shard;
      const uint64_t token_bytes = s.layout().token_bytes;
      const uint8_t* t = s.base() + s.layout().tokens_offset + next.offset * token_bytes;
      const uint8_t* m = s.mask() + next.offset;
      for (uint64_t b = 0; b < std::min<uint64_t>(next.length * token_bytes, 2048); b += 64) __builtin_prefetch(t + b);
      for (uint64_t b = 0; b < std::min<uint64_t>(next.length, 1024); b += 64) __builtin_prefetch(m + b);
    }
    const Shard& shard = *sample.shard;
    const uint8_t* tokens = shard.base() + shard.layout().tokens_offset;
    if (shard.layout().token_bytes == 2)
      copy_sample<uint16_t>(tokens, shard.mask(), sample.offset, sample.length, shift_labels, input_ids + pos,
                            labels + pos, position_ids + pos);
    else
      copy_sample<uint32_t>(tokens, shard.mask(), sample.offset, sample.length, shift_labels, input_ids + pos,
                            labels + pos, position_ids + pos);
    pos += sample.length;
    cu_seqlens[i + 1] = static_cast<int32_t>(pos);
  }
}

}  // namespace instructpack
