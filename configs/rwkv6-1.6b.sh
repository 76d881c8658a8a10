#!/usr/bin/env bash
# RWKV-6 1.6B (L24 C2048), the paper's fine-tuning settings: Bone b=64 | LoRA r=32 | PiSSA r=32
# (33,030,144 trainable parameters each), global batch 64, lr 2e-5 constant, ctx 512, bf16,
# DeepSpeed ZeRO-2, grad_cp 1, one epoch.
#   bash configs/rwkv6-1.6b.sh bone RWKV-x060-World-1B6.pth data/metamath [out/1b6-bone]
#   GPUS=1 MICRO_BSZ=8 bash configs/rwkv6-1.6b.sh lora ...      (1 GPU, 8 micro-batches accumulated)
# GPU memory per GPU (8 GPUs, ZeRO-2, bench/memory_plan.py: DeepSpeed's estimators + activations
# measured on the CPU; + ~1-2 GB CUDA context and allocator slack): 3.87 GiB at MICRO_BSZ 4, 4.37 GiB at 8.
MODEL_NAME=rwkv6-1.6b
source "$(dirname "$0")/common.sh"
