#include "kvfabric/plan/step_plan.h"

#include <algorithm>
#include <cstring>
#include <unordered_map>
#include <string>

namespace kvfabric {
namespace {

constexpr uint32_t kMagic = 0x4B564650;  // "KVFP"
// 3: tables carry computed_tokens; 4: and what changed only; 5: compactions and score requests;
// 6: kept ranges in any order that moves no token later; 7: layer groups of tables, copies and
// compactions
constexpr uint32_t kVersion = 7;

class Writer {
 public:
  void u8(uint8_t v) { bytes_.push_back(v); }
  void u32(uint32_t v) { raw(&v, 4); }
  void u64(uint64_t v) { raw(&v, 8); }
  void block(BlockId b) { u32(b.value); }
  void seq(SeqId s) { u64(s.value); }
  std::vector<uint8_t> take() { return std::move(bytes_); }

 private:
  void raw(const void* p, size_t n) {
    // x86-64 and aarch64 are little endian. resize + memcpy rather than insert(): GCC 12 warns
    // falsely (-Wstringop-overflow) on the inlined range insert.
    const size_t at = bytes_.size();
    bytes_.resize(at + n);
    std::memcpy(bytes_.data() + at, p, n);
  }
  std::vector<uint8_t> bytes_;
};

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> bytes) : bytes_(bytes) {}

