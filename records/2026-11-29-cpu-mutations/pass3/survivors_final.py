MUTANTS = [
("SS4", ["ssd.py"], "torch.full((w(512),), 20.0 * math.sqrt", "torch.full((w(512),), 10.0 * math.sqrt", ["-k", "l2norm_starts"]),
("DD3", ["ssd.py"], "scores.topk(min(cfg.topk_candidates, A), dim=2)", "scores.topk(min(100, A), dim=2)", ["-k", "ssd_batched_decoding"]),
("DD5", ["yolo.py"], "thr = 1 / anchor_t", "thr = 1 / (anchor_t + 1)", ["-k", "autoanchor_keeps"]),
]
