// Fused SRU++ elementwise recurrence for the CPU (forward and backward), built at first use by
// torch.utils.cpp_extension.load (see cpu.py). The math is documented in reference.py; this file only fuses it.
//
// Shapes (all contiguous, one floating dtype):
//   u [B, S, 3, D]  candidate, forget and reset inputs      x  [B, S, D]  highway input
//   v [2, D]        v_f, v_r (the c_{t-1} weights)           bias [2, D]   b_f, b_r
//   c0 [B, D]       initial state
// Work is split over (batch row, block of hidden units); each task walks its time steps in order, and the inner loop
// over hidden units is contiguous so the compiler vectorizes it.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlock = 128;  // hidden units per task

template <typename T>
inline T sigmoid(T z) {
  return T(1) / (T(1) + std::exp(-z));
}

void check_inputs(const at::Tensor& u, const at::Tensor& x, const at::Tensor& v, const at::Tensor& bias,
                  const at::Tensor& c0) {
  TORCH_CHECK(x.dim() == 3, "sru_cpu: x must be [B, S, D], got ", x.sizes());
  const auto B = x.size(0), S = x.size(1), D = x.size(2);
  TORCH_CHECK(u.sizes() == at::IntArrayRef({B, S, 3, D}), "sru_cpu: u must be [B, S, 3, D] = ",
              at::IntArrayRef({B, S, 3, D}), ", got ", u.sizes());
  TORCH_CHECK(v.sizes() == at::IntArrayRef({2, D}) && bias.sizes() == at::IntArrayRef({2, D}),
              "sru_cpu: v and bias must be [2, D]");
  TORCH_CHECK(c0.sizes() == at::IntArrayRef({B, D}), "sru_cpu: c0 must be [B, D]");
  for (const auto* t : {&u, &x, &v, &bias, &c0}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == x.scalar_type(),
                "sru_cpu: inputs must be contiguous CPU tensors of one dtype");
  }
}

template <typename T>
void forward_kernel(const T* u, const T* x, const T* v, const T* bias, const T* c0, T* h, T* c, int64_t B,
                    int64_t S, int64_t D) {
  const int64_t blocks = (D + kBlock - 1) / kBlock;
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    T state[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, j0 = (task % blocks) * kBlock, n = std::min(kBlock, D - j0);
      const T *vf = v + j0, *vr = v + D + j0, *bf = bias + j0, *br = bias + D + j0;
      std::copy(c0 + b * D + j0, c0 + b * D + j0 + n, state);
      for (int64_t t = 0; t < S; ++t) {
        const int64_t row = b * S + t;
        const T* ut = u + row * 3 * D + j0;
        const T* xt = x + row * D + j0;
        T* ht = h + row * D + j0;
        T* ct = c + row * D + j0;
        for (int64_t j = 0; j < n; ++j) {
          const T prev = state[j];
          const T f = sigmoid(ut[D + j] + vf[j] * prev + bf[j]);
          const T r = sigmoid(ut[2 * D + j] + vr[j] * prev + br[j]);
          const T cur = f * prev + (T(1) - f) * ut[j];
          state[j] = cur;
          ct[j] = cur;
          ht[j] = r * cur + (T(1) - r) * xt[j];
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const T* u, const T* x, const T* v, const T* bias, const T* c0, const T* c, const T* dh,
                     const T* dc_last, T* du, T* dx, T* dparam, T* dc0, int64_t B, int64_t S, int64_t D) {
  // dparam is [B, 4, D]: per batch row, the partial sums of dv_f, dv_r, db_f, db_r (summed over B by the caller).
  const int64_t blocks = (D + kBlock - 1) / kBlock;
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    T grad_c[kBlock], dvf[kBlock], dvr[kBlock], dbf[kBlock], dbr[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, j0 = (task % blocks) * kBlock, n = std::min(kBlock, D - j0);
      const T *vf = v + j0, *vr = v + D + j0, *bf = bias + j0, *br = bias + D + j0;
      std::copy(dc_last + b * D + j0, dc_last + b * D + j0 + n, grad_c);
      std::fill(dvf, dvf + n, T(0));
      std::fill(dvr, dvr + n, T(0));
      std::fill(dbf, dbf + n, T(0));
      std::fill(dbr, dbr + n, T(0));
      for (int64_t t = S - 1; t >= 0; --t) {
        const int64_t row = b * S + t;
        const T* ut = u + row * 3 * D + j0;
        const T* xt = x + row * D + j0;
        const T* ct = c + row * D + j0;
        const T* prev_c = t > 0 ? c + (row - 1) * D + j0 : c0 + b * D + j0;
        const T* dht = dh + row * D + j0;
        T* dut = du + row * 3 * D + j0;
        T* dxt = dx + row * D + j0;
        for (int64_t j = 0; j < n; ++j) {
          const T prev = prev_c[j];
          const T f = sigmoid(ut[D + j] + vf[j] * prev + bf[j]);
          const T r = sigmoid(ut[2 * D + j] + vr[j] * prev + br[j]);
          const T g = grad_c[j] + dht[j] * r;                   // dL/dc_t
          const T dr = dht[j] * (ct[j] - xt[j]) * r * (T(1) - r);  // dL/d(reset pre-activation)
          const T df = g * (prev - ut[j]) * f * (T(1) - f);        // dL/d(forget pre-activation)
          dut[j] = g * (T(1) - f);
          dut[D + j] = df;
          dut[2 * D + j] = dr;
          dxt[j] = dht[j] * (T(1) - r);
          dvf[j] += df * prev;
          dvr[j] += dr * prev;
          dbf[j] += df;
          dbr[j] += dr;
          grad_c[j] = g * f + df * vf[j] + dr * vr[j];  // dL/dc_{t-1}
        }
      }
      std::copy(grad_c, grad_c + n, dc0 + b * D + j0);
      T* out = dparam + b * 4 * D + j0;
      std::copy(dvf, dvf + n, out);
      std::copy(dvr, dvr + n, out + D);
      std::copy(dbf, dbf + n, out + 2 * D);
      std::copy(dbr, dbr + n, out + 3 * D);
    }
  });
}

}  // namespace

