// kvfabric-serve under mpirun when a rank stops or dies: the rank is named (rank and host), the
// control plane answers reads meanwhile, and the job ends with a non-zero status instead of
// hanging. Each test starts a real job (mpirun -n 2 kvfabric-serve) and plays its scheduler.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <boost/asio.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <mutex>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kvfabric/server/control_server.h"

namespace kvfabric {
namespace {

using nlohmann::json;
using ::testing::ContainsRegex;
using ::testing::HasSubstr;
using ::testing::Not;
using Clock = std::chrono::steady_clock;

constexpr auto kStartup = std::chrono::seconds(60);  // two ranks on a loaded 2-core machine

// A port nobody listens on now (the OS's choice), for the HTTP endpoint.
uint16_t free_port() {
  boost::asio::io_context io;
  boost::asio::ip::tcp::acceptor probe(io, {boost::asio::ip::make_address("127.0.0.1"), 0});
  return probe.local_endpoint().port();
}

// `mpirun ... kvfabric-serve` with its output collected; killed (the whole process group) when
// the test ends, so that no test leaves a job behind.
class ServeJob {
 public:
  //! Without `under_mpirun`, kvfabric-serve runs alone (the coordinator, no ranks).
  explicit ServeJob(const std::vector<std::string>& mpirun_flags = {}, bool under_mpirun = true) {
    config_path_ = ::testing::TempDir() + "kvf_fault_" + std::to_string(getpid()) + ".yaml";
    metrics_port_ = free_port();
    std::ofstream(config_path_)
        << "model: {name: tiny, num_layers: 2, num_query_heads: 4, num_kv_heads: 2, head_dim: 64, "
           "dtype: f32}\n"
           "cache: {block_size: 16, num_blocks: 64, kv_dtype: f32, host_num_blocks: 16}\n"
           "topology: {dp: 2, tp: 1}\n"
           "server: {port: 0, metrics_port: "
        << metrics_port_ << ", fault_grace_ms: 1500}\nruntime: {plan_deadline_ms: 500}\n";
    std::vector<std::string> args;
    if (under_mpirun) {
      args = {KVF_MPIEXEC, "-n", "2"};
      if (std::string(KVF_MPIEXEC_FLAGS).size() > 0) args.push_back(KVF_MPIEXEC_FLAGS);
      args.insert(args.end(), mpirun_flags.begin(), mpirun_flags.end());
    }
    args.insert(args.end(), {KVF_SERVE_BINARY, "--config", config_path_});
    start(args);
  }
  ~ServeJob() {
    if (pid_ > 0 && !exit_status_) {
      kill(-pid_, SIGCONT);
      kill(-pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (reader_.joinable()) reader_.join();
    std::remove(config_path_.c_str());
  }

  // Waits until the output matches `pattern`; returns its first group.
  std::optional<std::string> wait_for(const std::string& pattern, Clock::duration limit) {
    const std::regex re(pattern);
    const auto until = Clock::now() + limit;
    while (Clock::now() < until) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        std::smatch m;
        if (std::regex_search(output_, m, re)) return m.size() > 1 ? m[1].str() : m[0].str();
      }
      if (exited()) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return std::nullopt;
  }
  // The job's exit status once it ended within `limit`.
  std::optional<int> wait_exit(Clock::duration limit) {
    const auto until = Clock::now() + limit;
    while (!exited() && Clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    return exit_status_;
  }
  std::string output() {
    std::lock_guard<std::mutex> lock(mutex_);
    return output_;
  }
  uint16_t metrics_port() const { return metrics_port_; }
  pid_t pid() const { return pid_; }

 private:
  void start(const std::vector<std::string>& args) {
    int pipe_fds[2];
    ASSERT_EQ(pipe(pipe_fds), 0);
    pid_ = fork();
    ASSERT_GE(pid_, 0);
    if (pid_ == 0) {
      setpgid(0, 0);
      // Open MPI refuses root without these (CI runs as root).
      setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 0);
      setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 0);
      dup2(pipe_fds[1], STDOUT_FILENO);
      dup2(pipe_fds[1], STDERR_FILENO);
      close(pipe_fds[0]);
      std::vector<char*> argv;
      for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      execvp(argv[0], argv.data());
      _exit(127);
    }
    setpgid(pid_, pid_);
    close(pipe_fds[1]);
    reader_ = std::thread([this, fd = pipe_fds[0]] {
      char buffer[4096];
      for (ssize_t n; (n = read(fd, buffer, sizeof buffer)) > 0;) {
        std::lock_guard<std::mutex> lock(mutex_);
        output_.append(buffer, static_cast<size_t>(n));
      }
      close(fd);
    });
  }
  bool exited() {
    if (exit_status_) return true;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) != pid_) return false;
    exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return true;
  }

