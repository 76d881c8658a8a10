"""The fast load and decode paths against the plain ones: the one-pass cast + NaN check, and the
chunked batched linear of RWKV6.step."""
import pytest
import torch

from rwkv_bone import checkpoint
from rwkv_bone.checkpoint import converted_checked
from rwkv_bone.errors import UserError


def test_converted_checked_equals_a_plain_cast_and_finds_a_nan_in_a_later_chunk(monkeypatch):
    monkeypatch.setattr(checkpoint, "FINITE_CHUNK", 64)
    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(10, 30, generator=g).bfloat16(), "b": torch.randn(7, generator=g),
          "blocks.0.att.time_state": torch.randn(2, 4, 4, generator=g), "i": torch.arange(3)}
    out = converted_checked(sd, torch.float32, "cpu", "f.pth")
    assert torch.equal(out["a"], sd["a"].float()) and out["a"].dtype == torch.float32
    assert out["b"] is sd["b"] and out["i"] is sd["i"]
    assert out["blocks.0.att.time_state"] is sd["blocks.0.att.time_state"]
    half = converted_checked(sd, torch.bfloat16, "cpu", "f.pth")
    assert half["blocks.0.att.time_state"].dtype == torch.float32 and half["b"].dtype == torch.bfloat16
    bad = dict(sd, a=sd["a"].clone())
    bad["a"][9, 29] = float("nan")  # last chunk
    with pytest.raises(UserError, match="f.pth tensor a holds NaN"):
        converted_checked(bad, torch.float32, "cpu", "f.pth")
    bad = dict(sd, b=sd["b"].clone())
    bad["b"][3] = float("inf")  # no cast: checked in place
    with pytest.raises(UserError, match="tensor b holds NaN"):
        converted_checked(bad, torch.float32, "cpu", "f.pth")
