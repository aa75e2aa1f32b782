DK = "detr and (batched_matching or official_reference or position_encoding or without_objects or divided_by_all or preprocess_pads or postprocess)"
SK = "ssd and (losses or batched or hard_negatives or shared_best or detections_match or empty_and)"
YK = "yolo and (equals_yolov5_v7_stored or build_targets or detections_come or loss_is_scaled or without_detections)"
RK = "retinanet and (losses or detections_match or giou or empty_and)"
FK = "fcos and (losses or detections_match or assignment or empty_and)"
FRK = "faster_rcnn and (losses or detections_match or proposal_selection or empty_and)"
MUTANTS = [
("DB1", ["detr.py"], "gt_boxes.repeat(L, 1, 1), p=1)", "gt_boxes.repeat(L, 1, 1), p=2)", ["-k", DK]),
("DB2", ["detr.py"], "dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)", "dim_t = temperature ** (dim_t / num_pos_feats)", ["-k", DK]),
("DB3", ["detr.py"], "mask[i, : image.shape[1], : image.shape[2]] = False", "mask[i, : image.shape[1], :] = False", ["-k", DK]),
("SB1", ["ssd.py"], "num_negative = neg_to_pos_ratio * foreground.sum(1, keepdim=True)", "num_negative = neg_to_pos_ratio * foreground.sum()", ["-k", SK]),
("SB2", ["ssd.py"], "keep = keep[rank < cfg.detections_per_img]", "keep = keep[rank <= cfg.detections_per_img]", ["-k", SK]),
("YB1", ["yolo.py"], "grid = torch.stack([xs, ys], 2).view(1, 1, H, W, 2) - 0.5", "grid = torch.stack([ys, xs], 2).view(1, 1, H, W, 2) - 0.5", ["-k", YK]),
("YB2", ["yolo.py"], "return iou - (distance2 / diagonal2 + v * alpha)", "return iou - distance2 / diagonal2", ["-k", YK]),
("YB3", ["yolo.py"], "cell[:, 0].clamp_(0, W_l - 1)", "cell[:, 0].clamp_(0, H_l - 1)", ["-k", YK]),
("RB1", ["retinanet.py"], "keep = batched_nms(boxes_i, scores_i, labels_i, cfg.nms_thresh)[: cfg.detections_per_img]", "keep = batched_nms(boxes_i, scores_i, labels_i, cfg.nms_thresh)[:100]", ["-k", RK]),
("FB1", ["fcos.py"], "keep = batched_nms(boxes_i, scores_i, labels_i, cfg.nms_thresh)[: cfg.detections_per_img]", "keep = batched_nms(boxes_i, scores_i, labels_i, cfg.nms_thresh)[:300]", ["-k", FK]),
("FB2", ["fcos.py"], "candidate = in_center & (ltrb.amin(-1) > 0) & (max_distance > lower)", "candidate = in_center & (max_distance > lower)", ["-k", FK]),
("FRB1", ["faster_rcnn.py"], "cfg.box_bg_iou_thresh, allow_low_quality_matches=False)", "cfg.box_bg_iou_thresh, allow_low_quality_matches=True)", ["-k", FRK]),
("FRB2", ["faster_rcnn.py"], "    labels[~valid] = -1  # padding is never sampled\n", "", ["-k", FRK]),
("DAB1", ["data.py"], "class_names = sorted(found)  #", "class_names = sorted(found, reverse=True)  #", ["-k", "voc"]),
("DAB2", ["data.py"], "                iscrowd = 0\n", "                iscrowd = 1\n", ["-k", "coco"]),
]
