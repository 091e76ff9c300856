#pragma once
// The SideNet's backward pass (memory-augmented adaptation: every SideNet tensor trains; the
// backbone, its hidden states and the tied head wte are constants).
//
// Per layer i, forward (SideNet::forward with activations):
//   ln = ln_1(x);  x' = x + (B[r(i+1)] - B[ri]) + Wo att(q, k, v) + fc2(gelu(fc1(ln)))
// backward, from dx' (N, d), last layer first:
//   fc2, gelu, fc1      -> d ln       (and d fc2, d fc1)
//   out_proj            -> d att      (and d Wo)
//   attention, per stream (layer i*: memory-augmented, gate included) -> d q, d k, d v
//   q/k/v projections   -> d ln +=    (and d Wq, d Wk, d Wv)
//   ln_1                -> dx = dx' + ln_1'(d ln)   (the residual B difference has no gradient)
// and first of all logits = ln_f(x_L) wte^T:  d ln_f = d_logits wte;  dx_L = ln_f'(d ln_f).
// Retrieved keys/values and the retrieval itself are constants (as in the reference).
#include <cstddef>
#include <span>

#include "longmem/fusion.hpp"
#include "longmem/ops.hpp"
#include "longmem/side_net.hpp"
#include "longmem/tensor.hpp"

namespace longmem {

/// Gradient buffers of activations, reused across calls (N rows).
template <class T, class L = Host>
struct SideNetGradScratch {
  Tensor<T, L> dx;          // (N, d) gradient of the residual stream
  Tensor<T, L> dln;         // (N, d) of ln_1's output (and of ln_f's first)
  Tensor<T, L> datt;        // (N, d) of the attention output
  Tensor<T, L> dq, dk, dv;  // (N, d)
  Tensor<T, L> dfc;         // (N, n_inner) of fc1's output (and of gelu's first)

