"""How a deployment's model sits on its device: dtype, attention kernel, compiled forward,
and its share of a GPU that other deployments use too.

The keys come from the deployment (`pipeq._config.Deployment`: `dtype`,
`attn_implementation`, `compile`, `trust_remote_code`, `gpu_memory_fraction`,
`gpu_memory_bytes`), checked there when the config loads; what only the worker's machine
can tell (is flash-attn installed, is there a GPU) is checked here, before the model
loads, and fails the load (`ModelLoadError`, exit 3) naming the key.

`load(deployment)` is what `pipeq worker` runs before it announces itself: cap the GPU
memory, load the handler, compile and warm it up. A warm-up runs each shape class the
worker will meet (one item, two items of different lengths) so that no job pays for
compilation: with `dynamic=True`, inductor compiles once for any batch size and length.

Sharing a GPU: `torch.cuda.set_per_process_memory_fraction` caps what PyTorch's caching
allocator of this process may hold (an allocation past it raises `OutOfMemoryError`,
which the batcher answers by halving the batch). The CUDA context (a few hundred MB) is
outside the cap. transformers' continuous batching sizes its paged KV cache from the
GPU's *free* memory (`max_memory_percent` of it, 0.9 by default: `PagedAttentionCache`
in transformers/generation/continuous_batching/cache.py), which knows nothing of the
cap: `cache_budget` turns the cap into the `max_memory_percent` that keeps the cache,
and the activations transformers reserves beside it, inside this worker's share.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from typing import Any

from pipeq._config import Deployment
from pipeq.errors import ModelLoadError

log = logging.getLogger("pipeq.worker")

__all__ = [
    "CACHE_HEADROOM",
    "CacheBudget",
    "cache_budget",
    "cap_gpu_memory",
    "check_attention",
    "compile_forward",
    "kv_bytes_per_block",
    "load",
    "loaded_info",
    "model_kwargs",
    "warm_up",
]

#: the share of the room left under the cap that the continuous-batching cache takes;
#: transformers' own default share of free memory without logits processors (0.9), the
#: rest left for temporary tensors outside its accounting
CACHE_HEADROOM = 0.9


def model_kwargs(deployment: Deployment) -> dict[str, Any]:
    """The `from_pretrained` arguments of a deployment's model settings: `dtype`,
    `trust_remote_code`, and `attn_implementation` when one is asked for."""
    kwargs: dict[str, Any] = {
        "dtype": deployment.dtype,
        "trust_remote_code": deployment.trust_remote_code,
    }
    if deployment.attn_implementation:
        kwargs["attn_implementation"] = deployment.attn_implementation
    return kwargs


def check_attention(deployment: Deployment) -> None:
    """ModelLoadError, naming `attn_implementation`, when this machine cannot run the
    kernel asked for: flash_attention_2 needs the flash-attn package and a CUDA GPU."""
    if deployment.attn_implementation != "flash_attention_2":
        return
    why = None
    if not deployment.device.startswith("cuda"):
        why = f"it runs on a CUDA GPU and this worker's device is {deployment.device}"
    elif importlib.util.find_spec("flash_attn") is None:
        why = "the flash-attn package is not installed where this worker runs"
    else:
        from transformers.utils.import_utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            why = "transformers cannot use the installed flash-attn here (no CUDA GPU?)"
    if why is not None:
        raise ModelLoadError(
            f"attn_implementation = 'flash_attention_2' cannot be used: {why}; "
            "use 'sdpa' (PyTorch's fused attention) or install flash-attn",
            deployment=deployment.name,
        )


def cap_gpu_memory(deployment: Deployment) -> int | None:
    """Cap this process's GPU memory at the deployment's share
    (`torch.cuda.set_per_process_memory_fraction` on device 0: `pipeq worker` has narrowed
    CUDA_VISIBLE_DEVICES to its GPU); the cap in bytes, None without a cap or a GPU.
    ModelLoadError when `gpu_memory_bytes` is more than the GPU has."""
    if not deployment.device.startswith("cuda"):
        return None
    if not (deployment.gpu_memory_fraction or deployment.gpu_memory_bytes):
        return None
    import torch

    if not torch.cuda.is_available():
        return None  # the load itself says there is no GPU
    total = int(torch.cuda.mem_get_info(0)[1])
    fraction = deployment.gpu_memory_fraction or deployment.gpu_memory_bytes / total
    if fraction > 1:
        raise ModelLoadError(
            f"gpu_memory_bytes = {deployment.gpu_memory_bytes:,} is more than the GPU's "
            f"{total:,} bytes",
            deployment=deployment.name,
        )
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    cap = int(total * fraction)
    log.info(
        "GPU memory capped at %.1f GiB (%.0f %% of %.1f GiB)",
        cap / 2**30,
        100 * fraction,
        total / 2**30,
    )
    return cap


def kv_bytes_per_block(
    *, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int, page_size: int
) -> int:
    """Bytes of one block of transformers' paged KV cache: `page_size` tokens of keys and
    values (2) for every layer, each `kv_heads x head_dim` values of `dtype_bytes`
    (transformers' `FullAttentionCacheAllocator.get_bytes_per_page` times the layers)."""
    return layers * 2 * kv_heads * head_dim * dtype_bytes * page_size


@dataclass(frozen=True)
class CacheBudget:
    """What the continuous-batching cache of one worker may take on a shared GPU (bytes)."""

    #: this worker's share of the GPU (`total x fraction`)
    cap_bytes: int
    #: what the cache and the activations transformers reserves beside it may take
    cache_bytes: int
    #: the same as transformers' `ContinuousBatchingConfig.max_memory_percent`: a share of
    #: the GPU's free memory when the cache is made
    max_memory_percent: float
    #: KV blocks that `cache_bytes` would hold were it all cache (an upper bound: the
    #: activations for `max_batch_tokens` come out of it first)
    max_blocks: int


def cache_budget(
    *,
    total_bytes: int,
    fraction: float,
    process_bytes: int,
    free_bytes: int,
    bytes_per_block: int,
    headroom: float = CACHE_HEADROOM,
) -> CacheBudget:
    """Size the continuous-batching cache inside this worker's share of a GPU.

    `total_bytes` is the GPU's memory, `fraction` this worker's share (0 < fraction <= 1),
    `process_bytes` what this process holds already (the model's weights: PyTorch's
    `memory_reserved`), `free_bytes` the GPU's free memory now (other processes' use taken
    out: `torch.cuda.mem_get_info`), `bytes_per_block` one KV block (`kv_bytes_per_block`).
    The room is the share less what the process holds, and never more than is free (a
    neighbour may have taken more than its share); the cache takes `headroom` of it.

    ValueError when not even one block fits: the model leaves no room in its share."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], not {fraction}")
    if free_bytes <= 0 or bytes_per_block <= 0:
        raise ValueError("free_bytes and bytes_per_block must be positive")
    cap = int(total_bytes * fraction)
    room = min(cap - process_bytes, free_bytes)
    cache = int(room * headroom)
    if cache < bytes_per_block:
        raise ValueError(
            f"no room for the KV cache: this worker's share is {cap:,} bytes, it holds "
            f"{process_bytes:,} already and {free_bytes:,} are free; one block takes "
            f"{bytes_per_block:,}: raise gpu_memory_fraction"
        )
    return CacheBudget(
        cap_bytes=cap,
        cache_bytes=cache,
        max_memory_percent=cache / free_bytes,
        max_blocks=cache // bytes_per_block,
    )


def cuda_cache_sizes(model: Any, cap_bytes: int, page_size: int) -> dict[str, Any]:
    """`ContinuousBatchingConfig` arguments that keep the paged cache of `model` inside
    `cap_bytes` on the current CUDA device (`cache_budget` on what torch reports now)."""
    import torch
    from transformers.generation.continuous_batching.utils import find_head_dim

    config = model.config
    torch.cuda.empty_cache()  # as transformers does before it measures
    free, total = (int(n) for n in torch.cuda.mem_get_info(0))
    heads = config.num_attention_heads
    budget = cache_budget(
        total_bytes=total,
        fraction=min(1.0, cap_bytes / total),
        process_bytes=int(torch.cuda.memory_reserved(0)),
        free_bytes=free,
        bytes_per_block=kv_bytes_per_block(
            layers=config.num_hidden_layers,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=find_head_dim(config),
            dtype_bytes=model.dtype.itemsize,
            page_size=page_size,
        ),
    )
    log.info(
        "continuous batching cache: %.2f GiB (max_memory_percent %.3f, at most %d blocks)",
        budget.cache_bytes / 2**30,
        budget.max_memory_percent,
        budget.max_blocks,
    )
    return {"max_memory_percent": budget.max_memory_percent}


#: task -> (one input, another of a different length, parameters): what a warm-up runs
_WARM_UP: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "text-classification": ("warm up", "a longer sentence to warm the model up", {}),
    "token-classification": ("warm up", "a longer sentence to warm the model up", {}),
    "feature-extraction": ("warm up", "a longer sentence to warm the model up", {}),
    "zero-shot-classification": (
        "warm up",
        "a longer sentence to warm the model up",
        {"candidate_labels": ["one", "two"]},
    ),
    "question-answering": (
        {"question": "what?", "context": "warm up"},
        {"question": "what is it?", "context": "a longer context to warm the model up"},
        {},
    ),
    "text-generation": ("warm up", "a longer prompt to warm up", {"max_new_tokens": 2}),
    "summarization": ("warm up", "a longer article to warm the model up", {"max_new_tokens": 2}),
    "translation": ("warm up", "a longer sentence to warm the model up", {"max_new_tokens": 2}),
}


def warm_up(handler: Any) -> float:
    """Run the handler on one item, then on two of different lengths (every path a job
    takes: one item alone, a padded batch); the seconds it took."""
    task = handler.task
    first, second, params = _WARM_UP.get(task, _WARM_UP["text-classification"])
    if task == "fill-mask":
        mask = handler.pipe.tokenizer.mask_token
        first, second, params = f"warm {mask}", f"a longer {mask} to warm the model up", {}
    started = time.monotonic()
    handler.run([first], params)
    handler.run([first, second], params)
    return time.monotonic() - started


def compile_forward(handler: Any) -> None:
    """Replace the model's forward with `torch.compile(forward, dynamic=True)`: one
    graph for every batch size and length (a static one would recompile per shape)."""
    import torch

    model = handler.pipe.model
    model.forward = torch.compile(model.forward, dynamic=True)


def load(deployment: Deployment) -> Any:
    """The deployment's handler, ready to serve: GPU memory capped, attention kernel
    checked, model loaded with its settings, compiled and warmed up when asked.
    ModelLoadError says why it could not be."""
    from pipeq.worker.handlers import load_handler

    check_attention(deployment)
    try:
        cap = cap_gpu_memory(deployment)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"could not cap GPU memory: {type(e).__name__}: {e}", deployment=deployment.name
        ) from e
    handler = load_handler(deployment)
    handler.gpu_memory_cap_bytes = cap
    if deployment.compile:
        try:
            compile_forward(handler)
            handler.warm_up_s = warm_up(handler)
        except Exception as e:
            raise ModelLoadError(
                f"compile = true: torch.compile of {deployment.model!r} failed: "
                f"{type(e).__name__}: {e}",
                deployment=deployment.name,
            ) from e
        log.info("compiled and warmed up in %.1f s", handler.warm_up_s)
    return handler


def loaded_info(handler: Any) -> dict[str, Any]:
    """What the worker announces of how its model sits: the dtype its weights are in,
    the attention kernel transformers chose, compiled or not, the GPU memory cap."""
    model = getattr(handler.pipe, "model", None)
    dtype = getattr(model, "dtype", None)
    config = getattr(model, "config", None)
    info: dict[str, Any] = {
        "loaded_dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "loaded_attn_implementation": getattr(config, "_attn_implementation", None),
        "compiled": getattr(handler, "warm_up_s", None) is not None,
    }
    if getattr(handler, "warm_up_s", None) is not None:
        info["warm_up_s"] = round(handler.warm_up_s, 3)
    cap = getattr(handler, "gpu_memory_cap_bytes", None)
    if cap is not None:
        info["gpu_memory_cap_bytes"] = cap
    return info
