import torch

from siamese_detr.engine.profiling import OpCounter


def test_counts_each_kind_of_host_read_once():
    x = torch.randn(4)
    with OpCounter() as c:
        x.tolist()
        x.numpy()
        x[0].item()
        bool(x[1] > 0)
        float(x[2])
        x.cpu()
        x.to("cpu")
        x.to(torch.float64)  # a dtype change is not a host read
    assert c.syncs == 7
    kinds = sorted(k.split("@")[0] for k in c.sync_sites.elements())
    assert kinds == ["cpu", "item", "item", "item", "numpy", "to", "tolist"]


def test_counts_aten_ops_and_nothing_outside():
    x = torch.randn(3, 3)
    x @ x  # outside: not counted
    with OpCounter() as c:
        y = x @ x
        y.add_(1)
    assert c.syncs == 0
    assert c.op_names["mm"] == 1 and c.op_names["add_"] == 1
    assert c.ops == sum(c.op_names.values())


def test_reading_a_host_copy_is_free_and_device_moves_are_not_reads():
    x = torch.randn(4, 3)
    with OpCounter() as c:
        host = x.cpu()  # the one transfer
        host.numpy()
        host[1].tolist()
        float(host[0, 0])
        x.to(torch.device("cpu"))  # a move to the training device (the host in a CPU run)
    assert c.syncs == 1
    assert [k.split("@")[0] for k in c.sync_sites] == ["cpu"]


def test_ops_whose_output_size_depends_on_the_data_count_as_host_reads():
    """On a GPU these read a size (or a bool) back: boolean-mask indexing and assignment,
    nonzero, masked_select, unique, repeat_interleave with tensor repeats, equal. Their static
    cousins do not count. torchvision's GIoU loss is one (boolean-mask assignment), which is
    why the criterion has its own."""
    from torchvision.ops import generalized_box_iou_loss

    x = torch.randn(10)
    mask = x > 0
    reads = [
        lambda: x[mask],
        lambda: x.clone().__setitem__(mask, 1.0),
        lambda: x.nonzero(),
        lambda: x.masked_select(mask),
        lambda: torch.unique(x),
        lambda: torch.repeat_interleave(x, torch.full((10,), 2)),
        lambda: torch.equal(x, x),
    ]
    for i, fn in enumerate(reads):
        with OpCounter() as c:
            fn()
        assert c.syncs == 1, (i, dict(c.sync_sites))
    static = [
        lambda: x[torch.arange(3)],
        lambda: x.repeat_interleave(2),
        lambda: torch.repeat_interleave(x, torch.full((10,), 2), output_size=20),
        lambda: torch.where(mask, x, 0.0),
        lambda: x.masked_fill(mask, 0.0),
    ]
    for i, fn in enumerate(static):
        with OpCounter() as c:
            fn()
        assert c.syncs == 0, (i, dict(c.sync_sites))
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]])
    with OpCounter() as c:
        generalized_box_iou_loss(boxes, boxes.flip(0))
    assert c.syncs >= 1