  void resize(const SideNetConfig& c, index_t N) {
    for (Tensor<T, L>* t : {&dx, &dln, &datt, &dq, &dk, &dv}) t->resize({N, c.n_embd});
    dfc.resize({N, c.n_inner});
  }
};

/// Adds the gradient of the loss whose logits gradient is d_logits (N, V) to `grads` (every
/// SideNet tensor; shapes as zero_side_net_parameters). `acts` is what SideNet::forward kept for
/// the same hidden states, offsets and retrievals (which must still be alive).
template <Fusion F, class T, class L>
void side_net_backward(const SideNet<T, L>& net, const SideNetActivations<T, L>& acts, std::span<const index_t> offsets,
                       TensorView<const T, L> wte, TensorView<const T, L> d_logits, SideNetParameters<T, L>& grads,
                       SideNetGradScratch<T, L>& s) {
  const SideNetConfig& c = net.config();
  const SideNetParameters<T, L>& w = net.parameters();
  const index_t N = d_logits.dim(0), H = c.n_head, dh = c.head_dim();
  const double eps = c.layer_norm_epsilon;
  if (acts.layers.size() != static_cast<std::size_t>(c.n_layer) || acts.final_stream.dim(0) != N) {
    detail::fail<ShapeError>("side_net_backward: the activations are not from a forward over these ", N, " rows");
  }
  if (grads.layers.size() != w.layers.size()) {
    detail::fail<ShapeError>("side_net_backward: gradients for ", grads.layers.size(), " layers, the SideNet has ",
                             w.layers.size(), " (make them with zero_side_net_parameters)");
  }
  s.resize(c, N);
  const TensorView<T, L> none{};
  // logits = ln_f(x_L) wte^T
  ops::linear_backward(s.dln.view(), none, none, d_logits, TensorView<const T, L>{}, wte);
  ops::layer_norm_backward(s.dx.view(), grads.ln_f_weight.view(), grads.ln_f_bias.view(), cview(s.dln),
                           cview(acts.final_stream), cview(w.ln_f_weight), eps);
  for (int i = c.n_layer - 1; i >= 0; --i) {
    const auto& a = acts.layers[static_cast<std::size_t>(i)];
    const auto& wi = w.layers[static_cast<std::size_t>(i)];
    auto& g = grads.layers[static_cast<std::size_t>(i)];
    // MLP branch: fc2(gelu(fc1(ln)))
    ops::linear_backward(s.dfc.view(), g.fc2_weight.view(), g.fc2_bias.view(), cview(s.dx), cview(a.act),
                         cview(wi.fc2_weight));
    ops::gelu_backward(s.dfc.view(), cview(s.dfc), cview(a.fc), c.activation);
    ops::linear_backward(s.dln.view(), g.fc1_weight.view(), g.fc1_bias.view(), cview(s.dfc), cview(a.ln),
                         cview(wi.fc1_weight));
    // attention branch: Wo att
    ops::linear_backward(s.datt.view(), g.out_weight.view(), g.out_bias.view(), cview(s.dx), cview(a.att),
                         cview(wi.out_weight));
    if (i != c.memory_augmented_layer()) {  // every stream's segment attends within itself, in one call
      const Shape heads{offsets.back(), H, dh};
      ops::causal_attention_backward(s.dq.view().reshape(heads), s.dk.view().reshape(heads), s.dv.view().reshape(heads),
                                     cview(s.datt).reshape(heads), cview(a.q).reshape(heads), cview(a.k).reshape(heads),
                                     cview(a.v).reshape(heads), c.positions, std::span<const index_t>(offsets));
    }
    const Retrieved<T, L>* all = i == c.memory_augmented_layer() ? acts.stacked_memory : nullptr;
    if (all) {  // the forward read every stream's memory stacked by rows: one call
      const Shape heads{offsets.back(), H, dh};
      ops::memory_attention_backward<F>(s.dq.view().reshape(heads), s.dk.view().reshape(heads), s.dv.view().reshape(heads),
                                        g.gate.view(), cview(s.datt).reshape(heads), cview(a.q).reshape(heads),
                                        cview(a.k).reshape(heads), cview(a.v).reshape(heads), cview(all->keys),
                                        cview(all->values), cview(wi.gate), c.positions, offsets);
    }
    for (std::size_t b = 0; i == c.memory_augmented_layer() && !all && b + 1 < offsets.size(); ++b) {
      const index_t o0 = offsets[b], o1 = offsets[b + 1];
      const Shape heads{o1 - o0, H, dh};
      auto rows = [&](const Tensor<T, L>& t) { return cview(t).slice(o0, o1).reshape(heads); };
      auto grad_rows = [&](Tensor<T, L>& t) { return t.view().slice(o0, o1).reshape(heads); };
      const Retrieved<T, L>* mem = i == c.memory_augmented_layer() && b < acts.memory.size() ? acts.memory[b] : nullptr;
      if (mem && mem->chunks > 0) {
        ops::memory_attention_backward<F>(grad_rows(s.dq), grad_rows(s.dk), grad_rows(s.dv), g.gate.view(),
                                          rows(s.datt), rows(a.q), rows(a.k), rows(a.v), cview(mem->keys),
                                          cview(mem->values), cview(wi.gate), c.positions);
      } else {
        ops::causal_attention_backward(grad_rows(s.dq), grad_rows(s.dk), grad_rows(s.dv), rows(s.datt), rows(a.q),
                                       rows(a.k), rows(a.v), c.positions);
      }
    }
    ops::linear_backward(s.dln.view(), g.q_weight.view(), g.q_bias.view(), cview(s.dq), cview(a.ln),
                         cview(wi.q_weight), Accumulate::Yes);
    ops::linear_backward(s.dln.view(), g.k_weight.view(), g.k_bias.view(), cview(s.dk), cview(a.ln),
                         cview(wi.k_weight), Accumulate::Yes);
    ops::linear_backward(s.dln.view(), g.v_weight.view(), g.v_bias.view(), cview(s.dv), cview(a.ln),
                         cview(wi.v_weight), Accumulate::Yes);
    // ln_1: dx = dx' (residual) + ln_1'(d ln)
    ops::layer_norm_backward(s.dx.view(), g.ln_weight.view(), g.ln_bias.view(), cview(s.dln), cview(a.x),
                             cview(wi.ln_weight), eps, Accumulate::Yes);
  }
}

}  // namespace longmem
