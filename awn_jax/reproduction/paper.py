"""The numbers of "Towards Stable and Robust AdderNets" (Zhu et al., NeurIPS 2021) that the
reproduction compares against, ResNet-20 on CIFAR-10, accuracies in %.

Rows are named as in the paper (:func:`awn_jax.names.row_name`): CNN-R, ANN-R, ANN-r-WS, ...
"""

# (clean, FGSM, BIM-7, PGD-7, MIM-5, RFGSM-5): Table 1, and Table 3 for WS and "-r".
ROWS = {
    "CNN": (92.68, 16.33, 0.00, 0.00, 0.01, 0.00),
    "ANN": (91.72, 18.42, 0.00, 0.00, 0.04, 0.00),
    "CNN-R": (90.62, 17.23, 3.46, 3.67, 4.23, 0.06),
    "ANN-R": (90.95, 29.93, 29.30, 29.72, 32.25, 3.38),
    "ANN-R-AWN": (90.55, 45.93, 42.62, 43.39, 46.52, 18.36),
    "ANN-r-WS": (88.10, 49.24, 21.46, 22.96, 32.26, 7.31),
    "ANN-r-AWN": (89.81, 49.85, 22.54, 24.27, 32.54, 8.26),
    "ANN-R-WS": (89.38, 40.65, 31.35, 36.08, 42.30, 7.78),
}

# #Mul, #Add in millions at 32x32 (Table 1).
COUNTS = {"conv": (41.17, 41.17), "adder": (0.45, 81.89)}

# Sec. 5.1, in words: PGD-7 accuracy at eps 0.06 and 0.1 (Fig. 2a), PGD-50 (Fig. 2b).
SWEEPS = {
    ("eps", 0.06): {"CNN-R": 2.96, "ANN-R": 27.67, "ANN-R-WS": 28.66},
    ("eps", 0.1): {"ANN-R-AWN": 32.67},
    ("steps", 50): {"ANN-R": 26.48, "ANN-R-AWN": 36.52},
}

# Fig. 2c: variance of the test accuracy (%^2) over 9 models interpolated between two
# checkpoints; the paper's epoch pairs (ANN 160->164 and 290->294, ANN-AWN 125->135 and
# 283->294), early pair first.
INTERPOLATION_VARIANCE = {"ANN": (587.28, 627.54), "ANN-AWN": (336.00, 41.67)}

# Sec. 5.2: mean and std of the 19th layer's features before BN, early / late epoch.
FEATURES = {"ANN": {21: (-2738.58, 1042.44), 386: (-1476.52, 266.97)},
            "ANN-AWN": {21: (-940.89, 269.39), 385: (-564.59, 60.65)}}
