# Pass 5: 56 bugs where passes 1-4 did not go: the template's Main section and helpers (load_weights, load_state,
# make_config's precedence and paths, main()'s modes, the signal handler, the stop all-reduce, last.pt's contents);
# the model files' weight conversion (torchvision key names, YOLOv5 v7.0 and official DETR state dicts) and their
# make_optimizer (parameter groups, lr scaling by processes and --accumulate, warmup, weight decay); common.py's
# pad_targets, resize_boxes, clip_boxes_to_image, remove_small_boxes, check_images; data.py's predict, evaluate's
# output file and class names, load_checkpoint, check_out_folder, restores_signals, seed_everything, resume_state,
# _coco_dict, warn_counts, the loaders' less common paths, SyntheticShapes' empty images.
# "T": the same replacement in all eight model files (the part after "# TRY NOT TO MODIFY:"), so that the
# identical-template test does not catch it for free.
# Ids marked "probe" in the comments are bugs that the current tests may well not see (no test looks at that
# behaviour, or the test's data makes the bug invisible, e.g. one process, square images): they measure gaps.
# No selection includes test_compare_table_is_the_records (it counts README lines, a bug's line count is no finding).

FT = ['-k', 'fine_tune_from_weights_of_other_classes and fcos']
INTERRUPT = ['-k', 'interrupt_saves and fcos']

