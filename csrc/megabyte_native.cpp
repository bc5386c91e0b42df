// Native CPU kernels for the two fused byte-level ops of MEGABYTE (DESIGN.md §2-3), forward and
// backward, registered as PyTorch operators in the `megabyte_native` namespace:
//
//   patch_embed(ids, token_table, pos_table?, pad_patch?, patch_size, pad_id) -> (B, K, P*D_G)
//   global_to_local(global_out, ids, weight, bias?, local_table, local_pad?, patch_size, pad_id,
//                   cross_patch, shift=1) -> (B*K, P, D_L)
//   patch_embed_backward / global_to_local_backward: their gradients (called by autograd)
//
// The math is exactly megabyte_kernels/reference.py. Layout of the work:
//   * patch_embed forward: one pass over the (B*K*P, D_G) output rows, parallel over rows; the
//     shifted, right-padded global id of each row is computed on the fly from ids (no padded
//     copy), the token (or pad-patch) row and the position row are added with at::vec.
//   * global_to_local forward: the gather is fused *around* a library GEMM (no hand-written
//     GEMM; "GEMM engine" below says which): either the GEMM (+ bias) writes the output and one
//     pass adds local_table[l_ids] in place, or that pass writes local_table[l_ids] (+ bias)
//     first and `out.addmm_(X, W^T)` (beta = 1) adds the projection in BLAS's epilogue.
//   * backward: GEMMs for dX, dW by the same engine; every table gradient (token table, positions,
//     pad patch, local table, local pad, bias) in one pass over dOut, parallel over column chunks
//     of D: each task owns its columns of every accumulator and walks the rows in order, so each
//     gradient element is a sum in a fixed order (deterministic, no atomics, the same for every
//     thread count), accumulated in fp32 (fp64 for fp64 inputs).
// Autograd is registered here (Autograd dispatch key); fake (meta) implementations for
// torch.compile / opcheck are registered from Python (megabyte_kernels/native.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>

namespace megabyte_native {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

constexpr int64_t kRowGrain = 32768;  // elements per parallel task, forward passes

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ids (B, T) of any integer dtype -> contiguous int64, every value checked in [0, V) before any
// table row is read (c10::ValueError -> Python ValueError).
Tensor checked_ids(const Tensor& ids, int64_t V, const char* table) {
  TORCH_CHECK_VALUE(ids.device().is_cpu(), "megabyte_native: ids must be a CPU tensor, got ", ids.device());
  TORCH_CHECK_VALUE(ids.dim() == 2, "ids must have shape (B, T), got ", ids.sizes());
  TORCH_CHECK_VALUE(!at::isFloatingType(ids.scalar_type()) && !at::isComplexType(ids.scalar_type()),
                    "ids must be an integer tensor, got ", ids.scalar_type());
  Tensor out = ids.to(at::kLong).contiguous();
  const int64_t* p = out.const_data_ptr<int64_t>();
  const int64_t n = out.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < V, "ids must lie in [0, ", V, ") (", table, " has ", V,
                      " rows), found ", p[i]);
  }
  return out;
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "megabyte_native: ", name, " must be a CPU tensor, got ", t.device());
}

void check_opt(const std::optional<Tensor>& t, const Tensor& like, const char* name) {
  if (!t.has_value()) return;
  check_cpu(*t, name);
  TORCH_CHECK_VALUE(t->scalar_type() == like.scalar_type(), name, " has dtype ", t->scalar_type(),
                    " but the tables have ", like.scalar_type());
}

// dst[0:n) += src[0:n) (accumulator dtype: float or double), at::vec with a scalar tail
template <typename acc_t>
inline void add_into(acc_t* dst, const acc_t* src, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size()) {
    (Vec::loadu(dst + d) + Vec::loadu(src + d)).store(dst + d);
  }
  for (; d < n; ++d) dst[d] += src[d];
}

// out[0:n) = a[0:n) + b[0:n) in scalar_t, through fp32 for bf16/fp16 (at::vec::map2 converts)
template <typename scalar_t>
inline void add_rows(scalar_t* out, const scalar_t* a, const scalar_t* b, int64_t n) {
  at::vec::map2([](auto x, auto y) { return x + y; }, out, a, b, n);
}

