// YAML config text: parse_config() refuses anything malformed or out of range with an error
// (never a crash or an exception), and a config it accepts is valid and dumps to YAML that
// parses back to the same config.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "fuzz_check.h"
#include "kvfabric/config/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvfabric;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const auto config = parse_config(text, "fuzz");
  if (!config.ok()) return 0;
  fuzz::require(validate(*config).ok(), "an accepted config is valid");
  const std::string dumped = dump_config(*config);
  const auto again = parse_config(dumped, "dump");
  fuzz::require(again.ok(), "the dump parses: " + again.status().to_string() + "\n" + dumped);
  fuzz::require(dump_config(*again) == dumped, "the dump round-trips:\n" + dumped);
  return 0;
}
