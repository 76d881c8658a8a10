#!/usr/bin/env bash
# RWKV-6 3B (L32 C2560), the paper's fine-tuning settings: Bone b=64 | LoRA r=32 | PiSSA r=32
# (55,050,240 trainable parameters each), global batch 64, lr 2e-5 constant, ctx 512, bf16,
# DeepSpeed ZeRO-2, grad_cp 1, one epoch.
#   bash configs/rwkv6-3b.sh bone RWKV-x060-World-3B.pth data/metamath [out/3b-bone]
# GPU memory per GPU, an ESTIMATE (not measured): weights bf16 6.2 GB + adapter, grads and AdamW
# fp32 <= 1.0 GB + activations with grad_cp ~0.5 GB per sample (MICRO_BSZ 4: 2 GB)
# + CUDA/DeepSpeed overhead ~2 GB  =>  ~11 GB at MICRO_BSZ 4, ~13 GB at MICRO_BSZ 8.
MODEL_NAME=rwkv6-3b
source "$(dirname "$0")/common.sh"
