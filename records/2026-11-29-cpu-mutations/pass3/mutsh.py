MUTANTS = [
("YB3full", ["yolo.py"], "cell[:, 0].clamp_(0, W_l - 1)", "cell[:, 0].clamp_(0, H_l - 1)", ["-k", "yolo"]),
]
