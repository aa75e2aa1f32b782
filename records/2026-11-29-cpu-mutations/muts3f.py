MUTANTS = [
("FR3", ["faster_rcnn.py"], "keep = keep[scores_i[keep].sort(descending=True)[1]]", "keep = keep[scores_i[keep].sort()[1]]", ["-k", "faster_rcnn and (proposal_selection or detections_match)"]),
("FR4", ["faster_rcnn.py"], "pre_nms_top_n = cfg.rpn_pre_nms_top_n_train if training else cfg.rpn_pre_nms_top_n_test", "pre_nms_top_n = cfg.rpn_pre_nms_top_n_train", ["-k", "faster_rcnn and (proposal_selection or detections_match)"]),
]
