#include "kvfabric/backend/backend.h"

namespace kvfabric {

KvArena& KvArena::operator=(KvArena&& other) noexcept {
  if (this != &other) {
    reset();
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    tier_ = other.tier_;
    release_ = std::move(other.release_);
    other.release_ = nullptr;
  }
  return *this;
}

void KvArena::reset() {
  if (data_ != nullptr && release_) release_(data_, bytes_);
  data_ = nullptr;
  bytes_ = 0;
  release_ = nullptr;
}

}  // namespace kvfabric
