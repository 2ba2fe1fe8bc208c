// A kernel header that reaches for the Backend interface: kernels_include_check_refuses_backend
// expects tests/kernel_includes.cmake to refuse this directory.
#pragma once

#include "kvfabric/backend/backend.h"