template <typename scalar_t>
inline void copy_row(scalar_t* out, const scalar_t* a, int64_t n) {
  std::copy(a, a + n, out);
}

// Column chunks for the deterministic backward: whole cache lines per task (no false sharing
// between tasks writing the same accumulator row), about one chunk per thread.
template <typename acc_t>
int64_t column_chunk(int64_t D) {
  const int64_t line = 64 / sizeof(acc_t);
  const int64_t per_thread = ceil_div(D, std::max<int64_t>(1, at::get_num_threads()));
  return std::max(line, ceil_div(per_thread, line) * line);
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The deterministic scatter-add both backward passes share: grad rows r = 0..rows-1 of width D
// are added into the accumulator rows targets(r) names, {primary, secondary or nullptr}. Parallel
// over column chunks; each task walks the rows in order, so every element is a sum in a fixed
// order, the same for any thread count, with no atomics.
template <typename scalar_t, typename Targets>
void ordered_scatter_add(const scalar_t* grad, int64_t rows, int64_t D, const Targets& targets) {
  const int64_t CW = column_chunk<scalar_t>(D);
  at::parallel_for(0, ceil_div(D, CW), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t d0 = c * CW, w = std::min(CW, D - d0);
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* src = grad + r * D + d0;
        const auto [dst, dst2] = targets(r);
        add_into(dst + d0, src, w);
        if (dst2) add_into(dst2 + d0, src, w);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// GEMM engine. The global-to-local GEMMs go to a library, never a hand-written loop: ATen's BLAS
// (at::mm / addmm_, MKL in the x86 wheels) or oneDNN through ATen's own mkldnn operator
// `mkldnn::_linear_pointwise` (the one inductor's CPU backend calls). On the AMD EPYC (Zen 5,
// AVX-512) this was developed on, at the demo's GEMMs on 1 thread, MKL's sgemm runs at ~100
// GFLOP/s (what an AVX2 code path gives: MKL picks its kernels by CPU vendor) and oneDNN's,
// which picks by instruction set, at ~230 GFLOP/s; benchmarks/bench_native.py prints both.
// So fp32 GEMMs of at least kOneDnnMinMacs multiply-adds use oneDNN when this torch has the
// operator; smaller ones, other dtypes and torch builds without it use at::mm. On CPUs where
// MKL already uses AVX-512 the two are expected to be close (not measured here).
// MEGABYTE_NATIVE_GEMM=aten forces at::mm (read at every call, so a benchmark can compare).
// ------------------------------------------------------------------------------------------

struct OneDnn {
  std::optional<c10::OperatorHandle> linear;
};

const OneDnn& onednn_ops() {
  static const OneDnn ops = [] {
    OneDnn o;
    auto& d = c10::Dispatcher::singleton();
    auto lin = d.findOp(c10::OperatorName("mkldnn::_linear_pointwise", ""));
    if (lin && lin->hasKernelForDispatchKey(c10::DispatchKey::CPU)) o.linear = lin;
    return o;
  }();
  return ops;
}

// oneDNN costs ~12 us per call (primitive lookup) where MKL costs ~2: below about 2M multiply-adds
// (measured crossover at D_G=64, D_L=128: M=256 rows) at::mm is faster. Generation (one patch
// of P rows per call) stays on at::mm.
constexpr int64_t kOneDnnMinMacs = int64_t(1) << 21;

bool use_onednn(at::ScalarType dtype, int64_t macs) {
  if (dtype != at::kFloat || macs < kOneDnnMinMacs || !onednn_ops().linear) return false;
  const char* env = std::getenv("MEGABYTE_NATIVE_GEMM");
  return env == nullptr || std::strcmp(env, "aten") != 0;
}

Tensor call_boxed(const c10::OperatorHandle& op, std::vector<c10::IValue> stack) {
  op.callBoxed(&stack);
  return stack.at(0).toTensor();
}

// x (M, K) @ w (N, K)^T (+ bias) -> (M, N), oneDNN (only when use_onednn)
Tensor onednn_linear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias = std::nullopt) {
  return call_boxed(*onednn_ops().linear, {x, w, bias ? c10::IValue(*bias) : c10::IValue(), std::string("none"),
                                           c10::List<std::optional<c10::Scalar>>(), c10::IValue()});
}

}  // namespace

// The engine a global_to_local GEMM of `macs` multiply-adds in `dtype` uses now: "onednn" or
// "aten" (for tests and benchmarks).
std::string gemm_engine(at::ScalarType dtype, int64_t macs) { return use_onednn(dtype, macs) ? "onednn" : "aten"; }

// ------------------------------------------------------------------------------------------
// patch embedding
// ------------------------------------------------------------------------------------------

// h[b, t] = token_table[g_ids[b, t]] (pad_patch[t] for t < P when given) + pos_table[t],
// g_ids = [pad_id]*P ++ ids right-padded to K*P, dropping the last patch.
Tensor patch_embed_cpu(const Tensor& ids_in, const Tensor& token_table, const std::optional<Tensor>& pos_table,
                       const std::optional<Tensor>& pad_patch, int64_t P, int64_t pad_id) {
  TORCH_CHECK_VALUE(P >= 1, "patch_size must be positive, got ", P);
  TORCH_CHECK_VALUE(token_table.dim() == 2, "token_table must be (V, D_G), got ", token_table.sizes());
  check_cpu(token_table, "token_table");
  check_opt(pos_table, token_table, "pos_table");
  check_opt(pad_patch, token_table, "pad_patch");
  const int64_t V = token_table.size(0), D = token_table.size(1);
  TORCH_CHECK_VALUE(pad_id >= 0 && pad_id < V, "pad_id must lie in [0, ", V, "), got ", pad_id);
  const Tensor ids = checked_ids(ids_in, V, "token_table");
  const int64_t B = ids.size(0), T = ids.size(1), K = ceil_div(T, P), KP = K * P;
  if (pos_table) {
    TORCH_CHECK_VALUE(pos_table->dim() == 2 && pos_table->size(0) >= KP && pos_table->size(1) == D,
                      "pos_table must be (>= K*P = ", KP, ", ", D, "), got ", pos_table->sizes());
  }
  if (pad_patch) {
    TORCH_CHECK_VALUE(pad_patch->dim() == 2 && pad_patch->size(0) == P && pad_patch->size(1) == D,
                      "pad_patch must be (", P, ", ", D, "), got ", pad_patch->sizes());
  }
  const Tensor table = token_table.contiguous();
  const Tensor pos = pos_table ? pos_table->contiguous() : Tensor();
  const Tensor pad = pad_patch ? pad_patch->contiguous() : Tensor();
  Tensor out = at::empty({B, K, P * D}, token_table.options());
  const int64_t* id = ids.const_data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "patch_embed_cpu", [&] {
    const scalar_t* tab = table.const_data_ptr<scalar_t>();
    const scalar_t* pp = pos.defined() ? pos.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pd = pad.defined() ? pad.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * KP, std::max<int64_t>(1, kRowGrain / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / KP, t = r % KP;
        const scalar_t* src;
        if (t < P) {
          src = pd ? pd + t * D : tab + pad_id * D;
        } else {
          const int64_t s = t - P;  // the byte this slot embeds (s < T, or the right padding)
          src = tab + (s < T ? id[b * T + s] : pad_id) * D;
        }
        if (pp) {
          add_rows(o + r * D, src, pp + t * D, D);
        } else {
          copy_row(o + r * D, src, D);
        }
      }
    });
  });
  return out;
}

