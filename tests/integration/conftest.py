import pytest
import torch

from siamese_detr.demo.synthetic import make_detection_set, make_unlabeled_set


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    det = make_detection_set(root / "det", n_train=8, n_val=4, image_size=(128, 128), seed=0)
    make_unlabeled_set(root / "unlabeled", n=8, image_size=(128, 128), seed=1)
    from siamese_detr.proposals.generate import generate_proposals

    generate_proposals(root / "unlabeled", root / "proposals", method="edgeboxes", workers=1,
                       chunk_size=4, progress=False)
    torch.manual_seed(0)
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), root / "r18.pth")
    return {"root": root, "det": det}


def finetune_overrides(toy, out, iters=4, variant="conditional"):
    det = toy["det"]
    return [
        "--preset", f"tiny/{variant}/finetune", "--out", str(out),
        f"data.train_images={det.train_images}", f"data.train_ann={det.train_ann}",
        f"data.val_images={det.val_images}", f"data.val_ann={det.val_ann}",
        "data.train_scales=128", "data.val_size=128",
        f"model.backbone.weights={toy['root'] / 'r18.pth'}",
        f"optim.length={iters}", f"optim.lr_drops={iters}", "engine.log_every=1",
        "engine.ckpt_every=2", "engine.progress=false", "engine.keep_checkpoints=0",
    ]


def pretrain_overrides(toy, out, iters=4, variant="conditional"):
    root = toy["root"]
    return [
        "--preset", f"tiny/{variant}/siamese", "--out", str(out),
        f"pretrain.images={root / 'unlabeled'}", f"pretrain.proposals.store={root / 'proposals'}",
        "pretrain.siamese.base_scales=128", "pretrain.batch_size=2",
        f"model.backbone.weights={root / 'r18.pth'}",
        f"optim.length={iters}", f"optim.lr_drops={iters}", "engine.log_every=1",
        "engine.ckpt_every=2", "engine.progress=false", "engine.keep_checkpoints=0",
    ]
