// Marks functions usable from host code and from CUDA device code (view structs, conversions).
#pragma once

#if defined(__CUDACC__)
#define KVF_HOST_DEVICE __host__ __device__
#define KVF_FORCE_INLINE __forceinline__
#else
#define KVF_HOST_DEVICE
#define KVF_FORCE_INLINE inline __attribute__((always_inline))
#endif
