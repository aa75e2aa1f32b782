MUTANTS = [
("DD3full", ["ssd.py"], "scores.topk(min(cfg.topk_candidates, A), dim=2)", "scores.topk(min(100, A), dim=2)", ["-k", "ssd"]),
]
