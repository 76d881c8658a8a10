"""GPU check of the packed, self-checking and chunked-CE paths (run by scripts/gpu_check.sh).

    python scripts/check_paths.py --device cuda     # on a GPU: the real kernel
    python scripts/check_paths.py --device cpu      # dry run: the chunked path, a reference "kernel"

1. The kernel's self-check figures (rwkv_bone.wkv.selfcheck.compare) per dtype, and the verdict
   wkv6 acts on.
2. Packed documents: a small float32 model's logits and gradients with doc_start (two packed
   rows) against each document alone, through whatever path wkv6 picks on the device (on a GPU
   the kernel with the zero-decay reset) and through the chunked path.
Exit status 1 when a packed comparison exceeds its tolerance (a failed self-check is reported,
not fatal: wkv6 then falls back to chunked, which is what step 2 verifies).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rwkv_bone import model as model_mod  # noqa: E402
from rwkv_bone.config import RWKV6Config  # noqa: E402
from rwkv_bone.model import RWKV6  # noqa: E402
from rwkv_bone.wkv import selfcheck, wkv6_chunked, wkv6_reference  # noqa: E402

LENGTHS = [(40, 1, 59, 28), (77, 51)]  # two rows of T = 128


def reference_kernel(r, k, v, w, u, s=None):
    return wkv6_reference(r.float(), k.float(), v.float(), w.float(), u.float(), s)


def packed_error(model: RWKV6, device: str) -> tuple[float, float]:
    """Largest relative error of logits and of parameter gradients, packed vs alone."""
    T = sum(LENGTHS[0])
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (len(LENGTHS), T), generator=g).to(device)
    ds = torch.zeros(len(LENGTHS), T, dtype=torch.bool)
    for b, lens in enumerate(LENGTHS):
        ds[b, torch.tensor(lens).cumsum(0)[:-1]] = True
        ds[b, 0] = True
    ds = ds.to(device)
    cot = torch.randn(len(LENGTHS), T, model.config.vocab_size, generator=g).to(device)
    model.zero_grad()
    logits = model(idx, doc_start=ds)
    (logits * cot).sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = torch.zeros_like(logits)
    for b, lens in enumerate(LENGTHS):
        a = 0
        for n in lens:
            out = model(idx[b:b + 1, a:a + n])
            (out * cot[b:b + 1, a:a + n]).sum().backward()
            alone[b, a:a + n] = out[0].detach()
            a += n
    rel = lambda x, y: ((x - y).abs().max() / y.abs().max().clamp(min=1e-6)).item()  # noqa: E731
    grad_err = max(rel(packed[n], p.grad) for n, p in model.named_parameters())
    return rel(logits.detach(), alone), grad_err


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    failed = 0
    print("1. kernel self-check (relative errors vs chunked; tolerance per dtype):")
    if dev.type == "cuda":
        from rwkv_bone.wkv.cuda import HEAD_SIZE, cuda_kernel_available, wkv6_cuda

        kernel, label = (wkv6_cuda, "CUDA kernel") if cuda_kernel_available() else (None, "no kernel build")
    else:
        HEAD_SIZE, kernel, label = 64, reference_kernel, "CPU dry run: the reference as the kernel"
    print(f"   {label}")
    for dtype in (torch.float32, torch.bfloat16):
        if kernel is None:
            break
        errors = selfcheck.compare(kernel, dev, dtype, HEAD_SIZE)
        verdict = selfcheck.kernel_trusted(kernel, dev, dtype, HEAD_SIZE)
        print(f"   {dtype}: " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items())
              + f" (tolerance {selfcheck.TOLERANCE[dtype]:.0e}) -> {'TRUSTED' if verdict else 'REFUSED, chunked used'}")

    print("2. packed documents (doc_start) vs each document alone, float32, L2 C128:")
    torch.manual_seed(0)
    model = RWKV6.from_config(RWKV6Config(n_layer=2, n_embd=128, vocab_size=512), device=args.device)
    model.train()
    paths = [("wkv6 dispatch", None), ("chunked", lambda *a, doc_start=None: wkv6_chunked(*a, doc_start=doc_start))]
    for name, op in paths:
        saved = model_mod.wkv6
        if op is not None:
            model_mod.wkv6 = op
        try:
            le, ge = packed_error(model, args.device)
        finally:
            model_mod.wkv6 = saved
        ok = le < 1e-4 and ge < 1e-3
        failed += not ok
        print(f"   {name}: logits {le:.1e}, grads {ge:.1e} -> {'ok' if ok else 'FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
