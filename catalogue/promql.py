"""PromQL building blocks more than one rule needs."""

from __future__ import annotations

# A rank's info series names the GPU it uses (UGRO_GPU_UUIDS or torch's device), if any.
RANK_GPUS = 'ugro_train_rank_info{gpu_uuid!=""}'


def on_rank_gpus(exporter_expr: str) -> str:
    """An exporter GPU series, labelled with the job_id and rank of the rank that uses it."""
    return f"{exporter_expr} * on (gpu_uuid) group_left (job_id, rank) {RANK_GPUS}"


def new_events(counter: str, window: str) -> str:
    """Events a counter counted within ``window``, exactly; a series that appeared already
    above zero counts too (a first XID creates its series at 1; a NaN can precede the first
    scrape). ``increase()`` would extrapolate to fractions and miss both of those. But across a
    reset (a rank relaunched under the same labels, a GPU reset clearing its volatile ECC
    counts) max - min is the old total, not new events: there ``increase()``, which knows resets,
    decides."""
    return (
        f"(max_over_time({counter}[{window}]) - min_over_time({counter}[{window}]) > 0"
        f" unless resets({counter}[{window}]) > 0)"
        f" or increase({counter}[{window}]) > 0"
        f" or ({counter} > 0 unless {counter} offset {window})"
    )


def ratio(numerator: str, denominator: str) -> str:
    return f"{numerator} / {denominator}"
