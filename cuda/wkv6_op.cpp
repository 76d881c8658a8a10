// Torch bindings for the WKV6 CUDA kernels in wkv6_cuda.cu (head size _N_ from -D_N_=64).
//
// forward(r, k, v, w, u, s0) -> [y, sT]
// backward(r, k, v, w, u, s0, gy, gsT) -> [gr, gk, gv, gw, gu, gs0]
// r, k, v, gy: (B, T, H, N) contiguous float32 / bfloat16 / float16 (one type); w: (B, T, H, N)
// float32 raw decay (decay = exp(-exp(w))); u: (H, N) float32; s0, gsT: (B, H, N, N) float32.
// y, gr, gk, gv have r's type; sT, gw, gu (summed over the batch) and gs0 are float32.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <optional>
#include <vector>

void wkv6_cuda_forward(int dtype, int B, int T, int H, const void* r, const void* k,
                       const void* v, const float* w, const float* u, const float* s0, void* y,
                       float* sT, cudaStream_t stream);
void wkv6_cuda_backward(int dtype, int B, int T, int H, const void* r, const void* k,
                        const void* v, const float* w, const float* u, const float* s0,
                        const void* gy, const float* gsT, void* gr, void* gk, void* gv, float* gw,
                        float* gu, float* gs0, float* rq, float* f, cudaStream_t stream);

namespace {

int dtype_code(const torch::Tensor& x) {
    if (x.scalar_type() == torch::kFloat32) return 0;
    if (x.scalar_type() == torch::kBFloat16) return 1;
    if (x.scalar_type() == torch::kFloat16) return 2;
    TORCH_CHECK(false, "wkv6 CUDA: r, k, v must be float32, bfloat16 or float16, got ",
                x.scalar_type());
    return -1;
}

void check(const torch::Tensor& x, const char* name, c10::IntArrayRef shape,
           std::optional<torch::ScalarType> dtype, const torch::Tensor& like) {
    TORCH_CHECK(x.is_cuda(), "wkv6 CUDA: ", name, " must be a CUDA tensor");
    TORCH_CHECK(x.device() == like.device(), "wkv6 CUDA: ", name, " is on another device");
    TORCH_CHECK(x.is_contiguous(), "wkv6 CUDA: ", name, " must be contiguous");
    TORCH_CHECK(x.sizes() == shape, "wkv6 CUDA: ", name, " has shape ", x.sizes(),
                ", expected ", shape);
    if (dtype.has_value())
        TORCH_CHECK(x.scalar_type() == *dtype, "wkv6 CUDA: ", name, " must be ", *dtype);
}

void check_inputs(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                  const torch::Tensor& w, const torch::Tensor& u, const torch::Tensor& s0) {
    TORCH_CHECK(r.dim() == 4 && r.size(3) == _N_, "wkv6 CUDA: r must be (B, T, H, ", _N_, ")");
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
    dtype_code(r);
    check(r, "r", {B, T, H, _N_}, std::nullopt, r);
    check(k, "k", {B, T, H, _N_}, r.scalar_type(), r);
    check(v, "v", {B, T, H, _N_}, r.scalar_type(), r);
    check(w, "w", {B, T, H, _N_}, torch::kFloat32, r);
    check(u, "u", {H, _N_}, torch::kFloat32, r);
    check(s0, "s0", {B, H, _N_, _N_}, torch::kFloat32, r);
}

}  // namespace

std::vector<torch::Tensor> wkv6_forward(torch::Tensor r, torch::Tensor k, torch::Tensor v,
                                        torch::Tensor w, torch::Tensor u, torch::Tensor s0) {
    check_inputs(r, k, v, w, u, s0);
    const c10::cuda::CUDAGuard guard(r.device());
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    auto y = torch::empty_like(r);
    auto sT = torch::empty_like(s0);
    wkv6_cuda_forward(dtype_code(r), B, T, H, r.data_ptr(), k.data_ptr(), v.data_ptr(),
                      w.data_ptr<float>(), u.data_ptr<float>(), s0.data_ptr<float>(),
                      y.data_ptr(), sT.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {y, sT};
}

std::vector<torch::Tensor> wkv6_backward(torch::Tensor r, torch::Tensor k, torch::Tensor v,
                                         torch::Tensor w, torch::Tensor u, torch::Tensor s0,
                                         torch::Tensor gy, torch::Tensor gsT) {
    check_inputs(r, k, v, w, u, s0);
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    check(gy, "gy", r.sizes(), r.scalar_type(), r);
    check(gsT, "gsT", s0.sizes(), torch::kFloat32, r);
    const c10::cuda::CUDAGuard guard(r.device());
    auto f32 = r.options().dtype(torch::kFloat32);
    auto gr = torch::empty_like(r);
    auto gk = torch::empty_like(r);
    auto gv = torch::empty_like(r);
    auto gw = torch::empty_like(w);
    auto gu_per_batch = torch::empty({B, H, _N_}, f32);
    auto gs0 = torch::empty_like(s0);
    auto rq = torch::empty({B, T, H, _N_}, f32);  // r_t * q_t, read one step later by gk
    auto f = torch::empty({B, H, _N_}, f32);
    wkv6_cuda_backward(dtype_code(r), B, T, H, r.data_ptr(), k.data_ptr(), v.data_ptr(),
                       w.data_ptr<float>(), u.data_ptr<float>(), s0.data_ptr<float>(),
                       gy.data_ptr(), gsT.data_ptr<float>(), gr.data_ptr(), gk.data_ptr(),
                       gv.data_ptr(), gw.data_ptr<float>(), gu_per_batch.data_ptr<float>(),
                       gs0.data_ptr<float>(), rq.data_ptr<float>(), f.data_ptr<float>(),
                       c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {gr, gk, gv, gw, gu_per_batch.sum(0), gs0};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &wkv6_forward, "WKV6 forward (CUDA)");
    m.def("backward", &wkv6_backward, "WKV6 backward (CUDA)");
}
