"""The worker side of pipeq (needs pipeq[worker]: torch, transformers)."""
