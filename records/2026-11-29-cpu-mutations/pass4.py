# Pass 4: 55 bugs where passes 1-3 did not go: data.py's selective search, proposals files and cache, resume checks,
# loaders, --predict inputs, backbone weights, COCO image folders, class-order warning, presets, the command line;
# rcnn.py's region sampling, warp, SVM objective, hard-negative mining (thresholds, eviction, retraining, feature
# scaling), ridge regressor, scoring and parameter groups; fast_rcnn.py's RoI sampler, target statistics and their
# folding, truncated SVD cache, clipping, per-class NMS, loss; SSD / YOLO / DETR augmentation and AutoAnchor's
# evolution; three --show-targets drawings; bench.py compare.
# Ids marked "probe" in the comments are bugs that the current tests may well not see (no test looks at that
# behaviour, or the test's data makes the bug invisible, e.g. square images): they measure gaps, not regressions.

SS = ['-k', 'felzenszwalb or grid_graph or (selective_search and not stops_in_one_line)']
PROPOSALS = ['-k', 'proposals_files_and_cache or proposals_on_the_fly']
STAGE2 = ['-k', 'hard_negative or stage_2 or stage_3 or scores_with_softmax or rcnn_run_fits']
FAST_SAMPLER = ['-k', 'fast_rcnn_sampler']
YOLO_AUG = ['-k', 'yolo_mosaic or yolo_augmentation or (training_transforms_pickle and yolo)']