// (d token_table (V, D), d pos_table (pos_rows, D) or (0, D), d pad_patch (P, D) or (0, D))
std::tuple<Tensor, Tensor, Tensor> patch_embed_backward_cpu(const Tensor& grad, const Tensor& ids_in, int64_t V,
                                                            int64_t pos_rows, int64_t P, int64_t pad_id,
                                                            bool has_pos, bool has_pad_patch) {
  TORCH_CHECK_VALUE(grad.dim() == 3 && grad.size(2) % P == 0, "grad must be (B, K, P*D), got ", grad.sizes());
  const Tensor ids = checked_ids(ids_in, V, "token_table");
  const int64_t B = grad.size(0), K = grad.size(1), D = grad.size(2) / P, KP = K * P, T = ids.size(1);
  TORCH_CHECK_VALUE(ids.size(0) == B && ceil_div(T, P) == K, "ids ", ids.sizes(), " do not match grad ", grad.sizes());
  TORCH_CHECK_VALUE(!has_pos || pos_rows >= KP, "pos_rows must be >= K*P");
  const auto acc = acc_type(grad.scalar_type());
  const Tensor g = grad.to(acc).contiguous();  // (B*KP, D); a stride-0 grad becomes dense here
  auto opts = g.options();
  Tensor d_table = at::zeros({V, D}, opts);
  Tensor d_pos = at::zeros({has_pos ? pos_rows : 0, D}, opts);
  Tensor d_pad = at::zeros({has_pad_patch ? P : 0, D}, opts);
  const int64_t* id = ids.const_data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES(acc, "patch_embed_backward_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* dt = d_table.mutable_data_ptr<scalar_t>();
    scalar_t* dpos = has_pos ? d_pos.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dpad = has_pad_patch ? d_pad.mutable_data_ptr<scalar_t>() : nullptr;
    ordered_scatter_add(gp, B * KP, D, [&](int64_t r) -> std::pair<scalar_t*, scalar_t*> {
      const int64_t b = r / KP, t = r % KP;
      scalar_t* dst;
      if (t < P) {
        dst = dpad ? dpad + t * D : dt + pad_id * D;
      } else {
        const int64_t s = t - P;
        dst = dt + (s < T ? id[b * T + s] : pad_id) * D;
      }
      return {dst, dpos ? dpos + t * D : nullptr};
    });
  });
  const auto out_t = grad.scalar_type();
  return {d_table.to(out_t), d_pos.to(out_t), d_pad.to(out_t)};
}

