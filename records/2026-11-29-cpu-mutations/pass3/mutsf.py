MUTANTS = [
("DD5full", ["yolo.py"], "thr = 1 / anchor_t", "thr = 1 / (anchor_t + 1)", ["-k", "yolo and not ddp and not torchrun"]),
]
