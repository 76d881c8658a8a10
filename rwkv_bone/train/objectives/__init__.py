"""Training objectives beyond next-token loss: DPO / IPO on preference pairs (dpo.py) and GRPO with
verifiable rewards (grpo.py). Each module holds the loss math as pure tensor functions, tested
against explicit float64 computations; the math is in ../../../shared/spec/align.md's notation."""