// ------------------------------------------------------------------------------------------
// global-to-local
// ------------------------------------------------------------------------------------------

namespace {
// Row n = (b*K + k)*P + p of the local input, t = k*P + p: -1 for a shifted-in slot (the first S
// of the patch, or of the sequence with cross_patch), else the local id ids[b, t-S] (pad_id past
// the end of the sequence).
inline int64_t local_id(const int64_t* id, int64_t n, int64_t KP, int64_t T, int64_t P, int64_t S, int64_t pad_id,
                        bool cross_patch) {
  const int64_t b = n / KP, t = n % KP;
  if (cross_patch ? t < S : t % P < S) return -1;
  const int64_t s = t - S;
  return s < T ? id[b * T + s] : pad_id;
}
}  // namespace

// out[n] = global_out[n] @ weight^T + bias + local_table[l_ids[n]] (local_pad for shifted-in slots)
Tensor global_to_local_cpu(const Tensor& global_out, const Tensor& ids_in, const Tensor& weight,
                           const std::optional<Tensor>& bias, const Tensor& local_table,
                           const std::optional<Tensor>& local_pad, int64_t P, int64_t pad_id, bool cross_patch,
                           int64_t S) {
  TORCH_CHECK_VALUE(P >= 1, "patch_size must be positive, got ", P);
  TORCH_CHECK_VALUE(S >= 1 && S <= P, "shift must lie in [1, patch_size=", P, "], got ", S);
  check_cpu(global_out, "global_out");
  check_cpu(weight, "weight");
  check_cpu(local_table, "local_table");
  check_opt(bias, local_table, "bias");
  check_opt(local_pad, local_table, "local_pad");
  TORCH_CHECK_VALUE(global_out.scalar_type() == local_table.scalar_type() && weight.scalar_type() == local_table.scalar_type(),
                    "global_out, weight and local_table must share one dtype");
  TORCH_CHECK_VALUE(local_table.dim() == 2, "local_table must be (V, D_L), got ", local_table.sizes());
  const int64_t V = local_table.size(0), D_L = local_table.size(1);
  TORCH_CHECK_VALUE(pad_id >= 0 && pad_id < V, "pad_id must lie in [0, ", V, "), got ", pad_id);
  const Tensor ids = checked_ids(ids_in, V, "local_table");
  const int64_t B = ids.size(0), T = ids.size(1), K = ceil_div(T, P), KP = K * P, N = B * KP;
  TORCH_CHECK_VALUE(global_out.dim() == 3 && global_out.size(0) == B && global_out.size(1) == K &&
                        global_out.size(2) % P == 0,
                    "global_out must be (B=", B, ", K=", K, ", P*D_G), got ", global_out.sizes());
  const int64_t D_G = global_out.size(2) / P;
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == D_L && weight.size(1) == D_G, "weight must be (", D_L,
                    ", ", D_G, "), got ", weight.sizes());
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == D_L), "bias must be (", D_L, ",)");
  TORCH_CHECK_VALUE(!local_pad || (local_pad->dim() == 1 && local_pad->size(0) == D_L), "local_pad must be (", D_L, ",)");

  const Tensor table = local_table.contiguous();
  const Tensor bs = bias ? bias->contiguous() : Tensor();
  const Tensor lp = local_pad ? local_pad->contiguous() : Tensor();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const bool dnn = use_onednn(local_table.scalar_type(), N * D_G * D_L);
  // oneDNN: the GEMM (+ bias) writes the output, then one pass adds the embeddings in place;
  // at::mm: one pass writes embedding (+ bias), then addmm_ (beta = 1) adds the GEMM in place.
  // Either way the output is the only (B*K*P, D_L) buffer allocated.
  Tensor out = dnn ? onednn_linear(global_out.reshape({N, D_G}).contiguous(), weight.contiguous(),
                                   bias ? std::optional<Tensor>(bs) : std::nullopt)
                   : at::empty({N, D_L}, local_table.options());
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.numel() == N * D_L);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "global_to_local_cpu", [&] {
    const scalar_t* tab = table.const_data_ptr<scalar_t>();
    const scalar_t* bp = bs.defined() && !dnn ? bs.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pp = lp.defined() ? lp.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, kRowGrain / std::max<int64_t>(D_L, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t n = r0; n < r1; ++n) {
        const int64_t l = local_id(id, n, KP, T, P, S, pad_id, cross_patch);
        const scalar_t* src = l < 0 ? (pp ? pp : tab + pad_id * D_L) : tab + l * D_L;
        scalar_t* row = o + n * D_L;
        if (dnn) {
          add_rows(row, row, src, D_L);
        } else if (bp) {
          add_rows(row, src, bp, D_L);
        } else {
          copy_row(row, src, D_L);
        }
      }
    });
  });
  if (!dnn) out.addmm_(global_out.reshape({N, D_G}), weight.t());  // BLAS, beta = 1
  return out.view({B * K, P, D_L});
}

