"""Bad input gets a TracInError that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tracin_engine as te


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    ckpts = te.Checkpoints.from_state_dicts([model.state_dict()], [0.1])
    X, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    return model, ckpts, X, y


def test_wrong_checkpoint_keys_are_listed(tiny, tmp_path):
    model, _, X, y = tiny
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 3))
    torch.save(other.state_dict(), tmp_path / "c.pt")
    ckpts = te.Checkpoints.from_files([tmp_path / "c.pt"], learning_rates=[0.1])
    with pytest.raises(te.TracInError, match=r"unexpected keys \['3.bias', '3.weight'\]"):
        te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index((X, y), progress=False)


def test_data_parallel_prefix_is_stripped(tiny, tmp_path):
    model, _, X, y = tiny
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "c.pt")
    ckpts = te.Checkpoints.from_files([tmp_path / "c.pt"], learning_rates=[0.1])
    index = te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index((X, y), progress=False)
    assert index.self_influence().shape == (10,)


def test_learning_rate_count_mismatch(tmp_path, tiny):
    model = tiny[0]
    paths = []
    for i in range(3):
        torch.save(model.state_dict(), tmp_path / f"c{i}.pt")
        paths.append(tmp_path / f"c{i}.pt")
    with pytest.raises(te.TracInError, match="2 learning rates for 3 checkpoints"):
        te.Checkpoints.from_files(paths, learning_rates=[0.1, 0.1])


def test_missing_learning_rate_in_file(tmp_path, tiny):
    torch.save(tiny[0].state_dict(), tmp_path / "c.pt")
    with pytest.raises(te.TracInError, match="stores no learning rate; pass learning_rates"):
        te.Checkpoints.from_files([tmp_path / "c.pt"])


def test_empty_data(tiny):
    model, ckpts, X, y = tiny
    with pytest.raises(te.TracInError, match="empty"):
        te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index((X[:0], y[:0]), progress=False)


def test_labels_out_of_range(tiny):
    model, ckpts, X, y = tiny
    y = y.clone()
    y[4] = 7
    with pytest.raises(te.TracInError, match=r"labels out of range for 3 classes at positions \[4\]"):
        te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index((X, y), progress=False)


def test_labels_of_wrong_dtype(tiny):
    model, ckpts, X, y = tiny
    with pytest.raises(te.TracInError, match="int64 class indices"):
        te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index((X, y.float().unsqueeze(1)), progress=False)


def test_loss_without_one_value_per_example(tiny):
    model, ckpts, X, y = tiny
    bad = lambda out, t: F.cross_entropy(out, t, reduction="none").unsqueeze(1).expand(-1, 2)  # noqa: E731
    with pytest.raises(te.TracInError, match="one value per example"):
        te.TracIn(model, ckpts, loss_fn=bad).index((X, y), progress=False)


def test_non_finite_gradients_name_examples(tiny):
    model, ckpts, X, y = tiny
    X = X.clone()
    X[3, 0] = float("nan")
    X[7, 2] = float("inf")
    with pytest.raises(te.TracInError, match=r"example indices \[3, 7\]"):
        te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index((X, y), batch_size=10, progress=False)


class _Bare(nn.Module):
    """Only a bare parameter: no layer handler covers it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return x @ self.w


def test_hooks_refuse_unsupported_layers(tiny):
    model = _Bare()
    ckpts = te.Checkpoints.from_state_dicts([model.state_dict()], [0.1])
    with pytest.raises(te.TracInError, match="layer handlers.*per_example='vmap'"):
        te.TracIn(model, ckpts, loss_fn=F.cross_entropy, per_example="hooks")
    assert te.TracIn(model, ckpts, loss_fn=F.cross_entropy).featurizer.mode == "vmap"  # auto falls back


def test_unknown_layer_lists_valid_ones(tiny):
    model, ckpts, _, _ = tiny
    with pytest.raises(te.TracInError, match=r"unknown layer name\(s\) \['fc9'\]; valid names are \['0', '2'\]"):
        te.TracIn(model, ckpts, loss_fn=F.cross_entropy, layers=["fc9"])


def test_unlabeled_data_with_loss_target(tiny):
    model, ckpts, X, _ = tiny
    index = te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index((X, torch.zeros(10, dtype=torch.long)),
                                                                    progress=False)
    with pytest.raises(te.TracInError, match="target='prediction'"):
        index.influence((X,))


