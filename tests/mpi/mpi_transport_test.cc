// mpi label, run under mpirun (4 ranks in ctest): the MPI transport moves scattered host blocks
// bit-exact in every pattern a step plan produces (pairs, all-to-all, self, several batches per
// peer, empty batches), its collectives behave, and bad or mismatched batches give errors that
// name both ranks without hanging anyone.
#include <fcntl.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "kvfabric/transport/mpi_transport.h"
#include "mpi/mpi_env.h"
#include "testing/block_pattern.h"

namespace kvfabric {
namespace {

using ::testing::HasSubstr;

struct Shape {
  uint64_t count;
  uint64_t bytes;
};
// The batches rank `src` sends to rank `dst`, in order; every rank evaluates the same function,
// so both sides of each pair agree.
using Plan = std::function<std::vector<Shape>(int src, int dst)>;

// Builds this rank's side of `plan`, runs one exchange_blocks, and checks every received block
// against the pattern its sender wrote and against the sender's checksum (exchanged by
// broadcast), and that no slot outside the batches was written.
void run_plan(Transport& t, const Plan& plan, uint64_t round, bool adjacent = false) {
  const int me = t.rank().value;
  const int n = t.world_size();
  std::vector<std::unique_ptr<testing::ScatteredArena>> arenas;
  std::vector<std::vector<uint8_t*>> block_lists;
  std::vector<BlockBatch> sends, recvs;
  struct RecvInfo {
    int src;
    uint64_t batch;
  };
  std::vector<RecvInfo> recv_info;
  constexpr uint64_t kSpare = 3;  // unused slots per arena that must keep their marker

  // Sent checksums, folded per destination; sends listed by descending peer and receives by
  // ascending peer: only the order among one peer's batches matters.
  std::vector<uint64_t> sent_digest(n, 0), recv_digest(n, 0);
  for (int dst = n - 1; dst >= 0; --dst) {
    const std::vector<Shape> shapes = plan(me, dst);
    for (uint64_t b = 0; b < shapes.size(); ++b) {
      arenas.push_back(std::make_unique<testing::ScatteredArena>(
          shapes[b].count + kSpare, shapes[b].bytes, round * 1000 + me * 31 + dst * 7 + b, 0x5A,
          !adjacent));
      block_lists.push_back(arenas.back()->blocks(0, shapes[b].count));
      for (uint64_t i = 0; i < shapes[b].count; ++i) {
        testing::fill_pattern(block_lists.back()[i], shapes[b].bytes,
                              testing::block_seed(me, dst, b, i, round));
        sent_digest[dst] = testing::splitmix64(
            sent_digest[dst] ^ testing::checksum(block_lists.back()[i], shapes[b].bytes));
      }
    }
  }
  const size_t recv_arena_start = arenas.size();
  for (int src = 0; src < n; ++src) {
    const std::vector<Shape> shapes = plan(src, me);
    for (uint64_t b = 0; b < shapes.size(); ++b) {
      arenas.push_back(std::make_unique<testing::ScatteredArena>(
          shapes[b].count + kSpare, shapes[b].bytes, round * 2000 + me * 17 + src * 5 + b, 0xC3,
          !adjacent));
      block_lists.push_back(arenas.back()->blocks(0, shapes[b].count));
      recv_info.push_back({src, b});
    }
  }
  // Batches point into block_lists, which no longer grows.
  size_t k = 0;
  for (int dst = n - 1; dst >= 0; --dst) {
    for (const Shape& s : plan(me, dst))
      sends.push_back({RankId{dst}, block_lists[k++], s.bytes});
  }
  for (int src = 0; src < n; ++src) {
    for (const Shape& s : plan(src, me))
      recvs.push_back({RankId{src}, block_lists[k++], s.bytes});
  }

  const Status status = t.exchange_blocks(sends, recvs);
  EXPECT_TRUE(status.ok()) << status;

  for (size_t r = 0; r < recvs.size(); ++r) {
    const auto [src, b] = recv_info[r];
    const BlockBatch& batch = recvs[r];
    for (uint64_t i = 0; i < batch.blocks.size(); ++i) {
      EXPECT_TRUE(testing::has_pattern(batch.blocks[i], batch.block_bytes,
                                       testing::block_seed(src, me, b, i, round)))
          << "R" << me << ": block " << i << " of batch " << b << " from R" << src;
      recv_digest[src] = testing::splitmix64(recv_digest[src] ^
                                             testing::checksum(batch.blocks[i], batch.block_bytes));
    }
    testing::ScatteredArena& arena = *arenas[recv_arena_start + r];
    for (uint64_t i = batch.blocks.size(); i < batch.blocks.size() + kSpare; ++i)
      EXPECT_EQ(arena.block(i)[0], 0xC3) << "R" << me << ": a slot outside the batch was written";
  }

  // Both sides' checksums: every rank broadcasts what it sent to each peer.
  for (int root = 0; root < n; ++root) {
    std::vector<uint8_t> bytes;
    if (root == me) {
      bytes.resize(n * sizeof(uint64_t));
      std::memcpy(bytes.data(), sent_digest.data(), bytes.size());
    }
    // EXPECT, not ASSERT: returning early would leave the other ranks in the next broadcast.
    EXPECT_TRUE(t.broadcast(bytes, RankId{root}).ok());
    uint64_t sent_to_me = ~recv_digest[root];
    EXPECT_EQ(bytes.size(), n * sizeof(uint64_t));
    if (bytes.size() == n * sizeof(uint64_t))
      std::memcpy(&sent_to_me, bytes.data() + me * sizeof(uint64_t), sizeof(uint64_t));
    EXPECT_EQ(recv_digest[root], sent_to_me)
        << "R" << me << ": checksums of the blocks from R" << root << " differ on the two sides";
  }
}

class MpiTransportTest : public ::testing::Test {
 protected:
  Transport& t_ = testing::mpi_transport();
  const int me_ = t_.rank().value;
  const int n_ = t_.world_size();
};

TEST_F(MpiTransportTest, Identity) {
  EXPECT_EQ(t_.name(), "mpi");
  EXPECT_EQ(t_.rank(), testing::mpi_runtime().rank());
  EXPECT_EQ(n_, testing::mpi_runtime().world_size());
  EXPECT_TRUE(testing::mpi_runtime().owns_mpi());
  EXPECT_GE(static_cast<int>(testing::mpi_runtime().thread_level()),
            static_cast<int>(MpiThreadLevel::kFunneled));
}

TEST_F(MpiTransportTest, PairwiseManyBlocks) {
  // R0 <-> R1, R2 <-> R3: 64 scattered 16 KiB blocks each way.
  run_plan(
      t_,
      [this](int src, int dst) {
        return (src ^ 1) == dst && dst < n_ ? std::vector<Shape>{{64, 16384}}
                                            : std::vector<Shape>{};
      },
      1);
}

TEST_F(MpiTransportTest, AllToAllWithDifferentSizesPerPeer) {
  // Every ordered pair, self included, with its own block count (zero for some: empty batches)
  // and block size (some not a multiple of 8).
  run_plan(
      t_,
      [](int src, int dst) {
        const uint64_t count = ((src * 7 + dst * 3 + 1) % 9) * 6;
        const uint64_t bytes = 48 + 40 * ((src * 5 + dst) % 6) + (src == dst ? 3 : 0);
        return std::vector<Shape>{{count, bytes}};
      },
      2);
}

TEST_F(MpiTransportTest, RingOf1024SmallBlocks) {
  run_plan(
      t_,
      [this](int src, int dst) {
        return (src + 1) % n_ == dst ? std::vector<Shape>{{1024, 256}} : std::vector<Shape>{};
      },
      3);
}

TEST_F(MpiTransportTest, SelfSendsOnly) {
  run_plan(
      t_,
      [](int src, int dst) {
        return src == dst ? std::vector<Shape>{{5, 100}, {0, 8}, {7, 4096}} : std::vector<Shape>{};
      },
      4);
}

TEST_F(MpiTransportTest, SeveralBatchesPerPeerPairInOrder) {
  // Three batches to each peer with different block sizes: the i-th lands in the i-th.
  run_plan(
      t_,
      [](int src, int dst) {
        return std::vector<Shape>{{uint64_t(3 + src), 512}, {2, uint64_t(64 + 8 * dst)}, {9, 1}};
      },
      5);
}

TEST_F(MpiTransportTest, AdjacentBlocksMergeIntoRuns) {
  // Blocks handed out in arena order, so each batch is one contiguous run.
  run_plan(
      t_,
      [](int src, int dst) {
        return src != dst ? std::vector<Shape>{{16, 65536}} : std::vector<Shape>{};
      },
      6, /*adjacent=*/true);
}

TEST_F(MpiTransportTest, EmptyExchange) {
  EXPECT_TRUE(t_.exchange_blocks({}, {}).ok());
  run_plan(
      t_,
      [](int, int) {
        return std::vector<Shape>{{0, 64}};
      },
      7);
}

TEST_F(MpiTransportTest, RepeatedRoundsReuseNothingStale) {
  for (uint64_t round = 10; round < 20; ++round) {
    run_plan(
        t_,
        [round, this](int src, int dst) {
          return (src + round) % n_ == static_cast<uint64_t>(dst)
                     ? std::vector<Shape>{{round, 1000 + round}}
                     : std::vector<Shape>{};
        },
        round);
  }
}

TEST_F(MpiTransportTest, BroadcastVariousLengthsFromEveryRoot) {
  for (int root = 0; root < n_; ++root) {
    for (const uint64_t length :
         {uint64_t{0}, uint64_t{1}, uint64_t{13}, uint64_t{4096}, (uint64_t{1} << 20) + 5}) {
      const uint64_t seed = testing::block_seed(root, 0, length, 0);
      std::vector<uint8_t> bytes(7, 0xEE);  // non-roots start with other contents
      if (me_ == root) {
        bytes.resize(length);
        testing::fill_pattern(bytes.data(), length, seed);
      }
      const Status s = t_.broadcast(bytes, RankId{root});
      EXPECT_TRUE(s.ok()) << s;
      EXPECT_EQ(bytes.size(), length) << "root R" << root;
      EXPECT_TRUE(testing::has_pattern(bytes.data(), bytes.size(), seed))
          << "R" << me_ << ": " << length << " bytes from R" << root;
    }
  }
}

TEST_F(MpiTransportTest, BroadcastFromAnUnknownRootIsRefusedEverywhere) {
  std::vector<uint8_t> bytes = {1, 2, 3};
  const Status s = t_.broadcast(bytes, RankId{n_});
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("broadcast root R" + std::to_string(n_)));
  EXPECT_EQ(bytes, (std::vector<uint8_t>{1, 2, 3}));
  EXPECT_TRUE(t_.barrier().ok());  // nobody was left inside a collective
}

TEST_F(MpiTransportTest, AllGatherInRankOrder) {
  std::vector<uint64_t> out;
  std::vector<uint64_t> expected;
  for (int r = 0; r < n_; ++r)
    expected.push_back(uint64_t(r) * 1000 + 7);
  EXPECT_TRUE(t_.all_gather(uint64_t(me_) * 1000 + 7, out).ok());
  EXPECT_EQ(out, expected);
  expected.clear();
  for (int r = 0; r < n_; ++r)
    expected.push_back((uint64_t{1} << 63) | uint64_t(r));
  EXPECT_TRUE(t_.all_gather((uint64_t{1} << 63) | uint64_t(me_), out).ok());
  EXPECT_EQ(out, expected);
}

TEST_F(MpiTransportTest, GatherCollectsEveryRanksBytesOnTheRoot) {
  for (int root = 0; root < n_; ++root) {
    std::vector<uint8_t> mine(static_cast<size_t>(me_ * 100 + root), static_cast<uint8_t>(me_));
    std::vector<std::vector<uint8_t>> out;
    EXPECT_TRUE(t_.gather(mine, RankId{root}, out).ok());
    if (me_ != root) {
      EXPECT_TRUE(out.empty());
      continue;
    }
    ASSERT_EQ(out.size(), static_cast<size_t>(n_));
    for (int r = 0; r < n_; ++r) {
      EXPECT_EQ(out[r], std::vector<uint8_t>(static_cast<size_t>(r * 100 + root), static_cast<uint8_t>(r)));
    }
  }
  std::vector<std::vector<uint8_t>> out;
  EXPECT_THAT(t_.gather({}, RankId{n_}, out).message(), HasSubstr("gather root R" + std::to_string(n_)));
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  EXPECT_EQ(t_.describe(RankId{1}), std::string("rank 1 on ") + host);
}

// A rank that waits for a peer that does not take part gives up after its timeout, says whether
// the peer answers at all (a liveness ping: here it does, it waits elsewhere), and refuses every
// later call. A stopped peer ("does not answer") is tested with real jobs (serve_fault_test).
TEST_F(MpiTransportTest, AWaitPastTheTimeoutNamesTheRanksAndFailsTheTransport) {
  auto fresh = make_mpi_transport(testing::mpi_runtime());
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  Transport& t = **fresh;
  const int absent = n_ - 1;
  std::vector<std::vector<uint8_t>> out;
  if (me_ == absent) {
    // Waits in a barrier nobody else joins, answering pings meanwhile.
    t.set_timeout(std::chrono::milliseconds(3000));
    const Status alone = t.barrier();
    EXPECT_EQ(alone.code(), ErrorCode::kUnavailable);
    EXPECT_THAT(alone.message(), HasSubstr("the barrier did not complete within 3000 ms"));
  } else {
    t.set_timeout(std::chrono::milliseconds(200));
    const Status gathered = t.gather(std::vector<uint8_t>{1}, RankId{0}, out);
    if (me_ == 0) {
      EXPECT_EQ(gathered.code(), ErrorCode::kUnavailable);
      EXPECT_THAT(gathered.message(),
                  HasSubstr("the gather to " + t.describe(RankId{0}) +
                            " did not complete within 200 ms: " + t.describe(RankId{absent}) +
                            " answers but did not take part"));
      // Failed for good: the gather's messages cannot be withdrawn.
      EXPECT_EQ(t.barrier(), gathered);
    } else {
      EXPECT_TRUE(gathered.ok()) << gathered;  // its message went out
    }
  }
  EXPECT_TRUE(t_.barrier().ok());  // the shared transport is untouched
}

// Regression: a timeout past what the steady clock counts (here 292 million years) overflowed
// the deadline, and every later wait failed at once.
TEST_F(MpiTransportTest, ATimeoutPastTheClocksRangeWaitsForEver) {
  t_.set_timeout(std::chrono::milliseconds::max());
  if (me_ == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the others wait
  EXPECT_TRUE(t_.barrier().ok());
  t_.set_timeout(std::nullopt);
  EXPECT_TRUE(t_.barrier().ok());
}

TEST_F(MpiTransportTest, BarrierSeparatesRounds) {
  // After barrier k every rank appends "k rank" to one file. A barrier that let any rank run
  // ahead would let a line of round k+1 precede a line of round k.
  std::vector<uint8_t> path;
  if (me_ == 0) {
    char name[] = "/tmp/kvfabric-barrier-XXXXXX";
    const int fd = mkstemp(name);
    EXPECT_GE(fd, 0);
    if (fd >= 0) {
      close(fd);
      path.assign(name, name + sizeof(name) - 1);
    }
  }
  EXPECT_TRUE(t_.broadcast(path, RankId{0}).ok());
  ASSERT_FALSE(path.empty()) << "R0 could not create a file";  // the same verdict on every rank
  const std::string file(path.begin(), path.end());
  constexpr int kRounds = 200;
  for (int k = 0; k < kRounds; ++k) {
    EXPECT_TRUE(t_.barrier().ok());
    const int fd = open(file.c_str(), O_WRONLY | O_APPEND);
    EXPECT_GE(fd, 0);
    if (fd < 0) continue;
    const std::string line = std::to_string(k) + " " + std::to_string(me_) + "\n";
    EXPECT_EQ(write(fd, line.data(), line.size()), static_cast<ssize_t>(line.size()));
    close(fd);
  }
  ASSERT_TRUE(t_.barrier().ok());
  if (me_ == 0) {
    std::ifstream in(file);
    int round = 0, rank = 0, last = 0, lines = 0;
    while (in >> round >> rank) {
      EXPECT_GE(round, last) << "line " << lines << ": round " << round << " after " << last;
      last = round;
      ++lines;
    }
    EXPECT_EQ(lines, kRounds * n_);
    std::remove(file.c_str());
  }
}

TEST_F(MpiTransportTest, UnknownPeerIsRefusedBeforeAnyMessage) {
  testing::ScatteredArena src(4, 256, 1), dst(4, 256, 2, 0x77);
  const std::vector<uint8_t*> s = src.blocks(0, 4), d = dst.blocks(0, 4);
  const std::vector<uint8_t> before = dst.bytes();
  // Every rank makes the same mistake, so all of them return without posting anything.
  const BlockBatch good_recv{RankId{(me_ + 1) % n_}, d, 256};
  const BlockBatch bad_send{RankId{n_}, s, 256};
  Status st = t_.exchange_blocks({&bad_send, 1}, {&good_recv, 1});
  EXPECT_EQ(st.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("mpi transport R" + std::to_string(me_) +
                                      ": send batch 0 to R" + std::to_string(n_)));
  EXPECT_THAT(st.message(), HasSubstr("world size " + std::to_string(n_)));
  const BlockBatch bad_recv{RankId{-1}, d, 256};
  st = t_.exchange_blocks({}, {&bad_recv, 1});
  EXPECT_EQ(st.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("recv batch 0 from R-1"));
  EXPECT_EQ(dst.bytes(), before);
  // Nothing is left in flight: the next exchange works.
  run_plan(
      t_,
      [this](int a, int b) {
        return (a + 1) % n_ == b ? std::vector<Shape>{{4, 256}} : std::vector<Shape>{};
      },
      30);
}

TEST_F(MpiTransportTest, MalformedBatchesAreRefused) {
  testing::ScatteredArena src(8, 128, 3), dst(8, 128, 4, 0x66);
  std::vector<uint8_t*> s = src.blocks(0, 4), d = dst.blocks(0, 4);
  const std::vector<uint8_t> before = dst.bytes();
  const RankId peer{(me_ + 1) % n_};
  auto refused = [&](const BlockBatch& send, const BlockBatch& recv, const std::string& needle) {
    const Status st = t_.exchange_blocks({&send, 1}, {&recv, 1});
    EXPECT_EQ(st.code(), ErrorCode::kInvalidArgument) << st;
    EXPECT_THAT(st.message(), HasSubstr(needle));
  };
  refused({peer, s, 0}, {peer, d, 128}, "4 blocks of 0 bytes");
  std::vector<uint8_t*> null_block = s;
  null_block[1] = nullptr;
  refused({peer, null_block, 128}, {peer, d, 128}, "block 1 is null");
  std::vector<uint8_t*> overlap = d;
  overlap[2] = overlap[0] + 64;
  refused({peer, s, 128}, {peer, overlap, 128}, "overlaps");
  const BlockBatch self_send{RankId{me_}, s, 128};
  const std::vector<uint8_t*> d3 = dst.blocks(0, 3);
  const BlockBatch self_recv{RankId{me_}, d3, 128};
  refused(self_send, self_recv, "does not match");
  EXPECT_EQ(dst.bytes(), before);
  EXPECT_TRUE(t_.barrier().ok());
}

TEST_F(MpiTransportTest, MismatchedBatchesAcrossRanksNameBothRanks) {
  if (n_ < 2) GTEST_SKIP() << "needs 2 ranks";
  testing::ScatteredArena src(8, 256, 5), dst(8, 256, 6, 0x12);
  const std::vector<uint8_t*> s4 = src.blocks(0, 4), s2 = src.blocks(4, 2), d4 = dst.blocks(0, 4);
  for (uint8_t* p : s4)
    testing::fill_pattern(p, 256, 99);
  // R0 sends 4 blocks of 256 bytes where R1 expects 4 of 128, then 2 blocks where R1 expects
  // 4: R1 reports each with both ranks and both sizes and writes none of its blocks; R0's
  // sends complete (it cannot know).
  const std::vector<uint8_t> before = dst.bytes();
  struct Case {
    std::vector<uint8_t*> send_blocks;
    uint64_t recv_bytes;
    std::string message;
  };
  const Case cases[] = {
      {s4, 128,
       "recv batch 0 from R0 (4 blocks of 128 bytes): R0 sent 1024 bytes, R1 expected 512"},
      {s2, 256,
       "recv batch 0 from R0 (4 blocks of 256 bytes): R0 sent 512 bytes, R1 expected 1024"}};
  for (const Case& c : cases) {
    if (me_ == 0) {
      const BlockBatch send{RankId{1}, c.send_blocks, 256};
      EXPECT_TRUE(t_.exchange_blocks({&send, 1}, {}).ok());
    } else if (me_ == 1) {
      const BlockBatch recv{RankId{0}, d4, c.recv_bytes};
      const Status st = t_.exchange_blocks({}, {&recv, 1});
      EXPECT_EQ(st.code(), ErrorCode::kInvalidOperation) << st;
      EXPECT_THAT(st.message(), HasSubstr("mpi transport R1: exchange_blocks: " + c.message));
      EXPECT_EQ(dst.bytes(), before);
    }
  }
  // Both mistakes were fully consumed: the transport still works for everyone.
  EXPECT_TRUE(t_.barrier().ok());
  run_plan(
      t_,
      [](int a, int b) {
        return std::vector<Shape>{{uint64_t(1 + a + b), 256}};
      },
      31);
}

TEST_F(MpiTransportTest, SecondTransportHasItsOwnCommunicator) {
  auto second = make_mpi_transport(testing::mpi_runtime());
  ASSERT_TRUE(second.ok()) << second.status();
  run_plan(
      **second,
      [this](int a, int b) {
        return (b + 1) % n_ == a ? std::vector<Shape>{{8, 4096}} : std::vector<Shape>{};
      },
      40);
  run_plan(
      t_,
      [this](int a, int b) {
        return (a + 1) % n_ == b ? std::vector<Shape>{{8, 4096}} : std::vector<Shape>{};
      },
      41);
}

TEST_F(MpiTransportTest, PerBlockMessagesForLargeBlocks) {
  // With block_message_min_bytes, batches of large blocks go block by block and the others as
  // one message; the same plans arrive bit-exact, mixed in one exchange.
  auto per_block = make_mpi_transport(testing::mpi_runtime(), {.block_message_min_bytes = 4096});
  ASSERT_TRUE(per_block.ok()) << per_block.status();
  run_plan(
      **per_block,
      [](int src, int dst) {
        return std::vector<Shape>{{uint64_t(2 + (src + dst) % 3), 4096},
                                  {5, 1000},
                                  {uint64_t((src * 3 + dst) % 4), uint64_t(8192 + 8 * dst)}};
      },
      42);
  // A mismatch is still caught message by message and writes nothing.
  if (n_ >= 2 && me_ < 2) {
    testing::ScatteredArena src(4, 8192, 7), dst(4, 8192, 8, 0x3C);
    const std::vector<uint8_t*> s2 = src.blocks(0, 2), d2 = dst.blocks(0, 2);
    const std::vector<uint8_t> before = dst.bytes();
    if (me_ == 0) {
      const BlockBatch send{RankId{1}, s2, 8192};
      EXPECT_TRUE((*per_block)->exchange_blocks({&send, 1}, {}).ok());
    } else {
      const BlockBatch recv{RankId{0}, d2, 4096};
      const Status st = (*per_block)->exchange_blocks({}, {&recv, 1});
      EXPECT_EQ(st.code(), ErrorCode::kInvalidOperation) << st;
      EXPECT_THAT(st.message(), HasSubstr("R0 sent 8192 bytes, R1 expected 4096"));
      EXPECT_EQ(dst.bytes(), before);
    }
  }
  EXPECT_TRUE((*per_block)->barrier().ok());
}

TEST_F(MpiTransportTest, RawTransferBaseline) {
  if (n_ < 2) GTEST_SKIP() << "needs 2 ranks";
  const uint64_t bytes = (uint64_t{3} << 20) + 7;
  std::vector<uint8_t> out(bytes), in(bytes, 0);
  testing::fill_pattern(out.data(), bytes, 1000 + me_);
  MpiRawTransfer raw;
  raw.a = RankId{0};
  raw.b = RankId{n_ - 1};
  raw.bytes = bytes;
  raw.both_directions = true;
  raw.a_to_b = raw.b_to_a = out.data();
  raw.a_from_b = raw.b_from_a = in.data();
  ASSERT_TRUE(mpi_raw_transfer(t_, raw).ok());
  if (me_ == 0) {
    EXPECT_TRUE(testing::has_pattern(in.data(), bytes, 1000 + n_ - 1));
  } else if (me_ == n_ - 1) {
    EXPECT_TRUE(testing::has_pattern(in.data(), bytes, 1000));
  }

  auto local = make_local_transport();
  const Status wrong = mpi_raw_transfer(*local, raw);
  EXPECT_EQ(wrong.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(wrong.message(), HasSubstr("make_mpi_transport (got local)"));
  raw.b = RankId{0};
  EXPECT_EQ(mpi_raw_transfer(t_, raw).code(), ErrorCode::kInvalidArgument);
}

TEST(MpiRuntimeTest, SecondInitIsRefused) {
  auto again = MpiRuntime::init(nullptr, nullptr);
  EXPECT_EQ(again.status().code(), ErrorCode::kInvalidOperation);
  EXPECT_THAT(again.status().message(), HasSubstr("another MpiRuntime is alive"));
  // The first one is untouched.
  EXPECT_TRUE(testing::mpi_transport().barrier().ok());
}

}  // namespace
}  // namespace kvfabric