// Returns (h [B, S, D], c [B, S, D]: every state, kept for the backward).
std::vector<at::Tensor> sru_forward(const at::Tensor& u, const at::Tensor& x, const at::Tensor& v,
                                    const at::Tensor& bias, const at::Tensor& c0) {
  check_inputs(u, x, v, bias, c0);
  auto h = at::empty_like(x);
  auto c = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sru_forward", [&] {
    forward_kernel<scalar_t>(u.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             bias.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                             c.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2));
  });
  return {h, c};
}

// Returns (du, dx, dv, dbias, dc0).
std::vector<at::Tensor> sru_backward(const at::Tensor& u, const at::Tensor& x, const at::Tensor& v,
                                     const at::Tensor& bias, const at::Tensor& c0, const at::Tensor& c,
                                     const at::Tensor& dh, const at::Tensor& dc_last) {
  check_inputs(u, x, v, bias, c0);
  TORCH_CHECK(c.sizes() == x.sizes() && dh.sizes() == x.sizes() && dc_last.sizes() == c0.sizes(),
              "sru_cpu: c and dh must be [B, S, D], dc_last [B, D]");
  TORCH_CHECK(c.is_contiguous() && dh.is_contiguous() && dc_last.is_contiguous(), "sru_cpu: grads must be contiguous");
  const auto B = x.size(0), S = x.size(1), D = x.size(2);
  auto du = at::empty_like(u);
  auto dx = at::empty_like(x);
  auto dc0 = at::empty_like(c0);
  auto dparam = at::empty({B, 4, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sru_backward", [&] {
    backward_kernel<scalar_t>(u.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                              bias.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
                              dh.data_ptr<scalar_t>(), dc_last.data_ptr<scalar_t>(), du.data_ptr<scalar_t>(),
                              dx.data_ptr<scalar_t>(), dparam.data_ptr<scalar_t>(), dc0.data_ptr<scalar_t>(), B, S,
                              D);
  });
  auto dsum = dparam.sum(0);  // [4, D]
  return {du, dx, dsum.narrow(0, 0, 2).contiguous(), dsum.narrow(0, 2, 2).contiguous(), dc0};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &sru_forward, "SRU++ recurrence forward (CPU)");
  m.def("backward", &sru_backward, "SRU++ recurrence backward (CPU)");
}
