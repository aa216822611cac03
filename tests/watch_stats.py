"""What a watcher should report for a step, worked out from a statistics run's rows (shared by the watch tests)."""

from __future__ import annotations

import math


def expected(run, step: int | None = None) -> dict[tuple[str, str], tuple[float, float, float]]:
    """(module, kind) -> (abs_max, rms, mean) over its floating tensors, in ``step`` (default: the run's only one)."""
    df = run.to_pandas()
    if step is not None:
        df = df[df.step == step]
    df = df[df.dtype.astype(str).str.startswith("torch.float")]
    out = {}
    for (module, kind), g in df.groupby(["module", df.kind.astype(str).str.replace("s$", "", regex=True)]):
        n = float(g.numel.astype(float).sum())
        rms = math.sqrt(float((g.l2_norm.astype(float) ** 2).sum()) / n)
        mean = float((g["mean"].astype(float) * g.numel.astype(float)).sum()) / n
        out[(module, kind)] = (float(g.abs_max.astype(float).max()), rms, mean)
    return out
