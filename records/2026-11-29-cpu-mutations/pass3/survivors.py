# Round 3 survivors (each survived the whole detector's -k selection; args below are that selection)
MUTANTS = [
# SSD: conv4_3 L2Norm scale initialised at 10 instead of 20 (ssd.py:245)
("SS4", ["ssd.py"], "torch.full((w(512),), 20.0 * math.sqrt", "torch.full((w(512),), 10.0 * math.sqrt", ["-k", "ssd"]),
# SSD: per-class top-k before the score threshold 400 -> 100 (ssd.py:492)
("DD3", ["ssd.py"], "scores.topk(min(cfg.topk_candidates, A), dim=2)", "scores.topk(min(100, A), dim=2)", ["-k", "ssd"]),
# YOLO AutoAnchor: the fit threshold 1/anchor_t -> 1/(anchor_t+1) (yolo.py:537)
("DD5", ["yolo.py"], "thr = 1 / anchor_t", "thr = 1 / (anchor_t + 1)", ["-k", "yolo"]),
# YOLO build_targets: cell column clamped by the grid's height (yolo.py:502); only differs on non-square grids,
# which training never builds (mosaic squares): equivalent in practice, listed for completeness
("YB3", ["yolo.py"], "cell[:, 0].clamp_(0, W_l - 1)", "cell[:, 0].clamp_(0, H_l - 1)", ["-k", "yolo"]),
]
