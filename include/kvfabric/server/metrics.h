// Prometheus text exposition of a coordinator's state, for the control plane's /metrics.
#pragma once

#include <string>

#include "kvfabric/coordinator/coordinator.h"

namespace kvfabric {

struct ControlStats;

//! \brief The coordinator's counters (admissions, prefix hits, migrations, swaps, preemptions,
//! steps) and every replica's device pool (used, cached, free blocks) and host tier, in the
//! Prometheus text format (version 0.0.4), names prefixed `kvfabric_`. With `requests`, also
//! the control plane's request counts by op and outcome. Engines that drive the Coordinator
//! in process can serve this themselves.
std::string render_metrics(const Coordinator& coordinator, const ControlStats* requests = nullptr);

}  // namespace kvfabric
