X = " or help_shows or compare_table or preset or command_line"
MUTANTS = [
("CF1", ["retinanet.py"], "focal_alpha: float = 0.25", "focal_alpha: float = 0.5", ["-k", "retinanet and (losses or detections_match or giou)" + X]),
("CF2", ["fcos.py"], "focal_gamma: float = 2.0", "focal_gamma: float = 1.5", ["-k", "fcos and (losses or detections_match)" + X]),
("CF3", ["faster_rcnn.py"], "rpn_fg_iou_thresh: float = 0.7", "rpn_fg_iou_thresh: float = 0.6", ["-k", "faster_rcnn and (losses or detections_match or batched)" + X]),
("CF4", ["faster_rcnn.py"], "box_positive_fraction: float = 0.25", "box_positive_fraction: float = 0.5", ["-k", "faster_rcnn and (losses or detections_match or batched)" + X]),
("CF5", ["ssd.py"], "neg_to_pos_ratio: float = 3.0", "neg_to_pos_ratio: float = 2.0", ["-k", "ssd and (losses or hard_neg or batched)" + X]),
("CF6", ["ssd.py"], "iou_thresh: float = 0.5  #", "iou_thresh: float = 0.4  #", ["-k", "ssd and (losses or hard_neg or batched)" + X]),
("CF7", ["yolo.py"], "anchor_t: float = 4.0", "anchor_t: float = 3.0", ["-k", "yolo and (equals_yolov5_v7_stored or build_targets or autoanchor)" + X]),
("CF8", ["yolo.py"], "ema_decay: float = 0.9999", "ema_decay: float = 0.999", ["-k", "yolo and (ema or equals)" + X]),
("CF9", ["detr.py"], "set_cost_bbox: float = 5.0", "set_cost_bbox: float = 1.0", ["-k", "detr and (official or matching)" + X]),
("CF10", ["detr.py"], "eos_coef: float = 0.1", "eos_coef: float = 0.2", ["-k", "detr and (official or matching)" + X]),
("CF11", ["fcos.py"], "center_sampling_radius: float = 1.5", "center_sampling_radius: float = 2.5", ["-k", "fcos and (losses or assignment or batched)" + X]),
("CF12", ["retinanet.py"], "bg_iou_thresh: float = 0.4", "bg_iou_thresh: float = 0.3", ["-k", "retinanet and (losses or detections_match or batched)" + X]),
]