def test_shuffling_dataloader_is_refused(tiny):
    from torch.utils.data import DataLoader, TensorDataset

    model, ckpts, X, y = tiny
    with pytest.raises(te.TracInError, match="shuffle=False"):
        te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index(
            DataLoader(TensorDataset(X, y), shuffle=True), progress=False)


def test_not_a_checkpoints_object(tiny):
    with pytest.raises(te.TracInError, match="Checkpoints.from_files"):
        te.TracIn(tiny[0], ["a.pt"], loss_fn=F.cross_entropy)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(te.TracInError, match="does not exist"):
        te.Checkpoints.from_files([tmp_path / "nope.pt"], learning_rates=[0.1])


def test_vmap_unfriendly_layer_suggests_loop(tiny):
    class ItemModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) * float(x.sum().item() > 0)  # .item() cannot run under vmap

    model = ItemModel()
    ckpts = te.Checkpoints.from_state_dicts([model.state_dict()], [0.1])
    X, y = tiny[2], tiny[3]
    with pytest.raises(te.TracInError, match="per_example='loop'"):
        te.TracIn(model, ckpts, loss_fn=F.cross_entropy, per_example="vmap").index((X, y), progress=False)
    # ... and the suggested fallback works
    index = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, per_example="loop").index((X, y), progress=False)
    assert torch.isfinite(index.self_influence()).all()


def test_test_examples_of_another_shape(tiny):
    model, ckpts, X, y = tiny
    index = te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index((X, y), progress=False)
    with pytest.raises(te.TracInError, match=r"shape \(3,\) but the training examples had \(4,\)"):
        index.influence((X[:, :3], y))
    with pytest.raises(te.TracInError, match=r"shape \(2, 4\) but the training examples had \(4,\)"):
        index.top_k((X.reshape(5, 2, 4), y[:5]), k=2)
    assert index.influence((X[:2], y[:2])).shape == (2, 10)  # the right shape still works


@pytest.mark.parametrize("projection", [None, "factored"])
def test_integer_inputs_to_a_float_model(tiny, projection):
    model, ckpts, X, y = tiny
    kw = {"proj_dim": 8, "projection": projection} if projection else {}
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, **kw)
    Xu8 = (X.abs() * 40).to(torch.uint8)
    with pytest.raises(te.TracInError, match="inputs are uint8 but the model computes in float32.*X.float"):
        tracin.index((Xu8, y), progress=False)
    index = tracin.index((X, y), progress=False)
    with pytest.raises(te.TracInError, match="inputs are uint8"):
        index.influence((Xu8, y))


def test_cuda_device_without_cuda(tiny):
    model, ckpts, _, _ = tiny
    if not torch.cuda.is_available():
        with pytest.raises(te.TracInError, match="CUDA is not available on this machine.*device='cpu'"):
            te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cuda")
    with pytest.raises(te.TracInError, match="not a device name"):
        te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="gpu")


@pytest.mark.parametrize("k", [2.5, 0, -1, "3", True])
def test_k_must_be_a_positive_integer(tiny, k):
    model, ckpts, X, y = tiny
    index = te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index((X, y), progress=False)
    with pytest.raises(te.TracInError, match="k must be a positive integer"):
        index.top_k((X[:2], y[:2]), k=k)


def test_numpy_k_is_accepted(tiny):
    import numpy as np

    model, ckpts, X, y = tiny
    index = te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index((X, y), progress=False)
    assert index.top_k((X[:2], y[:2]), k=np.int64(3)).proponents.indices.shape == (2, 3)


def test_query_features_of_another_length_than_the_stored_rows_are_refused():
    """A store filled before its TracIn had seen a batch (tracin.dim still provisional: a factored
    projection settles its layout on the first batch) is refused at the query with both lengths, not a
    shape error from inside a matrix product."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    tracin = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [0.1]),
                       loss_fn=F.cross_entropy, proj_dim=64)
    provisional = tracin.dim
    store = te.FeatureStore(5, 1, provisional, torch.float32)
    store.write(0, 0, torch.randn(5, provisional))
    index = te.GradientIndex(tracin, store)
    test = (torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(te.TracInError, match=rf"have {tracin.features(test).shape[-1]} numbers per checkpoint but "
                                             rf"the stored rows have {provisional}"):
        index.top_k(test, k=3)
    assert tracin.dim != provisional
    with pytest.raises(te.TracInError, match="numbers per checkpoint"):
        index.influence(features=torch.zeros(1, 2, provisional + 1))
