"""rwkv-bone: fine-tune RWKV-6 ("x060") language models with Bone (Block Affine) adapters."""
from __future__ import annotations

from .errors import UserError

__version__ = "0.1.0"
__all__ = ["RWKV6", "RWKV6Config", "UserError", "wkv6", "apply_peft", "save_adapter", "load_adapter"]


def __getattr__(name: str):
    # Lazy: `import rwkv_bone` stays cheap, and CLIs import only what they use.
    if name in ("RWKV6", "RWKV6Config"):
        from . import model, config

        return getattr(model, name, None) or getattr(config, name)
    if name == "wkv6":
        from .wkv import wkv6

        return wkv6
    if name in ("apply_peft", "save_adapter", "load_adapter"):
        from . import peft

        return getattr(peft, name)
    raise AttributeError(name)
