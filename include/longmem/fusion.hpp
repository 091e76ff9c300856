#pragma once
// How the memory-augmented layer mixes local attention A with memory attention M.
//
//   GatedFusion (default, the reference implementation):
//     A = softmax(q k^T / sqrt(dh) + alibi + causal) v
//     M = softmax(q Kr^T / sqrt(dh)) Vr                    its own softmax, no position term
//     out_h = (1 - sigmoid(g_h)) A_h + sigmoid(g_h) M_h     one gate g_h per head
//   JointFusion (as the paper's text describes it):
//     out = softmax([q k^T / sqrt(dh) + alibi + causal, q Kr^T / sqrt(dh)]) [v; Vr]
//     the gate is not used.
// With an empty memory both reduce to A (no gate factor).
#include <type_traits>

namespace longmem {

struct GatedFusion {
  static constexpr const char* name = "gated";
};

struct JointFusion {
  static constexpr const char* name = "joint";
};

template <class F>
concept Fusion = std::is_same_v<F, GatedFusion> || std::is_same_v<F, JointFusion>;

}  // namespace longmem
