#!/usr/bin/env bash
# RWKV-6 3B (L32 C2560), the paper's fine-tuning settings: Bone b=64 | LoRA r=32 | PiSSA r=32
# (55,050,240 trainable parameters each), global batch 64, lr 2e-5 constant, ctx 512, bf16,
# DeepSpeed ZeRO-2, grad_cp 1, one epoch.
#   bash configs/rwkv6-3b.sh bone RWKV-x060-World-3B.pth data/metamath [out/3b-bone]
# GPU memory per GPU (8 GPUs, ZeRO-2, bench/memory_plan.py: DeepSpeed's estimators + activations
# measured on the CPU; + ~1-2 GB CUDA context and allocator slack): 6.95 GiB at MICRO_BSZ 4, 7.66 GiB at 8.
MODEL_NAME=rwkv6-3b
source "$(dirname "$0")/common.sh"