  template <typename T>
  bool get(T& out, const char* field) {
    if (!status_.ok()) return false;
    if (bytes_.size() - pos_ < sizeof(T)) {
      status_ = Status(ErrorCode::kParseError, "step plan truncated at " + std::string(field) +
                                                   " (byte " + std::to_string(pos_) + " of " +
                                                   std::to_string(bytes_.size()) + ")");
      return false;
    }
    std::memcpy(&out, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  // A count of entries of `entry_bytes` each that must fit in what is left.
  bool count(uint64_t& n, size_t entry_bytes, const char* field) {
    if (!get(n, field)) return false;
    if (n > (bytes_.size() - pos_) / entry_bytes) {
      status_ = Status(ErrorCode::kParseError, "step plan claims " + std::to_string(n) + " " +
                                                   field + " but only " +
                                                   std::to_string(bytes_.size() - pos_) +
                                                   " bytes follow");
      return false;
    }
    return true;
  }
  [[nodiscard]] bool done() const { return pos_ == bytes_.size(); }
  [[nodiscard]] const Status& status() const { return status_; }
  void fail(Status s) {
    if (status_.ok()) status_ = std::move(s);
  }

 private:
  std::span<const uint8_t> bytes_;
  size_t pos_ = 0;
  Status status_;
};

// kind, replica, dst_replica, src, dst, copy offsets and length, copy reason, copy groups.
constexpr size_t kOpBytes = 1 + 4 * 4 + 3 * 4 + 1 + 2 * 4;

// The block an op reads or writes, named by replica, tier and id.
uint64_t block_key(uint32_t replica, bool host, BlockId block) {
  return (uint64_t{replica} << 33) | (uint64_t{host} << 32) | block.value;
}

}  // namespace

size_t StepPlan::count(OpKind kind) const {
  size_t n = 0;
  for (const Op& op : ops) n += op.kind == kind ? 1 : 0;
  return n;
}

std::vector<uint8_t> StepPlan::serialize() const {
  Writer w;
  w.u32(kMagic);
  w.u32(kVersion);
  w.u64(step);
  w.u64(ops.size());
  for (const Op& op : ops) {
    w.u8(static_cast<uint8_t>(op.kind));
    w.u32(op.replica);
    w.u32(op.dst_replica);
    w.block(op.src);
    w.block(op.dst);
    w.u32(op.copy.src_offset);
    w.u32(op.copy.dst_offset);
    w.u32(op.copy.num_tokens);
    w.u8(static_cast<uint8_t>(op.copy.reason));
    w.u32(op.from_group);
    w.u32(op.to_group);
  }
  w.u64(tables.size());
  for (const auto& t : tables) {
    w.seq(t.seq);
    w.u32(t.replica);
    w.u32(t.layer_group);
    w.u64(t.num_tokens);
    w.u64(t.computed_tokens);
    w.u32(t.first_block);
    w.u64(t.blocks.size());
    for (BlockId b : t.blocks) w.block(b);
  }
  for (const auto* ids : {&released, &preempted}) {
    w.u64(ids->size());
    for (SeqId s : *ids) w.seq(s);
  }
  w.u64(compactions.size());
  for (const Compaction& c : compactions) {
    w.seq(c.seq);
    w.u32(c.replica);
    w.u32(c.layer_group);
    w.u64(c.tokens_before);
    w.u64(c.kept.size());
    for (const TokenRange& range : c.kept) {
      w.u64(range.first);
      w.u64(range.count);
    }
  }
  w.u64(score_requests.size());
  for (const ScoreRequest& request : score_requests) {
    w.seq(request.seq);
    w.u32(request.replica);
  }
  return w.take();
}

namespace {

bool read_op(Reader& r, StepPlan::Op& op) {
  uint8_t kind = 0, reason = 0;
  if (!r.get(kind, "ops") || !r.get(op.replica, "ops") || !r.get(op.dst_replica, "ops") ||
      !r.get(op.src.value, "ops") || !r.get(op.dst.value, "ops") ||
      !r.get(op.copy.src_offset, "ops") || !r.get(op.copy.dst_offset, "ops") ||
      !r.get(op.copy.num_tokens, "ops") || !r.get(reason, "ops") ||
      !r.get(op.from_group, "ops") || !r.get(op.to_group, "ops")) {
    return false;
  }
  if (kind > static_cast<uint8_t>(StepPlan::OpKind::kCopy)) {
    r.fail(Status(ErrorCode::kParseError, "step plan op has unknown kind " + std::to_string(kind)));
    return false;
  }
  if (reason > static_cast<uint8_t>(CopyReason::kCompaction)) {
    r.fail(Status(ErrorCode::kParseError, "step plan copy has unknown reason " + std::to_string(reason)));
    return false;
  }
  op.kind = static_cast<StepPlan::OpKind>(kind);
  op.copy.reason = static_cast<CopyReason>(reason);
  if (op.kind == StepPlan::OpKind::kCopy) {
    op.copy.src_block = op.src;
    op.copy.dst_block = op.dst;
  } else {
    op.copy = TokenCopy{};
  }
  if (const std::string problem = StepPlan::op_problem(op); !problem.empty()) {
    r.fail(Status(ErrorCode::kParseError, "step plan " + problem));
    return false;
  }
  return true;
}

bool read_compaction(Reader& r, StepPlan::Compaction& c) {
  uint64_t ranges = 0;
  if (!r.get(c.seq.value, "compactions") || !r.get(c.replica, "compactions") ||
      !r.get(c.layer_group, "compactions") || !r.get(c.tokens_before, "compactions") ||
      !r.count(ranges, 16, "kept ranges")) {
    return false;
  }
  c.kept.resize(ranges);
  for (StepPlan::TokenRange& range : c.kept) {
    if (!r.get(range.first, "kept ranges") || !r.get(range.count, "kept ranges")) return false;
  }
  if (const std::string problem = StepPlan::compaction_problem(c); !problem.empty()) {
    r.fail(Status(ErrorCode::kParseError, "step plan " + problem));
    return false;
  }
  return true;
}

}  // namespace

Result<StepPlan> StepPlan::deserialize(std::span<const uint8_t> bytes) {
  Reader r(bytes);
  StepPlan plan;
  uint32_t magic = 0, version = 0;
  if (r.get(magic, "magic") && magic != kMagic) {
    return Status(ErrorCode::kParseError, "not a step plan (bad magic number)");
  }
  if (r.get(version, "version") && version != kVersion) {
    return Status(ErrorCode::kParseError, "step plan version " + std::to_string(version) +
                                              " (this build reads version " +
                                              std::to_string(kVersion) + ")");
  }
  r.get(plan.step, "step");
  uint64_t n = 0;
  if (r.count(n, kOpBytes, "ops")) {
    plan.ops.resize(n);
    for (auto& op : plan.ops) {
      if (!read_op(r, op)) break;
    }
  }
  if (r.count(n, 44, "tables")) {
    plan.tables.resize(n);
    for (auto& t : plan.tables) {
      uint64_t blocks = 0;
      if (!r.get(t.seq.value, "tables") || !r.get(t.replica, "tables") ||
          !r.get(t.layer_group, "tables") || !r.get(t.num_tokens, "tables") || !r.get(t.computed_tokens, "tables") ||
          !r.get(t.first_block, "tables") || !r.count(blocks, 4, "table blocks")) {
        break;
      }
      if (t.computed_tokens > t.num_tokens) {
        r.fail(Status(ErrorCode::kParseError,
                      "step plan table of " + to_string(t.seq) + " says " +
                          std::to_string(t.computed_tokens) + " of its " +
                          std::to_string(t.num_tokens) + " tokens are computed"));
        break;
      }
      t.blocks.resize(blocks);
      for (BlockId& b : t.blocks) {
        if (!r.get(b.value, "table blocks")) break;
      }
    }
  }
  for (auto* ids : {&plan.released, &plan.preempted}) {
    if (!r.count(n, 8, ids == &plan.released ? "released" : "preempted")) break;
    ids->resize(n);
    for (SeqId& s : *ids) {
      if (!r.get(s.value, "sequence ids")) break;
    }
  }
  if (r.count(n, 32, "compactions")) {
    plan.compactions.resize(n);
    for (auto& c : plan.compactions) {
      if (!read_compaction(r, c)) break;
    }
  }
  if (r.count(n, 12, "score requests")) {
    plan.score_requests.resize(n);
    for (auto& request : plan.score_requests) {
      if (!r.get(request.seq.value, "score requests") ||
          !r.get(request.replica, "score requests")) {
        break;
      }
    }
  }
  if (!r.status().ok()) return r.status();
  if (!r.done()) return Status(ErrorCode::kParseError, "step plan has trailing bytes");
  return plan;
}

std::string StepPlan::op_problem(const Op& op) {
  if (op.kind == OpKind::kCopy) {
    // A copy reads the view it writes, or regroups whole blocks into a group's.
    if (op.from_group != op.to_group && op.from_group != kAllLayers) {
      return "copy reads layer group " + std::to_string(op.from_group) + " and writes layer group " +
             std::to_string(op.to_group) + "; only whole blocks regroup";
    }
  } else if (op.from_group != kAllLayers || op.to_group != kAllLayers) {
    return "op of replica " + std::to_string(op.replica) + " names a layer group; only copies do";
  }
  if (op.kind != OpKind::kMigrate && op.dst_replica != op.replica) {
    return "op of replica " + std::to_string(op.replica) +
           " names a destination replica; only migrations do";
  }
  return {};
}

// The kept ranges must be what a compaction can mean: non-empty, inside the sequence, disjoint,
// and in an order that moves no token to a later slot (a compaction may fill dropped slots with
// later tokens, so not always ascending).
std::string StepPlan::compaction_problem(const Compaction& c) {
  const auto refuse = [&](const TokenRange& range, const std::string& why) {
    return "compaction of " + to_string(c.seq) + " keeps [" + std::to_string(range.first) + ", +" +
           std::to_string(range.count) + ") of " + std::to_string(c.tokens_before) + " tokens; " +
           why;
  };
  uint64_t slot = 0;  // where the range's first token goes
  for (const TokenRange& range : c.kept) {
    if (range.count == 0 || range.first > c.tokens_before ||
        range.count > c.tokens_before - range.first) {
      return refuse(range, "ranges must be non-empty and inside");
    }
    if (range.first < slot) {
      return refuse(range, "it would move to later slot " + std::to_string(slot) +
                               "; kept tokens only move to earlier slots");
    }
    slot += range.count;
  }
  std::vector<TokenRange> by_first = c.kept;
  std::sort(by_first.begin(), by_first.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  for (size_t i = 1; i < by_first.size(); ++i) {
    if (by_first[i].first < by_first[i - 1].first + by_first[i - 1].count) {
      return refuse(by_first[i], "it overlaps [" + std::to_string(by_first[i - 1].first) + ", +" +
                                     std::to_string(by_first[i - 1].count) +
                                     "); ranges must be disjoint");
    }
  }
  return {};
}

uint64_t StepPlan::Compaction::tokens_after() const {
  uint64_t total = 0;
  for (const TokenRange& range : kept) total += range.count;
  return total;
}

Status apply_table_change(std::vector<BlockId>& table, const StepPlan::Table& change) {
  if (change.first_block > table.size()) {
    return invalid_argument("the table of " + to_string(change.seq) + " continues from block " +
                            std::to_string(change.first_block) + " but holds " +
                            std::to_string(table.size()));
  }
  table.resize(change.first_block);
  table.insert(table.end(), change.blocks.begin(), change.blocks.end());
  return ok_status();
}

std::vector<uint32_t> plan_waves(std::span<const StepPlan::Op> ops) {
  // Per block: the last wave that wrote it and the last that read it, each also for non-copy ops
  // only (a copy may join the wave of the copies it depends on: copies run in list order).
  struct Access {
    int64_t write = -1, write_other = -1, read = -1, read_other = -1;
  };
  std::unordered_map<uint64_t, Access> blocks;  // looked up only: its order decides nothing
  std::vector<uint32_t> waves;
  waves.reserve(ops.size());
  for (const StepPlan::Op& op : ops) {
    using K = StepPlan::OpKind;
    const bool is_copy = op.kind == K::kCopy;
    const uint64_t read = block_key(op.replica, op.kind == K::kSwapIn, op.src);
    const uint64_t write = block_key(op.dst_replica, op.kind == K::kSwapOut, op.dst);
    Access& r = blocks[read];
    Access& w = blocks[write];
    int64_t wave = 0;
    // After the last write of what it reads, and the last read and write of what it writes.
    wave = std::max(wave, (is_copy ? std::max(r.write_other + 1, r.write) : r.write + 1));
    wave = std::max(wave, (is_copy ? std::max(w.write_other + 1, w.write) : w.write + 1));
    wave = std::max(wave, (is_copy ? std::max(w.read_other + 1, w.read) : w.read + 1));
    r.read = std::max(r.read, wave);
    w.write = std::max(w.write, wave);
    if (!is_copy) {
      r.read_other = std::max(r.read_other, wave);
      w.write_other = std::max(w.write_other, wave);
    }
    waves.push_back(static_cast<uint32_t>(wave));
  }
  return waves;
}

}  // namespace kvfabric