// (d global_out (B, K, P*D_G), d weight (D_L, D_G), d bias (D_L,) or (0,), d local_table (V, D_L),
//  d local_pad (D_L,) or (0,))
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> global_to_local_backward_cpu(
    const Tensor& grad, const Tensor& global_out, const Tensor& ids_in, const Tensor& weight, int64_t V, int64_t P,
    int64_t pad_id, bool cross_patch, bool has_bias, bool has_local_pad, int64_t S) {
  TORCH_CHECK_VALUE(S >= 1 && S <= P, "shift must lie in [1, patch_size=", P, "], got ", S);
  const Tensor ids = checked_ids(ids_in, V, "local_table");
  const int64_t B = global_out.size(0), K = global_out.size(1), D_G = global_out.size(2) / P, KP = K * P, N = B * KP;
  const int64_t T = ids.size(1), D_L = weight.size(0);
  TORCH_CHECK_VALUE(grad.numel() == N * D_L, "grad must be (B*K, P, D_L) = (", B * K, ", ", P, ", ", D_L, "), got ",
                    grad.sizes());
  const Tensor g = grad.contiguous().view({N, D_L});
  const Tensor x = global_out.reshape({N, D_G});
  // the GEMMs: dX = g @ W, dW = g^T @ X (oneDNN for fp32 when there, else ATen's BLAS)
  Tensor d_x, d_w;
  if (use_onednn(grad.scalar_type(), N * D_G * D_L) && weight.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat) {
    d_x = onednn_linear(g, weight.t().contiguous());
    // dW reduces over the rows: as a linear, g^T (D_L, N) against X^T (D_G, N), which
    // _linear_pointwise copies to contiguous itself. Measured in this op's fwd+bwd at the demo
    // size: as fast as oneDNN's backward-weights primitive on to_mkldnn copies, and faster than
    // at::mm's TN GEMM without copies.
    d_w = onednn_linear(g.t(), x.t());
  } else {
    d_x = at::mm(g, weight);
    d_w = at::mm(g.t(), x);
  }
  d_x = d_x.view({B, K, P * D_G});
  // one ordered pass over dOut for the local table, the local pad and the bias
  const auto acc = acc_type(grad.scalar_type());
  const Tensor ga = g.to(acc).contiguous();
  auto opts = ga.options();
  Tensor d_table = at::zeros({V, D_L}, opts);
  Tensor d_bias = at::zeros({has_bias ? D_L : 0}, opts);
  Tensor d_pad = at::zeros({has_local_pad ? D_L : 0}, opts);
  const int64_t* id = ids.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(acc, "global_to_local_backward_cpu", [&] {
    const scalar_t* gp = ga.const_data_ptr<scalar_t>();
    scalar_t* dt = d_table.mutable_data_ptr<scalar_t>();
    scalar_t* db = has_bias ? d_bias.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dp = has_local_pad ? d_pad.mutable_data_ptr<scalar_t>() : nullptr;
    ordered_scatter_add(gp, N, D_L, [&](int64_t n) -> std::pair<scalar_t*, scalar_t*> {
      const int64_t l = local_id(id, n, KP, T, P, S, pad_id, cross_patch);
      return {l < 0 ? (dp ? dp : dt + pad_id * D_L) : dt + l * D_L, db};
    });
  });
  const auto out_t = grad.scalar_type();
  return {d_x, d_w, d_bias.to(out_t), d_table.to(out_t), d_pad.to(out_t)};
}

