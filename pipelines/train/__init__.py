"""Training one stage of the tokenizer on Ray Train: the stage configs (`config`), the driver's
plan (`plan`), the run (`run`: fit or resume, export, finish), the per-worker loop (`worker`),
checkpoints, run folders and bundle export (`state`), and the data feeding it (`data`). The
stages themselves (what trains, its loss, its inputs) are `dualtok_core.training_stages`."""
