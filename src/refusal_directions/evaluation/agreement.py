"""Agreement between binary judges of the same completions: percent agreement and Cohen's kappa.

Each judge gives one verdict per completion, True (e.g. attack success, unsafe), False, or None
(no verdict: not judged, or an answer that could not be parsed). A pair of judges is compared on
the completions both judged. With ``n`` such completions, ``p_o`` the share on which they agree
and ``p_a``, ``p_b`` their shares of True,

    p_e = p_a * p_b + (1 - p_a) * (1 - p_b)          (agreement expected by chance)
    kappa = (p_o - p_e) / (1 - p_e)

Kappa is undefined when ``p_e = 1``: both judges gave one and the same verdict on every completion
(then they agree perfectly but there is nothing to tell apart from chance); it is reported as
None with ``kappa_undefined`` saying why, as it is when no completion was judged by both. A judge
constant on its own while the other varies gets kappa 0 (``p_o = p_e``), a defined value.
"""

from __future__ import annotations

from typing import Sequence

Verdicts = Sequence[bool | None]


def paired_verdicts(a: Verdicts, b: Verdicts) -> list[tuple[bool, bool]]:
    """The (a, b) verdicts of the completions both judges judged (neither is None)."""
    if len(a) != len(b):
        raise ValueError(f"verdict lists differ in length: {len(a)} vs {len(b)}")
    return [(bool(x), bool(y)) for x, y in zip(a, b) if x is not None and y is not None]


def cohen_kappa(a: Verdicts, b: Verdicts) -> dict:
    """Agreement of two judges on the completions both judged.

    Returns ``{"n", "both_true", "a_only", "b_only", "both_false", "agreement" (p_o), "kappa",
    "kappa_undefined"}``: ``agreement`` is None when ``n`` is 0; ``kappa`` is None (and
    ``kappa_undefined`` the reason) when ``n`` is 0 or both judges are constant with the same
    verdict; otherwise ``kappa_undefined`` is None.
    """
    pairs = paired_verdicts(a, b)
    n = len(pairs)
    counts = {"both_true": sum(x and y for x, y in pairs), "a_only": sum(x and not y for x, y in pairs),
              "b_only": sum(y and not x for x, y in pairs), "both_false": sum(not x and not y for x, y in pairs)}
    out = {"n": n, **counts, "agreement": None, "kappa": None, "kappa_undefined": None}
    if n == 0:
        out["kappa_undefined"] = "no completion judged by both"
        return out
    p_o = (counts["both_true"] + counts["both_false"]) / n
    p_a = (counts["both_true"] + counts["a_only"]) / n
    p_b = (counts["both_true"] + counts["b_only"]) / n
    p_e = p_a * p_b + (1 - p_a) * (1 - p_b)
    out["agreement"] = p_o
    if p_e >= 1.0:
        verdict = "True" if p_a == 1.0 else "False"
        out["kappa_undefined"] = f"both judges gave {verdict} on every completion (chance agreement is 1)"
        return out
    out["kappa"] = (p_o - p_e) / (1 - p_e)
    return out


def agreement_pairs(verdicts: dict[str, Verdicts]) -> list[dict]:
    """``cohen_kappa`` of every pair of judges, in the order of ``verdicts`` (a before b), each with
    ``"a"`` and ``"b"`` the judges' names."""
    names = list(verdicts)
    return [{"a": x, "b": y, **cohen_kappa(verdicts[x], verdicts[y])}
            for i, x in enumerate(names) for y in names[i + 1 :]]


def agreement_matrices(names: Sequence[str], pairs: Sequence[dict]) -> dict[str, list[list[float | None]]]:
    """``{"agreement": [[...]], "kappa": [[...]]}``: symmetric matrices over ``names`` from
    ``agreement_pairs``; the diagonal and pairs without a value hold None."""
    index = {name: i for i, name in enumerate(names)}
    out: dict[str, list[list[float | None]]] = {}
    for key in ("agreement", "kappa"):
        matrix: list[list[float | None]] = [[None] * len(names) for _ in names]
        for pair in pairs:
            i, j = index[pair["a"]], index[pair["b"]]
            matrix[i][j] = matrix[j][i] = pair[key]
        out[key] = matrix
    return out


def disagreement(verdicts: Sequence[bool | None]) -> int:
    """How split the judges of one completion are: the size of the minority (True vs False, None
    left out); 0 when all judges with a verdict agree."""
    true = sum(1 for v in verdicts if v is True)
    false = sum(1 for v in verdicts if v is False)
    return min(true, false)


def most_disputed(verdicts: dict[str, Verdicts], limit: int) -> list[int]:
    """Indices of the (at most ``limit``) completions with the largest ``disagreement`` (ties: the
    earlier first); completions on which the judges agree are left out."""
    names = list(verdicts)
    n = len(verdicts[names[0]]) if names else 0
    scores = [disagreement([verdicts[name][i] for name in names]) for i in range(n)]
    order = sorted((i for i in range(n) if scores[i] > 0), key=lambda i: (-scores[i], i))
    return order[:limit]