// ------------------------------------------------------------------------------------------
// autograd (C++: no Python on the hot path; the backward ops have fake impls, so AOTAutograd
// traces this backward under torch.compile)
// ------------------------------------------------------------------------------------------

namespace {

class PatchEmbedFn : public torch::autograd::Function<PatchEmbedFn> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& ids, const Tensor& token_table,
                        const std::optional<Tensor>& pos_table, const std::optional<Tensor>& pad_patch, int64_t P,
                        int64_t pad_id) {
    ctx->save_for_backward({ids});
    ctx->saved_data["V"] = token_table.sym_size(0);
    ctx->saved_data["pos_rows"] = pos_table ? pos_table->sym_size(0) : c10::SymInt(0);
    ctx->saved_data["P"] = P;
    ctx->saved_data["pad_id"] = pad_id;
    ctx->saved_data["has_pos"] = pos_table.has_value();
    ctx->saved_data["has_pad"] = pad_patch.has_value();
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("megabyte_native::patch_embed", "")
                         .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                       const std::optional<Tensor>&, int64_t, int64_t)>();
    return op.call(ids, token_table, pos_table, pad_patch, P, pad_id);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor ids = ctx->get_saved_variables()[0];
    const bool has_pos = ctx->saved_data["has_pos"].toBool(), has_pad = ctx->saved_data["has_pad"].toBool();
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("megabyte_native::patch_embed_backward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, c10::SymInt,
                                                                   c10::SymInt, int64_t, int64_t, bool, bool)>();
    auto [d_table, d_pos, d_pad] =
        op.call(grads[0], ids, ctx->saved_data["V"].toSymInt(), ctx->saved_data["pos_rows"].toSymInt(),
                ctx->saved_data["P"].toInt(), ctx->saved_data["pad_id"].toInt(), has_pos, has_pad);
    return {Tensor(), d_table, has_pos ? d_pos : Tensor(), has_pad ? d_pad : Tensor(), Tensor(), Tensor()};
  }
};

