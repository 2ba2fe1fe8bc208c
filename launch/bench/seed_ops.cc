#include "bench/seed_ops.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <list>
#include <random>
#include <unordered_map>

#include "kvfabric/block/paged_kv_cache.h"

namespace kvfabric::bench {
namespace {

constexpr char kMagic[8] = {'K', 'V', 'F', 'O', 'P', 'S', '0', '1'};
constexpr uint64_t kPromptTokens = 64;

// The generator's own view of what is live, in least-recently-used order, so that it knows the
// victim of every eviction without asking a cache.
class LiveSet {
 public:
  void touch(uint64_t seq) {
    if (const auto it = where_.find(seq); it != where_.end()) order_.erase(it->second);
    order_.push_back(seq);
    where_[seq] = std::prev(order_.end());
    if (index_.count(seq) == 0) {
      index_[seq] = ids_.size();
      ids_.push_back(seq);
    }
  }
  void remove(uint64_t seq) {
    order_.erase(where_.at(seq));
    where_.erase(seq);
    const size_t i = index_.at(seq);
    ids_[i] = ids_.back();
    index_[ids_[i]] = i;
    ids_.pop_back();
    index_.erase(seq);
  }
  [[nodiscard]] uint64_t least_recent() const { return order_.front(); }
  [[nodiscard]] uint64_t at(size_t i) const { return ids_[i]; }
  [[nodiscard]] size_t size() const { return ids_.size(); }