MUTANTS = [
    # --- data.py: selective search ---
    # probe: ranking reversed in each hierarchy (the whole image last, the first merges first): only the order of
    # the boxes changes, which proposals_per_image and --max-boxes cut
    ('P4-SS1', ['data.py'], 'priorities.append(np.arange(len(merged), 0, -1, dtype=np.float64))',
     'priorities.append(np.arange(1, len(merged) + 1, dtype=np.float64))', SS),
    # probe: HSV hue of green-dominant pixels with the wrong sign
    ('P4-SS2', ['data.py'], 'np.where(high == g, 2 + (b - r) / d, 4 + (r - g) / d)',
     'np.where(high == g, 2 + (r - b) / d, 4 + (r - g) / d)', SS),
    # probe: Felzenszwalb's smoothing kernel cut to half-width ceil(sigma) instead of ceil(4 sigma)
    ('P4-SS3', ['data.py'], 'half = int(math.ceil(4 * sigma))', 'half = int(math.ceil(sigma))', SS),
    # the batched first pass forgets Int(C) in a joined component's threshold (the plain loop keeps it)
    ('P4-SS4', ['data.py'], '        threshold[big] = ew[safe] + k / size[big]',
     '        threshold[big] = k / size[big]', SS),
    # probe: texture maps not scaled to [0, 1] by their maximum (histogram bins of raw derivative magnitudes)
    ('P4-SS5', ['data.py'], 'maps.append(part / max(part.max(), 1e-12))', 'maps.append(part)', SS),
    # a region's box ends at its last pixel's left edge (x2 = max x instead of max x + 1)
    ('P4-SS6', ['data.py'], 'torch.zeros(n, dtype=torch.int64).scatter_reduce_(0, flat, xs, "amax") + 1,',
     'torch.zeros(n, dtype=torch.int64).scatter_reduce_(0, flat, xs, "amax"),', SS),
    # a merged region's box is cut to the smaller of the two right/bottom edges
    ('P4-SS7', ['data.py'],
     'np.concatenate([np.minimum(boxes[p, :2], boxes[q, :2]), np.maximum(boxes[p, 2:], boxes[q, 2:])])',
     'np.concatenate([np.minimum(boxes[p, :2], boxes[q, :2]), np.minimum(boxes[p, 2:], boxes[q, 2:])])', SS),

    # --- data.py: proposals files and cache ---
    # probe: NaN / inf proposals accepted from a file (the docstring and the error say "finite")
    ('P4-PF1', ['data.py'],
     'if boxes.size and (boxes.ndim != 2 or boxes.shape[1] != 4 or not np.isfinite(boxes).all()):',
     'if boxes.size and (boxes.ndim != 2 or boxes.shape[1] != 4):', PROPOSALS),
    # the cache no longer records which files the images were: a re-exported json naming other files reuses it
    ('P4-PF2', ['data.py'], '"files": hashlib.sha1(json.dumps(files).encode()).hexdigest(), **kwargs}', '**kwargs}',
     PROPOSALS),
    # probe: selective search runs on the training transforms' output (random flips) instead of the stored images
    ('P4-PF3', ['data.py'], 'transforms, dataset.transforms = getattr(dataset, "transforms", None), None',
     'transforms, dataset.transforms = getattr(dataset, "transforms", None), getattr(dataset, "transforms", None)',
     ['-k', 'proposals_files_and_cache or proposals_on_the_fly or rcnn_run_fits']),

    # --- data.py: resume checks and loaders ---
    # a run that is complete is resumed (and does nothing) instead of being refused
    ('P4-LD1', ['data.py'], 'if checkpoint["epoch"] >= epochs:', 'if checkpoint["epoch"] > epochs:',
     ['-k', 'a_stop_in_the_runs_last_step']),
    # probe: resuming on MORE steps per epoch (more data) is no longer refused; the test only tries fewer
    ('P4-LD2', ['data.py'], 'if checkpoint.get("steps", steps) != steps:', 'if checkpoint.get("steps", steps) > steps:',
     ['-k', 'a_stop_during_an_evaluation']),
    # the last partial batch of an epoch is dropped
    ('P4-LD3', ['data.py'], 'return math.ceil(len(dataset) / (batch_size * world_size))',
     'return len(dataset) // (batch_size * world_size)', ['-k', 'make_loader_and_collate or augmentation_is_seeded']),
    # evaluation batches sorted by w / h instead of val.py's h / w
    ('P4-LD4', ['data.py'], 'key=(lambda i: sizes[i]["height"] / sizes[i]["width"])',
     'key=(lambda i: sizes[i]["width"] / sizes[i]["height"])', ['-k', 'make_loader_and_collate']),

    # --- data.py: --predict inputs, backbone weights, COCO folders, warnings, presets, command line ---
    # --out one folder above the images is no longer refused (a drawing can replace an image of a sub-folder)
    ('P4-PR1', ['data.py'],
     'if out is not None and os.path.commonpath([real := os.path.realpath(out), folder]) == real:',
     'if out is not None and os.path.realpath(out) == folder:', ['-k', 'predict_folder_skips']),
    # batch norm's step counts of a source with batch norm are named as keys that do not fit a frozen-BN backbone
    ('P4-BW1', ['data.py'], '+ [f"unexpected {k}" for k in state_dict if k not in own and not k.endswith(step)]',
     '+ [f"unexpected {k}" for k in state_dict if k not in own]',
     ['-k', 'load_backbone_weights_names or backbone_weights_that_do_not_fit']),
    # the json's own folder is compared with the root instead of root/annotations
    ('P4-CI1', ['data.py'],
     'if os.path.abspath(own) != os.path.abspath(os.path.join(data_root, "annotations")):',
     'if os.path.abspath(own) != os.path.abspath(data_root):', ['-k', 'coco_images_beside']),
    # numbers as class names (a reference's state dict) warn that classes are taken by position
    ('P4-WO1', ['data.py'], 'if len(theirs) == len(ours) and tuple(theirs) != tuple(ours) and not _unnamed(theirs) and \\',
     'if len(theirs) == len(ours) and tuple(theirs) != tuple(ours) and \\', ['-k', 'fine_tuning_on_other_classes']),
    # a preset named for training is not announced where the checkpoint's config has the same fields
    ('P4-AN1', ['data.py'], 'args.preset_given or k not in (saved or {})) and', 'k not in (saved or {})) and',
     ['-k', 'preset_named_for_training']),
    # "-.5" is no longer read as a negative number: --lr -.5 gives argparse's error, not the one-line range check
    ('P4-PA1', ['data.py'], 'parser._negative_number_matcher = re.compile(r"-\\.?\\d")',
     'parser._negative_number_matcher = re.compile(r"-\\d")', ['-k', '(help_shows or command_line_fields) and fcos']),
    # a crop's SanitizeBoundingBoxes drops boxes but not their iscrowd / difficult flags
    ('P4-PB1', ['data.py'], 'return tuple(inputs[1][k] for k in PER_BOX if k in inputs[1])', 'return inputs[1]["labels"]',
     ['-k', 'ssd_augmentation or detr_augmentation or (training_transforms_pickle and (ssd or detr))']),

    # --- rcnn.py ---
    # the ground-truth boxes are not candidates of the fine-tuning batch
    ('P4-RS1', ['rcnn.py'], 'candidates = torch.cat([p, gt_boxes.to(p)])  # [R + M, 4]', 'candidates = p  # [R + M, 4]',
     ['-k', 'quarter_foreground']),
    # the warp's context: padding counted once instead of on both sides
    ('P4-WR1', ['rcnn.py'], 'scale = S / (S - 2 * padding)', 'scale = S / (S - padding)', ['-k', 'warp_is_rcnn']),
    # liblinear's primal without the 1/2 on |w|^2 (the solver's duality gap then never closes)
    ('P4-SV1', ['rcnn.py'], 'return 0.5 * w @ w + (upper * (1 - y * (X @ w)).clamp(min=0)).sum()',
     'return w @ w + (upper * (1 - y * (X @ w)).clamp(min=0)).sum()', ['-k', 'svm_reaches or hard_negative']),
    # hard negatives mined with the eviction threshold (-1.2) instead of -1.0001
    ('P4-TR1', ['rcnn.py'], 'negative[:, k] & (z[:, k] > cfg.svm_hard_thresh)',
     'negative[:, k] & (z[:, k] > cfg.svm_evict_thresh)', ['-k', 'hard_negative']),
    # eviction keeps the easy negatives and drops the hard ones
    ('P4-TR2', ['rcnn.py'], 'state["negatives"][k][z_neg >= cfg.svm_evict_thresh]',
     'state["negatives"][k][z_neg < cfg.svm_evict_thresh]', ['-k', 'hard_negative']),
    # probe: the count of added negatives is never reset: after the first 2000, a class is retrained at every image
    ('P4-TR3', ['rcnn.py'], '        state["added"][k] = 0\n', '', STAGE2),
    # probe: features scaled to a mean norm of 1, not feature_norm (20): the SVMs' C and bias feature mean other things
    ('P4-TR4', ['rcnn.py'], '[cfg.feature_norm / max(float(torch.cat(n).mean()), 1e-12) if n else 1.0 for n in norms]',
     '[1.0 / max(float(torch.cat(n).mean()), 1e-12) if n else 1.0 for n in norms]', STAGE2),
    # probe: stage 3 learns the offsets from the ground truth to the region (encode_boxes' arguments swapped)
    ('P4-TR5', ['rcnn.py'], 'bbox["gt"][sel].double(), bbox["rois"][sel].double()), cfg.bbox_lambda)',
     'bbox["rois"][sel].double(), bbox["gt"][sel].double()), cfg.bbox_lambda)', STAGE2),
    # whitening without rcnn_train_bbox_regressor's + 0.001
    ('P4-FB1', ['rcnn.py'], 'T = V @ torch.diag(1 / torch.sqrt(d.clamp(min=0) + 0.001)) @ V.T',
     'T = V @ torch.diag(1 / torch.sqrt(d.clamp(min=0))) @ V.T', ['-k', 'ridge_regression']),
    # probe: test-time SVM scores on unscaled fc7 (the SVMs were trained on features x feature_scale)
    ('P4-SC1', ['rcnn.py'], 'return fc7 * self.feature_scale[1] @ self.svm_weight.T + self.svm_bias',
     'return fc7 @ self.svm_weight.T + self.svm_bias',
     ['-k', 'scores_with_softmax or rcnn_run_fits or hard_negative or (eval_predict_show_targets and rcnn and not '
            'fast_rcnn and not faster_rcnn)']),
    # probe: Caffe's blobs_lr 2 for biases dropped (the x10 / x20 of the new classifier becomes x10 / x10)
    ('P4-CP1', ['rcnn.py'], '"lr": lr * (10 if new else 1) * (2 if bias else 1),', '"lr": lr * (10 if new else 1),',
     ['-k', '(resume_takes or overfits or bf16) and rcnn and not fast_rcnn and not faster_rcnn']),
    # probe: --show-targets draws every sampled background region, not as many as foreground
    ('P4-DRR', ['rcnn.py'], 'return (rois[labels == 0][:int((labels > 0).sum())], rois[labels > 0],',
     'return (rois[labels == 0], rois[labels > 0],', ['-k', 'show_targets and rcnn and not fast_rcnn and not faster_rcnn']),

    # --- fast_rcnn.py ---
    # no foreground fraction: up to all 64 RoIs foreground
    ('P4-FS1', ['fast_rcnn.py'], 'clamp(max=round(cfg.fg_fraction * cfg.rois_per_image))', 'clamp(max=cfg.rois_per_image)',
     FAST_SAMPLER),
    # the ground-truth boxes are not candidates (where proposals miss an object, no foreground)
    ('P4-FS2', ['fast_rcnn.py'], 'valid = torch.cat([gt_valid, proposal_valid], dim=1)  # [B, P]',
     'valid = torch.cat([torch.zeros_like(gt_valid), proposal_valid], dim=1)  # [B, P]', FAST_SAMPLER),
    # probe: random_subset takes one candidate too many in every image whose count is below the batch's largest
    # (and may then take a non-candidate); the sampler test's three images all have 16 / 48
    ('P4-FS3', ['fast_rcnn.py'], 'chosen = torch.arange(k, device=mask.device)[None] < counts[:, None]  # [B, k]',
     'chosen = torch.arange(k, device=mask.device)[None] <= counts[:, None]  # [B, k]',
     ['-k', 'fast_rcnn and (sampler or overfits or empty_and)']),
    # the streaming std without - E[t]^2 (a root mean square, not a standard deviation)
    ('P4-BT1', ['fast_rcnn.py'], 'stds = (squares / counts.clamp(min=1)[:, None] - means**2).clamp(min=0).sqrt()',
     'stds = (squares / counts.clamp(min=1)[:, None]).clamp(min=0).sqrt()', ['-k', 'box_targets_and_normalisation']),
    # probe: training targets multiplied by the std instead of divided (deltas() still undoes a division)
    ('P4-NT1', ['fast_rcnn.py'], '/ self.box_predictor.bbox_stds[labels])', '* self.box_predictor.bbox_stds[labels])',
     ['-k', 'fast_rcnn and (overfits or box_targets or checkpoint_folds or fine_tuning or empty_and)']),
    # the folded bias forgets to scale by the std
    ('P4-FO1', ['fast_rcnn.py'], '(b.detach().double() * std + mean).to(b.dtype)', '(b.detach().double() + mean).to(b.dtype)',
     ['-k', 'checkpoint_folds']),
    # the truncated-SVD cache ignores the ranks asked: another --svd-fc6 gets the old factorisation
    ('P4-SVD1', ['fast_rcnn.py'],
     'key = (head.fc6.weight._version, head.fc7.weight._version, head.fc6.weight.data_ptr(), cfg.svd_fc6, cfg.svd_fc7)',
     'key = (head.fc6.weight._version, head.fc7.weight._version, head.fc6.weight.data_ptr())', ['-k', 'truncated_svd']),
    # the reference's clip to W - 1, H - 1 on our continuous coordinates
    ('P4-DC1', ['fast_rcnn.py'], 'boxes_i = clip_boxes_to_image(boxes_i[:, 1:].reshape(-1, 4), size)',
     'boxes_i = clip_boxes_to_image(boxes_i[:, 1:].reshape(-1, 4), (size[0] - 1, size[1] - 1))',
     ['-k', 'decoding_clipping']),
    # probe: one NMS over all classes instead of per class (the decoding tests have one class, or check boxes only)
    ('P4-NM1', ['fast_rcnn.py'],
     'keep = keep[batched_nms(boxes_i[keep], scores_i[keep], labels_i[keep], cfg.nms_thresh)]',
     'keep = keep[torchvision.ops.nms(boxes_i[keep], scores_i[keep], cfg.nms_thresh)]',
     ['-k', 'fast_rcnn and (decoding or caps_each or checkpoint_folds or truncated_svd or overfits)']),
    # probe: the box loss divided by the foreground RoIs instead of all S RoIs (train.prototxt's normalisation)
    ('P4-LS1', ['fast_rcnn.py'], '"loss_box_reg": box_loss / num_rois}', '"loss_box_reg": box_loss / max(1, len(pos))}',
     ['-k', 'fast_rcnn and (losses or empty_and or overfits or bf16)']),

    # --- ssd.py, yolo.py, detr.py: augmentation ---
    # SSD's IoU crop without SanitizeBoundingBoxes: boxes cropped to nothing stay
    ('P4-SA1', ['ssd.py'], '        v2.SanitizeBoundingBoxes(labels_getter=data.per_box_fields)]))', '        ]))',
     ['-k', 'ssd_augmentation or (training_transforms_pickle and ssd)']),
    # probe: box_candidates' area ratio (> 10 % of the box left) dropped
    ('P4-YA1', ['yolo.py'], 'keep = (w > 2) & (h > 2) & (w * h / (area + 1e-16) > 0.1) & (',
     'keep = (w > 2) & (h > 2) & (', YOLO_AUG),
    # close_mosaic one epoch late: the mosaic goes on into the first closed epoch
    ('P4-YA2', ['yolo.py'], 'self.epoch < cfg.epochs - cfg.close_mosaic', 'self.epoch <= cfg.epochs - cfg.close_mosaic',
     ['-k', 'yolo_mosaic']),
    # probe: hue shifted by the gain instead of multiplied (v7.0: lut_hue = x * r[0] % 180)
    ('P4-YA3', ['yolo.py'], 'hue, saturation, value = hue * r[0] % 1,', 'hue, saturation, value = (hue + r[0]) % 1,',
     YOLO_AUG),
    # AutoAnchor's evolution keeps the mutations that lower the fitness
    ('P4-AA1', ['yolo.py'], 'if (f_candidate := fitness(candidate)) > f:', 'if (f_candidate := fitness(candidate)) < f:',
     ['-k', 'autoanchor_keeps']),
    # DETR's multi-scale resize never draws the largest of train_min_sizes
    ('P4-DR1', ['detr.py'], 'size = sizes[int(torch.randint(len(sizes), ()))] if len(sizes) > 1 else sizes[0]',
     'size = sizes[int(torch.randint(len(sizes) - 1, ()))] if len(sizes) > 1 else sizes[0]',
     ['-k', 'detr and preprocess_pads']),
    # probe: RandomSizeCrop's top drawn from the width's range and left from the height's (the test's crops are of
    # square images)
    ('P4-DA1', ['detr.py'], 'top, left = int(torch.randint(H - h + 1, ())), int(torch.randint(W - w + 1, ()))',
     'top, left = int(torch.randint(W - w + 1, ())), int(torch.randint(H - h + 1, ()))',
     ['-k', 'detr_augmentation or (training_transforms_pickle and detr)']),

    # --- --show-targets drawings (probes: the tests check only that the pictures are written and reproducible) ---
    # SSD's matched default boxes drawn in the 300-px batch's coordinates, not the image's
    ('P4-DRS', ['ssd.py'], 'boxes = resize_boxes(anchors[positive], batch.shape[-2:], image.shape[-2:])',
     'boxes = anchors[positive]', ['-k', 'eval_predict_show_targets and ssd']),
    # YOLO's cells and anchors drawn without taking the letterbox's offset off (tiny runs: square, no offset)
    ('P4-DRY', ['yolo.py'], 'drawn = draw_boxes(drawn, (boxes - frame) / r, color=colour, width=1)',
     'drawn = draw_boxes(drawn, boxes / r, color=colour, width=1)', ['-k', 'eval_predict_show_targets and yolo']),

    # --- bench.py compare ---
    # the dataset table shows the last evaluation, not the best one (what best.pt holds)
    ('P4-BC1', ['bench.py'], 'best = max(evals, key=lambda r: r["AP"], default=None)', 'best = evals[-1] if evals else None',
     ['-k', 'compare_reads or compare_cpu']),
    # training img/s: each epoch's first window (loader start, evaluation) no longer left out of the median
    ('P4-BC2', ['bench.py'], 'speeds = [r["img_s"] for r in steps_record if not r["step"].startswith(f"{log_every}/")]',
     'speeds = [r["img_s"] for r in steps_record]', ['-k', 'compare_reads or compare_cpu']),
    # the CPU table's runs ordered by folder name instead of by their start
    ('P4-BC3', ['bench.py'], 'key=lambda rs: rs[1]["start"])', 'key=lambda rs: rs[1]["path"])',
     ['-k', 'compare_reads or compare_cpu']),
]
