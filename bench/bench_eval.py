"""Greedy decoding tokens/s, side by side in one run on one model and dtype: the official `rwkv`
package's one-token path, ours at batch 1 and ours at --batch rows (rwkv_bone.decode.greedy_batch,
i.e. RWKV6.step), for each --dtype; where the CPU decode kernel (rwkv_bone/gemv) runs, ours again
with torch's matmul in its place, and ours again with the row-major kernel beside the packed one
load_model ships (rwkv_bone/gemv/packed.py).

    python bench/bench_eval.py [--n_layer 24 --n_embd 2048 --vocab 65536 --tokens 16 --batch 8
                                --dtype fp32,bf16 --repeats 2 --dir /tmp]

The model has random weights (speed does not depend on them; the head row of the end-of-document
token 0 is lowered so that no row stops early), on the CPU. Every path decodes --tokens new tokens
after a short prompt. Only the one-token steps are timed (the first token comes from the prompt's
logits, so --tokens - 1 steps); the prompt prefill of ours is reported apart (all --batch prompts,
one at a time, as greedy_batch does it). The paths run in turn --repeats times and the best time of
each is kept (the machine is shared; the best run is the least disturbed one). The checkpoint the
package loads is written under --dir (3.2 GB bf16 / 6.4 GB fp32 at L24 C2048) and deleted after.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rwkv_bone import gemv  # noqa: E402
from rwkv_bone.config import RWKV6Config  # noqa: E402
from rwkv_bone.decode import greedy_batch  # noqa: E402
from rwkv_bone.gemv.packed import PackedLinear, pack_linears  # noqa: E402
from rwkv_bone.model import RWKV6  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@torch.no_grad()
def random_model(cfg: RWKV6Config, dtype: torch.dtype) -> RWKV6:
    """Random weights N(0, 0.02) (norm weights 1, decays around -3), built without the slow
    reference initialisation; head row 0 lowered so greedy decoding never picks token 0."""
    g = torch.Generator().manual_seed(0)
    model = RWKV6.from_config(cfg, device="meta").to_empty(device="cpu")
    for name, p in model.named_parameters():
        if name.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight", "ln_x.weight")):
            p.fill_(1.0)
        elif name.endswith("time_decay"):
            p.copy_(torch.randn(p.shape, generator=g) - 3.0)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.head.weight[0] -= 1.0
    return model.to(dtype).eval()


class Package:
    """The official package's model on one checkpoint, stepping one token at a time."""

    def __init__(self, path: str, dtype: str) -> None:
        for var in ("RWKV_JIT_ON", "RWKV_CUDA_ON", "RWKV_V7_ON"):
            os.environ[var] = "0"
        from rwkv.model import RWKV

        self.model = RWKV(model=path, strategy=f"cpu {dtype}", verbose=False)

    @torch.no_grad()
    def decode_s(self, prompt: list[int], n: int) -> float:
        """Seconds for n - 1 greedy one-token steps after the prompt (not timed)."""
        logits, state = self.model.forward(prompt, None)
        t0 = time.perf_counter()
        for _ in range(n - 1):
            logits, state = self.model.forward([int(torch.argmax(logits))], state)
        return time.perf_counter() - t0


def unpack_linears(model: RWKV6) -> None:
    """Undo pack_linears in place (the row-major and torch paths run on plain nn.Linear weights)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, PackedLinear):
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                lin.weight = torch.nn.Parameter(child.weight, requires_grad=False)
                setattr(module, name, lin)


def ours(model: RWKV6, prompts: list[list[int]], n: int, batch: int) -> tuple[float, int, float]:
    """(prefill seconds, tokens made by the steps, step seconds) of greedy_batch: every prompt joins
    before the first on_step call (len(prompts) <= batch); the steps run between the first and last."""
    marks: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    greedy_batch(model, prompts, n, batch_size=batch, on_step=lambda k, _: marks.append((time.perf_counter(), k)))
    made = sum(k for _, k in marks[1:])
    return marks[0][0] - t0, made, marks[-1][0] - marks[0][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_layer", type=int, default=24)
    ap.add_argument("--n_embd", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per prompt")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each path; the best is kept")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--dir", default=None, help="folder for the package's checkpoint (default: the temp dir)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = RWKV6Config(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, args.vocab, (4 + i % 5,), generator=g).tolist() for i in range(args.batch)]
    print(f"RWKV-6 L{args.n_layer} C{args.n_embd} V{args.vocab}, CPU, {torch.get_num_threads()} threads, "
          f"{args.tokens} new tokens per prompt ({args.tokens - 1} timed steps), best of {args.repeats}")
    print(f"{'dtype':5s} {'path':34s} {'tokens/s':>10s} {'vs package':>11s} {'vs ours b1':>11s}")
    for name in args.dtype.split(","):
        model = random_model(cfg, DTYPES[name])
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            path = os.path.join(d, "bench.pth")
            model.save_checkpoint(path)
            pkg = Package(path, name)
        ours(model, prompts[:1], 3, 1)  # warm-up (first-call allocations, the kernel's build)
        # (key, rows, kernel on, packed): "one"/"many" are what load_model ships (packed)
        packs = gemv.available()
        paths = [("pkg", 0, None, False), ("one", 1, True, packs), ("many", args.batch, True, packs)]
        if packs:  # the row-major kernel beside the packed one
            paths += [("one_rows", 1, True, False), ("many_rows", args.batch, True, False)]
        if gemv.available():  # ours with torch's matmul as well, side by side
            paths += [("one_torch", 1, False, False), ("many_torch", args.batch, False, False)]
        best = {key: float("inf") for key, _, _, _ in paths}
        made, prefill = {}, float("inf")
        for _ in range(args.repeats):
            for key, rows, kernel, packed in sorted(paths, key=lambda p: p[3]):  # row-major first, then packed
                if key == "pkg":
                    best[key] = min(best[key], pkg.decode_s(prompts[0], args.tokens))
                    continue
                if packed and not any(isinstance(m, PackedLinear) for m in model.modules()):
                    pack_linears(model)
                gemv.set_enabled(kernel)
                pre, made[key], s = ours(model, prompts[:rows], args.tokens, rows)
                best[key] = min(best[key], s)
                if key == "many":
                    prefill = min(prefill, pre)
            gemv.set_enabled(True)
            unpack_linears(model)
        tps = {key: (made[key] if key in made else args.tokens - 1) / best[key] for key in best}
        labels = {"pkg": "rwkv package (one-token forward)", "one": "ours, batch 1",
                  "many": f"ours, batch {args.batch}", "one_torch": "ours, batch 1, torch matmul",
                  "many_torch": f"ours, batch {args.batch}, torch matmul",
                  "one_rows": "ours, batch 1, row-major kernel", "many_rows": f"ours, batch {args.batch}, row-major kernel"}
        for key in best:
            print(f"{name:5s} {labels[key]:34s} {tps[key]:10.2f} {tps[key] / tps['pkg']:10.2f}x "
                  f"{tps[key] / tps['one']:10.2f}x", flush=True)
        print(f"{name:5s} ours, prefill of the {args.batch} prompts (4-8 tokens each, one at a time): "
              f"{prefill:.2f} s, not in the figures above")
        del model, pkg


if __name__ == "__main__":
    main()
