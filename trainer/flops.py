"""Model FLOPs for MFU: the transformer estimate, a one-off measurement, and GPU peak FLOP/s.

MFU (model FLOPs utilisation, as defined in the PaLM paper and reported by torchtitan and
Megatron) is the model FLOP/s a run achieves over the hardware's peak. ``Telemetry`` counts model
FLOPs as ``flops_per_token × tokens`` (or ``flops_per_sample × samples``) in
``ugro_train_model_flops_total`` and publishes the device's peak in
``ugro_train_peak_flops_per_second``; the MFU recording rule divides the rate of one by the other.
Model FLOPs count the model's maths only (forward and backward, no activation recomputation),
so the figure is comparable across implementations.

Nothing here imports torch at module level: only the measurement needs it, and a trainer that
passes its own figures should not pay for the import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Dense (no structured sparsity) tensor-core peaks in FLOP/s, per GPU, by the training dtype.
# bf16 and fp16 share a figure on every GPU below. Sources, NVIDIA/AMD datasheets (the sparse
# figures they headline are twice these):
#   H100 SXM / H200 SXM / GH200: H100, H200, GH200 datasheets, 989 TF bf16, 495 tf32, 67 fp32
#   H100 NVL / H200 NVL: the same datasheets' NVL columns, 835 TF bf16
#   H100 PCIe: H100 datasheet, 756 TF bf16, 378 TF tf32, 51 TF fp32
#   A100 (SXM and PCIe): A100 datasheet, 312 TF bf16, 156 TF tf32, 19.5 TF fp32
#   L40S: L40S datasheet, 362 TF bf16, 183 TF tf32, 91.6 TF fp32
#   L4: L4 datasheet, 121 TF bf16, 60 TF tf32, 30.3 TF fp32
#   A10 / A10G: A10 datasheet, 125 TF bf16, 62.5 TF tf32, 31.2 TF fp32
#   B200: DGX/HGX B200 specifications, 2.25 PF bf16 per GPU
#   GB200: GB200 NVL72 specifications, 2.5 PF bf16 per GPU
#   MI300X: AMD Instinct MI300X datasheet, 1307 TF bf16
# torchtitan's get_peak_flops uses the same bf16 figures. Entries are matched in order against
# the device name (torch.cuda.get_device_name, e.g. "NVIDIA H100 80GB HBM3"), case-insensitively:
# more specific names come before the names they contain (GB200 before B200, H100 PCIe before H100).
PEAK_FLOPS_BY_GPU: tuple[tuple[str, Mapping[str, float]], ...] = (
    ("GB200", {"bf16": 2500e12}),
    ("B200", {"bf16": 2250e12}),
    ("H200 NVL", {"bf16": 835e12}),
    ("H200", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("H100 NVL", {"bf16": 835e12}),
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("GH200", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("A10", {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("A10G", {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("MI300X", {"bf16": 1307e12}),
)

TRAIN_DTYPES = ("bf16", "fp16", "tf32", "fp32")
# Other spellings of the training dtype, torch's among them, mapped to the table's keys.
_DTYPE_ALIASES = {
    "bfloat16": "bf16",
    "torch.bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "torch.float32": "fp32",
}


def train_dtype_name(dtype: Any) -> str:
    """The table's key for a training dtype ("bf16", torch.bfloat16, "float32", ...)."""
    name = str(dtype).strip().lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in TRAIN_DTYPES:
        raise ValueError(f"unknown training dtype {dtype!r}: expected one of {TRAIN_DTYPES}")
    return name


def peak_flops_for(device_name: str, dtype: Any = "bf16") -> float | None:
    """The GPU's dense peak FLOP/s for ``dtype``, or None for a GPU or dtype not in the table."""
    key = train_dtype_name(dtype)
    key = "bf16" if key == "fp16" else key  # the same tensor-core rate on every listed GPU
    # Whole words only, so that "L4" does not match "L40S" and "A10" not "A100".
    words = f" {device_name.upper().replace('-', ' ')} "
    for pattern, peaks in PEAK_FLOPS_BY_GPU:
        if f" {pattern.upper()} " in words:
            return peaks.get(key)
    return None


def transformer_flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder-only transformer: ``6·N + 12·n_layer·n_embd·seq_len``.

    The estimate of the PaLM paper (appendix B) and nanoGPT's ``estimate_mfu``: each parameter
    in a matrix multiply costs 2 FLOPs per token forward and 4 backward (6·N), and attention's
    score and value products add 12·n_layer·n_embd·seq_len (2·seq_len·n_embd per layer forward
    for each of the two, times 3 for forward plus backward); causal masking is not discounted.
    ``n_params`` should count the parameters used in matrix multiplies: leave out embedding
    tables that are only looked up (position embeddings, an untied input embedding), but keep an
    output head, tied to the input embedding or not.
    """
    for name, value in (
        ("n_params", n_params),
        ("n_layer", n_layer),
        ("n_embd", n_embd),
        ("seq_len", seq_len),
    ):
        if value < 0:
            raise ValueError(f"{name}={value}: expected a count >= 0")
    return float(6 * n_params + 12 * n_layer * n_embd * seq_len)


def measure_flops(model: Any, example_batch: Any) -> float:
    """FLOPs of one forward and backward pass of ``model`` on ``example_batch``, measured.

    Runs the pass once under ``torch.utils.flop_counter.FlopCounterMode``, which counts the
    matrix multiplies, convolutions and attention kernels (the model FLOPs) and nothing else.
    A mapping batch is passed as keyword arguments, a tuple or list as positional ones, anything
    else as the one argument. The loss is the output's ``loss`` (attribute or key) when it has
    one, else the output itself summed; the gradients go through ``torch.autograd.grad``, so the
    parameters' ``.grad`` are left as they were. Use it once, before training, not per step.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    parameters = [p for p in model.parameters() if p.requires_grad]
    counter = FlopCounterMode(display=False)
    with counter:
        if isinstance(example_batch, Mapping):
            output = model(**example_batch)
        elif isinstance(example_batch, (tuple, list)):
            output = model(*example_batch)
        else:
            output = model(example_batch)
        loss = _loss_of(output)
        if parameters:
            torch.autograd.grad(loss.sum(), parameters, allow_unused=True)
    return float(counter.get_total_flops())


def measure_flops_per_token(model: Any, example_batch: Any, *, tokens: int | None = None) -> float:
    """``measure_flops`` divided by the batch's tokens: a figure for ``flops_per_token``.

    ``tokens`` defaults to the element count of the batch's token ids: the batch itself when it
    is a tensor, its ``input_ids`` when it is a mapping, its first element when a tuple or list.
    Pass it for other layouts, or to leave padding out.
    """
    if tokens is None:
        tokens = _token_count(example_batch)
    if tokens <= 0:
        raise ValueError(f"tokens={tokens}: expected a batch with at least one token")
    return measure_flops(model, example_batch) / tokens


def _loss_of(output: Any) -> Any:
    if isinstance(output, Mapping) and "loss" in output:
        return output["loss"]
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _token_count(batch: Any) -> int:
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError("a mapping batch without input_ids: pass tokens= explicitly")
        batch = batch["input_ids"]
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    numel = getattr(batch, "numel", None)
    if numel is None:
        raise ValueError(f"cannot count the tokens of a {type(batch).__name__}: pass tokens=")
    return int(numel())


def positive_flops(source: str, raw: Any) -> float:
    """A FLOPs figure from an argument or environment variable: a finite number > 0."""
    try:
        value = float(str(raw).strip()) if isinstance(raw, str) else float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{source}={raw!r}: expected a finite number of FLOPs > 0 (e.g. 6.2e9)")
    return value
