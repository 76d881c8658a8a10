"""Hugging Face PEFT adapter folders (also what RWKV-PEFT writes since 2026 with `--merge 0`):

    FOLDER/adapter_config.json        peft_type "MISS" | "LORA", r, target_modules, and
                                      MiSS: init_weights (true: (r, out) default; "bat": (out/r, r, r),
                                      blocks indexed by the OUTPUT block = our Bone-col; "mini":
                                      (r, mini_r)), mini_r;  LoRA: lora_alpha, use_rslora
    FOLDER/adapter_model.safetensors  (or adapter_model.bin) keys base_model.model.{module}.miss_block,
                                      base_model.model.{module}.lora_A.weight (r, in) / .lora_B.weight (out, r)

How PEFT itself computes each MiSS mode (peft/tuners/miss/layer.py): default and mini add
(sum of x's r-wide slices) @ M (mini: M repeated out/mini_r times along the output), merged as
M^T added to every r-wide column block of W; bat merges W[a,c] += W[a,c] M_a + M_a. LoRA's scale is
lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; it is kept here as an equivalent
lora_alpha' = scale * r, so the rest of rwkv-bone needs no rsLoRA case.
"""
from __future__ import annotations

import json
import os
import shutil

from torch import Tensor

from ...errors import UserError
from .common import AdapterFile, load_tensor_dict, parts_of, split_tensors, targets_of

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."


def folder_of(path: str) -> str | None:
    """The adapter folder `path` names (the folder itself or a weight file inside it), or None."""
    if os.path.isdir(path):
        return path
    if os.path.basename(path) in WEIGHT_NAMES + (CONFIG_NAME,) or path.endswith(".safetensors"):
        return os.path.dirname(path) or "."
    return None


def _weights(folder: str) -> dict[str, Tensor]:
    for name in WEIGHT_NAMES:
        f = os.path.join(folder, name)
        if os.path.isfile(f):
            if name.endswith(".safetensors"):
                from safetensors import SafetensorError
                from safetensors.torch import load_file
                try:
                    return load_file(f)
                except (SafetensorError, OSError, ValueError) as e:
                    raise UserError(f"adapter {f} is not a readable safetensors file ({str(e)[:120]})") from None
            return load_tensor_dict(f, "adapter")
    raise UserError(f"adapter folder {folder} has no {' or '.join(WEIGHT_NAMES)}; expected a folder "
                    "written by PEFT's save_pretrained")


def read(path: str) -> AdapterFile:
    folder = folder_of(path)
    cfg_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise UserError(f"adapter folder {folder} has no {CONFIG_NAME}; expected a folder written by "
                        "PEFT's save_pretrained (or one of our .pth adapter files)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not readable JSON ({str(e)[:120]})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path} holds no JSON object; expected PEFT's adapter config")
    kind = str(cfg.get("peft_type", "")).upper()
    if kind not in ("MISS", "LORA"):
        raise UserError(f"adapter {folder} is a PEFT {cfg.get('peft_type')!r} adapter; rwkv-bone reads "
                        "MISS and LORA folders")
    if cfg.get("bias", "none") != "none":
        raise UserError(f"adapter {folder} trains biases (bias={cfg['bias']!r}); RWKV-6 linears have none")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise UserError(f"adapter {folder} uses per-layer ranks (rank_pattern/alpha_pattern), which "
                        "rwkv-bone does not read; save it with one r and lora_alpha")
    raw = {}
    for key, t in _weights(folder).items():
        key = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for old, new in ((".miss_block", ".miss"), (".lora_A.weight", ".lora_A"), (".lora_B.weight", ".lora_B")):
            if key.endswith(old):
                key = key[:-len(old)] + new
        raw[key] = t
    af = split_tensors(AdapterFile(path=folder, meta={}), raw)
    r = int(cfg.get("r", 0))
    if kind == "MISS":
        mode = cfg.get("init_weights", True)
        if mode == "bat":                        # our Bone-col: the tensor kind is .bone
            for layer in af.layers.values():
                if "miss" in layer:
                    layer["bone"] = layer.pop("miss")
            meta = dict(method="bone", bone_mode="col", bone_b=r)
        elif mode == "mini":
            meta = dict(method="miss", miss_r=r, miss_mode="mini", miss_mini_r=int(cfg.get("mini_r", 1)))
        else:                                    # true (zero init) or false (random init): default
            meta = dict(method="miss", miss_r=r, miss_mode="default", miss_mini_r=None)
    else:
        init = cfg.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "eva", "loftq")):
            raise UserError(f"adapter {folder} was initialised with {init!r}, so it belongs to a modified "
                            "base; convert it with PEFT (path_initial_model_for_weight_conversion) first")
        alpha = float(cfg.get("lora_alpha", r))
        scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
        meta = dict(method="lora", lora_r=r, lora_alpha=scale * r, lora_dropout=0.0, svd_niter=4)
    af.meta = dict(meta, targets=targets_of(af), train_parts=parts_of(af.others), format="hf-peft")
    return af


def write(layers: dict[str, dict[str, Tensor]], config: dict, path: str | os.PathLike) -> None:
    """A PEFT folder for Bone-col (as MiSS bat), MiSS and LoRA; written beside, then renamed in."""
    from safetensors.torch import save_file

    method = config["method"]
    if method == "bone" and config["bone_mode"] == "col":
        peft_cfg = dict(peft_type="MISS", r=config["bone_b"], init_weights="bat", mini_r=1, miss_dropout=0.0)
        rename = {"bone": "miss_block"}
    elif method == "miss":
        mini = config["miss_mode"] == "mini"
        peft_cfg = dict(peft_type="MISS", r=config["miss_r"], init_weights="mini" if mini else True,
                        mini_r=config["miss_mini_r"] if mini else 1, miss_dropout=0.0)
        rename = {"miss": "miss_block"}
    elif method == "lora":
        peft_cfg = dict(peft_type="LORA", r=config["lora_r"], lora_alpha=config["lora_alpha"],
                        use_rslora=False, lora_dropout=config.get("lora_dropout", 0.0),
                        fan_in_fan_out=False, init_lora_weights=True)
        rename = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    else:
        what = f"bone-{config.get('bone_mode')}" if method == "bone" else method
        raise UserError(f"HF PEFT has no {what} adapter; save it with --adapter_format ours (PEFT format "
                        "exists for --bone_mode col, miss and lora)")
    if config.get("train_parts"):
        raise UserError("HF PEFT folders hold adapter tensors only; drop --train_parts or save with "
                        "--adapter_format ours")
    peft_cfg.update(target_modules=list(config["targets"]), bias="none", task_type=None,
                    base_model_name_or_path=None, inference_mode=True, modules_to_save=None)
    tensors = {f"{PREFIX}{name}.{rename[kind]}": t.detach().float().cpu().contiguous()
               for name, kinds in layers.items() for kind, t in kinds.items() if kind in rename}
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHT_NAMES[0]))
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(peft_cfg, f, indent=2)
        old = None
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise UserError(f"{path} is a file; a PEFT adapter is a folder: choose another path")
            old = tmp + ".old"
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["folder_of", "read", "write"]
