"""The numbers the five papers (and their BERT-CRF baseline) report, for the report's paper columns.

Keys are ``(model, row, setting)``: ``row`` is the preset name that reproduces the paper's row (see
each model's ``PRESETS``), ``setting`` is ``t15``/``t17`` (in-domain) or ``t15-to-t17``/``t17-to-t15``
(cross-domain). Values are percentages as printed: ``P``, ``R``, ``F1`` and, where the paper gives
them, per-type F1 (``PER``, ``LOC``, ``ORG``, ``MISC``). ``source`` names the table.
Low-resource curves (MGIPS-CL Fig. 8) are printed only as a figure: no numbers here.
"""

from __future__ import annotations

TYPES = ("PER", "LOC", "ORG", "MISC")

# (model, [row names that mean the same setting], source, {setting: (P, R, F1) or (PER, LOC, ORG, MISC, P, R, F1)})
_TABLE: list[tuple[str, tuple[str, ...], str, dict[str, tuple]]] = [
    ("bert_crf", ("default",), "MGIPS-CL Table 2 (BERT-CRF)", {
        "t15": (84.74, 80.51, 60.27, 37.29, 69.22, 74.59, 71.81),
        "t17": (90.25, 83.05, 81.13, 62.21, 83.32, 83.57, 83.44)}),
    ("vcrmner", ("paper",), "VCRMNER Table 1", {
        "t15": (75.48, 78.23, 76.83), "t17": (87.76, 89.79, 88.76)}),
    ("vcrmner", ("w/o inter-former",), "VCRMNER Table 3", {
        "t15": (75.68, 76.46, 76.06), "t17": (87.44, 87.64, 87.54)}),
    ("vcrmner", ("w/o ev",), "VCRMNER Table 3", {
        "t15": (74.64, 76.21, 75.42), "t17": (86.26, 88.75, 87.49)}),
    ("vcrmner", ("w/o prompt",), "VCRMNER Table 3", {
        "t15": (74.17, 77.96, 76.02), "t17": (87.2, 89.27, 88.22)}),
    ("vcrmner", ("paper",), "VCRMNER Table 4 (cross-domain)", {
        "t17-to-t15": (71.87, 68.31, 69.08), "t15-to-t17": (72.45, 60.25, 65.11)}),
    ("promptmner", ("paper", "best"), "PromptMNER Table 1 (100 CPrompts)", {
        "t15": (78.03, 79.17, 78.60), "t17": (89.93, 90.60, 90.27)}),
    ("promptmner", ("task labels",), "PromptMNER Table 1", {
        "t15": (77.89, 77.44, 77.66), "t17": (88.27, 90.82, 89.53)}),
    ("promptmner", ("KB",), "PromptMNER Table 1", {
        "t15": (78.15, 78.23, 78.19), "t17": (89.78, 89.71, 89.74)}),
    ("promptmner", ("expert",), "PromptMNER Table 1", {
        "t15": (77.96, 78.65, 78.30), "t17": (89.59, 90.45, 90.02)}),
    ("promptmner", ("30 CPrompts",), "PromptMNER Table 1", {
        "t15": (77.84, 78.90, 78.37), "t17": (89.32, 90.97, 90.14)}),
    ("promptmner", ("50 CPrompts",), "PromptMNER Table 1", {
        "t15": (78.33, 78.75, 78.54), "t17": (89.67, 90.60, 90.13)}),
    ("promptmner", ("w/o MAS",), "PromptMNER Table 1", {
        "t15": (78.47, 77.62, 78.04), "t17": (89.12, 90.07, 89.59)}),
    ("pmner", ("full", "paper"), "P-MNER Table 2 / 3 (OURS)", {
        "t15": (79.18, 79.55, 79.43), "t17": (90.11, 91.23, 91.31)}),
    # P-MNER Table 3 prints F1 values that do not follow from its P and R; recorded as printed.
    ("pmner", ("T+V",), "P-MNER Table 3", {
        "t15": (72.76, 72.53, 72.31), "t17": (83.74, 83.24, 84.33)}),
    ("pmner", ("T+V+TCFM",), "P-MNER Table 3", {
        "t15": (74.38, 74.12, 73.35), "t17": (85.16, 84.35, 85.41)}),
    ("pmner", ("T+FRR+TCFM",), "P-MNER Table 3", {
        "t15": (75.32, 75.54, 75.14), "t17": (85.47, 84.89, 86.02)}),
    ("mgipscl", ("paper",), "MGIPS-CL Table 2 (mean of 5 runs)", {
        "t15": (86.83, 82.72, 66.20, 46.02, 77.70, 76.04, 76.86),
        "t17": (94.87, 85.88, 85.68, 73.31, 88.29, 88.75, 88.52)}),
    ("mgipscl", ("w/o IPS-CL",), "MGIPS-CL Table 3", {
        "t15": (74.66, 77.08, 75.85), "t17": (87.20, 88.23, 87.71)}),
    ("mgipscl", ("w/o MGI",), "MGIPS-CL Table 3", {
        "t15": (75.09, 76.81, 75.94), "t17": (86.87, 87.92, 87.39)}),
    ("mgipscl", ("w/o Row-grained",), "MGIPS-CL Table 3", {
        "t15": (76.03, 76.70, 76.36), "t17": (88.25, 87.92, 88.08)}),
    ("mgipscl", ("w/o Column-grained",), "MGIPS-CL Table 3", {
        "t15": (76.12, 76.70, 76.41), "t17": (87.79, 88.52, 88.15)}),
    ("espvr", ("paper",), "ESPVR Table 1 / 3", {
        "t15": (85.60, 80.48, 59.45, 38.08, 71.94, 74.17, 73.04),
        "t17": (92.73, 84.75, 83.82, 70.55, 85.70, 87.35, 86.52)}),
    ("espvr", ("w/o IC",), "ESPVR Table 3", {
        "t15": (84.97, 80.30, 60.03, 37.38, 71.67, 73.77, 72.70),
        "t17": (91.81, 84.59, 82.86, 68.59, 84.86, 86.24, 85.55)}),
    # ESPVR Table 3's "w/o ESPVR" row survives only partly in our copy of the paper (R 86.09 on 2017).
    ("espvr", ("w/o IC + ESPVR",), "ESPVR Table 3", {
        "t15": (84.55, 80.59, 60.95, 37.77, 72.32, 73.46, 72.89),
        "t17": (92.22, 83.47, 83.88, 67.75, 85.19, 86.39, 85.79)}),
    ("espvr", ("paper",), "ESPVR Table 2 (cross-domain)", {
        "t17-to-t15": (79.17, 70.63, 48.53, 18.20, 67.58, 63.03, 65.22),
        "t15-to-t17": (82.47, 70.68, 42.92, 32.63, 65.77, 61.54, 63.58)}),
]


def _expand() -> dict[tuple[str, str, str], dict]:
    results: dict[tuple[str, str, str], dict] = {}
    for model, rows, source, settings in _TABLE:
        for setting, numbers in settings.items():
            per_type = dict(zip(TYPES, numbers[:4])) if len(numbers) == 7 else {}
            precision, recall, f1 = numbers[-3:]
            entry = {"P": precision, "R": recall, "F1": f1, "per_type": per_type, "source": source}
            for row in rows:
                results[(model, row, setting)] = entry
    return results


PAPER_RESULTS = _expand()


def paper_result(model: str, row: str | None, setting: str) -> dict | None:
    """The paper's numbers for this model, preset and setting, or None when no paper reports them."""
    return PAPER_RESULTS.get((model, row or "default", setting))
