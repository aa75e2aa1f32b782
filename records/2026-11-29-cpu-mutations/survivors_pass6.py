# Pass 6's survivors (missed by the tests aimed at them) with the tests that now catch them; P6-BI1 is caught by the
# README table's test, which pass 6 left out. P6-SY2 and P6-BG1-3 were caught a session later (new tests); P6-BW1's
# line was rewritten then (a log's wall times are summed, a run resumed into its log), the bug is put into the new line.
MUTANTS = [
    ('P6-FRD1', ['faster_rcnn.py'], 'drawn = draw_boxes(drawn, resize_boxes(boxes, image_sizes[0], image.shape[-2:]), color=colour, width=1)', 'drawn = draw_boxes(drawn, boxes, color=colour, width=1)', ['-k', 'draw_each_assignment']),
    ('P6-FRD2', ['faster_rcnn.py'], '(rois[labels == 0][:int((labels > 0).sum())],', '(rois[labels == 0],', ['-k', 'draw_each_assignment']),
    ('P6-FRD3', ['faster_rcnn.py'], 'positive = assign_anchors(anchors, gt_boxes, gt_valid, model.cfg)[0] >= 0  # [A]', 'positive = assign_anchors(anchors, gt_boxes, gt_valid, model.cfg)[0] > 0  # [A]', ['-k', 'draw_each_assignment']),
    ('P6-RND1', ['retinanet.py'], 'resize_boxes(anchors[positive], image_sizes[0], image.shape[-2:])', 'resize_boxes(anchors[positive], image.shape[-2:], image_sizes[0])', ['-k', 'draw_each_assignment']),
    ('P6-RND2', ['retinanet.py'], 'positive = assign_anchors(anchors, gt_boxes, gt_valid, model.cfg)[0] >= 0  # [A]', 'positive = assign_anchors(anchors, gt_boxes, gt_valid, model.cfg)[0] > 0  # [A]', ['-k', 'draw_each_assignment']),
    ('P6-FCD1', ['fcos.py'], 'color=[(int(255 * c),) * 3 for c in centerness.tolist()])', 'color=[(int(255 * (1 - c)),) * 3 for c in centerness.tolist()])', ['-k', 'draw_each_assignment']),
    ('P6-FCD2', ['fcos.py'], 'points = (squares[:, :2] + squares[:, 2:]) / 2  # [P, 2]', 'points = squares[:, :2]  # [P, 2]', ['-k', 'draw_each_assignment']),
    ('P6-DTD1', ['detr.py'], 'scale = torch.tensor([image.shape[-1], image.shape[-2]] * 2,', 'scale = torch.tensor([image.shape[-2], image.shape[-1]] * 2,', ['-k', 'draw_each_assignment']),
    ('P6-DTD2', ['detr.py'], 'hungarian_match(pred_logits[-1:], pred_boxes[-1:], gt_boxes,', 'hungarian_match(pred_logits[:1], pred_boxes[:1], gt_boxes,', ['-k', 'draw_each_assignment']),
    ('P6-DTD3', ['detr.py'], 'draw_boxes(drawn, gt_xyxy, gt_labels[0, gt_idx], None, class_names, path, width=3)', 'draw_boxes(drawn, gt_xyxy, gt_labels[0, :len(gt_idx)], None, class_names, path, width=3)', ['-k', 'draw_each_assignment']),
    ('P6-FRCD1', ['fast_rcnn.py'], 'drawn = draw_boxes(image, proposals[~sampled][:30],', 'drawn = draw_boxes(image, proposals[sampled][:30],', ['-k', 'draw_each_assignment']),
    ('P6-FRCD2', ['fast_rcnn.py'], '(255, 0, 0)), (rois[labels > 0], (0, 0, 255))):', '(0, 0, 255)), (rois[labels > 0], (255, 0, 0))):', ['-k', 'draw_each_assignment']),
    ('P6-YLB2', ['yolo.py'], 'shape = (max(aspect), 1.0) if max(aspect) < 1', 'shape = (min(aspect), 1.0) if max(aspect) < 1', ['-k', 'yolo_letterbox_is_val']),
    ('P6-YLB4', ['yolo.py'], 'top, left = round((H - h) / 2 - 0.1), round((W - w) / 2 - 0.1)', 'top, left = round((H - h) / 2 + 0.1), round((W - w) / 2 + 0.1)', ['-k', 'yolo_letterbox_is_val']),
    ('P6-SZ3', ['ssd.py'], 'v2.RandomPhotometricDistort(p=0.5)', 'v2.RandomPhotometricDistort(p=0.0)', ['-k', 'ssd_augmentation_moves']),
    ('P6-TD1', ['data.py'], '{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}', '{k: v.to(device, non_blocking=True) for k, v in t.items() if torch.is_tensor(v)}', ['-k', 'make_loader_and_collate']),
    ('P6-SY2', ['data.py'], 'if box[2] - box[0] < 2 or box[3] - box[1] < 2:', 'if box[2] - box[0] < 2 and box[3] - box[1] < 2:', ['-k', 'synthetic_sliver']),
    ('P6-BW1', ['bench.py'], 'for part in found for i', 'for part in found[:1] for i', ['-k', 'compare_reads_cpu']),
    ('P6-BI1', ['bench.py'], 'if "test_scales" in cfg:', 'if "scales" in cfg:', ['-k', 'compare_table']),
    ('P6-BG1', ['bench.py'], 'best = max(run[0][0]["evals"], key=lambda e: e["AP"])', 'best = run[0][0]["evals"][-1]', ['-k', 'gallery_pictures']),
    ('P6-BG2', ['bench.py'], 'args.gallery_width * (2 if name == "rcnn" else 1))', 'args.gallery_width)', ['-k', 'gallery_pictures']),
    ('P6-BG3', ['bench.py'], 'if folder != args.predictions:', 'if folder == args.predictions:', ['-k', 'gallery_pictures']),
]
