DK = "detr and (batched_matching or official_reference or position_encoding or without_objects or divided_by_all or preprocess_pads or postprocess)"
SK = "ssd and (losses or batched or hard_negatives or shared_best or detections_match or empty_and)"
YK = "yolo and (equals_yolov5_v7_stored or build_targets or detections_come or loss_is_scaled or without_detections)"
RK = "retinanet and (losses or detections_match or giou or empty_and)"
FK = "fcos and (losses or detections_match or assignment or empty_and)"
FRK = "faster_rcnn and (losses or detections_match or proposal_selection or empty_and)"
MUTANTS = [
("DE1", ["detr.py"], "+ cfg.set_cost_giou * cost_giou", "- cfg.set_cost_giou * cost_giou", ["-k", DK]),
("DE2", ["detr.py"], "eps, scale = 1e-6, 2 * math.pi", "eps, scale = 1e-6, math.pi", ["-k", DK]),
("DE3", ["detr.py"], "return torch.cat((pos_y, pos_x), dim=3)", "return torch.cat((pos_x, pos_y), dim=3)", ["-k", DK]),
("DE4", ["detr.py"], 'suffix = "" if l == L - 1 else f"_{l}"', 'suffix = "" if l == 0 else f"_{l}"', ["-k", DK]),
("DE5", ["detr.py"], "empty_weight[-1] = cfg.eos_coef", "empty_weight[0] = cfg.eos_coef", ["-k", DK]),
("DE6", ["detr.py"], "key_padding_mask = mask.flatten(1)  # [B, S]", "key_padding_mask = torch.zeros_like(mask.flatten(1))", ["-k", DK]),
("DE7", ["detr.py"], "loss_ce = ce.sum((1, 2)) / empty_weight[target_classes].sum((1, 2))", "loss_ce = ce.mean((1, 2))", ["-k", DK]),
("SS1", ["ssd.py"], "return torch.where(forced >= 0, forced, matched_idxs)", "return matched_idxs", ["-k", SK]),
("SS2", ["ssd.py"], "self.box_coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))", "self.box_coder = BoxCoder(weights=(10.0, 10.0, 10.0, 10.0))", ["-k", SK]),
("SS3", ["ssd.py"], "negative_loss = cls_loss.masked_fill(foreground, -math.inf)", "negative_loss = cls_loss", ["-k", SK]),
("SS4", ["ssd.py"], "torch.full((w(512),), 20.0 * math.sqrt", "torch.full((w(512),), 10.0 * math.sqrt", ["-k", "ssd"]),
("SS5", ["ssd.py"], "boxes = clip_boxes_to_image(boxes, (cfg.size, cfg.size))", "boxes = boxes", ["-k", SK]),
("YY1", ["yolo.py"], "t = t[torch.max(ratio, 1 / ratio).max(2).values < anchor_t]", "t = t[ratio.max(2).values < anchor_t]", ["-k", YK]),
("YY2", ["yolo.py"], "* cfg.balance[level]", "* cfg.balance[-1 - level]", ["-k", YK]),
("YY3", ["yolo.py"], "(pwh.sigmoid() * 2) ** 2 * anchors[level]", "(pwh.sigmoid() * 2) * anchors[level]", ["-k", YK]),
("YY4", ["yolo.py"], "(cfg.cls_gain * (K / 80 * 3 / L))", "(cfg.cls_gain * (3 / L))", ["-k", YK]),
("YY5", ["yolo.py"], "(cfg.obj_gain * ((cfg.image_size / 640) ** 2 * 3 / L))", "(cfg.obj_gain * (3 / L))", ["-k", YK]),
("YY6", ["yolo.py"], "y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * anchors_l", "y[..., 2:4] = (y[..., 2:4] * 2) * anchors_l", ["-k", YK]),
("YY7", ["yolo.py"], "= iou.detach().clamp(0).to(obj_target.dtype)", "= 1.0", ["-k", YK]),
("RR1", ["retinanet.py"], "classification_loss = torch.where(matched_idxs != BETWEEN_THRESHOLDS, classification_loss, 0.0).sum(1)", "classification_loss = classification_loss.sum(1)", ["-k", RK]),
("RR2", ["retinanet.py"], '"classification": (classification_loss / num_foreground).mean(),', '"classification": classification_loss.sum() / num_foreground.sum(),', ["-k", RK]),
("FF1", ["fcos.py"], "return torch.sqrt((left_right.amin(-1) / left_right.amax(-1)) * (top_bottom.amin(-1) / top_bottom.amax(-1)))", "return ((left_right.amin(-1) / left_right.amax(-1)) * (top_bottom.amin(-1) / top_bottom.amax(-1)))", ["-k", FK]),
("FF2", ["fcos.py"], "scores = torch.sqrt(torch.sigmoid(cls_logits) * torch.sigmoid(centerness)[..., None])", "scores = torch.sigmoid(cls_logits) * torch.sigmoid(centerness)[..., None]", ["-k", FK]),
("FR5", ["faster_rcnn.py"], "self.rpn_box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))", "self.rpn_box_coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))", ["-k", FRK]),
("FR6", ["faster_rcnn.py"], 'target_regression, beta=1 / 9, reduction="sum")', 'target_regression, beta=1.0, reduction="sum")', ["-k", FRK]),
("FR7", ["faster_rcnn.py"], "labels = (matched_idxs >= 0).float().masked_fill(matched_idxs == BETWEEN_THRESHOLDS, -1.0)", "labels = (matched_idxs >= 0).float()", ["-k", FRK]),
("DA1", ["data.py"], "([x, y, x + w, y + h], label_of[category_id]", "([x, y, w, h], label_of[category_id]", ["-k", "coco"]),
("DA2", ["data.py"], 'difficult = int(float(obj.findtext("difficult") or 0))', "difficult = 0", ["-k", "voc"]),
]
