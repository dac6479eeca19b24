"""Self-supervised pretraining runner: data stream + pretext task + the shared engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from siamese_detr.config import ConfigError, RunConfig
from siamese_detr.configio import to_dict
from siamese_detr.engine.distributed import DistInfo
from siamese_detr.engine.logging import get_logger


def build_pretrain_dataset(cfg: RunConfig) -> Any:
    """Unlabeled images + their offline proposals -> a data set of two-view samples."""
    from siamese_detr.data.pretrain import PretrainDataset
    from siamese_detr.data.sources import list_images
    from siamese_detr.proposals.store import ProposalStore

    pre = cfg.pretrain
    if not pre.images:
        raise ConfigError("pretrain.images is empty: give an image folder, list file or COCO "
                          "json, e.g. pretrain.images=data/imagenet/train")
    records = list_images(pre.images)
    if pre.method == "detreg":
        from siamese_detr.methods.detreg.data import build_detreg_dataset

        return build_detreg_dataset(cfg, records)
    store = None
    if pre.siamese.box_source == "proposals":
        if not pre.proposals.store:
            raise ConfigError("pretrain.proposals.store is empty: run `siamese-detr proposals "
                              "run IMAGES --out STORE` first, or set "
                              "pretrain.siamese.box_source=random")
        if not Path(pre.proposals.store).is_dir():
            raise ConfigError(f"proposal store {pre.proposals.store} does not exist: run "
                              f"`siamese-detr proposals run {pre.images} --out "
                              f"{pre.proposals.store}`")
        store = ProposalStore.open(pre.proposals.store)
    return PretrainDataset(records, store, pre.siamese, cfg.seed, pre.proposals)


def collate_for(method: str) -> Any:
    """The batch collation of a pretext task's data set."""
    if method == "detreg":
        from siamese_detr.methods.detreg.data import collate_detreg

        return collate_detreg
    from siamese_detr.data.pretrain import collate_siamese

    return collate_siamese


def build_task(cfg: RunConfig) -> nn.Module:
    match cfg.pretrain.method:
        case "siamese":
            from siamese_detr.methods.siamese.task import build_siamese_task

            return build_siamese_task(cfg)
        case "detreg":
            from siamese_detr.methods.detreg.task import build_detreg_task

            return build_detreg_task(cfg)
        case "updetr":
            raise ConfigError(f"pretrain.method={cfg.pretrain.method} is not implemented yet; "
                              "use pretrain.method=siamese")
        case _:
            raise ConfigError(f"unknown pretrain.method={cfg.pretrain.method}")


def run_pretrain(cfg: RunConfig, dist_info: DistInfo, resume_path: str | None = None
                 ) -> dict[str, float]:
    from siamese_detr.data.loaders import build_detection_loader
    from siamese_detr.engine.loop import train
    from siamese_detr.engine.setup import prepare_training

    log = get_logger()
    run_dir = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    dataset = build_pretrain_dataset(cfg)
    task = build_task(cfg).to(dist_info.device)
    prep = prepare_training(task, cfg, dist_info, len(dataset), cfg.pretrain.batch_size,
                            resume_path, sync_bn=True)  # SyncBN in the global projector
    log.info("pretraining %s/%s: %d images, %d iterations (lr drops at %s), global batch %d",
             cfg.pretrain.method, cfg.model.variant, len(dataset), prep.schedule.total_steps,
             list(prep.schedule.lr_drops), prep.global_batch)

    def batches(position: int) -> Iterator[Any]:
        return build_detection_loader(dataset, cfg.pretrain.batch_size,
                                      cfg.pretrain.num_workers, cfg.seed, start_step=position,
                                      collate_fn=collate_for(cfg.pretrain.method))

    result = train(
        task=prep.model, batches=batches, optimizer=prep.optimizer, schedule=prep.schedule,
        engine=cfg.engine, run_dir=run_dir, dist_info=dist_info,
        checkpoint_meta={"kind": "pretrain", "config": to_dict(cfg)},
        start=prep.start, scaler=prep.scaler,
    )
    return result.last_metrics
