"""Fold adapters into their base model: a plain RWKV-6 checkpoint with no inference overhead.

    python merge.py --model BASE.pth --adapter ADAPTER --output OUT.pth [--adapter STATE.pth ...]

ADAPTER may be any format rwkv_bone.peft.formats reads, recognised by its content: rwkv-bone adapter
files (settings stored inside); RWKV-PEFT .pth files (3-D `.bone`/`.disha` = block-affine
Bone-row, 2-D = MiSS, lora_A/B, state tuning `blocks.{i}.att.time_state`, and the time_*/ln tensors
it saves beside them); HF PEFT / RWKV-PEFT folders (adapter_config.json + adapter_model.safetensors
or .bin: MiSS default/bat/mini, LoRA incl. rsLoRA; pass the folder or its weight file). Several
--adapter are folded in order. Peer LoRA .pth files carry no alpha, so they need --lora_alpha;
peer PiSSA files need --pissa_init (the init file holding init_lora_A/B). A state adapter adds its
learned initial states as official keys, which the `rwkv` package starts every sequence from. The
merge is computed in float32 and written in the base checkpoint's dtype (states stay float32),
atomically (an existing OUT is only replaced by a complete file).
"""
# A thin shim: the parser and main live in rwkv_bone.cli.merge (also `rwkv-bone merge ...`).
from rwkv_bone.cli import run_cli
from rwkv_bone.cli.merge import build_parser, check_output, main, parse_args  # noqa: F401 - re-exported

if __name__ == "__main__":
    run_cli(main)