class GlobalToLocalFn : public torch::autograd::Function<GlobalToLocalFn> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& global_out, const Tensor& ids, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& local_table,
                        const std::optional<Tensor>& local_pad, int64_t P, int64_t pad_id, bool cross_patch,
                        int64_t S) {
    ctx->save_for_backward({global_out, ids, weight});
    ctx->saved_data["V"] = local_table.sym_size(0);
    ctx->saved_data["P"] = P;
    ctx->saved_data["pad_id"] = pad_id;
    ctx->saved_data["cross_patch"] = cross_patch;
    ctx->saved_data["shift"] = S;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["has_pad"] = local_pad.has_value();
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("megabyte_native::global_to_local", "")
                         .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                       const Tensor&, const std::optional<Tensor>&, int64_t, int64_t, bool,
                                       int64_t)>();
    return op.call(global_out, ids, weight, bias, local_table, local_pad, P, pad_id, cross_patch, S);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool(), has_pad = ctx->saved_data["has_pad"].toBool();
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("megabyte_native::global_to_local_backward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
                             const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::SymInt, int64_t,
                             int64_t, bool, bool, bool, int64_t)>();
    auto [d_x, d_w, d_b, d_table, d_pad] =
        op.call(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["V"].toSymInt(), ctx->saved_data["P"].toInt(),
                ctx->saved_data["pad_id"].toInt(), ctx->saved_data["cross_patch"].toBool(), has_bias, has_pad,
                ctx->saved_data["shift"].toInt());
    return {d_x, Tensor(), d_w, has_bias ? d_b : Tensor(), d_table, has_pad ? d_pad : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor patch_embed_autograd(const Tensor& ids, const Tensor& token_table, const std::optional<Tensor>& pos_table,
                            const std::optional<Tensor>& pad_patch, int64_t P, int64_t pad_id) {
  return PatchEmbedFn::apply(ids, token_table, pos_table, pad_patch, P, pad_id);
}

Tensor global_to_local_autograd(const Tensor& global_out, const Tensor& ids, const Tensor& weight,
                                const std::optional<Tensor>& bias, const Tensor& local_table,
                                const std::optional<Tensor>& local_pad, int64_t P, int64_t pad_id, bool cross_patch,
                                int64_t S) {
  return GlobalToLocalFn::apply(global_out, ids, weight, bias, local_table, local_pad, P, pad_id, cross_patch, S);
}

}  // namespace

// schema: the one place the four ops are declared
TORCH_LIBRARY(megabyte_native, m) {
  m.def("patch_embed(Tensor ids, Tensor token_table, Tensor? pos_table, Tensor? pad_patch, int patch_size, "
        "int pad_id) -> Tensor");
  m.def("patch_embed_backward(Tensor grad, Tensor ids, SymInt vocab_size, SymInt pos_rows, int patch_size, "
        "int pad_id, bool has_pos, bool has_pad_patch) -> (Tensor, Tensor, Tensor)");
  m.def("global_to_local(Tensor global_out, Tensor ids, Tensor weight, Tensor? bias, Tensor local_table, "
        "Tensor? local_pad, int patch_size, int pad_id, bool cross_patch, int shift=1) -> Tensor");
  m.def("global_to_local_backward(Tensor grad, Tensor global_out, Tensor ids, Tensor weight, SymInt vocab_size, "
        "int patch_size, int pad_id, bool cross_patch, bool has_bias, bool has_local_pad, int shift=1) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gemm_engine(ScalarType dtype, int macs) -> str",
        [](at::ScalarType dtype, int64_t macs) { return gemm_engine(dtype, macs); });
}

TORCH_LIBRARY_IMPL(megabyte_native, CPU, m) {
  m.impl("patch_embed", &patch_embed_cpu);
  m.impl("patch_embed_backward", &patch_embed_backward_cpu);
  m.impl("global_to_local", &global_to_local_cpu);
  m.impl("global_to_local_backward", &global_to_local_backward_cpu);
}

TORCH_LIBRARY_IMPL(megabyte_native, Autograd, m) {
  m.impl("patch_embed", &patch_embed_autograd);
  m.impl("global_to_local", &global_to_local_autograd);
}

}  // namespace megabyte_native
