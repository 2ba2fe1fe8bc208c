#include "common/yaml_documents.h"

#include <string>

namespace kvfabric::detail {
namespace {

// "---" or "..." at the start of `line`, followed by nothing or by white space.
bool is_marker(std::string_view line, std::string_view marker) {
  if (line.substr(0, 3) != marker) return false;
  return line.size() == 3 || line[3] == ' ' || line[3] == '\t' || line[3] == '\r';
}

// Whether a line holds anything but white space and a comment.
bool has_content(std::string_view line) {
  const size_t first = line.find_first_not_of(" \t\r");
  return first != std::string_view::npos && line[first] != '#';
}

}  // namespace

Status check_single_yaml_document(std::string_view yaml_text, std::string_view source) {
  if (yaml_text.substr(0, 3) == "\xEF\xBB\xBF") yaml_text.remove_prefix(3);  // a UTF-8 BOM
  bool content = false, started = false, ended = false;
  size_t line_no = 0;
  while (!yaml_text.empty()) {
    const size_t eol = yaml_text.find('\n');
    const std::string_view line = yaml_text.substr(0, eol);
    yaml_text = eol == std::string_view::npos ? std::string_view() : yaml_text.substr(eol + 1);
    ++line_no;
    auto second_document = [&] {
      return invalid_argument(std::string(source) + ":" + std::to_string(line_no) +
                              ": a second YAML document starts here; the file must hold one");
    };
    if (is_marker(line, "---")) {
      if (content || started) return second_document();
      started = true;
      content = has_content(line.substr(3));  // "--- {model: ...}"
      continue;
    }
    if (is_marker(line, "...")) {
      if (has_content(line.substr(3))) return second_document();  // "... {b: 2}"
      ended = true;
      continue;
    }
    if (line.empty() || line[0] == '%') continue;  // a directive belongs to the next document
    if (has_content(line)) {
      if (ended) return second_document();
      content = true;
    }
  }
  return ok_status();
}

}  // namespace kvfabric::detail
