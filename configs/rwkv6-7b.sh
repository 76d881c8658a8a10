#!/usr/bin/env bash
# RWKV-6 7B (L32 C4096), the paper's fine-tuning settings: Bone b=64 | LoRA r=32 | PiSSA r=32
# (88,080,384 trainable parameters each), global batch 64, lr 2e-5 constant, ctx 512, bf16,
# DeepSpeed ZeRO-2, grad_cp 1, one epoch.
#   bash configs/rwkv6-7b.sh bone RWKV-x060-World-7B.pth data/metamath [out/7b-bone]
# GPU memory per GPU (8 GPUs, ZeRO-2, bench/memory_plan.py: DeepSpeed's estimators + activations
# measured on the CPU; + ~1-2 GB CUDA context and allocator slack): 15.96 GiB at MICRO_BSZ 4, 17.09 GiB at 8.
# Small GPUs: STRATEGY=deepspeed_stage_3_offload keeps weights and optimizer in CPU RAM (~20 GB
# host memory per node, plus a C++ compiler for DeepSpeed's CPU Adam); GPU then holds roughly the
# layer being computed + activations: ~2 GB + 0.6 GB per sample (ESTIMATE), much slower.
MODEL_NAME=rwkv6-7b
source "$(dirname "$0")/common.sh"
