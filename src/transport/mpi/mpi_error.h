// MPI error codes as text, for Status messages (MPI_Error_string).
#pragma once

#include <mpi.h>

#include <string>

namespace kvfabric::detail {

//! "MPI_ERR_TRUNCATE: message truncated"-style text of an MPI error code.
inline std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) {
    return "MPI error " + std::to_string(code);
  }
  return std::string(text, static_cast<size_t>(length)) + " (MPI error " + std::to_string(code) +
         ")";
}

}  // namespace kvfabric::detail