  std::string config_path_;
  uint16_t metrics_port_ = 0;
  pid_t pid_ = -1;
  std::optional<int> exit_status_;
  std::thread reader_;
  std::mutex mutex_;
  std::string output_;
};

// The job's control port and rank 1's process, once both ranks have said where they run.
struct Started {
  uint16_t port = 0;
  pid_t rank1 = 0;
};

Started wait_until_serving(ServeJob& job) {
  const auto port = job.wait_for(R"(control plane on 127\.0\.0\.1:(\d+))", kStartup);
  const auto rank1 = job.wait_for(R"(rank 1 on \S+ \(pid (\d+))", kStartup);
  EXPECT_TRUE(port && rank1) << job.output();
  if (!port || !rank1) return {};
  return {static_cast<uint16_t>(std::stoi(*port)), static_cast<pid_t>(std::stoi(*rank1))};
}

json call(ControlClient& client, const json& request) {
  const auto reply = client.call(request.dump());
  EXPECT_TRUE(reply.ok()) << reply.status();
  return reply.ok() ? json::parse(*reply) : json();
}

// CPU time (user + system) a process has used, in clock ticks.
uint64_t cpu_ticks(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(stat)), {});
  std::istringstream fields(text.substr(text.rfind(')') + 2));
  std::string skip;
  for (int i = 0; i < 11; ++i) fields >> skip;  // state .. cmajflt
  uint64_t user = 0, system = 0;
  fields >> user >> system;
  return user + system;
}

TEST(ServeFaultTest, AStoppedRankIsNamedReadsAnswerAndTheJobEndsNonZero) {
  ServeJob job;
  const Started started = wait_until_serving(job);
  ASSERT_NE(started.port, 0);
  auto client = ControlClient::connect("127.0.0.1", started.port);
  ASSERT_TRUE(client.ok()) << client.status();
  ASSERT_EQ(call(*client, {{"op", "admit"}, {"seq", 1}, {"tokens", json(std::vector<int>(40, 7))}})["ok"], true);
  ASSERT_EQ(call(*client, {{"op", "step"}})["ok"], true);

  // A rank waiting for the next plan does not spin (it used about 65 % of a core).
  const uint64_t before = cpu_ticks(started.rank1);
  std::this_thread::sleep_for(std::chrono::seconds(1));
  const uint64_t used = cpu_ticks(started.rank1) - before;
  EXPECT_LT(used, static_cast<uint64_t>(sysconf(_SC_CLK_TCK) / 4)) << "ticks in 1 s";

  ASSERT_EQ(kill(started.rank1, SIGSTOP), 0);
  const auto asked = Clock::now();
  const json step = call(*client, {{"op", "step"}});
  EXPECT_LT(Clock::now() - asked, std::chrono::seconds(10));
  EXPECT_EQ(step["error"]["code"], "Unavailable") << step;
  const std::string why = step["error"]["message"].get<std::string>();
  EXPECT_THAT(why, ContainsRegex("rank 1 on \\S+ does not answer"));
  EXPECT_THAT(why, HasSubstr("within 500 ms"));
  EXPECT_THAT(why, HasSubstr("runtime.plan_deadline_ms"));
  // Reads still answer; changes are refused with the same reason; /health says it.
  EXPECT_EQ(call(*client, {{"op", "stats"}})["ok"], true);
  EXPECT_THAT(call(*client, {{"op", "free"}, {"seq", 1}})["error"]["message"].get<std::string>(),
              ContainsRegex("rank 1 on \\S+ does not answer"));
  const auto health = http_get("127.0.0.1", job.metrics_port(), "/health");
  EXPECT_THAT(health.status().message(), HasSubstr("503"));
  EXPECT_THAT(health.status().message(), ContainsRegex("rank 1 on \\S+ does not answer"));

  const auto status = job.wait_exit(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value()) << "the job hangs:\n" << job.output();
  EXPECT_NE(*status, 0);
  EXPECT_THAT(job.output(), ContainsRegex("kvfabric-serve: Unavailable: .*rank 1 on \\S+ does not answer"));
  // Only the coordinator knows the last step (rank 0 may be sent SIGTERM while it aborts).
  EXPECT_THAT(job.output(), Not(ContainsRegex("rank 1 on \\S+: the last plan"))) << job.output();
}

