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
