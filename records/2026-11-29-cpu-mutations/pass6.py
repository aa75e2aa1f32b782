# Pass 6: what passes 1-5 left: --show-targets' draw_targets of faster_rcnn, retinanet, fcos, detr, fast_rcnn; the
# evaluation loader's batching; YOLO's rectangular evaluation letterbox; DETR's resize; SSD's augmentation options;
# data.py's VOC parsing, hflip with proposals, collate_fn, to_device, SyntheticShapes; bench.py's compare helpers and
# gallery. Ids marked "probe" are bugs the current tests may well miss (--show-targets is only checked for files
# written and reproducible; the synthetic images are square).

def ST(name):
    return ['-k', f'eval_predict_show_targets and {name}']

YL = ['-k', 'yolo and (letterbox or detections_come)']
CMP = ['-k', 'compare and not compare_table']

MUTANTS = [
    # ===================== draw_targets =====================
    # probe: faster_rcnn's boxes drawn in the resized batch's pixels, not the image's
    ('P6-FRD1', ['faster_rcnn.py'],
     'drawn = draw_boxes(drawn, resize_boxes(boxes, image_sizes[0], image.shape[-2:]), color=colour, width=1)',
     'drawn = draw_boxes(drawn, boxes, color=colour, width=1)', ST('faster_rcnn')),
    # probe: all sampled background RoIs drawn (hundreds hide the image)
    ('P6-FRD2', ['faster_rcnn.py'], '(rois[labels == 0][:int((labels > 0).sum())],',
     '(rois[labels == 0],', ST('faster_rcnn')),
    # probe: anchors matched to ground truth 0 not drawn as positive
    ('P6-FRD3', ['faster_rcnn.py'], 'positive = assign_anchors(anchors, gt_boxes, gt_valid, model.cfg)[0] >= 0  # [A]',
     'positive = assign_anchors(anchors, gt_boxes, gt_valid, model.cfg)[0] > 0  # [A]', ST('faster_rcnn')),
    # probe: retinanet's positive anchors mapped the wrong way (image -> batch instead of batch -> image)
    ('P6-RND1', ['retinanet.py'], 'resize_boxes(anchors[positive], image_sizes[0], image.shape[-2:])',
     'resize_boxes(anchors[positive], image.shape[-2:], image_sizes[0])', ST('retinanet')),
    # probe: retinanet drops the anchors of ground truth 0
    ('P6-RND2', ['retinanet.py'], 'positive = assign_anchors(anchors, gt_boxes, gt_valid, model.cfg)[0] >= 0  # [A]',
     'positive = assign_anchors(anchors, gt_boxes, gt_valid, model.cfg)[0] > 0  # [A]', ST('retinanet')),
    # probe: fcos's dots dark at the centre, white at the sides (brightness inverted)
    ('P6-FCD1', ['fcos.py'], 'color=[(int(255 * c),) * 3 for c in centerness.tolist()])',
     'color=[(int(255 * (1 - c)),) * 3 for c in centerness.tolist()])', ST('fcos')),
    # probe: fcos's dots at the squares' top-left corners, not the points
    ('P6-FCD2', ['fcos.py'], 'points = (squares[:, :2] + squares[:, 2:]) / 2  # [P, 2]',
     'points = squares[:, :2]  # [P, 2]', ST('fcos')),
    # fcos: encode's arguments swapped: ltrb of the point from the box's view, negative: nan centerness
    ('P6-FCD3', ['fcos.py'], 'model.box_coder.encode(gt_boxes[0, matched_idxs[positive]], anchors[positive])',
     'model.box_coder.encode(anchors[positive], gt_boxes[0, matched_idxs[positive]])', ST('fcos')),
    # probe: detr's scale (w, h) swapped: invisible on the square synthetic images
    ('P6-DTD1', ['detr.py'], 'scale = torch.tensor([image.shape[-1], image.shape[-2]] * 2,',
     'scale = torch.tensor([image.shape[-2], image.shape[-1]] * 2,', ST('detr')),
    # probe: detr matched with the first decoder layer's predictions, drawn from the last layer's
    ('P6-DTD2', ['detr.py'], 'hungarian_match(pred_logits[-1:], pred_boxes[-1:], gt_boxes,',
     'hungarian_match(pred_logits[:1], pred_boxes[:1], gt_boxes,', ST('detr')),
    # probe: detr's ground-truth labels not reordered with their boxes (wrong class colour/caption)
    ('P6-DTD3', ['detr.py'], 'draw_boxes(drawn, gt_xyxy, gt_labels[0, gt_idx], None, class_names, path, width=3)',
     'draw_boxes(drawn, gt_xyxy, gt_labels[0, :len(gt_idx)], None, class_names, path, width=3)', ST('detr')),
    # probe: fast_rcnn draws grey the sampled proposals instead of the unsampled ones
    ('P6-FRCD1', ['fast_rcnn.py'], 'drawn = draw_boxes(image, proposals[~sampled][:30],',
     'drawn = draw_boxes(image, proposals[sampled][:30],', ST('fast_rcnn')),
    # probe: fast_rcnn's foreground and background colours swapped
    ('P6-FRCD2', ['fast_rcnn.py'], '(255, 0, 0)), (rois[labels > 0], (0, 0, 255))):',
     '(0, 0, 255)), (rois[labels > 0], (255, 0, 0))):', ST('fast_rcnn')),

    # ===================== evaluation batches, letterbox, DETR resize, SSD augmentation =====================
    # evaluation drops the last partial batch (drop_last): images never evaluated
    ('P6-ML1', ['data.py'], 'batches = [order[i: i + batch_size] for i in range(0, len(dataset), batch_size)]',
     'batches = [order[i: i + batch_size] for i in range(0, len(dataset) - batch_size + 1, batch_size)]',
     ['-k', 'make_loader']),
    # evaluation order reversed
    ('P6-ML2', ['data.py'], 'sizes[i]["width"]) if sizes else None)', 'sizes[i]["width"]) if sizes else None, reverse=True)',
     ['-k', 'make_loader']),
    # collate_fn gives tuples, not lists
    ('P6-CF1', ['data.py'], '    return list(images), list(targets)\n', '    return images, targets\n',
     ['-k', 'make_loader']),
    # YOLO's rectangle rounded instead of ceiled: 672 -> 640 at 640 x 480 with the half-stride pad
    ('P6-YLB1', ['yolo.py'], 'H, W = (math.ceil(x * s / stride + cfg.letterbox_pad) * stride for x in shape)',
     'H, W = (round(x * s / stride + cfg.letterbox_pad) * stride for x in shape)', YL),
    # probe: a batch of wide images takes the least wide one's height (min instead of max aspect)
    ('P6-YLB2', ['yolo.py'], 'shape = (max(aspect), 1.0) if max(aspect) < 1',
     'shape = (min(aspect), 1.0) if max(aspect) < 1', YL),
    # top and left swapped
    ('P6-YLB3', ['yolo.py'], 'top, left = round((H - h) / 2 - 0.1), round((W - w) / 2 - 0.1)',
     'left, top = round((H - h) / 2 - 0.1), round((W - w) / 2 - 0.1)', YL),
    # probe: the odd pixel goes left/top instead of right/bottom
    ('P6-YLB4', ['yolo.py'], 'top, left = round((H - h) / 2 - 0.1), round((W - w) / 2 - 0.1)',
     'top, left = round((H - h) / 2 + 0.1), round((W - w) / 2 + 0.1)', YL),
    # an image already of the batch's shape is not resized even when its long side is not image_size
    ('P6-YLB5', ['yolo.py'], 'if max(H, W) == s and all(image.shape[-2:] == (H, W) for image in images):',
     'if all(image.shape[-2:] == (H, W) for image in images):', YL),
    # DETR's long side rounded instead of truncated (1066 -> 1067)
    ('P6-DRS1', ['detr.py'], 'return (int(size * height / width), size) if width < height',
     'return (round(size * height / width), size) if width < height', ['-k', 'detr_preprocess']),
    # SSD: zoom out always instead of half the time
    ('P6-SZ1', ['ssd.py'], 'v2.RandomZoomOut(list(cfg.image_mean), (1.0, cfg.zoom_out_max), p=0.5)',
     'v2.RandomZoomOut(list(cfg.image_mean), (1.0, cfg.zoom_out_max), p=1.0)', ['-k', 'ssd_augmentation']),
    # SSD: the IoU crop without its "keep the whole image" option (1.0)
    ('P6-SZ2', ['ssd.py'], 'v2.RandomIoUCrop(),', 'v2.RandomIoUCrop(sampler_options=[0.0, 0.1, 0.3, 0.5, 0.7, 0.9]),',
     ['-k', 'ssd_augmentation']),
    # probe: SSD's photometric distortion never applied
    ('P6-SZ3', ['ssd.py'], 'v2.RandomPhotometricDistort(p=0.5)', 'v2.RandomPhotometricDistort(p=0.0)',
     ['-k', 'ssd_augmentation']),

    # ===================== data.py =====================
    # VOC: difficult read from <truncated> (wrong key)
    ('P6-VX1', ['data.py'], 'difficult = int(float(obj.findtext("difficult") or 0))',
     'difficult = int(float(obj.findtext("truncated") or 0))', ['-k', 'voc_xml or voc_bccd or voc_evaluation']),
    # VOC: <size> width and height swapped
    ('P6-VX2', ['data.py'], 'for k in ("width", "height"))', 'for k in ("height", "width"))',
     ['-k', 'voc_bccd or voc_empty_size or image_size_mismatch']),
    # probe: hflip leaves proposals unflipped (wrong key)
    ('P6-HF1', ['data.py'], '    if "proposals" in target:\n        p = target["proposals"]',
     '    if "proposal" in target:\n        p = target["proposals"]', ['-k', 'hflip or augmentation or proposals']),
    # hflip mirrors about the height
    ('P6-HF2', ['data.py'], '    width = image.shape[-1]\n    target = dict(target)',
     '    width = image.shape[-2]\n    target = dict(target)', ['-k', 'hflip']),
    # probe: to_device drops the non-tensor fields (image_id)
    ('P6-TD1', ['data.py'], '{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}',
     '{k: v.to(device, non_blocking=True) for k, v in t.items() if torch.is_tensor(v)}', ST('detr')),
    # probe: SyntheticShapes keeps 1-pixel slivers it should drop
    ('P6-SY2', ['data.py'], 'if box[2] - box[0] < 2 or box[3] - box[1] < 2:',
     'if box[2] - box[0] < 2 and box[3] - box[1] < 2:', ['-k', 'synthetic']),

    # ===================== bench.py =====================
    # wall time read from the first time -v line, not the last
    ('P6-BW1', ['bench.py'], 'for i, x in enumerate(reversed(found[-1].split(":"))))',
     'for i, x in enumerate(reversed(found[0].split(":"))))', CMP),
    # the CPU device name cut at the first comma, not the ")"
    ('P6-BE1', ['bench.py'], 'device = line[:line.index(")") + 1] if line.startswith("CPU (") else line.split(",")[0]',
     'device = line.split(",")[0]', CMP),
    # SSD's input size reported as Fast R-CNN's (wrong key)
    ('P6-BI1', ['bench.py'], 'if "test_scales" in cfg:', 'if "scales" in cfg:', CMP),
    # probe: the gallery's best.pt is the last evaluation, not the best
    ('P6-BG1', ['bench.py'], 'best = max(run[0][0]["evals"], key=lambda e: e["AP"])',
     'best = run[0][0]["evals"][-1]', CMP),
    # probe: R-CNN's two-panel picture squeezed to one panel's width
    ('P6-BG2', ['bench.py'], 'args.gallery_width * (2 if name == "rcnn" else 1))', 'args.gallery_width)', CMP),
    # probe: the gallery's cpu-prediction bookkeeping inverted
    ('P6-BG3', ['bench.py'], 'if folder != args.predictions:', 'if folder == args.predictions:', CMP),
]
