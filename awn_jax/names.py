"""The paper's names, in one place for every layer that reports: models, rows, attacks.

"Towards Stable and Robust AdderNets" names a model by its layer type (CNN, ANN, ANN-WS,
ANN-AWN) and a Table 1/3 row by the model with the BN mode's suffix after its first part
("-R" running-mean, "-r" running, none for tracked): CNN-R, ANN-R, ANN-r-WS, ANN-R-AWN.
"""

PAPER_NAMES = {"conv": "CNN", "adder": "ANN", "adder-ws": "ANN-WS", "adder-awn": "ANN-AWN"}
BN_SUFFIX = {"tracked": "", "running-mean": "-R", "running": "-r"}

# Table 1's attacks, in its column order: FGSM, BIM-7, PGD-7, MIM-5, RFGSM-5.
PAPER_ATTACKS = ("fgsm", "bim", "pgd", "mim", "rfgsm")


def paper_name(layer_type: str) -> str:
    """The paper's name of a model with ``layer_type`` layers (the type itself if the paper
    has none)."""
    return PAPER_NAMES.get(layer_type, layer_type)


def row_name(layer_type: str, bn_mode: str) -> str:
    """The paper's label of a (layer type, BN mode) row: CNN, ANN-R, ANN-r-WS, ..."""
    head, _, tail = PAPER_NAMES[layer_type].partition("-")
    return head + BN_SUFFIX[bn_mode] + (f"-{tail}" if tail else "")
