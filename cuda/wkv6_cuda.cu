// WKV6 forward and backward CUDA kernels (head size _N_, passed with -D_N_=64).
//
// Per batch b and head h, with row vectors r_t, k_t, v_t of size N and the N x N state S
// (rows = key channel i, columns = value channel j):
//     y_t[j] = sum_i r_t[i] (S_{t-1}[i][j] + u[i] k_t[i] v_t[j])
//     S_t[i][j] = d_t[i] S_{t-1}[i][j] + k_t[i] v_t[j],          d_t = exp(-exp(w_t))
// Backward, with G_t = dL/dS_t (G_{T-1} = gradient of the final state):
//     G_{t-1}[i][j] = d_t[i] G_t[i][j] + r_t[i] gy_t[j]            (G_{-1} = dL/dS_initial)
//     gr_t[i] = sum_j gy_t[j] (S_{t-1}[i][j] + u[i] k_t[i] v_t[j])
//     gk_t[i] = sum_j G_t[i][j] v_t[j] + u[i] r_t[i] (gy_t . v_t)
//     gv_t[j] = sum_i G_t[i][j] k_t[i] + (sum_i r_t[i] u[i] k_t[i]) gy_t[j]
//     gu[i]   = sum_t r_t[i] k_t[i] (gy_t . v_t)
// and for the decay, with A_t = sum_{s<=t} log d_s (so S_t depends on A through exp(A_t - A_s)):
//     dL/dA_t[i] = r_{t+1}[i] q_{t+1}[i] - k_t[i] sum_j G_t[i][j] v_t[j] + [t = T-1] f[i],
//     q_t[i] = sum_j gy_t[j] S_{t-1}[i][j],    f[i] = sum_j G_{T-1}[i][j] S_{T-1}[i][j],
//     dL/dw_t[i] = (sum_{t' >= t} dL/dA_t'[i]) * log d_t[i],   log d_t = -exp(w_t).
// This avoids dividing by d_t (which underflows for strong decays) to recover S_{t-1} backwards.
//
// Layout: r, k, v, w, y and their gradients are (B, T, C) with C = H * N contiguous; states are
// (B, H, N, N) float32. r, k, v, y, gy, gr, gk, gv use the input type F (float, bf16 or half);
// w, u, states and gw, gu are float32; all arithmetic is float32. One block of N threads per
// (batch, head): in the forward and gv kernels thread j holds column j of the state in registers,
// in the gr and gk/gw kernels thread i holds row i.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef _N_
#error "compile with -D_N_=<head size>, e.g. -D_N_=64"
#endif

namespace {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename F> __device__ __forceinline__ F from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
    return __float2half(x);
}

template <typename F>
__global__ void __launch_bounds__(_N_) wkv6_forward_kernel(
    const int T, const int H, const F* __restrict__ r, const F* __restrict__ k,
    const F* __restrict__ v, const float* __restrict__ w, const float* __restrict__ u,
    const float* __restrict__ s0, F* __restrict__ y, float* __restrict__ sT) {
    const int b = blockIdx.x / H, h = blockIdx.x % H, j = threadIdx.x;
    const int C = H * _N_;
    __shared__ float sr[_N_], sk[_N_], sd[_N_], su[_N_];

    float state[_N_];  // state[i] = S[i][j]
    const float* s0p = s0 + (size_t)blockIdx.x * _N_ * _N_;
#pragma unroll
    for (int i = 0; i < _N_; i++) state[i] = s0p[i * _N_ + j];
    su[j] = u[h * _N_ + j];

    const size_t base = (size_t)b * T * C + h * _N_ + j;
    for (int t = 0; t < T; t++) {
        const size_t idx = base + (size_t)t * C;
        __syncthreads();
        sr[j] = to_float(r[idx]);
        sk[j] = to_float(k[idx]);
        sd[j] = __expf(-__expf(w[idx]));
        __syncthreads();
        const float vj = to_float(v[idx]);
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < _N_; i++) {
            const float kv = sk[i] * vj;
            acc += sr[i] * (su[i] * kv + state[i]);
            state[i] = state[i] * sd[i] + kv;
        }
        y[idx] = from_float<F>(acc);
    }
    float* sTp = sT + (size_t)blockIdx.x * _N_ * _N_;
#pragma unroll
    for (int i = 0; i < _N_; i++) sTp[i * _N_ + j] = state[i];
}

