#pragma once
// Eigen for the CPU backend, included in one place.
// GCC 12 with AVX-512 reports a false -W(maybe-)uninitialized inside its own intrinsics
// headers once Eigen's packet code is inlined (GCC bug 105593, fixed in GCC 13).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <Eigen/Core>
#pragma GCC diagnostic pop
#else
#include <Eigen/Core>
#endif
