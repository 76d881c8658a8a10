/* The cores' arithmetic ceiling for bench_gemv.py: independent chains of 512-bit fp32 FMAs
   (vfmadd, 32 flops each) or bf16 dot products (vdpbf16ps, 64 flops each), enough chains to hide
   the latency, nothing loaded from memory. Returns the flops done by all threads. */
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>

#define CHAINS 12

double rb_peak_f32(int64_t n, int threads) {
    double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        __m512 a[CHAINS], m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
        for (int i = 0; i < CHAINS; i++) a[i] = _mm512_set1_ps((float)i);
        for (int64_t k = 0; k < n; k++)
            _Pragma("GCC unroll 12") for (int i = 0; i < CHAINS; i++) a[i] = _mm512_fmadd_ps(a[i], m, c);
        float s = 0;
        for (int i = 0; i < CHAINS; i++) s += _mm512_reduce_add_ps(a[i]);
        total += (double)n * CHAINS * 32 + (s == 1.2345f);   /* s keeps the chains alive */
    }
    return total;
}

double rb_peak_bf16(int64_t n, int threads) {
    double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        __m512 a[CHAINS];
        __m512bh m = (__m512bh)_mm512_set1_epi16(0x3f80), c = (__m512bh)_mm512_set1_epi16(0x3380);
        for (int i = 0; i < CHAINS; i++) a[i] = _mm512_set1_ps((float)i);
        for (int64_t k = 0; k < n; k++)
            _Pragma("GCC unroll 12") for (int i = 0; i < CHAINS; i++) a[i] = _mm512_dpbf16_ps(a[i], m, c);
        float s = 0;
        for (int i = 0; i < CHAINS; i++) s += _mm512_reduce_add_ps(a[i]);
        total += (double)n * CHAINS * 64 + (s == 1.2345f);
    }
    return total;
}