// Forward sweep with thread i holding row i of S: gr, and r_t[i] q_t[i] / f[i] for the decay.
template <typename F>
__global__ void __launch_bounds__(_N_) wkv6_backward_gr_kernel(
    const int T, const int H, const F* __restrict__ r, const F* __restrict__ k,
    const F* __restrict__ v, const float* __restrict__ w, const float* __restrict__ u,
    const float* __restrict__ s0, const F* __restrict__ gy, const float* __restrict__ gsT,
    F* __restrict__ gr, float* __restrict__ rq, float* __restrict__ f) {
    const int b = blockIdx.x / H, h = blockIdx.x % H, i = threadIdx.x;
    const int C = H * _N_;
    __shared__ float sv[_N_], sg[_N_];

    float S[_N_];  // S[j] = S[i][j]
    const float* s0p = s0 + ((size_t)blockIdx.x * _N_ + i) * _N_;
#pragma unroll
    for (int j = 0; j < _N_; j++) S[j] = s0p[j];
    const float ui = u[h * _N_ + i];

    const size_t base = (size_t)b * T * C + h * _N_ + i;
    for (int t = 0; t < T; t++) {
        const size_t idx = base + (size_t)t * C;
        __syncthreads();
        sv[i] = to_float(v[idx]);
        sg[i] = to_float(gy[idx]);
        __syncthreads();
        const float ri = to_float(r[idx]), ki = to_float(k[idx]);
        const float di = __expf(-__expf(w[idx]));
        float q = 0.f, gv_dot = 0.f;
#pragma unroll
        for (int j = 0; j < _N_; j++) {
            q += sg[j] * S[j];
            gv_dot += sg[j] * sv[j];
            S[j] = S[j] * di + ki * sv[j];
        }
        gr[idx] = from_float<F>(q + ui * ki * gv_dot);
        rq[idx] = ri * q;
    }
    const float* gp = gsT + ((size_t)blockIdx.x * _N_ + i) * _N_;
    float fi = 0.f;
#pragma unroll
    for (int j = 0; j < _N_; j++) fi += gp[j] * S[j];
    f[(size_t)b * C + h * _N_ + i] = fi;
}

// Reverse sweep with thread i holding row i of G: gk, gw, gu (per batch) and the state gradient.
template <typename F>
__global__ void __launch_bounds__(_N_) wkv6_backward_gk_kernel(
    const int T, const int H, const F* __restrict__ r, const F* __restrict__ k,
    const F* __restrict__ v, const float* __restrict__ w, const float* __restrict__ u,
    const F* __restrict__ gy, const float* __restrict__ gsT, const float* __restrict__ rq,
    const float* __restrict__ f, F* __restrict__ gk, float* __restrict__ gw,
    float* __restrict__ gu, float* __restrict__ gs0) {
    const int b = blockIdx.x / H, h = blockIdx.x % H, i = threadIdx.x;
    const int C = H * _N_;
    __shared__ float sv[_N_], sg[_N_];

    float G[_N_];  // G[j] = G[i][j]
    const float* gp = gsT + ((size_t)blockIdx.x * _N_ + i) * _N_;
#pragma unroll
    for (int j = 0; j < _N_; j++) G[j] = gp[j];
    const float ui = u[h * _N_ + i];
    float gA = f[(size_t)b * C + h * _N_ + i];  // reverse running sum of dL/dA, starts with f
    float gui = 0.f;

    const size_t base = (size_t)b * T * C + h * _N_ + i;
    for (int t = T - 1; t >= 0; t--) {
        const size_t idx = base + (size_t)t * C;
        __syncthreads();
        sv[i] = to_float(v[idx]);
        sg[i] = to_float(gy[idx]);
        __syncthreads();
        const float ri = to_float(r[idx]), ki = to_float(k[idx]);
        const float lwi = -__expf(w[idx]);
        const float di = __expf(lwi);
        float hsum = 0.f, gv_dot = 0.f;
#pragma unroll
        for (int j = 0; j < _N_; j++) {
            hsum += G[j] * sv[j];
            gv_dot += sg[j] * sv[j];
            G[j] = G[j] * di + ri * sg[j];
        }
        gk[idx] = from_float<F>(hsum + ui * ri * gv_dot);
        gui += ri * ki * gv_dot;
        gA -= ki * hsum;
        if (t + 1 < T) gA += rq[idx + C];
        gw[idx] = gA * lwi;
    }
    float* gsp = gs0 + ((size_t)blockIdx.x * _N_ + i) * _N_;
#pragma unroll
    for (int j = 0; j < _N_; j++) gsp[j] = G[j];
    gu[(size_t)b * C + h * _N_ + i] = gui;
}