MUTANTS = [
    # ===================== the template (all eight model files): Main and helpers =====================
    # --- load_weights ---
    # another detector's checkpoint: the message names its class, not the file to use ("use FCOS", not "use fcos.py")
    ('P5-LW1', 'T', "checkpoint: use {checkpoint['file']}\")", "checkpoint: use {checkpoint['detector']}\")",
     ['-k', 'checkpoint_of_another_detector and fcos']),
    # the flag is not passed on: --resume's unreadable files are named "--weights ..." and a bare state dict given to
    # --resume is read as a reference's weights instead of "not last.pt of a run"
    ('P5-LW2', 'T', 'checkpoint = data.load_checkpoint(weights, flag)  # None:',
     'checkpoint = data.load_checkpoint(weights)  # None:', ['-k', 'unreadable_checkpoints and fcos']),

    # --- load_state ---
    # fine-tuning: the class layers of another class count (left out of loading) are reported missing: it stops
    ('P5-LS1', 'T', '[f"missing {k}" for k in missing if k not in other]', '[f"missing {k}" for k in missing]',
     ['-k', 'load_state_says_what_does_not_fit and fcos']),
    # fine_tune on by default: --eval / --predict load weights of another class count silently, heads left random
    ('P5-LS2', 'T', 'source: str, fine_tune: bool = False):', 'source: str, fine_tune: bool = True):',
     ['-k', 'load_state_says_what_does_not_fit and fcos']),

    # --- train(): fine-tuning, best.pt, resume, last.pt ---
    # K is not taken from the data: fine-tuning the 7-class shapes weights on BCCD (4) keeps a 7-class head
    ('P5-NC1', 'T', 'cfg = dataclasses.replace(cfg, num_classes=train_set.num_classes)',
     'cfg = dataclasses.replace(cfg, num_classes=cfg.num_classes)', FT),
    # theirs and ours swapped: numbers as names (a reference's state dict) now warn, and the message names the wrong side
    ('P5-FT1', 'T', 'data.warn_other_classes(class_names, train_set.class_names, f"--weights {cfg.weights}")',
     'data.warn_other_classes(train_set.class_names, class_names, f"--weights {cfg.weights}")',
     ['-k', 'fine_tuning_on_other_classes_of_the_same_count']),
    # the best AP starts at 0, not -inf: a run whose AP is -1 (no validation boxes) never writes best.pt
    ('P5-BEST1', 'T', 'epoch, step, best = 0, 0, {"AP": -math.inf}', 'epoch, step, best = 0, 0, {"AP": 0.0}',
     ['-k', 'best_pt_goes_to_the_later']),
    # --resume of an EMA run loads the EMA weights into the raw model too (the raw weights are lost)
    ('P5-RES1', 'T', 'raw_model.load_state_dict(resume["raw_model"] or resume["model"])',
     'raw_model.load_state_dict(resume["model"])', ['-k', 'keeps_its_best_evaluates']),
    # last.pt without its steps per epoch: a resume on other data (--num-train) is no longer refused
    ('P5-SAVE2', 'T', '"world_size": world_size, "steps": steps,', '"world_size": world_size,',
     ['-k', 'a_stop_during_an_evaluation']),

    # --- on_signal and the stop's all-reduce ---
    # "stopping after this step" said at every signal (SLURM's SIGTERM then torchrun's: twice)
    ('P5-SIG1', 'T', 'main_process and not stop and os.write(', 'main_process and os.write(', INTERRUPT),
    # after the first signal, Ctrl-C is handled again by on_signal instead of stopping at once
    ('P5-SIG2', 'T', 'stop.append(signal.signal(signal.SIGINT, handlers[signal.SIGINT]))',
     'stop.append(signal.signal(signal.SIGINT, on_signal))', INTERRUPT),
    # probe: the stop asked during rank 0's evaluation is not all-reduced (the other ranks neither wait for the
    # checkpoint nor stop with it); the DDP tests signal every rank mid-epoch, where the loss all-reduce decides
    ('P5-ASK1', 'T', 'ddp and dist.all_reduce(asked)  #', 'pass  #', ['-k', 'ddp_two_processes and yolo']),

    # --- make_config ---
    # precedence: the checkpoint's config no longer outranks the preset (the machine's cpu preset wins over --weights')
    ('P5-MC1', 'T', 'if k in fields and not (moved and k.endswith(("_ann", "_proposals"))):',
     'if k in fields and k not in values and not (moved and k.endswith(("_ann", "_proposals"))):',
     ['-k', 'preset_named_for_training']),
    # --data-root kept relative: --eval / --resume of the checkpoint from another folder reads another root
    ('P5-MC3', 'T', 'for k in ("data_root", "out"):  # absolute', 'for k in ("out",):  # absolute',
     ['-k', 'command_line_fields and fcos']),

    # --- main() ---
    # --resume: the run's folder is the one its config names, not where last.pt now is (a moved run is refused)
    ('P5-MN1', 'T', 'saved = {**load_weights(path := given["resume"], "--resume")[2], "out": os.path.dirname(os.path.abspath(path))}',
     'saved = load_weights(path := given["resume"], "--resume")[2]', INTERRUPT),
    # probe: --weights of a run that was itself resumed carries its "resume" over: fine-tuning resumes that run; the
    # tests fine-tune from runs never resumed
    ('P5-MN2', 'T', 'drop = ("device", "workers", "out", "resume", "weights")', 'drop = ("device", "workers", "out", "weights")',
     ['-k', '(fine_tune_from_weights_of_other_classes or fine_tuning_on_other_classes_of_the_same_count) and fcos']),
    # frozen_bn dropped from the checkpoint's config for --eval instead of for --train: fine-tuning keeps the
    # scratch run's trainable batch norm, --eval builds frozen batch norm for it
    ('P5-MN3', 'T', '+ (("frozen_bn",) if args.train else ())', '+ (("frozen_bn",) if not args.train else ())', FT),
    # the machine's preset also under --eval / --predict with weights (their model gets the cpu preset's settings)
    ('P5-MN4', 'T', 'cfg = make_config(given, saved, args.preset if args.train or saved is None else "none")',
     'cfg = make_config(given, saved, args.preset)', ['-k', 'torchvision_state_dict_file and fcos']),
    # --show-targets: the random weights not seeded: two runs draw other proposals / matchings
    ('P5-ST1', 'T', 'data.seed_everything(cfg.seed)  # the random weights: the same pictures every time',
     'pass  # the random weights: the same pictures every time',
     ['-k', 'eval_predict_show_targets and (faster_rcnn or detr)']),
    # --eval without the model's class names: no mapping by name onto the data's classes (and no warning)
    ('P5-EV1', 'T', 'stats = data.evaluate(model, val_set, cfg.batch_size, cfg.workers, device, class_names, cfg.out)',
     'stats = data.evaluate(model, val_set, cfg.batch_size, cfg.workers, device, None, cfg.out)',
     ['-k', 'eval_needs_only_the_val_split and fcos']),

    # ===================== the model files: weight conversion =====================
    # torchvision's newer RPN conv key (rpn.head.conv.0.0.) not mapped
    ('P5-CV1', ['faster_rcnn.py'],
     'key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.").replace("rpn.head.", "rpn_head.")',
     'key = key.replace("rpn.head.", "rpn_head.")', ['-k', 'convert_torchvision_round_trip and faster_rcnn']),
    # RetinaNet's head convs conv.{i}.0 mapped to conv.{i} instead of conv.{2i} (conv, ReLU, conv, ...)
    ('P5-CV2', ['retinanet.py'], 'lambda m: f"{m[1]}.{2 * int(m[2])}."', 'lambda m: f"{m[1]}.{int(m[2])}."',
     ['-k', 'convert_torchvision_round_trip and retinanet']),
    # YOLOv5's anchors scaled by the stride of the anchor's index instead of its level's
    ('P5-YC1', ['yolo.py'], 'value = value * value.new_tensor(STRIDES)[:, None, None]',
     'value = value * value.new_tensor(STRIDES)[None, :, None]', ['-k', 'yolo_v7_state_dict or yolo_equals_yolov5_v7_stored']),
    # a v7.0 state dict of K classes named 1..K-1: one class short
    ('P5-YC2', ['yolo.py'], 'coco if K == 80 else map(str, range(1, K + 1))', 'coco if K == 80 else map(str, range(1, K))',
     ['-k', 'yolo_v7_state_dict']),
    # DETR's backbone depth counted from the wrong key field (the layer name, not the block index): always resnet50
    ('P5-DC1', ['detr.py'], 'blocks = [len({k.split(".")[3] for k in state_dict if k.startswith(f"backbone.body.layer{i}.")})',
     'blocks = [len({k.split(".")[2] for k in state_dict if k.startswith(f"backbone.body.layer{i}.")})',
     ['-k', 'detr_official_checkpoint_files or detr_published_weights']),
    # an official run's --nheads not read from its args (the weights do not say it)
    ('P5-DC2', ['detr.py'], 'for k in ("nheads", "dilation", "dropout", "aux_loss") if k in args}',
     'for k in ("dilation", "dropout", "aux_loss") if k in args}', ['-k', 'detr_official_checkpoint_files']),

    # ===================== the model files: make_optimizer =====================
    # probe: the lr no longer scales with the processes (torchrun's global batch); every test runs make_optimizer
    # with world_size 1, and the DDP test compares a resumed run with a straight one of the same world size
    ('P5-OPT1', ['faster_rcnn.py'], 'images = cfg.batch_size * world_size * (cfg.accumulate if cfg.optimizer == "adamw" else 1)',
     'images = cfg.batch_size * (cfg.accumulate if cfg.optimizer == "adamw" else 1)',
     ['-k', 'faster_rcnn and (lr_scales or warmup_longer or resume_takes or train_writes_run_folder)']),
    # the linear warmup one step ahead: full lr a step early
    ('P5-OPT2', ['retinanet.py'], '(1 - cfg.warmup_factor) * step / warmup if step < warmup',
     '(1 - cfg.warmup_factor) * (step + 1) / warmup if step < warmup', ['-k', 'warmup_longer and retinanet']),
    # DETR's AdamW without the configured weight decay (torch's 1e-2 instead of 1e-4)
    ('P5-OPT4', ['detr.py'], '"lr": cfg.lr_backbone}], cfg.lr, weight_decay=cfg.weight_decay)',
     '"lr": cfg.lr_backbone}], cfg.lr)', ['-k', 'detr_optimizer']),
    # Fast R-CNN's biases decayed (decay_mult 0 lost)
    ('P5-OPT5', ['fast_rcnn.py'], '"lr": lr * (2 if bias else 1), "weight_decay": 0.0 if bias else weight_decay}',
     '"lr": lr * (2 if bias else 1), "weight_decay": weight_decay}', ['-k', 'caffe_parameter_groups']),
    # probe: R-CNN's parameter groups at the unscaled lr while the optimizer's default is scaled by the processes
    ('P5-OPT6', ['rcnn.py'], 'params, lr = caffe_param_groups(model, cfg.lr * world_size, cfg.weight_decay), cfg.lr * world_size',
     'params, lr = caffe_param_groups(model, cfg.lr, cfg.weight_decay), cfg.lr * world_size',
     ['-k', 'caffe_parameter_groups or ((resume_takes or train_writes_run_folder) and rcnn and not fast_rcnn and not faster_rcnn)']),
    # YOLOv5's weight decay not scaled by --accumulate (images per optimizer step / 64)
    ('P5-YOPT1', ['yolo.py'], 'decay = cfg.weight_decay * cfg.batch_size * world_size * cfg.accumulate / 64',
     'decay = cfg.weight_decay * cfg.batch_size * world_size / 64', ['-k', 'yolo_optimizer_and_schedule or yolo_adam']),
    # probe: YOLOv5's warmup without its floor of warmup_iters steps (the tests' 5 x 40 steps warm up for 3 epochs =
    # 120 > 100 steps either way; the tiny runs rebuild the schedule with the same code)
    ('P5-YS1', ['yolo.py'], 'self.warmup = max(round(cfg.warmup_epochs * steps_per_epoch), cfg.warmup_iters, 1)',
     'self.warmup = max(round(cfg.warmup_epochs * steps_per_epoch), 1)',
     ['-k', 'yolo_optimizer_and_schedule or yolo_adam or (train_writes_run_folder and yolo)']),

    # ===================== common.py =====================
    # pad_targets: a batch of empty images pads to 0 boxes, not 1: the assignment's max over no box fails
    ('P5-PT1', ['common.py'], 'M = max([1] + [len(t["boxes"]) for t in targets])',
     'M = max([0] + [len(t["boxes"]) for t in targets])', ['-k', 'empty_and_degenerate and (retinanet or ssd)']),
    # resize_boxes: x scaled by the height's ratio and y by the width's (SSD's 300x300 squash of non-square images)
    ('P5-RB1', ['common.py'], 'return boxes * ratios[[1, 0, 1, 0]]', 'return boxes * ratios[[0, 1, 0, 1]]',
     ['-k', 'detections_match_torchvision and ssd']),
    # clip_boxes_to_image: size read as (width, height)
    ('P5-CB1', ['common.py'], '    height, width = size\n', '    width, height = size\n', ['-k', 'area_clip_remove_small']),
    # remove_small_boxes: width OR height large enough
    ('P5-RMS1', ['common.py'], 'torch.where((ws >= min_size) & (hs >= min_size))[0]',
     'torch.where((ws >= min_size) | (hs >= min_size))[0]', ['-k', 'area_clip_remove_small']),
    # check_images: integer images (uint8, values up to 255) no longer refused
    ('P5-CI1', ['common.py'], 'if not isinstance(image, Tensor) or not image.is_floating_point() or image.dim() != 3',
     'if not isinstance(image, Tensor) or image.dim() != 3', ['-k', 'model_input_contract and (fcos or yolo)']),

    # ===================== data.py =====================
    # --- predict: predictions.json ---
    # the class name of label k taken at k - 1 (as if class_names had no background)
    ('P5-PR2', ['data.py'], '"class": class_names[label] if 0 <= label < len(class_names) else str(label)}',
     '"class": class_names[label - 1] if 0 < label <= len(class_names) else str(label)}',
     ['-k', 'eval_predict_show_targets and (detr or fcos)']),

    # --- evaluate: detections.json, ground_truth.json, class names ---
    # the json's category id of label k taken at k instead of k - 1
    ('P5-EV2', ['data.py'], '"category_id": cat_ids[r["category_id"] - 1]}', '"category_id": cat_ids[r["category_id"]]}',
     ['-k', 'writes_coco_results']),
    # ground_truth.json written beside a COCO json's detections (whose ground truth is the json) and not for VOC or
    # synthetic data
    ('P5-EV3', ['data.py'], 'if not isinstance(dataset, CocoDetection):', 'if isinstance(dataset, CocoDetection):',
     ['-k', 'writes_coco_results or (eval_predict_show_targets and fcos)']),
    # numbers as names (a reference's state dict) mapped by name: nothing matches, every detection dropped
    ('P5-EV4', ['data.py'], 'tuple(class_names) != tuple(dataset.class_names) and not unnamed:',
     'tuple(class_names) != tuple(dataset.class_names):', ['-k', 'evaluate_takes_numbers or writes_coco_results']),

    # --- load_checkpoint, check_out_folder, restores_signals ---
    # a folder given as --weights: torch's error ("not a whole file of torch.save") instead of "not a checkpoint"
    ('P5-LC1', ['data.py'], 'except (FileNotFoundError, IsADirectoryError, pickle.UnpicklingError, KeyError):',
     'except (FileNotFoundError, pickle.UnpicklingError, KeyError):', ['-k', 'weights_of_something_else and fcos']),
    # any --resume may write into another run's folder (its last.pt replaced)
    ('P5-CO1', ['data.py'],
     'if os.path.isfile(last) and not (resume and os.path.realpath(os.path.dirname(resume)) == os.path.realpath(out)):',
     'if os.path.isfile(last) and not resume:', ['-k', 'a_stop_during_an_evaluation']),
    # SIGTERM's handler not set back when train() returns or stops
    ('P5-RS2', ['data.py'], 'handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}',
     'handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT,)}', INTERRUPT),

    # --- seed_everything ---
    # keys not prefixed by their count: (s, 0, 0) and (s, 0, 0, 0) seed alike (SeedSequence pads with zeros)
    ('P5-SE1', ['data.py'], 'np.random.SeedSequence((len(keys), *keys))', 'np.random.SeedSequence(keys)',
     ['-k', 'seeds_of_different_keys']),
    # Python's random not seeded: YOLOv5's augmentation (scale, translation, HSV, flip, mosaic) is not a function of
    # (seed, epoch, image): a resumed run differs from a straight one
    ('P5-SE2', ['data.py'], '    random.seed(seed)\n    np.random.seed(seed)\n', '    np.random.seed(seed)\n',
     ['-k', 'keeps_its_best_evaluates or (interrupt_saves and yolo)']),

    # --- resume_state ---
    # the run's saved group settings outrank this run's (--lr / --weight-decay given with --resume ignored)
    ('P5-RST1', ['data.py'], '[{**saved, **{k: v for k, v in group.items() if k != "params"}}',
     '[{**{k: v for k, v in group.items() if k != "params"}, **saved}', ['-k', 'resume_takes_the_runs_state and fcos']),
    # probe: a LambdaLR's lr at the resumed step without its factor (warmup, lr steps): only the first step after a
    # resume is off; the tests resume after warmup (1 step) and before any lr step
    ('P5-RST3', ['data.py'], 'group["lr"] = base_lr * lr_lambda(obj.last_epoch)', 'group["lr"] = base_lr',
     ['-k', 'resume_takes_the_runs_state or a_new_lr_given_with_resume or (interrupt_saves and fcos)']),

    # --- _coco_dict, warn_counts ---
    # the background is a category of the ground truth (per-class and VOC per-class results name it)
    ('P5-CD1', ['data.py'], 'for k, name in enumerate(class_names) if k > 0]', 'for k, name in enumerate(class_names) if k >= 0]',
     ['-k', 'voc_evaluation_adds or (eval_predict_show_targets and fcos)']),
    # annotation ids from 0: the first ground-truth box can never be matched (0 means "no match")
    ('P5-CD2', ['data.py'], 'ann = {"id": len(annotations) + 1,', 'ann = {"id": len(annotations),',
     ['-k', 'evaluate_takes_numbers or voc_evaluation_adds']),
    # "..." after the first 3 ids already when there are exactly 3
    ('P5-WC1', ['data.py'], "{', ...' if len(ids) > 3 else ''}", "{', ...' if len(ids) > 2 else ''}",
     ['-k', 'noise_one_counted_warning']),

    # --- loaders' less common paths ---
    # VOC class names from the xml files of Annotations/ only, not of its subfolders: splits of ids "sub/d" disagree
    ('P5-VOC1', ['data.py'],
     'paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(ann_dir) for name in names)',
     'paths = sorted(os.path.join(ann_dir, name) for name in os.listdir(ann_dir))',
     ['-k', 'voc_ids_in_subfolders or voc_bccd or voc_and_coco_layouts']),
    # probe: a COCO json without "annotations" (COCO's test-dev image lists) fails with a KeyError
    ('P5-CO2', ['data.py'], 'annotations = data.get("annotations", [])  #', 'annotations = data["annotations"]  #',
     ['-k', 'coco_bccd or corrupt_json or coco_layouts or test_build_datasets or coco_area_and_image']),
    # probe: --predict on a folder skips .JPG / .PNG (upper-case extensions, as cameras write them)
    ('P5-IF1', ['data.py'], 'if f.lower().endswith(kinds) and f[0] != "."', 'if f.endswith(kinds) and f[0] != "."',
     ['-k', 'predict_folder_skips or predict_inputs_skip or command_line_refuses']),

    # --- SyntheticShapes ---
    # every image gets at least one shape: no empty images (negatives) unless every shape is rejected
    ('P5-SY1', ['data.py'], 'for _ in range(rng.integers(0, self.max_objects + 1)):',
     'for _ in range(rng.integers(1, self.max_objects + 1)):', ['-k', 'test_synthetic']),
]
