"""``compare``: the front door, which sends a comparison to this process (:mod:`.engine`) or to Ray (:mod:`.distributed`).

It sits above both so that neither imports the other's caller: Ray's workers reuse the engine's planning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import UsageError
from ..formats import Run, RunSource
from .align import MappingSpec
from .distributed import compare_on_ray
from .engine import compare_local
from .metrics import Tolerance, registered_metrics
from .replay import ReplayResult
from .results import CompareProgress, Comparison

__all__ = ["compare"]


def compare(
    run1: Run | RunSource,
    run2: Run | RunSource,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    exact: bool = False,
    whole_steps: bool = False,
    steps: Iterable[int] | None = None,
    modules: Iterable[str] | None = None,
    progress: Callable[[CompareProgress], None] | None = None,
    mapping: str | Path | MappingSpec | None = None,
    replay: ReplayResult | None = None,
    jobs: int | None = None,
    ray: str | None = None,
) -> Comparison:
    """Compare two runs and find, per step, the module where they start to differ.

    Args:
        run1, run2 (Run | str | Path | list): runs, or their directories (an output
            dir holding exactly one run also works); a run spread over several
            directories as a list of them or a parts file (see :func:`load_run`).
        rtol (float, optional), atol (float, optional): judge as ``torch.allclose`` (a missing one is
            1e-5 / 1e-8). By default each pair is judged against the rounding of its dtypes at its own
            scale (:func:`~tensorlog.compare.metrics.rounding_budget`), so runs that compute the same thing
            in another order (fused kernels, batching, tensor parallelism) match, and a 1e-3 defect does not.
        exact (bool, default False): bitwise; with runs served in different batches, the first module that
            differs is the first whose output for a request depends on the batch.
        whole_steps (bool, default False): compare only the steps both runs finished. Without it, a run that
            was cut short, stopped logging or is still being written makes the result incomplete (exit code 2).
        steps (iterable of int, optional): only these steps.
        modules (iterable of str, optional): only modules matching one of these regexes.
        progress (callable, optional): called with a :class:`CompareProgress` (modules and
            bytes done and in total) after each module.
        jobs (int, optional): worker threads; by default 1 for small comparisons and up to
            4 (one per core) once there are hundreds of MB to read. Each worker holds a few
            tensors at a time.
        mapping (str | Path | MappingSpec, optional): align the runs first: a preset
            (``"hf-vllm"``), a mapping file, or a spec. By default ``hf-vllm`` when one run
            is from HF transformers and the other from vLLM, and shard reassembly when
            the runs' world sizes differ.
        replay (ReplayResult, optional): from :func:`tensorlog.replay`; adds each module's
            own (isolated) error beside the accumulated one.
        ray (str, optional): compare on a Ray cluster (``"auto"``, or its address): each
            pair on the node that holds its files, only metrics coming back. Needs
            ``tensorlog[ray]``; runs of one layout and world size only.

    Returns:
        Comparison: ``bool()`` is True when all compared pairs match;
        ``first_divergence`` names, per step, the innermost module where the
        difference is born.

    Example:
        >>> result = tensorlog.compare("/tmp/il/run1", "/tmp/il/run2", rtol=1e-4)
        >>> result.first_divergence[0].module
        'model.layers.3.mlp.down_proj'
    """
    tol = Tolerance.of(rtol, atol, exact=exact)
    if ray is not None:
        if mapping is not None or jobs is not None:
            raise UsageError("a compare on Ray takes neither a mapping nor a number of jobs: each node's cores do the work")
        if registered_metrics():
            raise UsageError(f"a compare on Ray computes the built-in metrics only; registered here: {registered_metrics()}")
        return compare_on_ray(
            run1,
            run2,
            address=ray,
            tol=tol,
            steps=steps,
            modules=modules,
            progress=progress,
            replay=replay,
            whole_steps=whole_steps,
        )[0]
    return compare_local(
        run1,
        run2,
        tol,
        whole_steps=whole_steps,
        steps=steps,
        modules=modules,
        progress=progress,
        mapping=mapping,
        replay=replay,
        jobs=jobs,
    )
