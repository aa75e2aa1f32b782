MUTANTS = [
("D34", ["data.py"], "box = [x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1]", "box = [x0 + cols[0], y0 + rows[0], x0 + cols[-1], y0 + rows[-1]]", ["-k", "synthetic"]),
("D35", ["data.py"], "label = int(rng.integers(1, len(SHAPE_NAMES) + 1))", "label = int(rng.integers(1, len(SHAPE_NAMES)))", ["-k", "synthetic"]),
("D36", ["data.py"], "if (remaining * 2 < np.asarray(full_area)).any():", "if (remaining * 4 < np.asarray(full_area)).any():", ["-k", "synthetic"]),
("YO6", ["yolo.py"], "scale = B * (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)", "scale = B", ["-k", "yolo and (ddp or torchrun or equals)"]),
]
