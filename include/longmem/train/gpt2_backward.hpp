#pragma once
// The GPT-2 / GPT-2* backbone's backward pass (training from scratch; the tied embedding wte
// gets the gradient of both its uses: the input embedding and the output head).
//
// Per block j, forward (Gpt2Backbone::forward with activations), h = hidden[j]:
//   parallel:    a = ln_1 h;  h' = h + Wo attn(a) + fc_out(gelu(fc_in a))
//   sequential:  m = h + Wo attn(ln_1 h);  h' = m + fc_out(gelu(fc_in(ln_2 m)))
// backward, from dh' (N, d), last block first:
//   fc_out, gelu, fc_in -> d x            (x = a, or ln_2 m)
//   sequential: dm = dh' + ln_2'(d x)      parallel: d a = d x
//   out_proj -> d att;  attention per segment -> d q, d k, d v;  q/k/v -> d a +=
//   dh = dm (or dh') + ln_1'(d a)
// and first of all logits = ln_f(h_L) wte^T; last of all the embedding.
#include <cstdint>
#include <span>

#include "longmem/backbone.hpp"
#include "longmem/gpt2_backbone.hpp"
#include "longmem/ops.hpp"
#include "longmem/tensor.hpp"

namespace longmem {

/// Gradient buffers of activations, reused across calls (N rows).
template <class T, class L = Host>
struct Gpt2GradScratch {
  Tensor<T, L> dh;          // (N, d) gradient of the residual stream
  Tensor<T, L> dx;          // (N, d) of ln_f's output, then of the MLP input
  Tensor<T, L> dln;         // (N, d) of ln_1's output
  Tensor<T, L> datt;        // (N, d)
  Tensor<T, L> dq, dk, dv;  // (N, d)
  Tensor<T, L> dfc;         // (N, n_inner)

  void resize(const BackboneConfig& c, index_t N) {
    for (Tensor<T, L>* t : {&dh, &dx, &dln, &datt, &dq, &dk, &dv}) t->resize({N, c.n_embd});
    dfc.resize({N, c.n_inner});
  }
};

/// Adds the gradient of the loss whose logits gradient is d_logits (N, V) to `grads` (every
/// backbone tensor; shapes as zero_gpt2_parameters). `out` and `acts` come from one
/// Gpt2Backbone::forward over `segments` with hidden states and activations kept.
template <class T, class L>
void gpt2_backward(const Gpt2Backbone<T, L>& model, std::span<const std::span<const std::int32_t>> segments,
                   const BackboneOutput<T, L>& out, const Gpt2Activations<T, L>& acts,
                   TensorView<const T, L> d_logits, Gpt2Parameters<T, L>& grads, Gpt2GradScratch<T, L>& s) {
  const BackboneConfig& c = model.config();
  const Gpt2Parameters<T, L>& w = model.parameters();
  const int nL = c.n_layer;
  const index_t N = d_logits.dim(0), H = c.n_head, dh = c.head_dim();
  const double eps = c.layer_norm_epsilon;
  if (out.hidden.dim(0) != nL + 1 || out.hidden.dim(1) != N || acts.blocks.size() != static_cast<std::size_t>(nL) ||
      out.offsets.size() != segments.size() + 1) {
    detail::fail<ShapeError>("gpt2_backward: the forward output and activations are not from a forward over these ",
                             segments.size(), " segments of ", N, " rows with hidden states kept");
  }
  if (grads.blocks.size() != w.blocks.size()) {
    detail::fail<ShapeError>("gpt2_backward: gradients for ", grads.blocks.size(), " blocks, the backbone has ",
                             w.blocks.size(), " (make them with zero_gpt2_parameters)");
  }
  s.resize(c, N);
  const TensorView<T, L> none{};
  const auto& offsets = out.offsets;
  // logits = B[L] wte^T, B[L] = ln_f(h_L)
  ops::linear_backward(s.dx.view(), grads.wte.view(), none, d_logits, out.hidden[nL], cview(w.wte));
  ops::layer_norm_backward(s.dh.view(), grads.ln_f_weight.view(), grads.ln_f_bias.view(), cview(s.dx),
                           cview(acts.final_stream), cview(w.ln_f_weight), eps);
  const bool sequential = c.block_style == BlockStyle::Sequential;
  for (int j = nL - 1; j >= 0; --j) {
    const auto& a = acts.blocks[static_cast<std::size_t>(j)];
    const auto& wj = w.blocks[static_cast<std::size_t>(j)];
    auto& g = grads.blocks[static_cast<std::size_t>(j)];
    // MLP branch
    ops::linear_backward(s.dfc.view(), g.fc_out_weight.view(), g.fc_out_bias.view(), cview(s.dh), cview(a.act),
                         cview(wj.fc_out_weight));
    ops::gelu_backward(s.dfc.view(), cview(s.dfc), cview(a.fc), c.activation);
    ops::linear_backward(s.dx.view(), g.fc_in_weight.view(), g.fc_in_bias.view(), cview(s.dfc),
                         sequential ? cview(a.ln_2) : cview(a.ln_1), cview(wj.fc_in_weight));
    if (sequential) {
      // dh becomes the gradient of m = h after attention
      ops::layer_norm_backward(s.dh.view(), g.ln_2_weight.view(), g.ln_2_bias.view(), cview(s.dx), cview(a.mid),
                               cview(wj.ln_2_weight), eps, Accumulate::Yes);
    }
    // attention branch
    ops::linear_backward(s.datt.view(), g.out_weight.view(), g.out_bias.view(), cview(s.dh), cview(a.att),
                         cview(wj.out_weight));
    {  // every stream's segment attends within itself; all in one call (one batch on the GPU)
      const Shape heads{N, H, dh};
      auto rows = [&](const Tensor<T, L>& t) { return cview(t).reshape(heads); };
      auto grad_rows = [&](Tensor<T, L>& t) { return t.view().reshape(heads); };
      ops::causal_attention_backward(grad_rows(s.dq), grad_rows(s.dk), grad_rows(s.dv), rows(s.datt), rows(a.q),
                                     rows(a.k), rows(a.v), c.positions, std::span<const index_t>(offsets));
    }
    // d ln_1: parallel blocks add the MLP branch's gradient (dx) to the attention branch's
    Tensor<T, L>& dln = sequential ? s.dln : s.dx;
    ops::linear_backward(dln.view(), g.q_weight.view(), g.q_bias.view(), cview(s.dq), cview(a.ln_1), cview(wj.q_weight),
                         sequential ? Accumulate::No : Accumulate::Yes);
    ops::linear_backward(dln.view(), g.k_weight.view(), g.k_bias.view(), cview(s.dk), cview(a.ln_1), cview(wj.k_weight),
                         Accumulate::Yes);
    ops::linear_backward(dln.view(), g.v_weight.view(), g.v_bias.view(), cview(s.dv), cview(a.ln_1), cview(wj.v_weight),
                         Accumulate::Yes);
    ops::layer_norm_backward(s.dh.view(), g.ln_1_weight.view(), g.ln_1_bias.view(), cview(dln), out.hidden[j],
                             cview(wj.ln_1_weight), eps, Accumulate::Yes);
  }
  for (std::size_t b = 0; b < segments.size(); ++b) {
    ops::embedding_backward(grads.wte.view(), grads.wpe.view(), cview(s.dh).slice(offsets[b], offsets[b + 1]),
                            segments[b]);
  }
}

}  // namespace longmem
