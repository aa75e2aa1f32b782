MUTANTS = [
("DD1", ["faster_rcnn.py"], "final_boxes.append(boxes_i[keep[:post_nms_top_n]])", "final_boxes.append(boxes_i[keep])", ["-k", "faster_rcnn and (losses or detections_match or proposal_selection)"]),
("DD2", ["yolo.py"], "keep = keep[: cfg.max_det]", "keep = keep", ["-k", "yolo and (equals or detections or predict or without_detections)"]),
("DD3", ["ssd.py"], "scores.topk(min(cfg.topk_candidates, A), dim=2)", "scores.topk(min(100, A), dim=2)", ["-k", "ssd and (batched or detections_match)"]),
("DD4", ["ssd.py"], "20.0 * math.sqrt(w(512) / 512)", "20.0", ["-k", "ssd"]),
("DD5", ["yolo.py"], "thr = 1 / anchor_t", "thr = 1 / (anchor_t + 1)", ["-k", "yolo and autoanchor"]),
]
