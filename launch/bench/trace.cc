#include "bench/trace.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <charconv>
#include <ctime>
#include <string>

namespace kvfabric::bench {
namespace {

bool parse_uint(std::string_view text, uint64_t& out) {
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
  return ec == std::errc() && end == text.data() + text.size() && !text.empty();
}

uint64_t days_in_month(uint64_t year, uint64_t month) {
  static constexpr uint64_t kDays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  const bool leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
  return month == 2 && leap ? 29 : kDays[month - 1];
}

// "YYYY-MM-DD HH:MM:SS[.fraction]" -> seconds since the epoch.
bool parse_timestamp(std::string_view text, double& seconds) {
  if (text.size() < 19 || text[4] != '-' || text[7] != '-' || text[10] != ' ' || text[13] != ':' ||
      text[16] != ':') {
    return false;
  }
  uint64_t year, month, day, hour, minute, second;
  if (!parse_uint(text.substr(0, 4), year) || !parse_uint(text.substr(5, 2), month) ||
      !parse_uint(text.substr(8, 2), day) || !parse_uint(text.substr(11, 2), hour) ||
      !parse_uint(text.substr(14, 2), minute) || !parse_uint(text.substr(17, 2), second)) {
    return false;
  }
  double fraction = 0;
  if (text.size() > 19) {
    if (text[19] != '.') return false;
    uint64_t digits = 0;
    const std::string_view frac = text.substr(20);
    if (!parse_uint(frac, digits)) return false;
    double scale = 1;
    for (size_t i = 0; i < frac.size(); ++i)
      scale *= 10;
    fraction = static_cast<double>(digits) / scale;
  }
  if (month < 1 || month > 12 || day < 1 || day > days_in_month(year, month) || hour > 23 ||
      minute > 59 || second > 60) {
    return false;
  }
  std::tm fields{};
  fields.tm_year = static_cast<int>(year) - 1900;
  fields.tm_mon = static_cast<int>(month) - 1;
  fields.tm_mday = static_cast<int>(day);
  fields.tm_hour = static_cast<int>(hour);
  fields.tm_min = static_cast<int>(minute);
  fields.tm_sec = static_cast<int>(second);
  seconds = static_cast<double>(timegm(&fields)) + fraction;  // trace timestamps are UTC
  return true;
}

}  // namespace

Result<std::vector<TraceRequest>> parse_azure_trace(std::string_view csv, std::string_view source) {
  std::vector<TraceRequest> requests;
  double first = 0;
  size_t line_no = 0;
  while (!csv.empty()) {
    const size_t eol = csv.find('\n');
    std::string_view line = csv.substr(0, eol);
    csv = eol == std::string_view::npos ? std::string_view() : csv.substr(eol + 1);
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    if (line_no == 1) {
      if (line.rfind("TIMESTAMP,", 0) != 0) {
        return Status(ErrorCode::kParseError,
                      std::string(source) +
                          ":1: expected the header TIMESTAMP,ContextTokens,GeneratedTokens");
      }
      continue;
    }
    const size_t c1 = line.find(',');
    const size_t c2 = c1 == std::string_view::npos ? c1 : line.find(',', c1 + 1);
    auto bad = [&](const std::string& what) {
      return Status(ErrorCode::kParseError, std::string(source) + ":" + std::to_string(line_no) +
                                                ": " + what + " in '" + std::string(line) + "'");
    };
    if (c2 == std::string_view::npos) return bad("expected 3 comma-separated fields");
    double t = 0;
    uint64_t prompt = 0, output = 0;
    if (!parse_timestamp(line.substr(0, c1), t)) return bad("bad timestamp");
    if (!parse_uint(line.substr(c1 + 1, c2 - c1 - 1), prompt) || prompt > UINT32_MAX) {
      return bad("bad ContextTokens");
    }
    if (!parse_uint(line.substr(c2 + 1), output) || output > UINT32_MAX) {
      return bad("bad GeneratedTokens");
    }
    if (requests.empty()) first = t;
    const double arrival = t - first;
    if (!requests.empty() && arrival < requests.back().arrival_s) {
      return bad("timestamp goes backwards");
    }
    requests.push_back({arrival, static_cast<uint32_t>(prompt), static_cast<uint32_t>(output)});
  }
  if (requests.empty()) {
    return Status(ErrorCode::kParseError, std::string(source) + ": the trace has no requests");
  }
  return requests;
}

std::vector<MooncakeRequest> scale_out_trace(const std::vector<MooncakeRequest>& trace,
                                             uint32_t copies) {
  uint64_t ids = 0;
  for (const MooncakeRequest& r : trace) {
    for (uint64_t h : r.hash_ids) ids = std::max(ids, h + 1);
  }
  std::vector<MooncakeRequest> out;
  out.reserve(trace.size() * copies);
  for (uint32_t k = 0; k < copies; ++k) {
    for (const MooncakeRequest& r : trace) {
      MooncakeRequest& copy = out.emplace_back(r);
      for (uint64_t& h : copy.hash_ids) h += k * ids;
    }
  }
  // The copies are each in arrival order: a stable sort by time interleaves them.
  std::stable_sort(out.begin(), out.end(), [](const MooncakeRequest& a, const MooncakeRequest& b) {
    return a.timestamp_ms < b.timestamp_ms;
  });
  return out;
}

constexpr std::array<std::string_view, 5> kMooncakeKeys = {"timestamp", "input_length",
                                                            "output_length", "hash_ids", "priority"};

Result<std::vector<MooncakeRequest>> parse_mooncake_trace(std::string_view jsonl,
                                                          std::string_view source) {
  std::vector<MooncakeRequest> requests;
  size_t line_no = 0;
  while (!jsonl.empty()) {
    const size_t eol = jsonl.find('\n');
    const std::string_view line = jsonl.substr(0, eol);
    jsonl = eol == std::string_view::npos ? std::string_view() : jsonl.substr(eol + 1);
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    auto bad = [&](const std::string& what) {
      return Status(ErrorCode::kParseError,
                    std::string(source) + ":" + std::to_string(line_no) + ": " + what);
    };
    // The object's own keys, as the parser meets them: nlohmann keeps the last of two equal ones.
    std::vector<std::string> keys;
    const auto collect_keys = [&keys](int depth, nlohmann::json::parse_event_t event,
                                      nlohmann::json& parsed) {
      if (event == nlohmann::json::parse_event_t::key && depth == 1) {
        keys.push_back(parsed.get<std::string>());
      }
      return true;
    };
    const nlohmann::json j = nlohmann::json::parse(line, collect_keys, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) return bad("not a JSON object");
    if (keys.size() != j.size()) {
      std::sort(keys.begin(), keys.end());
      const auto twice = std::adjacent_find(keys.begin(), keys.end());
      return bad("key \"" + twice->substr(0, 64) + "\" appears twice");
    }
    for (const auto& [key, _] : j.items()) {
      if (std::find(kMooncakeKeys.begin(), kMooncakeKeys.end(), key) == kMooncakeKeys.end()) {
        return bad("unknown key \"" + key.substr(0, 64) +
                   "\" (known: timestamp, input_length, output_length, hash_ids, priority)");
      }
    }
    MooncakeRequest r;
    const auto get_uint = [&](const char* key, uint64_t max, uint64_t& out) {
      const auto it = j.find(key);
      if (it == j.end() || !it->is_number_unsigned() || it->get<uint64_t>() > max) return false;
      out = it->get<uint64_t>();
      return true;
    };
    uint64_t value = 0;
    const auto ts = j.find("timestamp");
    if (ts == j.end() || !ts->is_number() || ts->get<double>() < 0) {
      return bad("\"timestamp\" must be a non-negative number");
    }
    r.timestamp_ms = ts->get<double>();
    if (!get_uint("input_length", UINT32_MAX, value)) return bad("bad \"input_length\"");
    r.input_length = static_cast<uint32_t>(value);
    if (!get_uint("output_length", UINT32_MAX, value)) return bad("bad \"output_length\"");
    r.output_length = static_cast<uint32_t>(value);
    const auto ids = j.find("hash_ids");
    if (ids == j.end() || !ids->is_array()) return bad("\"hash_ids\" must be an array");
    r.hash_ids.reserve(ids->size());
    for (const auto& id : *ids) {
      if (!id.is_number_unsigned()) return bad("hash ids must be non-negative integers");
      r.hash_ids.push_back(id.get<uint64_t>());
    }
    if (j.contains("priority")) {
      if (!get_uint("priority", UINT32_MAX, value)) return bad("bad \"priority\"");
      r.priority = static_cast<uint32_t>(value);
    }
    if (!requests.empty() && r.timestamp_ms < requests.back().timestamp_ms) {
      return bad("timestamp goes backwards");
    }
    requests.push_back(std::move(r));
  }
  if (requests.empty()) {
    return Status(ErrorCode::kParseError, std::string(source) + ": the trace has no requests");
  }
  return requests;
}

}  // namespace kvfabric::bench
