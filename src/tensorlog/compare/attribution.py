"""Where a divergence is born: the innermost module whose inputs match and whose outputs differ.

Walking a step in completion order (children finish before their parents), a
module whose inputs match and whose outputs do not is where a difference
appears. A parent in that state is attributed to its logged descendant that is
itself born ("contains"), so the answer is the innermost module, not the root
whose token-id inputs always match. Where no nesting was recorded (a dump of the
reference logger), the module tree comes from the qualified names.
"""

from __future__ import annotations

from ..formats import ModuleCall
from .results import ModuleResult

__all__ = ["attribute", "innermost_born"]


def attribute(results: list[ModuleResult], calls: dict[tuple[int | None, str], ModuleCall]) -> list[ModuleResult]:
    """Mark a 'born' parent as 'contains' when a logged descendant is itself born.

    A module whose inputs could not be compared (cross-framework alignment
    compares outputs only) is 'born' only if nothing failed before it in
    completion order; after an earlier failure it is 'inherited'.
    """
    born = [r for r in results if r.verdict == "born"]
    out = []
    failed_before = False
    for r in sorted(results, key=lambda r: r.completion):
        if r.verdict == "born":
            me = calls.get((r.rank, r.module))
            child = None
            if me is not None and me.seq_start is not None and me.seq_end is not None:
                for other in born:
                    oc = calls.get((other.rank, other.module))
                    inside = (
                        other is not r
                        and oc is not None
                        and oc.rank == me.rank
                        and oc.seq_start is not None
                        and oc.seq_end is not None
                        and me.seq_start < oc.seq_start
                        and oc.seq_end < me.seq_end
                    )
                    if inside and (child is None or oc.seq_end < calls[(child.rank, child.module)].seq_end):  # type: ignore[operator,union-attr]
                        child = other
            elif me is not None:
                child = _named_descendant(r, born)
            if child is not None:
                r = r.model_copy(update={"verdict": "contains", "explained_by": child.module})
            elif r.inputs_match is None and failed_before:
                r = r.model_copy(update={"verdict": "inherited"})
        failed_before = failed_before or r.verdict in ("born", "inherited")
        out.append(r)
    return out


def _named_descendant(r: ModuleResult, born: list[ModuleResult]) -> ModuleResult | None:
    """Without a recorded nesting (the reference logger writes none), the module tree of the names: the first
    born module, in start order, whose qualified name lies under this one's (``model`` holds ``model.layers.1``)."""
    prefix = r.module + "."
    inside = [o for o in born if o is not r and o.rank == r.rank and o.module.startswith(prefix)]
    return min(inside, key=lambda o: o.position, default=None)


def innermost_born(results: list[ModuleResult]) -> ModuleResult | None:
    for r in sorted(results, key=lambda r: r.completion):
        if r.verdict == "born":
            return r
    return None
