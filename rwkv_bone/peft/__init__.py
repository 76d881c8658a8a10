"""Parameter-efficient fine-tuning for RWKV-6: Bone (row/col/ab), LoRA, PiSSA, OLoRA, MiSS, state.

One table of methods (registry.py), one file per method (bone.py, lora.py, miss.py, state.py, each
opening with its math) with its options (options/), injection into the model (inject.py), adapter
files / merging (adapter_io.py) and one file per foreign file format (formats/). The names below
load on first use, so the table and the options import without torch (train.py --help reads them).
"""
from ..lazy import lazy_package

lazy_package(__name__, {
    **dict.fromkeys(("adapter_state_dict", "load_adapter", "merge_state_dict", "read_adapter_file",
                     "save_adapter"), "adapter_io"),
    **dict.fromkeys(("BoneLinear", "bone_delta"), "bone"),
    **dict.fromkeys(("DEFAULT_TARGETS", "TRAIN_PARTS", "adapter_modules", "apply_peft", "count_trainable",
                     "mark_trainable", "merge_peft"), "inject"),
    **dict.fromkeys(("LORA_INITS", "LoraLinear", "lora_delta"), "lora"),
    **dict.fromkeys(("MissLinear", "miss_delta"), "miss"),
    **dict.fromkeys(("METHODS", "REGISTRY", "get_method", "register"), "registry"),
    "BONE_MODES": "options.bone",
    "MISS_MODES": "options.miss",
})

__all__ = ["BONE_MODES", "BoneLinear", "bone_delta", "LORA_INITS", "LoraLinear", "lora_delta",
           "MISS_MODES", "MissLinear", "miss_delta", "REGISTRY", "get_method", "register",
           "DEFAULT_TARGETS", "METHODS", "TRAIN_PARTS", "adapter_modules", "apply_peft",
           "count_trainable", "mark_trainable", "merge_peft", "adapter_state_dict", "save_adapter",
           "load_adapter", "read_adapter_file", "merge_state_dict"]