 private:
  std::list<uint64_t> order_;
  std::unordered_map<uint64_t, std::list<uint64_t>::iterator> where_;
  std::vector<uint64_t> ids_;
  std::unordered_map<uint64_t, size_t> index_;
};

}  // namespace

SeedOpScript make_seed_op_script(const SeedOpOptions& options) {
  SeedOpScript script;
  script.block_size = options.block_size;
  std::mt19937_64 rng(options.seed);
  LiveSet live;
  uint64_t next = 0;
  for (; next < options.live; ++next) {
    script.setup.push_back({SeedOpKind::kAllocate, next, kPromptTokens});
    live.touch(next);
  }
  const uint64_t low = options.live - options.live / 20;
  const uint64_t high = options.live + options.live / 20;
  for (uint64_t i = 0; i < options.operations; ++i) {
    const uint64_t roll = rng() % 100;
    const uint64_t pick = live.size() == 0 ? 0 : live.at(rng() % live.size());
    const bool grow = (roll >= 80 && roll < 85) || (roll >= 85 && roll < 95 && live.size() <= low);
    if (live.size() == 0 || grow) {
      script.timed.push_back({SeedOpKind::kAllocate, next, kPromptTokens});
      live.touch(next++);
    } else if (roll < 80) {
      script.timed.push_back({SeedOpKind::kAppend, pick, 1});
      live.touch(pick);
    } else if (roll < 95 || live.size() >= high) {
      script.timed.push_back({SeedOpKind::kFree, pick, 0});
      live.remove(pick);
    } else if (roll < 99) {
      script.timed.push_back({SeedOpKind::kFork, pick, next});
      live.touch(next++);
    } else {
      const uint64_t victim = live.least_recent();
      script.timed.push_back({SeedOpKind::kEvict, victim, 0});
      live.remove(victim);
    }
  }
  // Every block a sequence can hold at once, with room to spare: nothing runs out.
  const uint64_t tokens = high * kPromptTokens + options.operations;
  script.num_blocks = tokens / options.block_size + 2 * high + 1024;
  return script;
}

Status write_seed_op_script(const SeedOpScript& script, const std::string& path) {
  std::ofstream out(path, std::ios::binary);
  if (!out) return Status(ErrorCode::kIoError, "cannot write " + path);
  const uint64_t header[4] = {script.num_blocks, script.block_size, script.setup.size(),
                              script.timed.size()};
  out.write(kMagic, sizeof(kMagic));
  out.write(reinterpret_cast<const char*>(header), sizeof(header));
  for (const auto* ops : {&script.setup, &script.timed}) {
    for (const SeedOp& op : *ops) {
      const uint64_t record[3] = {static_cast<uint64_t>(op.kind), op.a, op.b};
      out.write(reinterpret_cast<const char*>(record), sizeof(record));
    }
  }
  if (!out) return Status(ErrorCode::kIoError, "writing " + path + " failed");
  return ok_status();
}

Result<SeedOpScript> read_seed_op_script(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status(ErrorCode::kIoError, "cannot read " + path);
  char magic[8];
  uint64_t header[4];
  in.read(magic, sizeof(magic));
  in.read(reinterpret_cast<char*>(header), sizeof(header));
  if (!in || std::memcmp(magic, kMagic, sizeof(magic)) != 0) {
    return invalid_argument(path + " is not a seed op script");
  }
  // The counts must fit the file (24 bytes a record): a header's count sized the ops first.
  const std::streamoff records_from = in.tellg();
  in.seekg(0, std::ios::end);
  const auto record_bytes = static_cast<uint64_t>(in.tellg() - records_from);
  const uint64_t records = record_bytes / 24;
  in.seekg(records_from);
  if (record_bytes % 24 != 0 || header[2] > records || header[3] != records - header[2]) {
    return invalid_argument(path + " announces " + std::to_string(header[2]) + " + " +
                            std::to_string(header[3]) + " ops but holds " +
                            std::to_string(records) + " records (or bytes after them)");
  }
  SeedOpScript script;
  script.num_blocks = header[0];
  script.block_size = header[1];
  for (auto [ops, count] : {std::pair{&script.setup, header[2]}, std::pair{&script.timed, header[3]}}) {
    ops->resize(count);
    for (SeedOp& op : *ops) {
      uint64_t record[3];
      in.read(reinterpret_cast<char*>(record), sizeof(record));
      if (!in || record[0] > static_cast<uint64_t>(SeedOpKind::kEvict)) {
        return invalid_argument(path + " is truncated or holds an unknown op");
      }
      op = {static_cast<SeedOpKind>(record[0]), record[1], record[2]};
    }
  }
  return script;
}

Result<SeedOpRun> run_seed_op_script(const SeedOpScript& script,
                                     const std::function<void(size_t, size_t)>& progress) {
  KVF_ASSIGN_OR_RETURN(PagedKvCache cache,
                       PagedKvCache::create(script.num_blocks, script.block_size, 8, 128));
  auto run = [&](const SeedOp& op, uint64_t& mismatches) -> Status {
    switch (op.kind) {
      case SeedOpKind::kAllocate:
        return cache.allocate(SeqId{op.a}, op.b);
      case SeedOpKind::kAppend:
        return cache.append(SeqId{op.a}, op.b);
      case SeedOpKind::kFork:
        return cache.fork(SeqId{op.a}, SeqId{op.b});
      case SeedOpKind::kFree:
        return cache.free(SeqId{op.a});
      case SeedOpKind::kEvict: {
        KVF_ASSIGN_OR_RETURN(const SeqId victim, cache.evict());
        if (victim.value != op.a) ++mismatches;
        return ok_status();
      }
    }
    return ok_status();
  };
  SeedOpRun result;
  for (const SeedOp& op : script.setup) KVF_RETURN_IF_ERROR(run(op, result.evict_mismatches));
  // Timed in chunks so that progress is reported between them, outside the timed work.
  constexpr size_t kChunk = size_t{1} << 18;
  for (size_t first = 0; first < script.timed.size(); first += kChunk) {
    const size_t last = std::min(script.timed.size(), first + kChunk);
    const auto start = std::chrono::steady_clock::now();
    for (size_t i = first; i < last; ++i) KVF_RETURN_IF_ERROR(run(script.timed[i], result.evict_mismatches));
    result.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (progress) progress(last, script.timed.size());
  }
  result.operations = script.timed.size();
  return result;
}

}  // namespace kvfabric::bench
