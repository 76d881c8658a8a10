"""Parameter-efficient fine-tuning for RWKV-6: Bone (row/col/ab), LoRA, PiSSA, OLoRA, MiSS, state.

One table of methods (registry.py), one file per method (bone.py, lora.py, miss.py, state.py, each
opening with its math), injection into the model (inject.py), adapter files / merging
(adapter_io.py) and one file per foreign file format (formats/)."""
from .adapter_io import (adapter_state_dict, load_adapter, merge_state_dict, read_adapter_file,
                         save_adapter)
from .bone import BONE_MODES, BoneLinear, bone_delta
from .inject import (DEFAULT_TARGETS, METHODS, TRAIN_PARTS, adapter_modules, apply_peft,
                     count_trainable, mark_trainable, merge_peft)
from .lora import LORA_INITS, LoraLinear, lora_delta
from .miss import MISS_MODES, MissLinear, miss_delta
from .registry import REGISTRY, get_method

__all__ = ["BONE_MODES", "BoneLinear", "bone_delta", "LORA_INITS", "LoraLinear", "lora_delta",
           "MISS_MODES", "MissLinear", "miss_delta", "REGISTRY", "get_method",
           "DEFAULT_TARGETS", "METHODS", "TRAIN_PARTS", "adapter_modules", "apply_peft",
           "count_trainable", "mark_trainable", "merge_peft", "adapter_state_dict", "save_adapter",
           "load_adapter", "read_adapter_file", "merge_state_dict"]
