"""DPO's reference for full fine-tuning (--peft none): the base model's log-probabilities of every
pair, computed once before the first update and stored in the run folder, so no second model is
ever held in memory.

    PROJ/reference_logps.pt = {"fingerprint": str, "total": (P, 2) float64, "count": (P, 2) float64}

Row i is pair i of the pair dataset (column 0 chosen, 1 rejected): the summed response-token
log-probabilities and the number of response tokens. The table is computed on the training device
inside the first training step (before any optimizer step, under the run's own precision, so the
first sigmoid loss is ln 2), in micro-batches of the run's size. The fingerprint hashes the pair data
files, --ctx_len, the precision and the base weights (a float64 sum per tensor): a fresh run reuses a
matching table, recomputes a stale one; --resume requires a matching one (its weights are no longer
the base).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from torch import Tensor

from ...errors import UserError
from .dpo import SeqLogp, pair_logps

REFERENCE_FILE = "reference_logps.pt"
HASH_BLOCK = 1 << 24


def _hash_file(h, path: str) -> None:
    h.update(os.path.basename(path).encode())
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)


def fingerprint(data_prefix: str, ctx_len: int, precision: str, model: torch.nn.Module) -> str:
    """sha256 of the pair data files, ctx_len, precision and the model's tensors (name, shape, dtype,
    float64 sum): what the stored log-probabilities depend on."""
    h = hashlib.sha256()
    for ext in (".bin", ".idx", ".mask.bin", ".mask.idx"):
        if os.path.isfile(data_prefix + ext):
            _hash_file(h, data_prefix + ext)
    h.update(f"ctx_len={ctx_len};precision={precision}".encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            s = float(t.sum(dtype=torch.float64)) if t.is_floating_point() else float(t.double().sum())
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{s!r};".encode())
    return h.hexdigest()


class StoredReference:
    """The reference log-probs of every pair; `ensure` fills the table from the model (the base,
    before any update) when no matching stored table exists."""

    def __init__(self, proj_dir: str, fp: str, *, resume: bool) -> None:
        self.path, self.fingerprint = os.path.join(proj_dir, REFERENCE_FILE), fp
        self.total: Tensor | None = None   # (P, 2) float64
        self.count: Tensor | None = None
        if os.path.isfile(self.path):
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            if saved.get("fingerprint") == fp:
                self.total, self.count = saved["total"], saved["count"]
            elif resume:
                raise UserError(f"--resume: {self.path} holds reference log-probabilities of other pair data, "
                                "--ctx_len, precision or base model than this run's; resume with the flags of the "
                                "run that wrote it (or start a new run in another --proj_dir)")
        elif resume:
            raise UserError(f"--resume of a --peft none DPO run needs {self.path}, the reference "
                            "log-probabilities computed from the base at its start, and it is missing; "
                            "start the run again without --resume")

    @torch.no_grad()
    def ensure(self, module) -> None:
        """Compute the table from `module.model` over `module.sampler` (PairDocuments), once."""
        if self.total is not None:
            return
        pairs, model, B = module.sampler, module.model, module.data.micro_bsz
        device = next(model.parameters()).device
        totals, counts = [], []
        for start in range(0, pairs.n_docs, B):
            rows = [[pairs.document(2 * i + k) for k in (0, 1)] for i in range(start, min(start + B, pairs.n_docs))]
            x, y, mask = (torch.from_numpy(np.stack([[r[j] for r in pair] for pair in rows])).to(device)
                          for j in range(3))                                   # (b, 2, T) each
            c, r = pair_logps(model, x, y, mask)
            totals.append(torch.stack([c.total, r.total], -1).double().cpu())
            counts.append(torch.stack([c.count, r.count], -1).double().cpu())
        self.total, self.count = torch.cat(totals), torch.cat(counts)
        if module.global_rank == 0:
            from ...atomic import torch_save_atomic

            torch_save_atomic({"fingerprint": self.fingerprint, "total": self.total, "count": self.count},
                              self.path)

    def pair_logps(self, index: Tensor, like: Tensor) -> tuple[SeqLogp, SeqLogp]:
        """index (B,) or (B, 1) pair numbers -> (chosen, rejected) SeqLogp (B,) in `like`'s dtype and device."""
        i = index.long().reshape(-1).cpu()
        t, c = (a[i].to(device=like.device, dtype=like.dtype) for a in (self.total, self.count))
        return SeqLogp(t[:, 0], c[:, 0]), SeqLogp(t[:, 1], c[:, 1])


__all__ = ["REFERENCE_FILE", "StoredReference", "fingerprint"]
