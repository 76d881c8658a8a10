#!/usr/bin/env bash
# RWKV-6 1.6B (L24 C2048), the paper's fine-tuning settings: Bone b=64 | LoRA r=32 | PiSSA r=32
# (33,030,144 trainable parameters each), global batch 64, lr 2e-5 constant, ctx 512, bf16,
# DeepSpeed ZeRO-2, grad_cp 1, one epoch.
#   bash configs/rwkv6-1.6b.sh bone RWKV-x060-World-1B6.pth data/metamath [out/1b6-bone]
#   GPUS=1 MICRO_BSZ=8 bash configs/rwkv6-1.6b.sh lora ...      (1 GPU, 8 micro-batches accumulated)
# GPU memory per GPU, an ESTIMATE (not measured): weights bf16 3.2 GB + adapter, grads and AdamW
# fp32 <= 0.6 GB + activations with grad_cp ~0.45 GB per sample (MICRO_BSZ 4: 1.8 GB)
# + CUDA/DeepSpeed overhead ~2 GB  =>  ~8 GB at MICRO_BSZ 4, ~10 GB at MICRO_BSZ 8.
MODEL_NAME=rwkv6-1.6b
source "$(dirname "$0")/common.sh"
