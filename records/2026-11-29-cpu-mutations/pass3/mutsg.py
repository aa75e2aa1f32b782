MUTANTS = [
("DD5rest", ["yolo.py"], "thr = 1 / anchor_t", "thr = 1 / (anchor_t + 1)", ["-k", "yolo and (ddp or torchrun)"]),
]