TEST(ServeFaultTest, AKilledRankEndsTheJobAndIsNamed) {
  ServeJob job;
  const Started started = wait_until_serving(job);
  ASSERT_NE(started.port, 0);
  auto client = ControlClient::connect("127.0.0.1", started.port);
  ASSERT_TRUE(client.ok()) << client.status();
  ASSERT_EQ(call(*client, {{"op", "step"}})["ok"], true);
  ASSERT_EQ(kill(started.rank1, SIGKILL), 0);
  // Open MPI ends the job within about a second: its message names the rank and the node, and
  // rank 0 says that it was ended and after which step.
  const auto status = job.wait_exit(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value()) << "the job hangs:\n" << job.output();
  EXPECT_NE(*status, 0);
  EXPECT_THAT(job.output(), ContainsRegex("process rank 1 .* on node \\S+ exited on signal 9"));
  EXPECT_THAT(job.output(), ContainsRegex("rank 0 on \\S+ received SIGTERM"));
  EXPECT_THAT(job.output(), ContainsRegex("rank 0 on \\S+: the last plan was step 0"));
}

// An operator's SIGTERM (mpirun hands it to every rank) drains: the request in progress is
// answered, rank 0 ends the other ranks, and every process exits 0.
TEST(ServeFaultTest, SigtermDrainsAndTheJobExitsZero) {
  ServeJob job;
  const Started started = wait_until_serving(job);
  const auto rank0 = job.wait_for(R"(rank 0 on \S+ \(pid (\d+))", kStartup);
  ASSERT_TRUE(started.port != 0 && rank0) << job.output();
  auto client = ControlClient::connect("127.0.0.1", started.port);
  ASSERT_TRUE(client.ok()) << client.status();
  ASSERT_EQ(call(*client, {{"op", "admit"}, {"seq", 1}, {"tokens", {1, 2, 3}}})["ok"], true);
  ASSERT_EQ(call(*client, {{"op", "step"}})["ok"], true);
  // Rank 0's /metrics shows every rank's figures, as of that step.
  const auto metrics = http_get("127.0.0.1", job.metrics_port(), "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_THAT(*metrics, HasSubstr("\nkvfabric_rank_steps_total{rank=\"1\",replica=\"1\",shard=\"0\"} 1\n"));
  EXPECT_THAT(*metrics, HasSubstr("backend=\"cpu\""));
  EXPECT_THAT(*metrics, HasSubstr("\nkvfabric_plan_execution_duration_seconds_count 1\n"));
  ASSERT_EQ(kill(started.rank1, SIGTERM), 0);
  ASSERT_EQ(kill(static_cast<pid_t>(std::stoi(*rank0)), SIGTERM), 0);
  const auto status = job.wait_exit(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value()) << "the job hangs:\n" << job.output();
  EXPECT_EQ(*status, 0) << job.output();
  EXPECT_THAT(job.output(), ContainsRegex("rank 0 on \\S+ received SIGTERM: draining"));
  EXPECT_THAT(job.output(), ContainsRegex("rank 1 on \\S+ received SIGTERM: it waits for rank 0"));
  EXPECT_THAT(job.output(), HasSubstr("stopped after 1 steps"));
}

TEST(ServeFaultTest, SigtermDrainsTheLoneCoordinator) {
  ServeJob job({}, /*under_mpirun=*/false);
  const auto port = job.wait_for(R"(control plane on 127\.0\.0\.1:(\d+))", kStartup);
  ASSERT_TRUE(port) << job.output();
  ASSERT_EQ(kill(job.pid(), SIGTERM), 0);
  const auto status = job.wait_exit(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value()) << "it hangs:\n" << job.output();
  EXPECT_EQ(*status, 0) << job.output();
  EXPECT_THAT(job.output(), HasSubstr("the coordinator received SIGTERM: draining"));
  EXPECT_THAT(job.output(), HasSubstr("stopped after 0 steps"));
}

// With mpirun --enable-recovery the job outlives the dead rank, and the deadline names it.
TEST(ServeFaultTest, UnderRecoveryADeadRankIsNamedByTheDeadline) {
  ServeJob job({"--enable-recovery"});
  const Started started = wait_until_serving(job);
  ASSERT_NE(started.port, 0);
  auto client = ControlClient::connect("127.0.0.1", started.port);
  ASSERT_TRUE(client.ok()) << client.status();
  ASSERT_EQ(kill(started.rank1, SIGKILL), 0);
  const json step = call(*client, {{"op", "step"}});
  EXPECT_EQ(step["error"]["code"], "Unavailable") << step;
  EXPECT_THAT(step["error"]["message"].get<std::string>(),
              ContainsRegex("rank 1 on \\S+ does not answer"));
  ASSERT_TRUE(job.wait_exit(std::chrono::seconds(30)).has_value()) << "the job hangs:\n"
                                                                   << job.output();
}

}  // namespace
}  // namespace kvfabric
