"""The reference report (vLLM's ``tools/compare_il.py``), line for line, then tensorlog's findings.

Anything that parses the reference's markdown (its headings, its summary
table, its ✅/❌ module headings and tensor tables) reads this one the same
way; tensorlog's own findings follow in one added section at the end.
"""

from __future__ import annotations

import json

from ..compare.compare_il import ReferenceReport, RefTensor
from ..compare.metrics import columns
from ..compare.results import Comparison
from .text import clean, headline, module_cell

__all__ = ["render_reference"]


def _details(c: RefTensor, files: bool) -> tuple[str, str]:
    if c.match:
        return "✅", "Tensors match"
    if c.error is not None:
        return "❌", c.error
    text = (
        f"Max abs diff: {c.max_abs_diff:.2e}, Mean abs diff: {c.mean_abs_diff:.2e}, "
        f"Diff elements: {c.num_diff_elements}/{c.total_elements}"
    )
    if files and c.file1 and c.file2:
        text += f"<br>Files: `{c.file1}` vs `{c.file2}`"
    return "❌", text


def render_reference(r: ReferenceReport, *, verbose: bool = False, findings: Comparison | None = None) -> str:
    """The reference's markdown (no trailing newline, as its ``--output`` writes it)."""
    out = [
        "# Intermediate Logging Comparison Report",
        "",
        "Comparing intermediate logging outputs between:",
        f"- **Directory 1**: `{r.dir1}`",
        f"- **Directory 2**: `{r.dir2}`",
        "",
        "Comparison parameters:",
        f"- Relative tolerance (rtol): {r.rtol}",
        f"- Absolute tolerance (atol): {r.atol}",
        "",
        "## Overall Summary",
        "",
        "| Category | Total | Matching | Mismatched | Missing |",
        "|----------|-------|----------|------------|---------|",
        f"| Steps | {len(r.steps)} | - | - | - |",
        f"| Modules | {r.modules.total} | {r.modules.matching} | {r.modules.mismatched} | {r.modules.missing} |",
        f"| Tensors | {r.tensors.total} | {r.tensors.matching} | {r.tensors.mismatched} | {r.tensors.missing} |",
        "",
    ]
    for step, sr in sorted(r.steps.items()):
        out += [
            f"## {step}",
            "",
            f"**Summary**: {sr.counts.matching} matching modules, {sr.counts.mismatched} mismatched modules, "
            f"{sr.counts.missing} missing modules",
            "",
        ]
        for module, mr in sorted(sr.modules.items()):
            if mr.error is not None:
                out += [f"### ❌ {module}", "", f"**Error**: {mr.error}", ""]
                continue
            status = "❌" if mr.tensors.mismatched else "✅"
            out += [
                f"### {status} {module}",
                "",
                f"**Summary**: {mr.tensors.matching} matching tensors, {mr.tensors.mismatched} mismatched tensors, "
                f"{mr.tensors.missing} missing tensors",
                "",
            ]
            for kind in ("inputs", "outputs"):
                meta = mr.metadata.get(kind)
                if meta is not None and not meta.get("match", True):
                    paths = f" - Files: `{meta['file1']}` vs `{meta['file2']}`" if "file1" in meta and "file2" in meta else ""
                    out.append(f"**{(kind + '_metadata').capitalize()}**: Mismatch detected{paths}")
                    if verbose and "mismatches" in meta:
                        out += ["```json", json.dumps(meta["mismatches"], indent=2), "```"]
                    out.append("")
            if mr.tensors.mismatched or verbose:
                for kind, title in (("inputs", "Input"), ("outputs", "Output")):
                    tensors = getattr(mr, kind)
                    if not tensors:
                        continue
                    out += [f"#### {title} Tensors", "", "| Tensor | Status | Details |", "|--------|--------|---------|"]
                    for name, c in sorted(tensors.items()):
                        status_t, details = _details(c, files=kind == "inputs")  # the reference names files for inputs only
                        out.append(f"| {name} | {status_t} | {details} |")
                    out.append("")
    text = "\n".join(out)
    if findings is not None or r.unreadable:
        text += "\n" + _findings(r, findings)
    return text


_NO_FILE = {
    "value": "None or scalar values (keyword inputs, non-tensor items), compared by value",
    "statistics": "tensors without a file on one side, compared by statistics",
    "checksum": "tensors without a file on one side, compared by checksum",
}
"""What tensorlog compares that the reference's table does not count: it counts tensor files only."""


def _tensor_files_only(c: Comparison) -> tuple[Comparison, str]:
    """``c`` with its counts cut to the pairs the table above counts, and a line that names the rest."""
    compared = ("match", "mismatch", "shape_mismatch", "value_mismatch")
    rest = [t for m in c.modules for t in m.tensors if t.method in _NO_FILE and t.status in compared]
    if not rest:
        return c, ""
    failed, ok = sum(t.failed for t in rest), sum(t.ok for t in rest)
    s = c.summary
    summary = s.model_copy(
        update={
            "pairs_compared": s.pairs_compared - len(rest),
            "matched": s.matched - ok,
            "matched_exact": s.matched_exact - ok,  # a match by value, statistics or checksum counts as exact
            "mismatched": s.mismatched - failed,
        }
    )
    counts = [f"{sum(t.method == m for t in rest)} {what}" for m, what in _NO_FILE.items() if any(t.method == m for t in rest)]
    extra = f"Also compared, and not counted above: {'; '.join(counts)}" + (f" ({failed} differ)." if failed else ".")
    return c.model_copy(update={"summary": summary}), extra


def _findings(r: ReferenceReport, c: Comparison | None) -> str:
    """tensorlog's section: where the divergence is born, and what could not be read."""
    out = ["## tensorlog findings", ""]
    if r.unreadable:
        out += [f"**Unreadable files ({len(r.unreadable)})**: exit code 2; these pairs count as mismatched above.", ""]
        out += [f"- {clean(u)}" for u in r.unreadable[:20]] + (
            [f"- ... and {len(r.unreadable) - 20} more"] if len(r.unreadable) > 20 else []
        )
        out.append("")
    if c is not None:
        c, extra = _tensor_files_only(c)
        out += [f"**{headline(c)}**", ""] + ([extra, ""] if extra else [])
        failing = [m for m in c.modules if m.verdict in ("born", "contains")]
        if failing:
            cols = columns("modules_brief")
            out += [
                "| step | module | verdict | " + " | ".join(c.header for c in cols) + " |",
                "|---:|---|---|" + "".join("---:|" if c.numeric else "---|" for c in cols),
            ]
            out += [
                "| " + " | ".join([str(m.step), f"`{clean(m.module)}`", m.verdict, *(module_cell(c, m) for c in cols)]) + " |"
                for m in failing
            ]
            out.append("")
        out += [f"- {clean(n)}" for n in c.notes]
    return "\n".join(out)