// Reverse sweep with thread j holding column j of G: gv.
template <typename F>
__global__ void __launch_bounds__(_N_) wkv6_backward_gv_kernel(
    const int T, const int H, const F* __restrict__ r, const F* __restrict__ k,
    const float* __restrict__ w, const float* __restrict__ u, const F* __restrict__ gy,
    const float* __restrict__ gsT, F* __restrict__ gv) {
    const int b = blockIdx.x / H, h = blockIdx.x % H, j = threadIdx.x;
    const int C = H * _N_;
    __shared__ float sr[_N_], sk[_N_], sd[_N_], su[_N_];

    float G[_N_];  // G[i] = G[i][j]
    const float* gp = gsT + (size_t)blockIdx.x * _N_ * _N_;
#pragma unroll
    for (int i = 0; i < _N_; i++) G[i] = gp[i * _N_ + j];
    su[j] = u[h * _N_ + j];

    const size_t base = (size_t)b * T * C + h * _N_ + j;
    for (int t = T - 1; t >= 0; t--) {
        const size_t idx = base + (size_t)t * C;
        __syncthreads();
        sr[j] = to_float(r[idx]);
        sk[j] = to_float(k[idx]);
        sd[j] = __expf(-__expf(w[idx]));
        __syncthreads();
        const float gyj = to_float(gy[idx]);
        float acc = 0.f, bonus = 0.f;
#pragma unroll
        for (int i = 0; i < _N_; i++) {
            acc += G[i] * sk[i];
            bonus += sr[i] * su[i] * sk[i];
            G[i] = G[i] * sd[i] + sr[i] * gyj;
        }
        gv[idx] = from_float<F>(acc + bonus * gyj);
    }
}

template <typename F>
void launch_forward(int B, int T, int H, const void* r, const void* k, const void* v,
                    const float* w, const float* u, const float* s0, void* y, float* sT,
                    cudaStream_t stream) {
    wkv6_forward_kernel<F><<<B * H, _N_, 0, stream>>>(
        T, H, static_cast<const F*>(r), static_cast<const F*>(k), static_cast<const F*>(v), w, u,
        s0, static_cast<F*>(y), sT);
}

template <typename F>
void launch_backward(int B, int T, int H, const void* r, const void* k, const void* v,
                     const float* w, const float* u, const float* s0, const void* gy,
                     const float* gsT, void* gr, void* gk, void* gv, float* gw, float* gu,
                     float* gs0, float* rq, float* f, cudaStream_t stream) {
    const F* r_ = static_cast<const F*>(r);
    const F* k_ = static_cast<const F*>(k);
    const F* v_ = static_cast<const F*>(v);
    const F* gy_ = static_cast<const F*>(gy);
    wkv6_backward_gr_kernel<F><<<B * H, _N_, 0, stream>>>(
        T, H, r_, k_, v_, w, u, s0, gy_, gsT, static_cast<F*>(gr), rq, f);
    wkv6_backward_gk_kernel<F><<<B * H, _N_, 0, stream>>>(
        T, H, r_, k_, v_, w, u, gy_, gsT, rq, f, static_cast<F*>(gk), gw, gu, gs0);
    wkv6_backward_gv_kernel<F><<<B * H, _N_, 0, stream>>>(
        T, H, r_, k_, w, u, gy_, gsT, static_cast<F*>(gv));
}

}  // namespace

// dtype: 0 = float32, 1 = bfloat16, 2 = float16 (the type of r, k, v, y and their gradients).
void wkv6_cuda_forward(int dtype, int B, int T, int H, const void* r, const void* k,
                       const void* v, const float* w, const float* u, const float* s0, void* y,
                       float* sT, cudaStream_t stream) {
    if (dtype == 1)
        launch_forward<__nv_bfloat16>(B, T, H, r, k, v, w, u, s0, y, sT, stream);
    else if (dtype == 2)
        launch_forward<__half>(B, T, H, r, k, v, w, u, s0, y, sT, stream);
    else
        launch_forward<float>(B, T, H, r, k, v, w, u, s0, y, sT, stream);
}

void wkv6_cuda_backward(int dtype, int B, int T, int H, const void* r, const void* k,
                        const void* v, const float* w, const float* u, const float* s0,
                        const void* gy, const float* gsT, void* gr, void* gk, void* gv, float* gw,
                        float* gu, float* gs0, float* rq, float* f, cudaStream_t stream) {
    if (dtype == 1)
        launch_backward<__nv_bfloat16>(B, T, H, r, k, v, w, u, s0, gy, gsT, gr, gk, gv, gw, gu,
                                       gs0, rq, f, stream);
    else if (dtype == 2)
        launch_backward<__half>(B, T, H, r, k, v, w, u, s0, gy, gsT, gr, gk, gv, gw, gu, gs0, rq,
                                f, stream);
    else
        launch_backward<float>(B, T, H, r, k, v, w, u, s0, gy, gsT, gr, gk, gv, gw, gu, gs0, rq,
                               f, stream);
}
