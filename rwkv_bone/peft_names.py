"""The names of the fine-tuning methods and their modes, without importing torch, so every parser
(train.py --help) can offer them as choices. rwkv_bone/peft/registry.py checks at import that its
table holds exactly these methods; bone.py and miss.py take their modes from here."""

METHODS = ("bone", "lora", "pissa", "olora", "miss", "state")
BONE_MODES = ("row", "col", "ab")
MISS_MODES = ("default", "mini")
