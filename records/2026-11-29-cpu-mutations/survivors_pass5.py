# Pass 5's 8 survivors (missed by the suite before this folder's commit of them) with the tests that now catch them
MUTANTS = [
    ('P5-ASK1', 'T', 'ddp and dist.all_reduce(asked)  #', 'pass  #', ['-k', 'stop_while_rank_0_evaluates']),
    ('P5-MN2', 'T', 'drop = ("device", "workers", "out", "resume", "weights")', 'drop = ("device", "workers", "out", "weights")', ['-k', 'weights_of_a_resumed_run']),
    ('P5-OPT1', ['faster_rcnn.py'], 'images = cfg.batch_size * world_size * (cfg.accumulate if cfg.optimizer == "adamw" else 1)', 'images = cfg.batch_size * (cfg.accumulate if cfg.optimizer == "adamw" else 1)', ['-k', 'lr_follows_the_global_batch']),
    ('P5-OPT6', ['rcnn.py'], 'params, lr = caffe_param_groups(model, cfg.lr * world_size, cfg.weight_decay), cfg.lr * world_size', 'params, lr = caffe_param_groups(model, cfg.lr, cfg.weight_decay), cfg.lr * world_size', ['-k', 'lr_follows_the_global_batch']),
    ('P5-YS1', ['yolo.py'], 'self.warmup = max(round(cfg.warmup_epochs * steps_per_epoch), cfg.warmup_iters, 1)', 'self.warmup = max(round(cfg.warmup_epochs * steps_per_epoch), 1)', ['-k', 'yolo_optimizer_and_schedule']),
    ('P5-RST3', ['data.py'], 'group["lr"] = base_lr * lr_lambda(obj.last_epoch)', 'group["lr"] = base_lr', ['-k', 'resume_state_sets_the_lr']),
    ('P5-CO2', ['data.py'], 'annotations = data.get("annotations", [])  #', 'annotations = data["annotations"]  #', ['-k', 'coco_json_of_images_only']),
    ('P5-IF1', ['data.py'], 'if f.lower().endswith(kinds) and f[0] != "."', 'if f.endswith(kinds) and f[0] != "."', ['-k', 'predict_folder_skips']),
]
